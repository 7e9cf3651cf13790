"""Tiny random transformers models, saved with `save_pretrained`, as the parity reference."""
import os

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def save_tiny(model_cls, config, path, *, seed=0, **save_kw):
  """Builds `model_cls` from `config` (eager attention, f32, random weights), saves it to
  `path` and returns the PyTorch model in eval mode."""
  import torch
  torch.manual_seed(seed)
  model = model_cls._from_config(config, attn_implementation="eager",
                                 dtype=torch.float32).eval()
  with torch.no_grad():  # larger than the init's 0.02 std: differences show up
    for p in model.parameters():
      p.normal_(0, 0.2 if p.ndim > 1 else 0.5)
  model.save_pretrained(path, **save_kw)
  return model


def assert_close_rel(ours, theirs, rtol=1e-4, where=""):
  """max |ours - theirs| <= rtol · max |theirs| (per array)."""
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, f"{where}: shape {ours.shape} vs {theirs.shape}"
  err = np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-30)
  assert err <= rtol, f"{where}: relative error {err:.2e} > {rtol:.0e}"


def assert_bf16_runs(path, inputs, reference, rtol=0.1, tower=None):
  """The checkpoint loaded in bf16 runs and its hidden states stay near `reference` (the
  f32 ones): bf16 rounding only, max |diff| <= rtol · max |reference| per state."""
  import jax.numpy as jnp

  from plato_jax.models import from_pretrained
  states = from_pretrained(str(path), dtype=jnp.bfloat16, tower=tower)(*inputs)
  assert len(states) == len(reference)
  for i, (a, b) in enumerate(zip(states, reference)):
    assert a.dtype == jnp.bfloat16, f"hidden state {i} is {a.dtype}"
    assert_close_rel(np.asarray(a, np.float32), np.asarray(b), rtol=rtol,
                     where=f"bf16 hidden state {i}")
