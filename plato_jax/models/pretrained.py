"""Loading encoders: a checkpoint directory's config decoded to an architecture, its tensors
read into the Flax model (`from_pretrained`), and converted models saved and loaded."""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from plato_jax.models import parallel, vit
from plato_jax.models.hf import (FP8_DTYPES, Checkpoint, CheckpointError, Source,
                                 dequantize_fp8, tensor)

# model_type → (module, config class, model class, checkpoint prefixes to try)
# Decoders, bare, as a causal LM, or the language model of a multimodal checkpoint.
_DECODER_PREFIXES = ("", "model.", "model.language_model.", "language_model.model.")
_LLAMA = ("llama", "LlamaConfig", "Llama", _DECODER_PREFIXES)
_VIT = ("vit", "VitConfig", "Vit", ("", "vit.", "vision_model.", "dinov2.", "pixio.",
                                    "videomae.", "model."))
_CLIP_TEXT = ("clip", "ClipTextConfig", "ClipText", ("", "text_model."))
_BLOOM = ("bloom", "BloomConfig", "Bloom", ("", "transformer."))
_GEMMA = ("gemma", "GemmaConfig", "Gemma", _DECODER_PREFIXES)
_DASHENG = ("dasheng", "DashengConfig", "Dasheng", ("", "encoder."))
ARCHITECTURES = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "granite": _LLAMA,
    "olmo": _LLAMA, "olmo2": _LLAMA, "olmo3": _LLAMA, "mixtral": _LLAMA, "olmoe": _LLAMA,
    "gpt_oss": _LLAMA, "ministral3": _LLAMA,
    "vit": _VIT, "vit_mae": _VIT, "dinov2": _VIT, "dinov2_with_registers": _VIT,
    "clip_vision_model": _VIT, "pixio": _VIT, "videomae": _VIT, "videomaev2": _VIT,
    "clip_text_model": _CLIP_TEXT, "bloom": _BLOOM,
    "gemma": _GEMMA, "gemma2": _GEMMA, "gemma3_text": _GEMMA, "gemma3": _GEMMA,
    "dasheng": _DASHENG,
}
# Quantized checkpoints read (dequantized on load): FP8 weights (with their
# `weight_scale_inv`) in any model, and model_type → the methods only it has.
QUANTIZATIONS = {"gpt_oss": ("mxfp4",)}
ANY_MODEL_QUANTIZATIONS = ("fp8",)
# Two-tower checkpoints: model_type → {tower: architecture}.
# (Where only one tower is supported, it is the default: Mistral 3's language model.)
TOWERS = {"clip": {"vision": _VIT, "text": _CLIP_TEXT}, "mistral3": {"text": _LLAMA}}
# Checkpoint tensors that no encoder needs (output heads, cached buffers, final norms that
# the hidden states do not include, the other tower of a two-tower checkpoint).
IGNORED = re.compile("|".join([
    r"lm_head\.weight$", r"rotary_emb\.inv_freq$", r"(^|\.)layernorm\.", r"^pooler\.",
    r"post_layernorm\.", r"mask_token$", r"^decoder\.", r"^text_model\.",
    r"^vision_model\.", r"final_layer_norm\.",
    r"^text_projection", r"^visual_projection", r"^logit_scale", r"^classifier\.",
    r"^norm\.", r"^fc_norm\.", r"^head\.", r"^(model\.)?vision_tower\.",
    r"^(model\.)?multi_modal_projector\.",  # (the last three: timm, Mistral 3's vision)
    r"\.activation_scale$",  # FP8 checkpoints' static activation scales
    r"^fc\.", r"num_batches_tracked$",  # a ResNet's classifier, BatchNorm's step count
    r"^front_end\."]))  # Dasheng's mel filterbank and window (computed from the config)


def architecture(config: dict, tower: str | None = None):
  kind = config.get("model_type")
  if vit.is_videomae_v2(kind):  # one model_type per size
    kind = "videomaev2"
  if kind in TOWERS:
    if tower is None and len(TOWERS[kind]) == 1:
      tower = next(iter(TOWERS[kind]))
    if tower not in TOWERS[kind]:
      raise CheckpointError(f"config.json: the towers of a {kind} checkpoint that load are "
                            f"{sorted(TOWERS[kind])}; choose one with tower=, got {tower!r}")
    module, config_cls, model_cls, prefixes = TOWERS[kind][tower]
  elif kind in ARCHITECTURES:
    module, config_cls, model_cls, prefixes = ARCHITECTURES[kind]
  else:
    raise CheckpointError(f"config.json: unsupported model_type {kind!r} "
                          f"(supported: {sorted({*ARCHITECTURES, *TOWERS})})")
  mod = importlib.import_module(f"plato_jax.models.{module}")
  return getattr(mod, config_cls), getattr(mod, model_cls), prefixes


