"""Gallery sources and the prefetching tile stream.

A gallery source is anything with this small protocol (duck-typed):

    num_rows: int                  rows, in stream order
    dim: int                       feature dimension
    dtype: numpy dtype             storage dtype (float32, float16, bfloat16, ...)
    ids() -> np.ndarray[int64]     every row's id, in stream order (distinct int64 values)
    read(start, stop) -> ndarray   rows [start, stop) as a [stop-start, dim] numpy array
    take(positions) -> ndarray     optional: the rows at these positions, in their order
                                   (`take_rows` reads runs with `read` where it is missing)
    fingerprint() -> str           optional: changes whenever the rows do (what a resumed
                                   search checks; `fingerprint` warns where it is missing)

`as_source` wraps numpy / jax arrays, TensorStore arrays (optionally one layer of an
[N, L, D] array) and lists of shards (arrays or sources, concatenated in order).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import threading
import warnings
from typing import Any, Iterator, Sequence

import numpy as np

from plato_jax.kernels.primitives import RowWindow

MAX_POSITION = 2**31 - 2  # devices number a gallery's rows with int32 (-1, -2: no row)
ALIGN = 64  # bytes: the CPU client takes host arrays aligned so without a copy


def _as_host_array(x) -> np.ndarray:
  if isinstance(x, np.ndarray):
    return x
  return np.asarray(x)


def on_accelerator(x) -> bool:
  """A jax array held in accelerator memory: its tiles are sliced there, never copied to
  the host and back."""
  import jax
  return isinstance(x, jax.Array) and all(d.platform != "cpu" for d in x.devices())


class IdRows:
  """Rows of given ids within one id array (ids unique), sorted once for many lookups:
  `IdRows(ids)(wanted)` → the row of each wanted id; an id not there is a ValueError that
  names it (`what` leads the message)."""

  def __init__(self, ids):
    self.ids = np.asarray(ids)
    self.sorter = np.argsort(self.ids, kind="stable")  # ids[sorter] ascending

  def lookup(self, wanted) -> tuple[np.ndarray, np.ndarray]:
    """(the row of each wanted id — meaningless where absent —, whether it is there)."""
    wanted = np.asarray(wanted)
    if not self.ids.size:
      return np.zeros(wanted.shape, np.int64), np.zeros(wanted.shape, bool)
    at = np.minimum(np.searchsorted(self.ids, wanted, sorter=self.sorter), self.ids.size - 1)
    rows = self.sorter[at]
    return rows, self.ids[rows] == wanted

  def __call__(self, wanted, what: str = "ids not found") -> np.ndarray:
    wanted = np.asarray(wanted)
    rows, found = self.lookup(wanted)
    if not found.all():
      raise ValueError(f"{what}: {wanted[~found][:10].tolist()}")
    return rows


class _RowNumberIds:
  """Ids given at construction, or row numbers."""
  num_rows: int
  _ids: np.ndarray | None = None

  def ids(self) -> np.ndarray:
    if self._ids is None:
      return np.arange(self.num_rows, dtype=np.int64)
    return self._ids


class ArraySource(_RowNumberIds):
  """An in-memory [N, D] array: numpy, or jax (one in accelerator memory stays there and
  `read` returns device slices)."""

  def __init__(self, rows, ids=None):
    rows = rows if on_accelerator(rows) else _as_host_array(rows)
    if rows.ndim != 2:
      raise ValueError(f"gallery must be a 2-D [N, D] array, got shape {rows.shape}")
    self._rows = rows
    self.num_rows, self.dim = rows.shape
    self.dtype = np.dtype(rows.dtype)
    self._ids = None if ids is None else np.asarray(ids)

  def read(self, start: int, stop: int) -> np.ndarray:
    return self._rows[start:stop]

  def take(self, positions) -> np.ndarray:
    return np.asarray(self._rows[np.asarray(positions)])

  def fingerprint(self) -> str:
    """A digest of every value (a pass over the array)."""
    return digest(np.asarray(self._rows))


class TensorStoreSource(_RowNumberIds):
  """A TensorStore array [N, D], or one layer of [N, L, D] (`layer`)."""

  def __init__(self, array, ids=None, layer: int | None = None):
    shape = tuple(array.shape)
    kvstore = getattr(array, "kvstore", None)
    where = f" ({kvstore.url})" if kvstore is not None else ""  # in-memory arrays have none
    if layer is None and len(shape) != 2:
      raise ValueError(f"TensorStore gallery{where} must be [N, D] or be given a layer; "
                       f"shape {shape}")
    if layer is not None:
      if len(shape) != 3:
        raise ValueError(f"layer={layer} needs an [N, L, D] array, got shape {shape}{where}")
      if not -shape[1] <= layer < shape[1]:
        raise ValueError(f"layer {layer} out of range for {shape[1]} layers{where}")
      array = array[:, layer, :]
    self._array = array
    self.num_rows, self.dim = int(array.shape[0]), int(array.shape[1])
    self.dtype = np.dtype(array.dtype.numpy_dtype)
    self._ids = None if ids is None else np.asarray(ids)

  def read(self, start: int, stop: int) -> np.ndarray:
    # TensorStore slicing does not clamp: callers pass stop <= num_rows.
    return self._array[start:stop].read().result()

  def take(self, positions) -> np.ndarray:
    return self._array[np.asarray(positions, np.int64)].read().result()

  def fingerprint(self) -> str:
    """The array's spec and a digest of every value (a pass over the array, in tiles)."""
    h = hashlib.sha256(json.dumps(self._array.spec().to_json(), sort_keys=True).encode())
    step = max(1, 2**24 // max(1, self.dim))
    for start in range(0, self.num_rows, step):
      h.update(digest(self.read(start, min(start + step, self.num_rows))).encode())
    return h.hexdigest()[:16]


class ConcatSource:
  """Shards read one after another as one gallery. Ids: `ids` [N] when given; else a shard
  that is a source (the protocol above) brings its own, and an array shard's rows (or an
  `ArraySource`'s / `TensorStoreSource`'s made without ids) are numbered by their place in
  the whole gallery. Shards of different dtypes are read in
  their common dtype (`np.result_type`: a widening, values unchanged)."""

  def __init__(self, shards: Sequence[Any], ids=None):
    if not shards:
      raise ValueError("empty list of gallery shards")
    self._numbered = [_numbered_by_place(s) for s in shards]
    self._shards = [as_source(s) for s in shards]
    dims = [s.dim for s in self._shards]
    if len(set(dims)) != 1:
      raise ValueError("gallery shards have different dimensions: " + ", ".join(
          f"shard {i} has D={d}" for i, d in enumerate(dims) if d != dims[0]) +
          f" (shard 0 has D={dims[0]})")
    self.dim = dims[0]
    self.dtype = np.result_type(*[s.dtype for s in self._shards])
    self._offsets = np.cumsum([0] + [s.num_rows for s in self._shards])
    self.num_rows = int(self._offsets[-1])
    self._ids = None if ids is None else np.asarray(ids)

  def ids(self) -> np.ndarray:
    if self._ids is not None:
      return self._ids
    return np.concatenate([
        np.arange(lo, hi, dtype=np.int64) if numbered else s.ids()
        for s, numbered, lo, hi in zip(self._shards, self._numbered, self._offsets[:-1],
                                       self._offsets[1:])])

  def read(self, start: int, stop: int) -> np.ndarray:
    parts = []
    for shard, lo, hi in zip(self._shards, self._offsets[:-1], self._offsets[1:]):
      a, b = max(start, lo), min(stop, hi)
      if a < b:
        parts.append(np.asarray(shard.read(int(a - lo), int(b - lo)), dtype=self.dtype))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)

  def fingerprint(self) -> str:
    return digest(np.array([fingerprint(s) for s in self._shards]), self.ids())

  def take(self, positions) -> np.ndarray:
    positions = np.asarray(positions, np.int64)
    shard = np.searchsorted(self._offsets, positions, side="right") - 1
    out = np.empty((positions.size, self.dim), self.dtype)
    for i in np.unique(shard):
      at = shard == i
      out[at] = take_rows(self._shards[i], positions[at] - self._offsets[i])
    return out


