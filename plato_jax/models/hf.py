"""Hugging Face checkpoint directories, read without torch: config.json + safetensors.

A checkpoint directory holds `config.json` and either `model.safetensors` or shards named
by `model.safetensors.index.json` (`weight_map`: tensor name → shard file); without them,
`pytorch_model.bin` or its shards (`torch_pickle.py`). Tensors are
memory-mapped and read one at a time, so loading needs about one tensor of host memory
above the parameters themselves.

The safetensors format is small enough to read directly: an 8-byte little-endian header
length, a JSON header {name: {dtype, shape, data_offsets: [begin, end]}}, then the raw
little-endian bytes. bf16 and fp8 come through `ml_dtypes`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from typing import Callable, Iterator

import ml_dtypes
import numpy as np

from plato_jax.models import torch_pickle
from plato_jax.models.errors import CheckpointError

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim",
               "max_position_embeddings", "image_size", "patch_size", "num_channels")


def read_config(checkpoint_dir: str) -> dict:
  path = os.path.join(checkpoint_dir, "config.json")
  if not os.path.isfile(path):
    raise CheckpointError(f"{checkpoint_dir}: no config.json (not a Hugging Face checkpoint "
                          f"directory)")
  try:
    with open(path) as f:
      config = json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(config, dict):
    raise CheckpointError(f"{path}: expected a JSON object")
  for key in SIZE_FIELDS:  # sizes that build arrays: a bad one fails here, not in numpy
    value = config.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                              or value < 1):
      raise CheckpointError(f"{path}: {key}={value!r} must be a positive integer")
  return config


class SafetensorsFile:
  """One .safetensors file: its header, and tensors as read-only memory maps."""

  def __init__(self, path: str):
    self.path = path
    try:
      with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
          raise CheckpointError(f"{path}: truncated (no safetensors header)")
        (n,) = struct.unpack("<Q", raw)
        size = os.fstat(f.fileno()).st_size
        if n > size - 8:
          raise CheckpointError(f"{path}: header length {n} exceeds the file ({size} bytes)")
        header = json.loads(f.read(n))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
      raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
      raise CheckpointError(f"{path}: the safetensors header is a JSON "
                            f"{type(header).__name__}, not an object")
    self.metadata = header.pop("__metadata__", None) or {}
    if not isinstance(self.metadata, dict):
      raise CheckpointError(f"{path}: __metadata__ is not an object")
    self._data_start = 8 + n
    self._size = size
    self._entries = {name: self._entry(name, e) for name, e in header.items()}
    spans = sorted((e["data_offsets"][0], e["data_offsets"][1], name)
                   for name, e in self._entries.items())
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
      if begin < end:
        raise CheckpointError(f"{path}: tensors {first!r} and {second!r} overlap (bytes "
                              f"from {begin} belong to both)")
    self._map = None

  def _entry(self, name: str, entry) -> dict:
    """A header entry checked: dtype known, shape of counts, data_offsets inside the file
    and holding exactly the shape's bytes (products in Python ints: no wrap-around)."""
    where = f"{self.path}: tensor {name!r}"
    if not isinstance(entry, dict):
      raise CheckpointError(f"{where}: header entry is not an object")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
      raise CheckpointError(f"{where}: header entry lacks {missing}")
    if entry["dtype"] not in SAFETENSORS_DTYPES:
      raise CheckpointError(f"{where}: unsupported dtype {entry['dtype']!r}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
      raise CheckpointError(f"{where}: shape {shape!r} is not a list of counts")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(
        isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
      raise CheckpointError(f"{where}: data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    expected = math.prod(shape) * np.dtype(SAFETENSORS_DTYPES[entry["dtype"]]).itemsize
    if not 0 <= begin <= end or self._data_start + end > self._size or end - begin != expected:
      raise CheckpointError(f"{where}: data_offsets [{begin}, {end}) for shape {shape} "
                            f"{entry['dtype']} (expected {expected} bytes inside the "
                            f"{self._size - self._data_start} bytes of data)")
    return entry

  def keys(self) -> list[str]:
    return list(self._entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._entries[name]["shape"])

  def get(self, name: str) -> np.ndarray:
    entry = self._entries[name]  # checked when the header was read
    dtype = SAFETENSORS_DTYPES[entry["dtype"]]
    begin, end = entry["data_offsets"]
    shape = tuple(entry["shape"])
    if self._map is None:
      self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
    data = self._map[self._data_start + begin:self._data_start + end]
    return data.view(dtype).reshape(shape)


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata=None) -> None:
  """Writes numpy arrays as one safetensors file (tests and converted checkpoints)."""
  names = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}
  header, offset, blobs = {}, 0, []
  for name, array in tensors.items():
    array = np.ascontiguousarray(array)
    blob = array.tobytes()
    header[name] = {"dtype": names[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + len(blob)]}
    offset += len(blob)
    blobs.append(blob)
  if metadata:
    header["__metadata__"] = metadata
  text = json.dumps(header).encode()
  text += b" " * ((-len(text)) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)))
    f.write(text)
    for blob in blobs:
      f.write(blob)