def _abstract(config_json: dict, tower: str | None, dtype, shapes):
  """(abstract model, checkpoint prefixes) for a checkpoint's config.json; `shapes(name)`
  gives a checkpoint tensor's shape, or None when it is absent."""
  if "model_type" not in config_json and "architecture" in config_json:  # a timm checkpoint
    from plato_jax.models import resnet, vit
    arch = str(config_json["architecture"])
    if re.match(r"(tv_)?resnet\d", arch):  # (torchvision's ResNets: the same names)
      config, model_cls = resnet.ResNetConfig.from_tensors(arch, shapes), resnet.ResNet
    else:
      config, model_cls = vit.timm_config(config_json, shapes), vit.Vit
    prefixes = ("", "model.")
  else:
    config_cls, model_cls, prefixes = architecture(config_json, tower)
    kind = config_json.get("model_type")
    quant = config_json.get("quantization_config")
    method = quant.get("quant_method") if isinstance(quant, dict) else quant
    supported = ANY_MODEL_QUANTIZATIONS + QUANTIZATIONS.get(kind, ())
    if quant is not None and method not in supported:
      raise CheckpointError(f"config.json quantization_config: quant_method {method!r} is "
                            f"not supported for model_type {kind!r} (supported: "
                            f"{list(supported)})")
    from_checkpoint = getattr(config_cls, "from_checkpoint", None)  # sizes from the tensors

    def prefixed(name):  # a tensor's shape under whichever prefix the checkpoint uses
      return next((s for s in (shapes(p + name) for p in prefixes) if s is not None), None)

    config = from_checkpoint(config_json, prefixed) if from_checkpoint else \
        config_cls.from_hf(config_json)
  if getattr(config, "head", None) == "separate" and shapes("lm_head.weight") is None:
    config = dataclasses.replace(config, head="none")  # a bare model: hidden states only
  return nnx.eval_shape(lambda: model_cls(config, dtype=dtype)), prefixes


_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|blocks|h)\.(\d+)\.")


def _check_layer_count(ckpt) -> None:
  """A config that asks for more layers than the checkpoint has tensors for is an error
  before the model is built (a 20,000-layer config took 87 s and 1.6 GB to fail later)."""
  want = ckpt.config.get("num_hidden_layers")
  if not isinstance(want, int):
    return
  found = [int(m.group(1)) for k in ckpt.keys() for m in [_LAYER_INDEX.search(k)] if m]
  if found and want > max(found) + 1:
    raise CheckpointError(f"{ckpt.dir}: config.json says num_hidden_layers={want}, but the "
                          f"checkpoint's tensors cover layers 0..{max(found)}")