def digest(*arrays) -> str:
  """A short hex digest of arrays: their dtypes, shapes and bytes."""
  h = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(a)
    h.update(str((a.dtype, a.shape)).encode())
    h.update(a.tobytes() if a.dtype != object else repr(a.tolist()).encode())
  return h.hexdigest()[:16]


def fingerprint(source) -> str:
  """The source's content fingerprint (`fingerprint()` of the protocol); for a source
  without one, a warning (a resumed search cannot see its rows change) and its class."""
  if hasattr(source, "fingerprint"):
    return str(source.fingerprint())
  warnings.warn(f"gallery source {type(source).__name__} has no fingerprint(): a resumed "
                f"search cannot tell whether its rows changed since the checkpoint")
  return f"unknown:{type(source).__name__}"


def host_rows(source) -> np.ndarray | None:
  """The source's rows as the host array that holds them, where it has one (no copy), else
  None: such rows are read where they lie rather than gathered."""
  rows = getattr(source, "_rows", None) if isinstance(source, ArraySource) else None
  return rows if isinstance(rows, np.ndarray) else None


def take_rows(source, positions) -> np.ndarray:
  """The rows of `source` at `positions` (any order, repeats allowed) as [len, dim]: its
  `take` where it has one, else one `read` per run of consecutive positions."""
  positions = np.asarray(positions, np.int64)
  if hasattr(source, "take"):
    rows = np.asarray(source.take(positions))
  else:
    wanted, inverse = np.unique(positions, return_inverse=True)
    breaks = np.flatnonzero(np.diff(wanted) != 1) + 1
    parts = [np.asarray(source.read(int(wanted[a]), int(wanted[b - 1]) + 1))
             for a, b in zip(np.r_[0, breaks], np.r_[breaks, wanted.size])]
    rows = (np.concatenate(parts) if parts else np.zeros((0, source.dim), source.dtype))[inverse]
  if rows.shape != (positions.size, source.dim):
    raise ValueError(f"gallery source {type(source).__name__} returned shape {rows.shape} for "
                     f"{positions.size} rows, expected {(positions.size, source.dim)}")
  return rows


