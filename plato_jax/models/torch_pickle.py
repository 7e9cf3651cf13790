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
    "BoolStorage": np.bool_,
}  # (float8 tensors come as an UntypedStorage with the dtype apart: _rebuild_tensor_v3)


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


# torch dtypes by name, for _rebuild_tensor_v3 (which takes the dtype apart from the storage).
DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16,
          "bfloat16": ml_dtypes.bfloat16, "int64": np.int64, "int32": np.int32,
          "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
          "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2}


@dataclasses.dataclass(frozen=True)
class _Dtype:
  dtype: np.dtype


class _TensorSpec:
  """A tensor as the pickle describes it (a private class: a pickle cannot build one except
  through the rebuild functions below, which check their arguments)."""

  def __init__(self, storage, offset, shape, stride, dtype=None, where=""):
    ints = lambda v: isinstance(v, tuple) and all(  # noqa: E731
        isinstance(i, int) and not isinstance(i, bool) for i in v)
    if not isinstance(storage, _Storage) or not isinstance(offset, int) or \
        not ints(tuple(shape)) or not ints(tuple(stride)) or len(shape) != len(stride):
      raise CheckpointError(f"{where}: a tensor with malformed storage, offset, size or "
                            f"stride")
    if dtype is not None and dtype != storage.dtype:  # an untyped storage read as `dtype`
      itemsize = np.dtype(dtype).itemsize
      storage = _Storage(storage.key, np.dtype(dtype),
                         storage.numel * np.dtype(storage.dtype).itemsize // itemsize)
    self.args = (storage, offset, tuple(shape), tuple(stride))


class _Unpickler(pickle.Unpickler):
  def __init__(self, file, where: str):
    super().__init__(file)
    self.where = where
    # Fresh functions per unpickler: a pickle's BUILD on one of them changes nothing else.
    self.allowed = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"):
            lambda st, off, size, stride, *_: _TensorSpec(st, off, size, stride, where=where),
        ("torch._utils", "_rebuild_tensor_v3"): self._rebuild_v3,
        ("torch._utils", "_rebuild_parameter"): lambda data, *_: data,
        ("torch._utils", "_rebuild_parameter_with_state"): lambda data, *_: data,
        ("torch.storage", "UntypedStorage"): _StorageType(np.dtype(np.uint8))}

  def _rebuild_v3(self, storage, offset, size, stride, _grad, _hooks, dtype, *_):
    if not isinstance(dtype, _Dtype):
      raise CheckpointError(f"{self.where}: a tensor whose dtype is {dtype!r:.40}")
    return _TensorSpec(storage, offset, size, stride, dtype.dtype, self.where)

  def find_class(self, module, name):
    if (module, name) in self.allowed:
      return self.allowed[(module, name)]
    if module == "torch" and name in STORAGE_DTYPES:
      return _StorageType(np.dtype(STORAGE_DTYPES[name]))
    if module == "torch" and name in DTYPES:
      return _Dtype(np.dtype(DTYPES[name]))
    raise CheckpointError(f"{self.where}: the pickle refers to {module}.{name}, which a "
                          f"checkpoint of tensors does not need (not loaded)")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType) and isinstance(pid[4], int)):
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
        self.obj = self._lazy(_Unpickler(f, path).load())
    except CheckpointError:
      raise
    except Exception as e:  # noqa: BLE001  (a truncated, corrupt or self-nested pickle)
      raise CheckpointError(f"{path}: unreadable pickle ({type(e).__name__}: {e})") from None

  def _lazy(self, value):
    if isinstance(value, _TensorSpec):
      return LazyTensor(self, *value.args)
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
    else:  # deflated: read no more than the storage's bytes
      with self._zip.open(name) as f:
        raw = np.frombuffer(f.read(nbytes), np.uint8)
    return raw.view(s.dtype)


def state_dict(path: str, key: str | None = None) -> dict:
  """{name: LazyTensor} of a torch.save file holding a state dict (or, with `key`, a dict
  holding one under `key`, as Dasheng's {"model": ..., "config": ...})."""
  return tensors_of(TorchArchive(path).obj, path, key)


def tensors_of(obj, path: str, key: str | None = None) -> dict:
  """`state_dict` of an already unpickled object (`TorchArchive(path).obj`)."""
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
