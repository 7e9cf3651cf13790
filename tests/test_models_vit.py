"""Vision transformer and CLIP parity: every hidden state of our Flax ports equals
transformers' PyTorch model (eager, f32) within 1e-4 relative, through save_pretrained →
from_pretrained, at the native image size and at a non-square, non-native one."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from model_reference import assert_bf16_runs, assert_close_rel, save_tiny

from plato_jax.models import from_pretrained
from plato_jax.models.hf import CheckpointError
from plato_jax.models.vit import bicubic_matrix

BASE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            image_size=28, patch_size=14)
CASES = {
    "dinov2": (transformers.Dinov2Model, transformers.Dinov2Config(**BASE)),
    "dinov2_swiglu": (transformers.Dinov2Model, transformers.Dinov2Config(**BASE, use_swiglu_ffn=True)),
    "dinov2_registers": (transformers.Dinov2WithRegistersModel,
                         transformers.Dinov2WithRegistersConfig(**BASE, num_register_tokens=3)),
    "vit": (transformers.ViTModel, transformers.ViTConfig(**BASE)),
    "vit_mae": (transformers.ViTMAEModel, transformers.ViTMAEConfig(**BASE, mask_ratio=0.0)),
    "clip_vision": (transformers.CLIPVisionModel, transformers.CLIPVisionConfig(**BASE)),
    "pixio": (transformers.PixioModel, transformers.PixioConfig(  # (sizes from mlp_ratio)
        **{k: v for k, v in BASE.items() if k != "intermediate_size"}, n_cls_tokens=3)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_vision_parity_any_image_size(tmp_path, name):
  model_cls, config = CASES[name]
  model = save_tiny(model_cls, config, tmp_path)
  ours = from_pretrained(str(tmp_path))
  for h, w in [(28, 28), (42, 70)]:  # native, and non-square with interpolated positions
    x = torch.randn(2, 3, h, w)
    kw = {} if name.startswith(("dinov2", "pixio")) else {"interpolate_pos_encoding": True}
    if name == "vit_mae":  # MAE shuffles patches by `noise`; ascending noise keeps the order
      kw["noise"] = torch.arange((h // 14) * (w // 14), dtype=torch.float32)[None].repeat(2, 1)
    with torch.no_grad():
      theirs = model(x, output_hidden_states=True, **kw).hidden_states
    states = ours(jnp.asarray(x.numpy()))
    assert len(states) == len(theirs) == 3
    for i, (a, b) in enumerate(zip(states, theirs)):
      assert_close_rel(a, b.numpy(), where=f"{name} {h}x{w} hidden state {i}")
  assert_bf16_runs(tmp_path, (jnp.asarray(x.numpy()),), [t.numpy() for t in theirs])


@pytest.mark.parametrize("qv_bias", [True, False])
def test_videomae_tubelets_and_sinusoid_positions(tmp_path, qv_bias):
  cfg = transformers.VideoMAEConfig(**BASE, num_frames=4, tubelet_size=2, qv_bias=qv_bias,
                                    layer_norm_eps=1e-6)
  model = save_tiny(transformers.VideoMAEModel, cfg, tmp_path)
  x = torch.randn(2, 4, 3, 28, 28)  # [B, T, C, H, W]
  with torch.no_grad():
    theirs = model(x, output_hidden_states=True).hidden_states
  ours = from_pretrained(str(tmp_path))(jnp.asarray(x.numpy()))
  assert len(ours) == len(theirs) == 3
  for i, (a, b) in enumerate(zip(ours, theirs)):
    assert_close_rel(a, b.numpy(), where=f"hidden state {i}")
  assert_bf16_runs(tmp_path, (jnp.asarray(x.numpy()),), [t.numpy() for t in theirs])


def videomae_v2_checkpoint(model, cfg, path, gammas=None):
  """transformers' VideoMAE saved as OpenGVLab publishes VideoMAE-v2 (its VisionTransformer
  inside `model.`: fused qkv weight, q_bias / v_bias, timm names, config.json's
  model_config); `gammas` [layer] → (gamma_1, gamma_2) as layer scales."""
  from plato_jax.models.hf import write_safetensors
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  out = {"model.patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
         "model.patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
         "model.fc_norm.weight": np.ones(cfg.hidden_size, np.float32),
         "model.fc_norm.bias": np.zeros(cfg.hidden_size, np.float32)}
  for i in range(cfg.num_hidden_layers):
    hf, v2 = f"encoder.layer.{i}.", f"model.blocks.{i}."
    out[v2 + "attn.qkv.weight"] = np.concatenate(
        [sd[hf + f"attention.attention.{n}.weight"] for n in ("query", "key", "value")])
    out[v2 + "attn.q_bias"] = sd[hf + "attention.attention.query.bias"]
    out[v2 + "attn.v_bias"] = sd[hf + "attention.attention.value.bias"]
    for ours, theirs in (("attention.output.dense", "attn.proj"), ("layernorm_before", "norm1"),
                         ("layernorm_after", "norm2"), ("intermediate.dense", "mlp.fc1"),
                         ("output.dense", "mlp.fc2")):
      for leaf in ("weight", "bias"):
        out[f"{v2}{theirs}.{leaf}"] = sd[f"{hf}{ours}.{leaf}"]
    if gammas is not None:
      out[v2 + "gamma_1"], out[v2 + "gamma_2"] = gammas[i]
  path.mkdir()
  write_safetensors(str(path / "model.safetensors"), out)
  (path / "config.json").write_text(json.dumps({
      "model_type": "VideoMAEv2_Base", "architectures": ["VideoMAEv2_Base"],
      "model_config": {"img_size": cfg.image_size, "patch_size": cfg.patch_size, "in_chans": 3,
                       "num_classes": 0, "embed_dim": cfg.hidden_size,
                       "depth": cfg.num_hidden_layers, "num_heads": cfg.num_attention_heads,
                       "mlp_ratio": cfg.intermediate_size / cfg.hidden_size, "qkv_bias": True,
                       "qk_scale": None, "norm_layer": "nn.LayerNorm", "layer_norm_eps": 1e-6,
                       "init_values": 0.1 if gammas is not None else 0.0,
                       "use_learnable_pos_emb": False, "tubelet_size": cfg.tubelet_size,
                       "use_mean_pooling": True, "with_cp": False,
                       "num_frames": cfg.num_frames, "cos_attn": False}}))


def test_videomae_v2_published_layout(rng, tmp_path):
  """VideoMAE-v2 as OpenGVLab publishes it equals the same weights in transformers' VideoMAE
  (the same ViT); its layer scales equal transformers' model with the scales folded into
  the attention output and fc2 weights (γ ⊙ (Wx + b) = (γW)x + γb)."""
  cfg = transformers.VideoMAEConfig(**BASE, num_frames=4, tubelet_size=2, layer_norm_eps=1e-6)
  model = save_tiny(transformers.VideoMAEModel, cfg, tmp_path / "v1")
  x = torch.randn(2, 4, 3, 28, 28)
  with torch.no_grad():
    theirs = model(x, output_hidden_states=True).hidden_states
  videomae_v2_checkpoint(model, cfg, tmp_path / "v2")
  ours = from_pretrained(str(tmp_path / "v2"))
  assert ours.config.num_frames == 4 and ours.config.tubelet_size == 2
  for i, (a, b) in enumerate(zip(ours(jnp.asarray(x.numpy())), theirs)):
    assert_close_rel(a, b.numpy(), where=f"v2 hidden state {i}")
  gammas = [tuple(rng.uniform(0.5, 1.5, (2, 32)).astype(np.float32))
            for _ in range(cfg.num_hidden_layers)]
  videomae_v2_checkpoint(model, cfg, tmp_path / "v2_scaled", gammas)
  with torch.no_grad():
    for layer, (g1, g2) in zip(model.encoder.layer, gammas):
      for linear, g in ((layer.attention.output.dense, g1), (layer.output.dense, g2)):
        linear.weight.mul_(torch.from_numpy(g)[:, None])
        linear.bias.mul_(torch.from_numpy(g))
    theirs = model(x, output_hidden_states=True).hidden_states
  scaled = from_pretrained(str(tmp_path / "v2_scaled"))
  assert scaled.config.layer_scale
  for i, (a, b) in enumerate(zip(scaled(jnp.asarray(x.numpy())), theirs)):
    assert_close_rel(a, b.numpy(), where=f"v2 layer-scaled hidden state {i}")
  config = json.loads((tmp_path / "v2" / "config.json").read_text())
  config["model_config"]["cos_attn"] = True
  (tmp_path / "v2" / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match="model_config: cos_attn=True is not supported"):
    from_pretrained(str(tmp_path / "v2"))


def test_clip_two_towers_from_one_checkpoint(rng, tmp_path):
  text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
              vocab_size=50, bos_token_id=0, eos_token_id=1, pad_token_id=1,
              max_position_embeddings=16)
  config = transformers.CLIPConfig(text_config=text, vision_config=BASE)
  model = save_tiny(transformers.CLIPModel, config, tmp_path)
  with pytest.raises(CheckpointError, match=r"that load are \['text', 'vision'\]"):
    from_pretrained(str(tmp_path))
  x = torch.randn(2, 3, 28, 28)
  with torch.no_grad():
    theirs = model.vision_model(x, output_hidden_states=True).hidden_states
  for a, b in zip(from_pretrained(str(tmp_path), tower="vision")(jnp.asarray(x.numpy())), theirs):
    assert_close_rel(a, b.numpy(), where="clip vision")
  ids = rng.integers(2, 50, (3, 9))
  mask = np.ones_like(ids)
  mask[1, 6:] = 0  # right padding, as CLIP's tokenizer pads
  with torch.no_grad():
    theirs = model.text_model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                              output_hidden_states=True).hidden_states
  states = from_pretrained(str(tmp_path), tower="text")(jnp.asarray(ids), jnp.asarray(mask))
  real = mask.astype(bool)
  for i, (a, b) in enumerate(zip(states, theirs)):
    assert_close_rel(np.asarray(a)[real], b.numpy()[real], where=f"clip text hidden state {i}")


@pytest.mark.parametrize("antialias", [False, True])
def test_bicubic_matrix_equals_torch_interpolate(rng, antialias):
  for n_in, n_out in [(4, 6), (6, 4), (37, 16), (16, 37), (5, 5)]:
    x = rng.standard_normal((1, 1, n_in, 3)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.as_tensor(x), size=(n_out, 3), mode="bicubic",
                                          align_corners=False, antialias=antialias)
    np.testing.assert_allclose(bicubic_matrix(n_in, n_out, antialias) @ x[0, 0], ref[0, 0],
                               atol=1e-5)


_TIMM_BLOCK = {  # HF block tensor (legacy names of ViT, DINOv2, CLIP) → timm's
    "layernorm_before": "norm1", "layer_norm1": "norm1", "norm1": "norm1",
    "layernorm_after": "norm2", "layer_norm2": "norm2", "norm2": "norm2",
    "attention.output.dense": "attn.proj", "self_attn.out_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2", "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2", "mlp.weights_in": "mlp.fc1", "mlp.weights_out": "mlp.fc2"}
_TIMM_TOP = {
    "embeddings.cls_token": "cls_token", "embeddings.class_embedding": "cls_token",
    "embeddings.position_embeddings": "pos_embed", "embeddings.position_embedding.weight": "pos_embed",
    "embeddings.register_tokens": "reg_token",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
    "pre_layrnorm.weight": "norm_pre.weight", "pre_layrnorm.bias": "norm_pre.bias"}
_QKV = {"query": 0, "key": 1, "value": 2, "q_proj": 0, "k_proj": 1, "v_proj": 2}


def to_timm(tensors: dict) -> dict:
  """HF checkpoint tensors → timm's layout, written out independently of the loader: fused
  qkv [3D, D] in q, k, v order, cls_token [1, 1, D], pos_embed [1, N, D], ls1/ls2.gamma."""
  import re
  out, qkv = {}, {}
  for key, value in tensors.items():
    block = re.match(r"encoder\.layers?\.(\d+)\.(.+)\.(weight|bias|lambda1)$", key)
    if block:
      i, name, leaf = block.groups()
      head = name.rsplit(".", 1)[-1]
      if leaf == "lambda1":
        out[f"blocks.{i}.ls{name[-1]}.gamma"] = value
      elif head in _QKV:
        qkv.setdefault((i, leaf), [None] * 3)[_QKV[head]] = value
      else:
        out[f"blocks.{i}.{_TIMM_BLOCK[name]}.{leaf}"] = value
    elif key in _TIMM_TOP:
      name = _TIMM_TOP[key]
      if name == "cls_token":
        value = value.reshape(1, 1, -1)
      if name == "pos_embed":
        value = value.reshape(1, *value.shape[-2:])
      out[name] = value
  for (i, leaf), parts in qkv.items():
    out[f"blocks.{i}.attn.qkv.{leaf}"] = np.concatenate(parts, axis=0)
  return out


TIMM_CASES = {
    "vit_tiny_patch14_224": CASES["vit"][:1] + (transformers.ViTConfig(**BASE, layer_norm_eps=1e-6),),
    "vit_small_patch14_dinov2": CASES["dinov2"],
    "vit_small_patch14_reg4_dinov2": CASES["dinov2_registers"],
    "vit_giant_patch14_dinov2": CASES["dinov2_swiglu"],
    "vit_base_patch14_clip_quickgelu_224": CASES["clip_vision"],
}


@pytest.mark.parametrize("arch", sorted(TIMM_CASES))
def test_timm_checkpoints_load(tmp_path, arch):
  """A timm-format directory (config.json with `architecture`, timm tensor names, fused
  qkv) gives the hidden states of the same weights under transformers."""
  import json
  from plato_jax.models.hf import Checkpoint, write_safetensors
  model_cls, config = TIMM_CASES[arch]
  model = save_tiny(model_cls, config, tmp_path / "hf")
  hf = Checkpoint(str(tmp_path / "hf"))
  (tmp_path / "timm").mkdir()
  write_safetensors(str(tmp_path / "timm" / "model.safetensors"),
                    to_timm({k: np.asarray(v) for k, v in hf.items()}))
  (tmp_path / "timm" / "config.json").write_text(json.dumps(
      {"architecture": arch, "model_args": {"num_heads": 2}, "num_classes": 0}))
  x = torch.randn(2, 3, 28, 28)
  with torch.no_grad():
    theirs = model(x, output_hidden_states=True).hidden_states
  ours = from_pretrained(str(tmp_path / "timm"))(jnp.asarray(x.numpy()))
  for i, (a, b) in enumerate(zip(ours, theirs)):
    assert_close_rel(a, b.numpy(), where=f"{arch} hidden state {i}")


def test_converted_timm_model_round_trips(tmp_path):
  import json
  from plato_jax.models import load_converted, save_converted
  from plato_jax.models.hf import Checkpoint, write_safetensors
  model_cls, config = CASES["dinov2_registers"]
  save_tiny(model_cls, config, tmp_path / "hf")
  hf = Checkpoint(str(tmp_path / "hf"))
  (tmp_path / "timm").mkdir()
  write_safetensors(str(tmp_path / "timm" / "model.safetensors"),
                    to_timm({k: np.asarray(v) for k, v in hf.items()}))
  (tmp_path / "timm" / "config.json").write_text(json.dumps(
      {"architecture": "vit_small_patch14_reg4_dinov2", "model_args": {"num_heads": 2}}))
  model = from_pretrained(str(tmp_path / "timm"))
  save_converted(model, str(tmp_path / "converted"))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 3, 28, 28)), jnp.float32)
  for a, b in zip(model(x), load_converted(str(tmp_path / "converted"))(x)):
    np.testing.assert_array_equal(a, b)
