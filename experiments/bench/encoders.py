"""Encoder throughput: our Flax ports against transformers (PyTorch) in the same run.

    python -m plato_jax.experiments.bench.encoders                       # GPU: DINOv2-B/14 at 518 px, 3B LLaMA
    python -m plato_jax.experiments.bench.encoders --size=small          # CPU: the same harness, small shapes
    python -m plato_jax.experiments.bench.encoders --models=mixtral,gpt_oss   # the MoE decoders

The MoE decoders have their published widths, expert counts and top-k at --size=paper
(Mixtral-8x7B, GPT-OSS-20b) but only --moe_layers layers, so one GPU holds them; transformers
runs its default experts implementation (grouped_mm where torch has it), sdpa attention
(eager for GPT-OSS, whose sinks sdpa does not take).

Random weights (throughput does not depend on them), both sides in --dtype, the same
inputs; reports images/s (vision) and tokens/s (text), the ratio ours / transformers (> 1:
we are faster), and the largest relative difference of the last hidden state as a check
that both ran the same model. The papers' feature pass: every hidden state is returned.
"""
from __future__ import annotations

import os
import tempfile

from absl import app, flags

from .timing import best_time

FLAGS = flags.FLAGS
flags.DEFINE_enum("size", None, ["paper", "small"], "paper: DINOv2-B/14 at 518 px and a "
                  "3B LLaMA (GPU); small: tiny shapes (CPU). Default: paper on GPU, else small")
flags.DEFINE_enum("dtype", None, ["bfloat16", "float32"], "both sides (default: bf16 on GPU, "
                  "f32 on CPU)")
flags.DEFINE_list("models", ["dinov2", "llama"], "which benchmarks: dinov2, llama, mixtral, "
                  "gpt_oss")
flags.DEFINE_integer("moe_layers", 4, "layers of the MoE decoders at --size=paper")
flags.DEFINE_integer("batch", None, "batch size (default per size)")
flags.DEFINE_integer("seq", 128, "text tokens per row")
flags.DEFINE_integer("repeats", 5, "timed runs (best is reported)")

SHAPES = {
    # DINOv2-B/14 (timm vit_base_patch14_dinov2) and an OpenLLaMA-3B-shaped decoder.
    "paper": {"dinov2": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                             intermediate_size=3072, patch_size=14, image_size=518),
              "llama": dict(hidden_size=3200, intermediate_size=8640, num_hidden_layers=26,
                            num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
              "mixtral": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                              num_key_value_heads=8, vocab_size=32000, num_local_experts=8,
                              num_experts_per_tok=2),
              "gpt_oss": dict(hidden_size=2880, intermediate_size=2880, num_attention_heads=64,
                              num_key_value_heads=8, head_dim=64, vocab_size=201088,
                              num_local_experts=32, num_experts_per_tok=4),
              "batch": {"dinov2": 64, "llama": 16, "mixtral": 16, "gpt_oss": 16}, "image": 518},
    "small": {"dinov2": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3,
                             intermediate_size=768, patch_size=14, image_size=224),
              "llama": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=4, vocab_size=2000),
              "mixtral": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, vocab_size=2000,
                              num_local_experts=8, num_experts_per_tok=2),
              "gpt_oss": dict(hidden_size=256, intermediate_size=256, num_hidden_layers=4,
                              num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                              vocab_size=2000, num_local_experts=16, num_experts_per_tok=4),
              "batch": {"dinov2": 8, "llama": 8, "mixtral": 8, "gpt_oss": 8}, "image": 224},
}


TEXT = {"llama": ("LlamaConfig", "LlamaModel"), "mixtral": ("MixtralConfig", "MixtralModel"),
        "gpt_oss": ("GptOssConfig", "GptOssModel")}
TEXT_MOE = ("mixtral", "gpt_oss")


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  import transformers

  from plato_jax.models import from_pretrained, hidden_states_fn

  gpu = jax.default_backend() == "gpu"
  size = FLAGS.size or ("paper" if gpu else "small")
  name = FLAGS.dtype or ("bfloat16" if gpu else "float32")
  tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]
  jdtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[name]
  device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
  shapes = SHAPES[size]
  print(f"backend={jax.default_backend()} torch_device={device} size={size} dtype={name}")
  rng = np.random.default_rng(0)
  for which in FLAGS.models:
    batch = FLAGS.batch or shapes["batch"][which]
    with tempfile.TemporaryDirectory() as tmp:
      if which == "dinov2":
        config = transformers.Dinov2Config(**shapes[which])
        model = transformers.Dinov2Model._from_config(config, attn_implementation="sdpa")
        x = rng.standard_normal((batch, 3, shapes["image"], shapes["image"])).astype(np.float32)
        inputs_t = (torch.as_tensor(x).to(device, tdtype),)
        inputs_j = (jnp.asarray(x, jdtype),)
        units, unit = batch, "images/s"
      else:
        config_cls, model_cls = TEXT[which]
        sizes = dict(shapes[which])
        if which in TEXT_MOE:
          sizes.setdefault("num_hidden_layers", FLAGS.moe_layers)
        config = getattr(transformers, config_cls)(**sizes)
        model = getattr(transformers, model_cls)._from_config(
            config, attn_implementation="eager" if which == "gpt_oss" else "sdpa")
        ids = rng.integers(0, config.vocab_size, (batch, FLAGS.seq))
        inputs_t = (torch.as_tensor(ids).to(device),)
        inputs_j = (jnp.asarray(ids, jnp.int32),)
        units, unit = batch * FLAGS.seq, "tokens/s"
      model.save_pretrained(tmp)
      model = model.to(device, tdtype).eval()
      ours = from_pretrained(tmp, dtype=jdtype)
    run, params = hidden_states_fn(ours)

    def torch_pass():
      with torch.inference_mode():
        out = model(*inputs_t, output_hidden_states=True).hidden_states
      if device == "cuda":
        torch.cuda.synchronize()
      return out

    def jax_pass():
      return run(params, *inputs_j)

    t_torch, theirs = best_time(torch_pass, FLAGS.repeats)
    t_ours, mine = best_time(jax_pass, FLAGS.repeats)
    theirs = theirs[-1].float().cpu().numpy()
    mine = np.asarray(mine[-1], np.float32)
    err = np.abs(mine - theirs).max() / np.abs(theirs).max()
    experts = getattr(model.config, "_experts_implementation", None)
    which_label = f"{which} ({experts})" if experts and which in TEXT_MOE else which
    print(f"{which_label:7s} batch={batch:<4d} transformers {units / t_torch:10.1f} {unit}   "
          f"plato_jax {units / t_ours:10.1f} {unit}   ours/theirs {t_torch / t_ours:5.2f}x   "
          f"max rel diff {err:.1e}")


if __name__ == "__main__":
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  app.run(main)
