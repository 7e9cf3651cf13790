"""Crafted checkpoints and data files: each is a CheckpointError (or a skipped record)
naming the file and field, never a silent load, a file read outside the checkpoint, a raw
traceback or a model built for nothing."""
import json
import struct

import numpy as np
import pytest

from plato_jax.models import from_pretrained
from plato_jax.models.hf import Checkpoint, CheckpointError, SafetensorsFile, write_safetensors


def raw_safetensors(path, header, data=b""):
  text = json.dumps(header).encode()
  path.write_bytes(struct.pack("<Q", len(text)) + text + data)
  return str(path)


def entry(begin, end, shape=(2,), dtype="F32"):
  return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


@pytest.mark.parametrize("header,match", [
    ([1, 2], "JSON list, not an object"),
    ({"w": entry(-8, 0)}, r"tensor 'w': data_offsets \[-8, 0\)"),
    ({"w": entry(0, 8), "v": entry(4, 12)}, "tensors 'w' and 'v' overlap"),
    ({"w": {"dtype": "F32", "shape": [2]}}, r"lacks \['data_offsets'\]"),
    ({"w": entry(0, 8, shape=(2**62, 2**62))}, "expected .* bytes"),  # no int64 wrap
    ({"w": entry(0, 8, shape=(-2,))}, "not a list of counts"),
    ({"w": entry(0, 8, dtype="F7")}, "unsupported dtype 'F7'"),
    ({"w": [0, 8]}, "header entry is not an object"),
    ({"w": entry(0, 8), "__metadata__": [1]}, "__metadata__ is not an object"),
])
def test_crafted_safetensors_headers_are_refused(tmp_path, header, match):
  path = raw_safetensors(tmp_path / "m.safetensors", header, b"\0" * 16)
  with pytest.raises(CheckpointError, match=match):
    SafetensorsFile(path)


def test_deeply_nested_header_is_refused(tmp_path):
  text = ("[" * 100_000 + "]" * 100_000).encode()
  (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", len(text)) + text)
  with pytest.raises(CheckpointError, match="unreadable safetensors header"):
    SafetensorsFile(str(tmp_path / "m.safetensors"))


def test_weight_map_cannot_lead_outside_the_checkpoint(tmp_path):
  outside = tmp_path / "secret.safetensors"
  write_safetensors(str(outside), {"w": np.ones(2, np.float32)})
  ckpt = tmp_path / "ckpt"
  ckpt.mkdir()
  (ckpt / "config.json").write_text(json.dumps({"model_type": "llama"}))
  for shard in ["../secret.safetensors", "/etc/passwd", ".."]:
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(CheckpointError, match="not a file name in"):
      Checkpoint(str(ckpt))


@pytest.mark.parametrize("field,value", [("vocab_size", -5), ("hidden_size", "64"),
                                         ("num_hidden_layers", 0), ("head_dim", True)])
def test_config_sizes_must_be_positive_integers(tmp_path, field, value):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", field: value}))
  write_safetensors(str(tmp_path / "model.safetensors"), {"w": np.ones(2, np.float32)})
  with pytest.raises(CheckpointError, match=f"{field}={value!r} must be a positive integer"):
    from_pretrained(str(tmp_path))


def test_more_layers_than_tensors_fails_before_the_model_is_built(tmp_path):
  config = {"model_type": "llama", "vocab_size": 16, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 20_000, "num_attention_heads": 2}
  (tmp_path / "config.json").write_text(json.dumps(config))
  write_safetensors(str(tmp_path / "model.safetensors"),
                    {f"layers.{i}.mlp.up_proj.weight": np.ones((16, 8), np.float32)
                     for i in range(2)})
  with pytest.raises(CheckpointError, match=r"num_hidden_layers=20000.*layers 0\.\.1"):
    from_pretrained(str(tmp_path))


def test_a_decompression_bomb_is_a_bad_record():
  import io

  from PIL import Image

  from plato_jax.data import decode_image
  buf = io.BytesIO()
  Image.new("L", (1, 1)).save(buf, format="PNG")
  small = buf.getvalue()
  assert decode_image(small) is not None
  old = Image.MAX_IMAGE_PIXELS
  Image.MAX_IMAGE_PIXELS = 0.5  # the 1-pixel image counts as a bomb now
  try:
    assert decode_image(small) is None
  finally:
    Image.MAX_IMAGE_PIXELS = old