def is_source(x) -> bool:
  """`x` follows the gallery source protocol."""
  return all(hasattr(x, a) for a in ("num_rows", "dim", "ids", "read"))


def _numbered_by_place(shard) -> bool:
  """A shard whose rows take their place in the whole gallery as ids: an array, or one of
  the sources here made without ids."""
  return not is_source(shard) or (isinstance(shard, _RowNumberIds) and shard._ids is None)


def as_source(gallery, ids=None):
  """Wraps `gallery` in a source; objects that already follow the protocol pass through."""
  if isinstance(gallery, (list, tuple)):
    return ConcatSource(gallery, ids=ids)
  if is_source(gallery):
    if ids is not None:
      raise ValueError("a gallery source carries its own ids")
    return gallery
  if type(gallery).__module__.startswith("tensorstore"):
    return TensorStoreSource(gallery, ids=ids)
  return ArraySource(gallery, ids=ids)


@dataclasses.dataclass
class Tile:
  """Rows [start, stop) of the stream, reordered by id (ties on device break by column)."""
  start: int
  stop: int
  rows: Any            # [stop-start, D], sorted by id: numpy, a jax array on the device, or
                       # a RowWindow of host rows
  ids: np.ndarray       # int64, ascending


def aligned_empty(shape, dtype, align: int = ALIGN) -> np.ndarray:
  """An uninitialised C-contiguous array whose data starts on an `align`-byte boundary."""
  nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
  buf = np.empty(nbytes + align, np.uint8)
  offset = (-buf.ctypes.data) % align
  return buf[offset:offset + nbytes].view(dtype).reshape(shape)


