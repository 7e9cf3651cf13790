"""TensorStore feature stores: one model's per-layer features over one dataset.

Layout under a store's root (a local path or a TensorStore kvstore URL: file://, gs://,
s3://, memory://):

    plato_store.json   metadata (below); written last, and `complete` only when every row is
    plato_store.lock   while a writer works on the store: who (host, pid, since); created
                       with a conditional write, so of two writers one gets the store
    features/          zarr3 [N, L, D] (bf16, f16 or f32), sharding codec: a shard holds
                       `shard_rows` rows of ONE layer, split in inner chunks of `chunk_rows`
                       rows — streaming one layer reads only that layer's bytes, in tiles;
                       a random row costs its inner chunk (read and checksummed whole), so
                       chunks default to ~256 KB
    ids/               zarr3 [N] int64 row ids (stable dataset ids)
    columns/<name>/    zarr3 [N] per-row values, optional: float32 (e.g. a caption's loss) or
                       int64 (labels, source ids: exact at any size)
    seals/             zarr3 [N / shard_rows, L + 1 + columns] uint64: each shard file's seal
                       (`plato_jax.shardfile`), by row shard and array (layers, ids, columns)

Every inner chunk carries a CRC-32C, checked whenever it is read; a missing shard is an
error, never rows of zeros; and a reader compares a shard's seal with the writer's before
it reads from it, so a shard file moved or copied onto another's name is an error naming
the file, not data from the wrong rows. A complete local store's features are read
straight from their shard files (`plato_jax.shardfile.ChunkReader`: the same checks, a
quarter of TensorStore's CPU time); everything else through TensorStore.

One [N, L, D] array rather than L arrays keeps a row's layers under one id and lets a layer
be chosen at read time; the [rows, 1, D] chunk shape makes one layer as cheap to stream as
a separate array would be.

Metadata: format, version, model, dataset, pooling, layers (names), num_rows, num_layers,
dim, dtype, chunk_rows, shard_rows, columns, column_dtypes (absent: float32 columns),
rows_written, complete, sealed, generation (a token renewed whenever the writer writes:
resumed work keyed on it sees a rewritten store), note (the writer's `note` at `note_rows`
rows, the last durable one: a resumed writer continues from there, where its producer
continues), plus any `extra` fields.

zarr-python reads the arrays directly (float32/float16; bfloat16 is a TensorStore zarr3
extension data type that zarr-python 3.1 does not know).
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
import warnings
from typing import Any, Sequence

import ml_dtypes
import numpy as np
import tensorstore as ts

from plato_jax.lock import Busy, Lock
from plato_jax.shardfile import UNSEALED, ChunkReader, ShardError, shard_seals, sharding_codec

FORMAT = "plato_jax.store"
VERSION = 1
METADATA = "plato_store.json"
LOCK = "plato_store.lock"
# One context for every open: shares caches and makes memory:// stores visible across opens.
_CONTEXT = ts.Context()
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
CHUNK_BYTES = 2 ** 18  # default inner chunk: streams at full rate, and a gathered row costs little


COLUMN_DTYPES = ("float32", "int64")


def _column_values(name: str, values, dtype: np.dtype) -> np.ndarray:
  """An appended column's values in its dtype; a ValueError naming the column and the first
  rows where that would change a value (a fraction into int64, an integer past float32's
  2^24 of exact ones)."""
  values = np.asarray(values).reshape(-1)
  if dtype == np.int64:
    if not (np.issubdtype(values.dtype, np.integer) or values.dtype == bool):
      floats = values.astype(np.float64)
      bad = np.flatnonzero(~np.isfinite(floats) | (floats != np.round(floats))
                           | (np.abs(floats) >= 2.0 ** 53))
      if bad.size:
        raise ValueError(f"append: int64 column {name!r} given non-integer values at rows "
                         f"{bad[:10].tolist()}: {values[bad[:3]].tolist()}")
    return values.astype(np.int64)
  if np.issubdtype(values.dtype, np.integer):
    bad = np.flatnonzero(np.abs(values.astype(np.float64)) > 2 ** 24)
    if bad.size:
      raise ValueError(f"append: float32 column {name!r} cannot hold integers past 2^24 "
                       f"exactly (rows {bad[:10].tolist()}: {values[bad[:3]].tolist()}); "
                       f"create it as an int64 column")
  return values.astype(np.float32)


def default_chunk_rows(dim: int, itemsize: int) -> int:
  """Rows of a ~CHUNK_BYTES inner chunk: a power of two, 1 to 4,096."""
  rows = max(1, min(4096, CHUNK_BYTES // (dim * itemsize)))
  return 1 << (rows.bit_length() - 1)


def _root_url(path: str) -> str:
  if "://" in path:
    return path.rstrip("/") + "/"
  return "file://" + os.path.abspath(path) + "/"


def _existing(url: str) -> dict:
  """The spec that opens an existing array of a store: a missing shard is an error, never
  rows of the fill value (zeros) read as data. So chunks of zeros are written like any
  other (TensorStore would otherwise leave them out, and the read would fail)."""
  return {"driver": "zarr3", "kvstore": url, "fill_missing_data_reads": False,
          "store_data_equal_to_fill_value": True}


def _sharded_spec(url: str, shape, dtype: str, shard, chunk) -> dict:
  return {
      **_existing(url),
      "metadata": {
          "shape": list(shape),
          "data_type": dtype,
          "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(shard)}},
          "codecs": [sharding_codec(chunk)],
      },
  }


def _seals_spec(url: str, row_shards: int, slots: int) -> dict:
  return {
      **_existing(url),
      "metadata": {
          "shape": [row_shards, slots], "data_type": "uint64", "fill_value": UNSEALED,
          "chunk_grid": {"name": "regular", "configuration": {
              "chunk_shape": [min(row_shards, 4096), slots]}},
          "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                     {"name": "crc32c"}]},
  }


class _Shards:
  """A store's shard files by (slot, row shard) — slots: its layers, then ids, then its
  columns — and their seals."""

  def __init__(self, root: str, meta: dict):
    self.rows, self.layers = meta["shard_rows"], meta["num_layers"]
    self.chunks = meta["shard_rows"] // meta["chunk_rows"]
    self.arrays = ["ids/"] + [f"columns/{c}/" for c in meta.get("columns", [])]
    self.slots = self.layers + len(self.arrays)
    self.kv = ts.KvStore.open(root, context=_CONTEXT).result()

  def key(self, slot: int, shard: int) -> str:
    if slot < self.layers:
      return f"features/c/{shard}/{slot}/0"
    return f"{self.arrays[slot - self.layers]}c/{shard}"

  def path(self, slot: int, shard: int) -> str:
    """A shard file's local path (a file:// store)."""
    return self.kv.url[len("file://"):] + self.key(slot, shard)

  def seals(self, pairs) -> list[int]:
    """Seals of (slot, shard) pairs, read from the files."""
    return shard_seals(self.kv, [self.key(*p) for p in pairs], self.chunks)

  def describe(self, slot: int, shard: int) -> str:
    what = f"layer {slot}" if slot < self.layers else self.arrays[slot - self.layers][:-1]
    return (f"{self.kv.url}{self.key(slot, shard)} (rows {shard * self.rows}.."
            f"{(shard + 1) * self.rows - 1} of {what})")