class TorchFile:
  """A torch.save shard (pytorch_model.bin), or a state dict already read from a torch.save
  file, with SafetensorsFile's interface."""

  def __init__(self, path: str, tensors: dict | None = None):
    self.path = path
    self._tensors = torch_pickle.state_dict(path) if tensors is None else tensors

  def keys(self) -> list[str]:
    return list(self._tensors)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._tensors[name].shape

  def get(self, name: str) -> np.ndarray:
    return self._tensors[name].numpy()


# Weight files, by preference: (index of shards, single file, opener).
WEIGHT_FILES = (("model.safetensors.index.json", "model.safetensors", SafetensorsFile),
                ("pytorch_model.bin.index.json", "pytorch_model.bin", TorchFile))


# torch.save files of a model's own package, {"model": state dict, "config": the model's
# arguments}: model_type ← a tensor only that family has.
PACKAGE_FILES = {"dasheng": "freq_pos_embed"}


class Checkpoint:
  """The tensors of a checkpoint directory by name, across shards, read lazily: safetensors,
  or where a directory has none, torch.save files (read without running their pickles); or
  one torch.save file of a model's own package (`PACKAGE_FILES`), its arguments becoming
  config.json's `encoder_kwargs`."""

  def __init__(self, checkpoint_dir: str):
    self.dir = checkpoint_dir
    self._files: dict = {}
    self._where: dict[str, str] = {}
    if os.path.isfile(checkpoint_dir):
      self._read_package_file(checkpoint_dir)
      return
    self.config = read_config(checkpoint_dir)
    for index_name, single_name, opener in WEIGHT_FILES:
      index = os.path.join(checkpoint_dir, index_name)
      single = os.path.join(checkpoint_dir, single_name)
      if os.path.isfile(index):
        self._read_index(index, opener)
        break
      if os.path.isfile(single):
        f = self._files[single_name] = opener(single)
        self._where = {name: single_name for name in f.keys()}
        break
    else:
      other = [n for n in os.listdir(checkpoint_dir) if n.endswith((".bin", ".pth", ".pt"))]
      raise CheckpointError(
          f"{checkpoint_dir}: no model.safetensors, pytorch_model.bin or their shard indexes"
          + (f" (found {other[:3]}: name a torch.save file pytorch_model.bin, or convert it "
             f"to safetensors)" if other else ""))

  def _read_package_file(self, path: str) -> None:
    saved = torch_pickle.TorchArchive(path).obj
    if not (isinstance(saved, dict) and isinstance(saved.get("model"), dict)
            and isinstance(saved.get("config"), dict)):
      raise CheckpointError(f"{path}: not a checkpoint directory, nor a torch.save file of "
                            f"{{'model': state dict, 'config': arguments}}")
    tensors = torch_pickle.tensors_of(saved, path, "model")
    kind = next((k for k, name in PACKAGE_FILES.items() if name in tensors), None)
    if kind is None:
      raise CheckpointError(f"{path}: a torch.save file of no package this loader knows "
                            f"(it looks for {sorted(PACKAGE_FILES.values())})")
    self.config = {"model_type": kind, "encoder_kwargs": saved["config"]}
    self._files[os.path.basename(path)] = TorchFile(path, tensors)
    self._where = {name: os.path.basename(path) for name in tensors}

  def _read_index(self, index: str, opener) -> None:
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise CheckpointError(f"{index}: no readable weight_map ({e!r})") from None
    if not isinstance(weight_map, dict):
      raise CheckpointError(f"{index}: weight_map is not an object")
    for name, shard in weight_map.items():
      # A shard is a file of this directory: no paths that lead out of it.
      if not isinstance(shard, str) or os.path.basename(shard) != shard or \
          shard in ("", ".", ".."):
        raise CheckpointError(f"{index}: tensor {name!r} names shard {shard!r}, not a file "
                              f"name in {self.dir}")
      self._where[name] = shard
    for shard in sorted(set(weight_map.values())):
      path = os.path.join(self.dir, shard)
      if not os.path.isfile(path):
        raise CheckpointError(f"{index} names shard {shard!r}, which is missing")
      f = self._files[shard] = opener(path)
      present = set(f.keys())
      absent = [n for n, s in weight_map.items() if s == shard and n not in present]
      if absent:
        raise CheckpointError(f"{path}: tensors listed in the index are absent: {absent[:5]}")

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def keys(self) -> list[str]:
    return list(self._where)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._files[self._where[name]].shape(name)

  def get(self, name: str) -> np.ndarray:
    if name not in self._where:
      raise CheckpointError(f"{self.dir}: tensor {name!r} is missing")
    return self._files[self._where[name]].get(name)

  def items(self) -> Iterator[tuple[str, np.ndarray]]:
    for name in self._where:
      yield name, self.get(name)


