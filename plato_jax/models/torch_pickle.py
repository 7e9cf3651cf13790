"""PyTorch checkpoint files (`torch.save`: pytorch_model.bin, *.pt, *.pth) read without torch
and without running the pickle's code.

A torch.save file is a zip archive: `<name>/data.pkl` pickles the object (a state dict, or a
dict that holds one), and each tensor's storage is the raw little-endian bytes of
`<name>/data/<key>`. The unpickler here resolves only the globals a checkpoint needs (the
tensor and parameter rebuilders, the storage types, OrderedDict); any other is an error
naming it, so a malicious pickle cannot run code. Tensors come back as `LazyTensor`s: their
dtype and shape are known at once, their bytes are read (memory-mapped where the archive
stores them uncompressed, as torch does) when asked for, one at a time.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

from plato_jax.models.errors import CheckpointError

STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "Float8_e4m3fnStorage": ml_dtypes.float8_e4m3fn,
    "Float8_e5m2Storage": ml_dtypes.float8_e5m2,
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
  dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _Storage:
  key: str
  dtype: np.dtype
  numel: int


@dataclasses.dataclass
class LazyTensor:
  """A tensor of a torch.save archive, read on `numpy()`."""
  archive: "TorchArchive"
  storage: _Storage
  offset: int
  shape: tuple[int, ...]
  stride: tuple[int, ...]

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(self.storage.dtype)

  def numpy(self) -> np.ndarray:
    data = self.archive.storage(self.storage)
    item = self.dtype.itemsize
    if not self.shape:
      return data[self.offset:self.offset + 1].reshape(())
    end = self.offset + 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
    if self.offset < 0 or end > data.size or min(self.stride, default=0) < 0:
      raise CheckpointError(f"{self.archive.path}: a tensor of shape {list(self.shape)} "
                            f"lies outside its storage {self.storage.key!r}")
    return np.lib.stride_tricks.as_strided(
        data[self.offset:], self.shape, tuple(s * item for s in self.stride), writeable=False)


def _rebuild_tensor(storage, offset, shape, stride, *_):
  return ("tensor", storage, int(offset), tuple(shape), tuple(stride))


def _rebuild_parameter(data, *_):
  return data


class _Unpickler(pickle.Unpickler):
  ALLOWED = {("collections", "OrderedDict"): collections.OrderedDict,
             ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
             ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
             ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter}

  def __init__(self, file, where: str):
    super().__init__(file)
    self.where = where

  def find_class(self, module, name):
    if (module, name) in self.ALLOWED:
      return self.ALLOWED[(module, name)]
    if module == "torch" and name in STORAGE_DTYPES:
      return _StorageType(np.dtype(STORAGE_DTYPES[name]))
    raise CheckpointError(f"{self.where}: the pickle refers to {module}.{name}, which a "
                          f"checkpoint of tensors does not need (not loaded)")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise CheckpointError(f"{self.where}: unsupported persistent id {pid!r:.80}")
    _, kind, key, _location, numel = pid
    return _Storage(str(key), kind.dtype, int(numel))


class TorchArchive:
  """One torch.save file: `obj` is the unpickled object with LazyTensors in place of
  tensors."""

  def __init__(self, path: str):
    self.path = path
    try:
      self._zip = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
      raise CheckpointError(f"{path}: not a torch.save zip archive ({e}); files saved by "
                            f"torch < 1.6 or with _use_new_zipfile_serialization=False are "
                            f"not read") from None
    names = self._zip.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pickles) != 1:
      raise CheckpointError(f"{path}: expected one data.pkl in the archive, found {pickles}")
    self._prefix = pickles[0][:-len("data.pkl")]
    self._map = None
    try:
      with self._zip.open(pickles[0]) as f:
        raw = _Unpickler(f, path).load()
    except CheckpointError:
      raise
    except Exception as e:  # noqa: BLE001  (a truncated or corrupt pickle)
      raise CheckpointError(f"{path}: unreadable pickle ({type(e).__name__}: {e})") from None
    self.obj = self._lazy(raw)

  def _lazy(self, value):
    if isinstance(value, tuple) and len(value) == 5 and value[0] == "tensor":
      return LazyTensor(self, *value[1:])
    if isinstance(value, dict):
      return {k: self._lazy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
      return type(value)(self._lazy(v) for v in value)
    return value

  def storage(self, s: _Storage) -> np.ndarray:
    """The storage's elements, memory-mapped when stored uncompressed."""
    name = f"{self._prefix}data/{s.key}"
    try:
      info = self._zip.getinfo(name)
    except KeyError:
      raise CheckpointError(f"{self.path}: storage {s.key!r} is missing from the "
                            f"archive") from None
    nbytes = s.numel * np.dtype(s.dtype).itemsize
    if info.file_size < nbytes:
      raise CheckpointError(f"{self.path}: storage {s.key!r} holds {info.file_size} bytes, "
                            f"{s.numel} elements need {nbytes}")
    if info.compress_type == zipfile.ZIP_STORED:
      with open(self.path, "rb") as f:  # the data follows the local header
        f.seek(info.header_offset)
        header = f.read(30)
        name_len, extra_len = struct.unpack("<HH", header[26:30])
      start = info.header_offset + 30 + name_len + extra_len
      if self._map is None:
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
      raw = self._map[start:start + nbytes]
    else:
      raw = np.frombuffer(self._zip.read(name)[:nbytes], np.uint8)
    return raw.view(s.dtype)


def state_dict(path: str, key: str | None = None) -> dict:
  """{name: LazyTensor} of a torch.save file holding a state dict (or, with `key`, a dict
  holding one under `key`, as Dasheng's {"model": ..., "config": ...})."""
  obj = TorchArchive(path).obj
  if key is not None:
    if not isinstance(obj, dict) or key not in obj:
      raise CheckpointError(f"{path}: no {key!r} entry in the saved object")
    obj = obj[key]
  if not isinstance(obj, dict):
    raise CheckpointError(f"{path}: the saved object is a {type(obj).__name__}, not a "
                          f"state dict")
  bad = [k for k, v in obj.items() if not isinstance(v, LazyTensor)]
  if bad:
    raise CheckpointError(f"{path}: entries that are not tensors: {bad[:5]}")
  return obj


def is_torch_archive(path: str) -> bool:
  return os.path.isfile(path) and zipfile.is_zipfile(path)