def _read_metadata(root: str) -> dict:
  kv = ts.KvStore.open(root, context=_CONTEXT).result()
  got = kv.read(METADATA).result()
  where = root + METADATA
  if got.state != "value":
    raise ValueError(f"not a plato_jax feature store: {where} is missing")
  try:
    meta = json.loads(bytes(got.value))
  except ValueError as e:
    raise ValueError(f"corrupt store metadata {where}: {e}") from None
  required = ("format", "version", "num_rows", "num_layers", "dim", "dtype", "rows_written",
              "complete", "layers")
  missing = [f for f in required if f not in meta]
  if missing or meta.get("format") != FORMAT:
    raise ValueError(f"corrupt store metadata {where}: missing fields {missing}"
                     if missing else f"corrupt store metadata {where}: format {meta['format']!r}")
  kinds = {"version": int, "num_rows": int, "num_layers": int, "dim": int, "rows_written": int,
           "complete": bool, "layers": list, "chunk_rows": int, "shard_rows": int}
  wrong = [k for k, kind in kinds.items() if k in meta and (
      not isinstance(meta[k], kind) or (kind is int and (isinstance(meta[k], bool)
                                                          or meta[k] < 0)))]
  if wrong:
    raise ValueError(f"corrupt store metadata {where}: " + ", ".join(
        f"{k}={meta[k]!r} (expected {'a count' if kinds[k] is int else kinds[k].__name__})"
        for k in wrong))
  if meta["version"] > VERSION:
    raise ValueError(f"{where}: store version {meta['version']} is newer than this "
                     f"plato_jax ({VERSION})")
  if meta["dtype"] not in DTYPES:
    raise ValueError(f"{where}: unsupported dtype {meta['dtype']!r}")
  return meta


