"""torch.save checkpoints (pytorch_model.bin, .pt) read without torch: tensors equal what torch
saved (dtypes, views, shared storages, non-contiguous strides), a pickle that asks for any
other code is refused, and a whole HF .bin checkpoint (single and sharded) loads with parity."""
import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from model_reference import save_tiny
from test_models_decoders import SMALL, batch, check_parity

from plato_jax.models import from_pretrained
from plato_jax.models.hf import CheckpointError
from plato_jax.models.torch_pickle import TorchArchive, state_dict


def test_tensors_equal_what_torch_saved(tmp_path):
  base = torch.randn(6, 5)
  saved = {
      "f32": torch.randn(3, 4), "bf16": torch.randn(7).to(torch.bfloat16),
      "f16": torch.randn(2, 2).half(), "i64": torch.arange(10), "bool": torch.rand(5) > 0.5,
      "transposed": base.t(), "row": base[2], "slice": base[1:4, 2:],  # views of one storage
      "scalar": torch.tensor(3.5), "param": torch.nn.Parameter(torch.randn(4, 3)),
      "empty": torch.zeros(0, 3),
      "fp8": torch.randn(3, 4).to(torch.float8_e4m3fn)}  # (an untyped storage, dtype apart)
  torch.save(saved, tmp_path / "x.pt")
  loaded = state_dict(str(tmp_path / "x.pt"))
  assert list(loaded) == list(saved)
  for name, t in saved.items():
    ours = loaded[name].numpy()
    low = t.dtype in (torch.bfloat16, torch.float8_e4m3fn)
    ref = t.detach().float().numpy() if low else t.detach().numpy()
    assert ours.shape == tuple(t.shape), name
    assert ours.dtype == {torch.bfloat16: np.dtype(ml_dtypes.bfloat16),
                          torch.float8_e4m3fn: np.dtype(ml_dtypes.float8_e4m3fn)}.get(
        t.dtype, ref.dtype), name
    np.testing.assert_array_equal(np.asarray(ours, ref.dtype), ref, err_msg=name)


def test_nested_object_with_a_state_dict_under_a_key(tmp_path):
  """Dasheng's checkpoints: {"model": state dict, "config": {...}}."""
  sd = {"blocks.0.weight": torch.randn(3, 3)}
  torch.save({"model": sd, "config": {"embed_dim": 3, "patch_size": [64, 4]}}, tmp_path / "d.pt")
  archive = TorchArchive(str(tmp_path / "d.pt"))
  assert archive.obj["config"] == {"embed_dim": 3, "patch_size": [64, 4]}
  np.testing.assert_array_equal(state_dict(str(tmp_path / "d.pt"), "model")
                                ["blocks.0.weight"].numpy(), sd["blocks.0.weight"].numpy())
  with pytest.raises(CheckpointError, match="no 'weights' entry"):
    state_dict(str(tmp_path / "d.pt"), "weights")


class Boom:
  def __reduce__(self):
    return (os.system, ("touch pwned",))


def test_a_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  torch.save({"w": torch.zeros(2), "evil": Boom()}, tmp_path / "evil.pt")
  with pytest.raises(CheckpointError, match=r"refers to (posix|os)\.system"):
    TorchArchive(str(tmp_path / "evil.pt"))
  assert not (tmp_path / "pwned").exists()
  nested = []
  nested.append(nested)  # a list that holds itself
  torch.save({"w": torch.zeros(2), "loop": nested}, tmp_path / "loop.pt")
  with pytest.raises(CheckpointError, match="unreadable pickle"):
    TorchArchive(str(tmp_path / "loop.pt"))
  torch.save({"w": ("tensor", "x", 0, (), 0)}, tmp_path / "fake.pt")  # a look-alike tuple
  with pytest.raises(CheckpointError, match=r"entries that are not tensors: \['w'\]"):
    state_dict(str(tmp_path / "fake.pt"))
  (tmp_path / "junk.pt").write_bytes(b"\x80\x02junk")
  with pytest.raises(CheckpointError, match="not a torch.save zip archive"):
    TorchArchive(str(tmp_path / "junk.pt"))


@pytest.mark.parametrize("sharded", [False, True])
def test_hf_checkpoint_as_pytorch_model_bin(rng, tmp_path, sharded):
  """A checkpoint published as pytorch_model.bin (OpenLLaMA, BLOOMZ): single, or shards
  named by pytorch_model.bin.index.json."""
  model = save_tiny(transformers.LlamaForCausalLM, transformers.LlamaConfig(**SMALL), tmp_path)
  os.remove(tmp_path / "model.safetensors")
  sd = {k: v.contiguous() for k, v in model.state_dict().items()}
  if not sharded:
    torch.save(sd, tmp_path / "pytorch_model.bin")
  else:
    names = sorted(sd)
    shards = {"pytorch_model-00001-of-00002.bin": names[:len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for file, keys in shards.items():
      torch.save({k: sd[k] for k in keys}, tmp_path / file)
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
  check_parity(model.model, tmp_path, *batch(rng))
  ours = from_pretrained(str(tmp_path))
  np.testing.assert_array_equal(np.asarray(ours.embed_tokens.weight[...]),
                                model.model.embed_tokens.weight.detach().numpy())
  assert jnp.asarray(ours.lm_head.weight[...]).shape == (97, 64)