def config_value(config: dict, key: str, default=None, *, required: bool = False,
                 where: str = "config.json"):
  if key in config and config[key] is not None:
    return config[key]
  if required:
    raise CheckpointError(f"{where}: required field {key!r} is missing")
  return default


def required_shape(shapes, name: str, where: str) -> list:
  """`shapes(name)` (a checkpoint tensor's shape, None when absent: how configs are read
  from tensors), or an error naming the tensor."""
  shape = shapes(name)
  if shape is None:
    raise CheckpointError(f"{where}: tensor {name!r} is missing")
  return shape


def count_indexed(shapes, template: str) -> int:
  """How many of template.format(0), template.format(1), ... the checkpoint holds in a
  row (layers, blocks)."""
  n = 0
  while shapes(template.format(n)) is not None:
    n += 1
  return n


def sub_config(config: dict, outer: str, key: str, inner: str | None = None) -> dict:
  """The `key` part (model_type `inner`, or its own when None) of a composite config of
  model_type `outer` (a CLIP tower, Gemma 3's or Mistral 3's text model); any other config
  unchanged."""
  if config.get("model_type") != outer:
    return config
  if not isinstance(config.get(key), dict):
    raise CheckpointError(f"config.json: a {outer} config without {key!r}")
  inner = inner or config[key].get("model_type")
  if inner is None:
    raise CheckpointError(f"config.json: {key} of the {outer} config has no model_type")
  return {**config[key], "model_type": inner}


@dataclasses.dataclass(frozen=True)
class Source:
  """How one model parameter is read: the checkpoint tensors `names`, read in order and
  joined by `combine(tensors, keys, dtype)` (None: the one tensor as it is; `keys` are the
  names with the checkpoint's prefix, for messages; `dtype` the parameter's, so a large
  join is built once, in it). A name with a leading "/" is absolute (no checkpoint
  prefix)."""
  names: tuple[str, ...]
  combine: Callable | None = None
  what: str = ""  # how the tensors are joined, for error messages

  def read(self, get: Callable[[str], np.ndarray], keys, dtype) -> np.ndarray:
    tensors = [get(name) for name in self.names]
    return tensors[0] if self.combine is None else self.combine(tensors, list(keys), dtype)


def tensor(name: str) -> Source:
  return Source((name,))


def sliced(name: str, index: tuple) -> Source:
  """A slice of one tensor (timm's fused qkv)."""
  return Source((name,), lambda ts, keys, dtype: ts[0][index], f"part {index}")