def from_pretrained(checkpoint_dir: str, dtype=jnp.float32, *, tower: str | None = None,
                    mesh: Mesh | None = None):
  """The encoder of a local Hugging Face checkpoint directory (or of a model package's own
  torch.save file: Dasheng's), parameters in `dtype`; `tower` ("vision" or "text") picks one
  tower of a two-tower (CLIP) checkpoint.

  Tensors are read one at a time from memory-mapped safetensors, converted on the host and
  placed on the default device, or, with a `mesh` that has a "model" axis, split across
  that axis's devices as `parallel.partition_spec` says (replicated over any other axis):
  no device holds a whole copy of a large tensor. Errors name the missing or mis-shaped
  tensor, or the field.
  A decoder also gets its output embedding (`lm_head`, or the tied input embedding) when
  the checkpoint has one, for token losses (`model.logits`).
  """
  ckpt = Checkpoint(checkpoint_dir)
  _check_layer_count(ckpt)
  seen = {}

  def shapes(name):  # (recorded: a timm config is rebuilt from them by load_converted)
    seen[name] = list(ckpt.shape(name)) if name in ckpt else None
    return seen[name]

  abstract, prefixes = _abstract(ckpt.config, tower, dtype, shapes)
  graphdef, state = nnx.split(abstract)
  flat = nnx.to_flat_state(state)
  rename = getattr(abstract, "checkpoint_key", lambda name: name)
  # Each parameter is read from one checkpoint tensor, or joined from several (a Source).
  sources = [rename(".".join(str(p) for p in path)) for path, _ in flat]
  sources = [s if isinstance(s, Source) else tensor(s) for s in sources]

  def key(prefix, name):
    return name[1:] if name.startswith("/") else prefix + name

  names = [name for s in sources for name in s.names]
  prefix = next((p for p in prefixes if all(key(p, n) in ckpt for n in names)), None)
  if prefix is None:  # name the first missing tensor under the likeliest prefix
    best = max(prefixes, key=lambda p: sum(key(p, n) in ckpt for n in names))
    missing = [key(best, n) for n in names if key(best, n) not in ckpt]
    raise CheckpointError(f"{checkpoint_dir}: {len(missing)} tensors the "
                          f"{type(abstract.config).__name__} model needs are missing, e.g. "
                          f"{missing[:3]}")
  used = set()
  quant = ckpt.config.get("quantization_config")
  fp8_block = quant.get("weight_block_size") if isinstance(quant, dict) else None

  def read(name):
    """A checkpoint tensor; an FP8 one times its scale."""
    k = key(prefix, name)
    value = ckpt.get(k)
    if value.dtype in FP8_DTYPES:
      scale = k + "_scale_inv"
      if scale not in ckpt:
        raise CheckpointError(f"{checkpoint_dir}: tensor {k!r} is {value.dtype} without its "
                              f"scale {scale!r}")
      used.add(scale)
      value = dequantize_fp8(value, ckpt.get(scale), k, tuple(fp8_block) if fp8_block else None)
    return value

  for (path, var), source in zip(flat, sources):
    keys = [key(prefix, n) for n in source.names]
    used.update(keys)
    value = source.read(read, keys, var.get_value().dtype)
    if tuple(value.shape) != tuple(var.get_value().shape):
      what = f" ({source.what})" if source.what else ""
      raise CheckpointError(f"{checkpoint_dir}: tensor {' + '.join(map(repr, keys))}{what} "
                            f"has shape {list(value.shape)}, the config implies "
                            f"{list(var.get_value().shape)}")
    host = np.asarray(value).astype(var.get_value().dtype, copy=False)
    if mesh is None:
      var.set_value(jnp.asarray(host))
    else:
      name = ".".join(str(p) for p in path)
      spec = parallel.partition_spec(name, host.shape, parallel.model_axis_size(mesh))
      var.set_value(jax.device_put(host, NamedSharding(mesh, spec)))
  unused = [k for k in ckpt.keys() if k not in used
            and not IGNORED.search(k[len(prefix):] if k.startswith(prefix) else k)]
  if unused:
    logging.warning("%s: %d checkpoint tensors not used by the encoder, e.g. %s",
                    checkpoint_dir, len(unused), unused[:5])
  model = nnx.merge(graphdef, nnx.from_flat_state(flat))
  model.source = {"config": ckpt.config, "tower": tower, "dtype": np.dtype(dtype).name,
                  "shapes": seen}
  return model


def save_converted(model, directory: str) -> None:
  """Saves a loaded encoder (its parameters, with orbax, and how to rebuild it), so that
  `load_converted` skips the checkpoint conversion."""
  import orbax.checkpoint as ocp
  directory = os.path.abspath(directory)
  _, state = nnx.split(model)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, "params"), nnx.to_pure_dict(state), force=True)
  with open(os.path.join(directory, "source.json"), "w") as f:
    json.dump(model.source, f)


def load_converted(directory: str):
  """An encoder saved by `save_converted`."""
  import orbax.checkpoint as ocp
  directory = os.path.abspath(directory)
  path = os.path.join(directory, "source.json")
  if not os.path.isfile(path):
    raise CheckpointError(f"{directory}: no source.json (not saved by save_converted)")
  with open(path) as f:
    source = json.load(f)
  abstract, _ = _abstract(source["config"], source["tower"], jnp.dtype(source["dtype"]),
                          lambda n: source["shapes"].get(n))
  graphdef, state = nnx.split(abstract)
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(state))
  with ocp.StandardCheckpointer() as ckptr:
    pure = ckptr.restore(os.path.join(directory, "params"), target)
  nnx.replace_by_pure_dict(state, pure)
  model = nnx.merge(graphdef, state)
  model.source = source
  return model


def hidden_states_fn(model):
  """A jitted function (params, *inputs) → hidden states, and the params to pass it."""
  graphdef, params = nnx.split(model)

  @jax.jit
  def run(params, *inputs):
    return nnx.merge(graphdef, params)(*inputs)

  return run, params