class TileBuffers:
  """Aligned host buffers that tile copies reuse. A fresh 100 MB buffer pays its page faults
  on every tile: copying a 32,768 × 768 f32 tile took 42–64 ms into a new buffer and 16 ms
  into a reused one (2-core CPU, 2026-11-23). Whoever consumes a tile gives its buffer back
  (`give_back`) once nothing reads it any more."""

  def __init__(self):
    self._free = collections.defaultdict(list)
    self._mine: dict[int, tuple[np.ndarray, tuple]] = {}  # id → (buffer, key): ids are reused
    self._lock = threading.Lock()

  def take(self, shape, dtype) -> np.ndarray:
    key = (tuple(shape), np.dtype(dtype))
    with self._lock:
      if self._free[key]:
        return self._free[key].pop()
    out = aligned_empty(shape, dtype)
    with self._lock:
      self._mine[id(out)] = (out, key)
    return out

  def give_back(self, array) -> None:
    """Returns a buffer `take` made; anything else is ignored."""
    with self._lock:
      buffer, key = self._mine.get(id(array), (None, None))
      if buffer is array and not any(b is array for b in self._free[key]):
        self._free[key].append(array)


def host_aligned(rows: np.ndarray, dtype=None, buffers: TileBuffers | None = None) -> np.ndarray:
  """`rows` as a 64-byte-aligned C-contiguous array of `dtype` (default: its own), copied
  only when it is not one already (into a buffer from `buffers`, when given); a conversion
  and the alignment share one copy.

  The CPU backend takes such arrays without a copy (measured: 0.2 ms instead of 90 ms for
  a 100 MB tile); the copy, when needed, happens here in a reader thread.
  """
  dtype = rows.dtype if dtype is None else np.dtype(dtype)
  if rows.dtype == dtype and rows.flags.c_contiguous and rows.ctypes.data % ALIGN == 0:
    return rows
  return _aligned_copy(rows, rows.shape, dtype, buffers)


def _aligned_copy(rows: np.ndarray, shape, dtype, buffers: TileBuffers | None) -> np.ndarray:
  """An aligned array of `shape` (from `buffers`, when given) starting with `rows`, converted
  to `dtype`; the rest is left as it is."""
  out = aligned_empty(shape, dtype) if buffers is None else buffers.take(shape, dtype)
  np.copyto(out.reshape(-1)[:rows.size].reshape(rows.shape), rows,
            casting="unsafe" if rows.dtype != dtype else "no")
  return out


def window_length(tile_rows: int, dim: int, itemsize: int = 4) -> int:
  """Elements of the windows of `tile_rows`-row tiles: room for any offset."""
  return tile_rows * dim + ALIGN // itemsize


def host_window(rows: np.ndarray, length: int, dtype,
                buffers: TileBuffers | None = None) -> RowWindow:
  """`rows` as a `RowWindow` of `length` elements: a view of the allocation holding them
  when it reaches far enough on both sides (an interior tile of an in-memory gallery),
  else a copy (converted to `dtype`; zero past the rows)."""
  dtype = np.dtype(dtype)
  if rows.dtype == dtype and rows.flags.c_contiguous and rows.size:
    view = _window_around(rows, length)
    if view is not None:
      return view
  out = _aligned_copy(rows, (length,), dtype, buffers)
  out[rows.size:] = 0
  return RowWindow(out, np.int32(0))