def _stack(tensors, keys, dtype) -> np.ndarray:
  first = tuple(tensors[0].shape)
  for key, t in zip(keys, tensors):
    if tuple(t.shape) != first:
      raise CheckpointError(f"tensor {key!r} has shape {list(t.shape)}, unlike {keys[0]!r} "
                            f"({list(first)}): stacked experts must share a shape")
  out = np.empty((len(tensors), *first), dtype)
  for i, t in enumerate(tensors):
    out[i] = t  # converted into the parameter's dtype one expert at a time
  return out


def stacked(names) -> Source:
  """Per-expert tensors stacked on a new leading axis (Mixtral, OLMoE experts)."""
  return Source(tuple(names), _stack, f"{len(names)} tensors stacked")


# MXFP4 (OCP microscaling): 4-bit E2M1 values, two per byte (low nibble first), in blocks of
# 32 sharing one E8M0 scale byte (a power of two, bias 127; 255 is NaN).
FP4_E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                     -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray, name: str = "",
                     dtype=np.float32) -> np.ndarray:
  """GPT-OSS expert weights: blocks uint8 [E, R, G, 16] and scales uint8 [E, R, G] → `dtype`
  [E, G·32, R] (the transpose of the quantized [E, R, G·32], as the model multiplies x @ W),
  one expert at a time."""
  if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
    raise CheckpointError(f"MXFP4 tensor {name!r}: blocks and scales must be uint8 (got "
                          f"{blocks.dtype} and {scales.dtype})")
  if blocks.ndim != 4 or blocks.shape[-1] != 16 or blocks.shape[:-1] != scales.shape:
    raise CheckpointError(f"MXFP4 tensor {name!r}: blocks {list(blocks.shape)} and scales "
                          f"{list(scales.shape)} are not [E, R, G, 16] and [E, R, G]")
  e, r, g, _ = blocks.shape
  out = np.empty((e, g * 32, r), dtype)
  for i in range(e):
    scale = np.asarray(scales[i])
    if (scale == 255).any():
      raise CheckpointError(f"MXFP4 tensor {name!r}: expert {i} has a NaN scale (255)")
    packed = np.asarray(blocks[i])
    values = np.empty((r, g, 32), np.float32)
    values[..., 0::2] = FP4_E2M1[packed & 0x0F]
    values[..., 1::2] = FP4_E2M1[packed >> 4]
    values = np.ldexp(values, scale.astype(np.int32)[..., None] - 127)
    out[i] = values.reshape(r, g * 32).T
  return out


def mxfp4(base: str) -> Source:
  """An expert weight stored as `{base}_blocks` + `{base}_scales`."""
  return Source((f"{base}_blocks", f"{base}_scales"),
                lambda ts, keys, dtype: dequantize_mxfp4(*ts, " + ".join(keys), dtype),
                "MXFP4, dequantized")


FP8_DTYPES = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))


def dequantize_fp8(weight: np.ndarray, scale: np.ndarray, name: str = "",
                   block: tuple[int, int] | None = None) -> np.ndarray:
  """An FP8 weight [rows, cols] times its `weight_scale_inv` (transformers multiplies by it
  despite the name): one scale for the tensor, or a grid of [block_rows, block_cols] blocks
  (`block` from quantization_config.weight_block_size; else the grid divides the weight
  evenly). uint8 scales are E8M0 exponents (2^(s - 127)). → float32."""
  scale = np.asarray(scale)
  s = np.exp2(scale.astype(np.float32) - 127) if scale.dtype == np.uint8 else \
      scale.astype(np.float32)
  w = np.asarray(weight).astype(np.float32)
  if s.size == 1:
    return w * s.reshape(())
  if w.ndim != 2 or s.ndim != 2:
    raise CheckpointError(f"FP8 tensor {name!r}: weight {list(w.shape)} with scale grid "
                          f"{list(s.shape)} (expected a 2-D weight and a 2-D grid)")
  rows, cols = w.shape
  bm, bn = block or (rows // s.shape[0], cols // s.shape[1])
  if bm < 1 or bn < 1 or (-(-rows // bm), -(-cols // bn)) != s.shape:
    raise CheckpointError(f"FP8 tensor {name!r}: weight {list(w.shape)} does not match the "
                          f"scale grid {list(s.shape)}"
                          + (f" of {bm}×{bn} blocks" if block else ""))
  return w * np.repeat(np.repeat(s, bm, axis=0)[:rows], bn, axis=1)[:, :cols]