def _write_metadata(root: str, meta: dict) -> None:
  kv = ts.KvStore.open(root, context=_CONTEXT).result()
  kv.write(METADATA, json.dumps(meta, indent=1, sort_keys=True).encode()).result()


StoreBusy = Busy  # another writer, alive, holds the store


def exists(path: str) -> bool:
  """Whether a store (complete or not) has its metadata at `path`."""
  kv = ts.KvStore.open(_root_url(path), context=_CONTEXT).result()
  return kv.read(METADATA).result().state == "value"


class StoreWriter:
  """Appends rows (all layers of each) in order; resumable after a crash.

  Rows are buffered to whole shards, so each shard is written once, asynchronously.
  `rows_written` in the metadata only moves once the data before it is durable, so a rerun
  after a crash continues from there (`StoreWriter.resume`).
  """

  def __init__(self, root: str, meta: dict, features, ids, columns=None, lock=None):
    self.root, self.meta = root, meta
    self._lock = None if lock is None else lock.adopt(self)  # our plato_store.lock
    self._features, self._ids = features, ids
    self._dtype = DTYPES[meta["dtype"]]
    self._buffer: list[tuple[np.ndarray, np.ndarray, dict]] = []
    self._buffered = 0
    self._pending: list[Any] = []
    self._columns = {name: ts.open(_existing(root + f"columns/{name}/"),
                                   open=True, context=_CONTEXT).result()
                     for name in meta.get("columns", [])} if columns is None else columns
    self._shards = _Shards(root, meta)
    self._seals = ts.open(_existing(root + "seals/"), open=True, context=_CONTEXT).result() \
        if meta.get("sealed") else None  # stores from before seals stay without
    self._notes: list[tuple[int, Any]] = []  # (store position after an append, its note)
    self.rows_written = meta["rows_written"]   # durable
    self.position = self.rows_written         # appended (buffered or in flight)

  @classmethod
  def create(cls, path: str, *, num_rows: int, num_layers: int, dim: int,
             dtype: str = "bfloat16", model: str = "", dataset: str = "", pooling: str = "",
             layers: Sequence[str] | None = None, chunk_rows: int | None = None,
             shard_rows: int | None = None, overwrite: bool = False,
             columns: Sequence[str] | dict = (), extra: dict | None = None) -> "StoreWriter":
    """A new store (see the module docstring). `columns`: names of float32 columns, or
    {name: "float32" | "int64"}."""
    if dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if min(num_rows, num_layers, dim) < 1:
      raise ValueError(f"store shape must be positive, got N={num_rows} L={num_layers} D={dim}")
    for what, value in (("chunk_rows", chunk_rows), ("shard_rows", shard_rows)):
      if value is not None and (int(value) != value or value < 1):
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    column_dtypes = dict(columns) if isinstance(columns, dict) else \
        dict.fromkeys(columns, "float32")
    odd = {name: kind for name, kind in column_dtypes.items() if kind not in COLUMN_DTYPES}
    if odd:
      raise ValueError(f"column dtypes must be one of {COLUMN_DTYPES}, got {odd}")
    root = _root_url(path)
    if exists(path) and not overwrite:
      raise ValueError(f"a feature store already exists at {root} (resume it or overwrite=True)")
    lock = Lock(root, LOCK, what="store", context=_CONTEXT)  # before anything goes
    layers = [str(x) for x in (layers if layers is not None else range(num_layers))]
    if len(layers) != num_layers:
      raise ValueError(f"{len(layers)} layer names for {num_layers} layers")
    itemsize = np.dtype(DTYPES[dtype]).itemsize
    if chunk_rows is None:
      chunk_rows = default_chunk_rows(dim, itemsize)
    chunk_rows = max(1, min(chunk_rows, num_rows))
    if shard_rows is None:
      # A shard of every layer is buffered before it is written: keep that under ~256 MB.
      budget = 256 * 2**20 // (num_layers * dim * itemsize)
      shard_rows = max(chunk_rows, budget // chunk_rows * chunk_rows)
    shard_rows = min(shard_rows, -(-num_rows // chunk_rows) * chunk_rows)
    if shard_rows % chunk_rows:
      raise ValueError(f"shard_rows {shard_rows} must be a multiple of chunk_rows {chunk_rows}")
    meta = dict(format=FORMAT, version=VERSION, model=model, dataset=dataset, pooling=pooling,
                layers=layers, num_rows=int(num_rows), num_layers=int(num_layers), dim=int(dim),
                dtype=dtype, chunk_rows=int(chunk_rows), shard_rows=int(shard_rows),
                columns=list(column_dtypes), column_dtypes=column_dtypes, rows_written=0,
                complete=False, sealed=True, note=None,
                note_rows=None,
                **(extra or {}))
    _write_metadata(root, meta)  # first: an interrupted create is an incomplete store
    features = ts.open(_sharded_spec(root + "features/", (num_rows, num_layers, dim), dtype,
                                     (shard_rows, 1, dim), (chunk_rows, 1, dim)),
                       create=True, delete_existing=True,
                       context=_CONTEXT).result()
    ids = ts.open(_sharded_spec(root + "ids/", (num_rows,), "int64", (shard_rows,),
                                (chunk_rows,)), create=True, delete_existing=True,
                       context=_CONTEXT).result()
    cols = {name: ts.open(_sharded_spec(root + f"columns/{name}/", (num_rows,), kind,
                                        (shard_rows,), (chunk_rows,)), create=True,
                          delete_existing=True, context=_CONTEXT).result()
            for name, kind in column_dtypes.items()}
    ts.open(_seals_spec(root + "seals/", -(-num_rows // shard_rows), num_layers + 1 + len(cols)),
            create=True, delete_existing=True, context=_CONTEXT).result()
    return cls(root, meta, features, ids, cols, lock=lock)

  @classmethod
  def resume(cls, path: str, *, from_note: bool = False) -> "StoreWriter":
    """The writer of an incomplete store, at its durable rows. `from_note`: at the rows of
    the last durable note instead (0 if none), for a producer that continues from its
    notes: rows durable past the note are written again."""
    root = _root_url(path)
    meta = _read_metadata(root)
    if meta["complete"]:
      raise ValueError(f"store {root} is already complete")
    lock = Lock(root, LOCK, what="store", context=_CONTEXT)
    if from_note or meta.get("note_rows") is not None:
      meta["rows_written"] = meta.get("note_rows") or 0
    features = ts.open(_existing(root + "features/"), open=True,
                       context=_CONTEXT).result()
    ids = ts.open(_existing(root + "ids/"), open=True,
                  context=_CONTEXT).result()
    return cls(root, meta, features, ids, lock=lock)

  def append(self, rows, ids, columns: dict | None = None, note=None) -> None:
    """rows [B, L, D] (or [B, D] for a one-layer store), ids [B] int, `columns` {name: [B]}
    for the store's per-row columns. `note` (JSON) is kept with the position after these
    rows and lands in the metadata once they are durable: a producer records there where
    to continue after a crash."""
    rows = np.asarray(rows)
    if rows.ndim == 2 and self.meta["num_layers"] == 1:
      rows = rows[:, None, :]
    want = (self.meta["num_layers"], self.meta["dim"])
    if rows.ndim != 3 or rows.shape[1:] != want:
      raise ValueError(f"append: rows of shape {rows.shape} do not match the store's "
                       f"[B, {want[0]}, {want[1]}]")
    ids = np.asarray(ids)
    if ids.shape != (rows.shape[0],) or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"append: ids must be {rows.shape[0]} integers, got {ids.shape} {ids.dtype}")
    columns = dict(columns or {})
    if sorted(columns) != sorted(self._columns):
      raise ValueError(f"append: columns {sorted(columns)} given, the store has "
                       f"{sorted(self._columns)}")
    columns = {k: _column_values(k, v, np.dtype(self._columns[k].dtype.numpy_dtype))
               for k, v in columns.items()}
    for name, values in columns.items():
      if values.shape != (rows.shape[0],):
        raise ValueError(f"append: column {name!r} has {values.shape[0]} values for "
                         f"{rows.shape[0]} rows")
    if self.position + rows.shape[0] > self.meta["num_rows"]:
      raise ValueError(f"append: rows {self.position}..{self.position + rows.shape[0]} "
                       f"exceed the store's {self.meta['num_rows']} rows")
    bad = np.flatnonzero(~np.isfinite(rows.astype(np.float32)).all(axis=(1, 2)))
    if bad.size:
      raise ValueError(f"append: rows with NaN/Inf features at store rows "
                       f"{(self.position + bad[:10]).tolist()} (ids {ids[bad[:10]].tolist()})")
    self._buffer.append((rows.astype(self._dtype), ids.astype(np.int64), columns))
    self._buffered += rows.shape[0]
    self.position += rows.shape[0]
    if note is not None:
      self._notes.append((self.position, note))
    self._flush(final=self.position == self.meta["num_rows"])

  def _flush(self, final: bool) -> None:
    """Issues the buffered rows that fill whole shards (all of them when `final`)."""
    if not self._buffer:
      return
    start = self.position - self._buffered
    shard = self.meta["shard_rows"]
    if self._buffered < shard and not final:
      return
    rows_all = np.concatenate([r for r, _, _ in self._buffer])
    ids_all = np.concatenate([i for _, i, _ in self._buffer])
    cols_all = {k: np.concatenate([c[k] for _, _, c in self._buffer]) for k in self._columns}
    whole = len(rows_all) if final else (start + len(rows_all)) // shard * shard - start
    if whole:
      self._issue(start, rows_all[:whole], ids_all[:whole],
                  {k: v[:whole] for k, v in cols_all.items()})
    rest = len(rows_all) - whole
    self._buffer = [(rows_all[whole:], ids_all[whole:], {k: v[whole:] for k, v in
                                                         cols_all.items()})] if rest else []
    self._buffered = rest

  def _issue(self, start: int, rows: np.ndarray, ids: np.ndarray, columns: dict) -> None:
    stop = start + len(rows)
    futures = [self._features[start:stop].write(rows), self._ids[start:stop].write(ids)]
    futures += [self._columns[k][start:stop].write(v) for k, v in columns.items()]
    self._pending.append((stop, futures))
    if len(self._pending) > 2:  # the metadata follows the durable rows shard by shard
      self.commit(wait_all=False)

  def commit(self, wait_all: bool = True) -> None:
    """Waits for issued writes and records the durable row count in the metadata."""
    keep = 0 if wait_all else 1
    before = self.rows_written
    while len(self._pending) > keep:
      stop, futures = self._pending.pop(0)
      for f in futures:
        f.result()
      self.rows_written = stop
    full = self.rows_written // self.meta["shard_rows"]  # shards now durable and whole
    last = -(-self.rows_written // self.meta["shard_rows"])
    self._seal(before // self.meta["shard_rows"],
               last if self.rows_written == self.meta["num_rows"] else full)
    while self._notes and self._notes[0][0] <= self.rows_written:
      # the last note at or before rows_written, and the row count it belongs to
      self.meta["note_rows"], self.meta["note"] = self._notes.pop(0)
    self.meta["rows_written"] = int(self.rows_written)
    self.meta["generation"] = uuid.uuid4().hex  # the rows changed: resumed work sees it
    _write_metadata(self.root, self.meta)

  def _seal(self, first: int, stop: int) -> None:
    """Records the seals of row shards [first, stop) (every array's), read back from the
    files just written."""
    if self._seals is None or stop <= first:
      return
    pairs = [(slot, shard) for shard in range(first, stop) for slot in range(self._shards.slots)]
    seals = np.array(self._shards.seals(pairs), np.uint64).reshape(stop - first, -1)
    self._seals[first:stop].write(seals).result()

  def close(self, *, allow_fewer: bool = False) -> "FeatureStore | None":
    """Writes everything; marks the store complete when every row is in it. With
    `allow_fewer` (a producer that skipped rows), a store short of `num_rows` is cut to the
    rows written and completed too."""
    self._flush(final=True)
    self.commit()
    if allow_fewer and self.rows_written < self.meta["num_rows"]:
      n = self.rows_written
      self._features.resize(exclusive_max=[n, self.meta["num_layers"], self.meta["dim"]],
                            shrink_only=True).result()
      for array in [self._ids, *self._columns.values()]:
        array.resize(exclusive_max=[n], shrink_only=True).result()
      self.meta["num_rows"] = int(n)
      if self._seals is not None:  # the cut rewrote the last shard
        shards = -(-n // self.meta["shard_rows"])
        self._seals.resize(exclusive_max=[shards, self._shards.slots], shrink_only=True).result()
        self._seal(shards - 1, shards)
    complete = self.rows_written == self.meta["num_rows"]
    if complete:
      self.meta["complete"] = True
      self.meta["generation"] = uuid.uuid4().hex
      _write_metadata(self.root, self.meta)
    self.release()
    return FeatureStore.open(self.root) if complete else None

  def release(self) -> None:
    """Gives the store's lock back (the writer is done with it, complete or not)."""
    if self._lock is not None:
      self._lock.release()
      self._lock = None


def _direct_reader(root: str, meta: dict) -> ChunkReader | None:
  """A reader of the features' shard files without TensorStore, where one applies: a local
  store, complete (its files no longer change), in exactly the layout the writer makes."""
  if not root.startswith("file://") or not meta["complete"]:
    return None
  try:
    with open(root[len("file://"):] + "features/zarr.json") as f:
      zarr_json = json.load(f)
  except (OSError, ValueError):
    return None  # TensorStore's open names what is wrong
  dim, itemsize = meta["dim"], np.dtype(DTYPES[meta["dtype"]]).itemsize
  if not ChunkReader.for_array(zarr_json, (meta["shard_rows"], 1, dim),
                               (meta["chunk_rows"], 1, dim)):
    return None
  return ChunkReader(meta["shard_rows"] // meta["chunk_rows"], meta["chunk_rows"], dim * itemsize)


class FeatureStore:
  """Reads a store: metadata, ids, one layer as a gallery source, random row gathers."""

  def __init__(self, root: str, meta: dict, features, ids):
    self.root, self.meta = root, meta
    self._features, self._ids_array = features, ids
    self._ids_cache: np.ndarray | None = None
    self.num_rows, self.num_layers, self.dim = meta["num_rows"], meta["num_layers"], meta["dim"]
    self.dtype = np.dtype(DTYPES[meta["dtype"]])
    self._shards = _Shards(root, meta)
    self._recorded: np.ndarray | None = None  # the writer's seals, read at the first check
    self._checked: set = set()
    self._seals_lock = threading.Lock()
    self._direct = _direct_reader(root, meta)
    if not meta.get("sealed"):
      warnings.warn(f"store {root} was written before shard seals: a shard file moved onto "
                    f"another's name cannot be detected (its chunks' checksums are still "
                    f"verified)")

  def _check(self, slots, shards) -> None:
    """Compares the seals of these shard files (every slot, row shard) with the writer's,
    each once, before they are read: a file moved or copied onto another's name, or missing,
    is an error naming it."""
    if not self.meta.get("sealed"):
      return
    todo = [(slot, shard) for shard in shards for slot in slots
            if (slot, shard) not in self._checked]
    if not todo:
      return
    with self._seals_lock:
      if self._recorded is None:
        self._recorded = ts.open(_existing(self.root + "seals/"), open=True, read=True,
                                 context=_CONTEXT).result().read().result()
    for (slot, shard), seal in zip(todo, self._shards.seals(todo)):
      want = int(self._recorded[shard, slot])
      if want == UNSEALED and not self.meta["complete"]:
        continue  # an incomplete store's last shards: their writer has not sealed them yet
      if seal != want:
        raise ShardError(f"store {self.root}: shard file {self._shards.describe(slot, shard)} "
                         f"is not the one its writer wrote there (moved or copied from "
                         f"elsewhere, or rewritten since)")
    self._checked.update(todo)

  def _row_shards(self, start: int, stop: int) -> range:
    return range(start // self.meta["shard_rows"], -(-stop // self.meta["shard_rows"]))

  @classmethod
  def open(cls, path: str, *, allow_partial: bool = False) -> "FeatureStore":
    root = _root_url(path)
    meta = _read_metadata(root)
    if not meta["complete"] and not allow_partial:
      raise ValueError(f"store {root} is incomplete ({meta['rows_written']} of "
                       f"{meta['num_rows']} rows written); resume its writer first")
    try:
      features = ts.open(_existing(root + "features/"), open=True,
                         read=True, context=_CONTEXT).result()
      ids = ts.open(_existing(root + "ids/"), open=True, read=True,
                    context=_CONTEXT).result()
    except ValueError as e:
      raise ValueError(f"store {root}: cannot open its arrays: {e}") from None
    want = (meta["num_rows"], meta["num_layers"], meta["dim"])
    if tuple(features.shape) != want or np.dtype(features.dtype.numpy_dtype) != DTYPES[meta["dtype"]]:
      raise ValueError(f"store {root}: features array is {tuple(features.shape)} "
                       f"{features.dtype}, metadata says {want} {meta['dtype']}")
    if tuple(ids.shape) != (meta["num_rows"],):
      raise ValueError(f"store {root}: ids array has shape {tuple(ids.shape)}, expected "
                       f"({meta['num_rows']},)")
    store = cls(root, meta, features, ids)
    if not meta["complete"]:
      store.num_rows = meta["rows_written"]
    return store

  def fingerprint(self) -> str:
    """Changes whenever the store's writer writes (its metadata's `generation`, renewed at
    every commit) or its metadata changes: what resumed work checks."""
    return hashlib.sha256(json.dumps(self.meta, sort_keys=True).encode()).hexdigest()[:16]

  def column(self, name: str) -> np.ndarray:
    """A per-row column [num_rows] in its dtype (float32 or int64), e.g. each caption's loss
    or each row's label."""
    if name not in self.meta.get("columns", []):
      raise ValueError(f"store {self.root}: no column {name!r}; columns are "
                       f"{self.meta.get('columns', [])}")
    self._check([self.num_layers + 1 + self.meta["columns"].index(name)],
                self._row_shards(0, self.num_rows))
    array = ts.open(_existing(self.root + f"columns/{name}/"), open=True,
                    read=True, context=_CONTEXT).result()
    return array[:self.num_rows].read().result()

  def ids(self) -> np.ndarray:
    if self._ids_cache is None:
      self._check([self.num_layers], self._row_shards(0, self.num_rows))
      self._ids_cache = self._ids_array[:self.num_rows].read().result()
    return self._ids_cache

  def layer_index(self, layer: int | str) -> int:
    if isinstance(layer, str) and not layer.lstrip("-").isdigit():
      if layer not in self.meta["layers"]:
        raise ValueError(f"store {self.root}: no layer named {layer!r}; layers are "
                         f"{self.meta['layers']}")
      return self.meta["layers"].index(layer)
    layer = int(layer)
    if not -self.num_layers <= layer < self.num_layers:
      raise ValueError(f"store {self.root}: layer {layer} out of range for "
                       f"{self.num_layers} layers")
    return layer % self.num_layers

  def layer(self, layer: int | str) -> "LayerSource":
    return LayerSource(self, self.layer_index(layer))

  def gather(self, rows: Sequence[int], layer: int | str | None = None) -> np.ndarray:
    """Rows (store positions) in the given order: [len, L, D], or [len, D] for one layer."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
      raise ValueError(f"store {self.root}: rows out of range [0, {self.num_rows})")
    slots = list(range(self.num_layers)) if layer is None else [self.layer_index(layer)]
    wanted, inverse = np.unique(rows, return_inverse=True)
    self._check(slots, np.unique(wanted // self.meta["shard_rows"]).tolist())
    if self._direct is None:
      view = self._features if layer is None else self._features[:, slots[0]]
      got = view[ts.d[0].translate_to[0]][wanted.tolist()].read().result() if rows.size else \
          np.zeros((0, *view.shape[1:]), self.dtype)
      return np.take(got, inverse, axis=0)  # indexing with [] mixes slow paths for bf16
    got = np.empty((len(slots), wanted.size, self.dim), self.dtype)
    size = self.meta["shard_rows"]
    bounds = np.searchsorted(wanted, np.arange(0, self.num_rows + size, size))
    for shard in np.flatnonzero(np.diff(bounds)).tolist():
      a, b = bounds[shard], bounds[shard + 1]
      for i, slot in enumerate(slots):
        self._direct.take_rows(self._shards.path(slot, shard), wanted[a:b] - shard * size,
                               got[i, a:b], shard * size)
    if layer is not None:
      return np.take(got[0], inverse, axis=0)
    return np.ascontiguousarray(np.take(got, inverse, axis=1).transpose(1, 0, 2))

  def read_layer(self, layer: int | str, start: int = 0, stop: int | None = None) -> np.ndarray:
    stop = self.num_rows if stop is None else min(stop, self.num_rows)
    layer = self.layer_index(layer)
    self._check([layer], self._row_shards(start, stop))
    if self._direct is None:
      return self._features[start:stop, layer].read().result()
    out = np.empty((max(0, stop - start), self.dim), self.dtype)
    size = self.meta["shard_rows"]
    for shard in self._row_shards(start, stop):
      lo, hi = max(start, shard * size), min(stop, (shard + 1) * size)
      self._direct.read_rows(self._shards.path(layer, shard), lo - shard * size,
                             hi - shard * size, out[lo - start:hi - start], shard * size)
    return out


class LayerSource:
  """One layer of a store as a gallery source (`plato_jax.knn` protocol)."""

  def __init__(self, store: FeatureStore, layer: int):
    self.store, self.layer = store, layer
    self.num_rows, self.dim, self.dtype = store.num_rows, store.dim, store.dtype

  def ids(self) -> np.ndarray:
    return self.store.ids()

  def read(self, start: int, stop: int) -> np.ndarray:
    return self.store.read_layer(self.layer, start, stop)

  def take(self, positions) -> np.ndarray:
    return self.store.gather(positions, self.layer)

  def fingerprint(self) -> str:
    return f"{self.store.fingerprint()}:{self.layer}"