def _window_around(rows: np.ndarray, length: int) -> RowWindow | None:
  """An aligned view of `length` elements starting at most ALIGN bytes before `rows`, inside
  the array that owns their memory; None if that array does not reach so far."""
  owner = rows
  while isinstance(owner.base, np.ndarray):
    owner = owner.base
  item, start = rows.itemsize, rows.ctypes.data
  if not owner.flags.c_contiguous or start % item:
    return None
  begin = start - start % ALIGN
  lo = owner.ctypes.data
  if begin < lo or begin + length * item > lo + owner.nbytes:
    return None
  window = owner.reshape(-1).view(np.uint8)[begin - lo:begin - lo + length * item]
  return RowWindow(window.view(rows.dtype), np.int32((start - begin) // item))


def _raise_for_rows(tile_ids: np.ndarray, bad: np.ndarray, what: str) -> None:
  if bad.any():
    ids = tile_ids[bad]
    raise ValueError(f"gallery rows with {what}: ids {ids[:10].tolist()}"
                     + (f" and {ids.size - 10} more" if ids.size > 10 else ""))


def raise_for_bad_rows(source, ids: np.ndarray, slots: Sequence[np.ndarray], *,
                       nonzero: bool) -> None:
  """Scans the rows on the host and raises a ValueError naming the NaN/Inf rows, rows whose
  float32 squared norm overflows, and (with `nonzero`) all-zero rows. The engine counts such
  rows on the device and calls this only when the count is not zero."""
  for positions in slots:
    rows = take_rows(source, positions).astype(np.float32)
    tile_ids = ids[positions]
    _raise_for_rows(tile_ids, ~np.isfinite(rows).all(axis=1), "NaN/Inf values")
    with np.errstate(over="ignore"):
      _raise_for_rows(tile_ids, ~np.isfinite(np.square(rows).sum(axis=1)),
                      "a squared norm that overflows float32")
    if nonzero:
      _raise_for_rows(tile_ids, ~rows.any(axis=1), "zero norm (cannot be normalised)")


def stream_tiles(source, ids: np.ndarray, ranges: Sequence[tuple[int, int]], *,
                 dtype=None, prefetch: int = 4, buffers: TileBuffers | None = None,
                 window: int | None = None) -> Iterator[Tile]:
  """Reads tiles in background threads, `prefetch` reads in flight; sorts each tile by id
  (and converts it to `dtype`, when given). Host tiles that must be copied (unaligned,
  converted or reordered rows) are copied into `buffers`' when given; the consumer gives
  them back. With `window` (elements), host tiles come as `RowWindow`s of that length,
  copied only where they cannot be read in place.

  Several reads in flight matter: one TensorStore read of a tile does not keep the storage
  and decode threads busy on its own (measured: one in flight read at a quarter of the rate).
  """

  def load(r):
    start, stop = r
    rows = source.read(start, stop)
    on_device = on_accelerator(rows)
    rows = rows if on_device else np.asarray(rows)
    if rows.shape != (stop - start, source.dim):
      raise ValueError(f"gallery source {type(source).__name__} returned shape {rows.shape} "
                       f"for rows [{start}, {stop}), expected {(stop - start, source.dim)}")
    if np.dtype(rows.dtype) != np.dtype(source.dtype):  # converting would hide a wrong source
      raise ValueError(f"gallery source {type(source).__name__} returned {rows.dtype} rows "
                       f"for [{start}, {stop}), but declares dtype {np.dtype(source.dtype)}")
    tile_ids = ids[start:stop]
    order = np.argsort(tile_ids, kind="stable")
    if not np.all(order == np.arange(order.size)):
      rows, tile_ids = rows[order], tile_ids[order]
    if on_device:
      return Tile(start, stop, rows if dtype is None else rows.astype(dtype), tile_ids)
    if window is not None:
      return Tile(start, stop, host_window(rows, window, dtype or rows.dtype, buffers), tile_ids)
    return Tile(start, stop, host_aligned(rows, dtype, buffers), tile_ids)

  with concurrent.futures.ThreadPoolExecutor(max_workers=prefetch) as pool:
    pending = [pool.submit(load, r) for r in ranges[:prefetch]]
    nxt = len(pending)
    while pending:
      tile = pending.pop(0).result()
      if nxt < len(ranges):
        pending.append(pool.submit(load, ranges[nxt]))
        nxt += 1
      yield tile
