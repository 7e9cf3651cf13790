"""zarr v3 shard files as `plato_jax.store` writes them: their seals, and rows read from them
directly with every chunk's checksum verified.

Layout (zarr v3 `sharding_indexed`, index at the end; index codecs and inner codecs are
bytes (little-endian) + crc32c, nothing else): a shard file is its inner chunks, each the
chunk's C-order bytes followed by their CRC-32C (4 bytes, little-endian), then the index —
[chunks, 2] little-endian uint64 (offset, length) and its own CRC-32C. An absent chunk is
(2^64-1, 2^64-1). A chunk at the array's edge is stored whole (padded with the fill value).

Seals. A bit flipped in a shard fails its chunk's checksum. A whole shard file copied or
moved onto another's name does not: its chunks are intact, only in the wrong place. A
shard's seal is a 64-bit digest of its index and of every chunk's CRC-32C — so of its
contents — read with a few small range reads, never the data. The writer records each
shard's seal; a reader compares before it trusts a shard (`plato_jax.store`).

Direct reads (`ChunkReader`). Reading a local shard file with one `preadv` per run of
chunks straight into the output rows, then checking each chunk's CRC-32C while it is still
in cache (the `crc32c` package: the CPU's CRC instruction, the GIL released), took a
quarter of the CPU time of TensorStore's checked read (0.21 against 0.83 CPU-s for
500,000 × 768 bf16 rows, 2-core CPU, 2026-12-05) — what keeps checksums nearly free on a
pass that reads more than it computes. Used where it applies (a local, complete store in exactly this layout, a
little-endian CPU with a CRC instruction); TensorStore reads everything else.
"""
from __future__ import annotations

import hashlib
import os
import sys

import numpy as np

ABSENT = 2 ** 64 - 1
UNSEALED = 0  # a shard whose seal was not recorded (yet)


class ShardError(ValueError):
  """A shard file that is missing, damaged, or not the one its writer put there."""


def shard_seals(kv, keys, chunks: int) -> list[int]:
  """The seals of the shard files `keys` (each of `chunks` inner chunks) in `kv`, a
  tensorstore.KvStore. Raises ShardError naming the file if one is missing or its index is
  damaged. Local files are read with plain preads (a thousand 4-byte reads of a shard cost
  ~2 ms so, ~30 ms through TensorStore); elsewhere every read is issued before any is awaited."""
  if kv.url.startswith("file://"):
    return [_local_seal(kv.url[len("file://"):] + key, chunks) for key in keys]
  size = chunks * 16 + 4
  tails = [kv.read(key, byte_range=slice(-size, None)) for key in keys]
  indexes, crc_reads = [], []
  for key, tail in zip(keys, tails):
    got = tail.result()
    where = f"{kv.url}{key}"
    if got.state != "value":
      raise ShardError(f"shard file {where} is missing")
    index = _checked_index(bytes(got.value), chunks, where)
    indexes.append(index)
    crc_reads.append([kv.read(key, byte_range=slice(int(o + n - 4), int(o + n)))
                      for o, n in _present(index, chunks)])
  seals = []
  for key, index, reads in zip(keys, indexes, crc_reads):
    crcs = []
    for read in reads:
      got = read.result()
      crcs.append(bytes(got.value) if got.state == "value" else b"")
    seals.append(_seal(index, crcs, f"{kv.url}{key}"))
  return seals


def _local_seal(path: str, chunks: int) -> int:
  fd = _open_local(path)
  try:
    index = _local_index(fd, chunks, path)
    return _seal(index, [os.pread(fd, 4, int(o + n - 4)) for o, n in _present(index, chunks)],
                 path)
  finally:
    os.close(fd)


def _open_local(path: str) -> int:
  try:
    return os.open(path, os.O_RDONLY)
  except FileNotFoundError:
    raise ShardError(f"shard file {path} is missing") from None


def _local_index(fd: int, chunks: int, path: str) -> bytes:
  """The index at the end of an open local shard file (its bytes and CRC, unchecked)."""
  size = chunks * 16 + 4
  return _checked_index(os.pread(fd, size, max(0, os.fstat(fd).st_size - size)), chunks, path)


def _checked_index(index: bytes, chunks: int, where: str) -> bytes:
  if len(index) != chunks * 16 + 4:
    raise ShardError(f"shard file {where} is damaged: {len(index)} bytes where its "
                     f"{chunks}-chunk index needs {chunks * 16 + 4}")
  return index


def _present(index: bytes, chunks: int) -> np.ndarray:
  """(offset, length) of each chunk the index holds."""
  entries = np.frombuffer(index, "<u8", count=2 * chunks).reshape(chunks, 2)
  return entries[entries[:, 0] != ABSENT]


def _seal(index: bytes, crcs: list[bytes], where: str) -> int:
  digest = hashlib.sha256(index)
  for crc in crcs:
    if len(crc) != 4:
      raise ShardError(f"shard file {where} is damaged: its index points past its end")
    digest.update(crc)
  return int.from_bytes(digest.digest()[:8], "little") or 1  # never UNSEALED


CHECKSUMMED = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]


def sharding_codec(chunk_shape) -> dict:
  """The codec of a store's sharded arrays: inner chunks of `chunk_shape`, each carrying a
  CRC-32C of its bytes (checked when it is read), the index likewise."""
  return {"name": "sharding_indexed", "configuration": {
      "chunk_shape": list(chunk_shape), "codecs": CHECKSUMMED, "index_codecs": CHECKSUMMED}}


def _hardware_crc32c():
  """The `crc32c` package's function where it uses the CPU's CRC instruction, else None
  (a table-driven CRC would be slower than TensorStore's own read)."""
  try:
    import crc32c
  except ImportError:
    return None
  return crc32c.crc32c if getattr(crc32c, "hardware_based", False) else None


_CRC32C = _hardware_crc32c()
# Chunks read by one preadv before their checksums: a run that stays in cache for them.
RUN_BYTES = 2 ** 20


def _bytes_of(array: np.ndarray) -> np.ndarray:
  """The bytes of a C-contiguous array, as a flat uint8 view (never a copy)."""
  if not array.flags.c_contiguous:
    raise ValueError("shard reads fill C-contiguous arrays")
  return array.reshape(-1).view(np.uint8)


class ChunkReader:
  """Reads rows of local shard files in this layout whose inner chunks each hold
  `chunk_rows` rows of `row_bytes` bytes, verifying every chunk it reads.

  `for_array` says whether an array's zarr.json is in exactly this layout; `read_rows`
  fills an output with a range of rows of one shard file, `take_rows` with chosen rows;
  errors are ShardErrors naming the file and the rows.
  """

  def __init__(self, chunks: int, chunk_rows: int, row_bytes: int):
    self.chunks, self.chunk_rows, self.row_bytes = chunks, chunk_rows, row_bytes
    self.chunk_bytes = chunk_rows * row_bytes
    self._run = max(1, min(RUN_BYTES // self.chunk_bytes, (os.sysconf("SC_IOV_MAX") - 1) // 2))

  @staticmethod
  def for_array(zarr_json: dict, shard_shape, chunk_shape) -> bool:
    """Whether the array described by `zarr_json` (its parsed metadata) is sharded in exactly
    this layout with these shapes, and this machine can read it directly."""
    if _CRC32C is None or sys.byteorder != "little":
      return False
    codecs = zarr_json.get("codecs", [])
    if len(codecs) != 1:
      return False
    config = dict(codecs[0].get("configuration", {}))
    if config.pop("index_location", "end") != "end":
      return False
    grid = zarr_json.get("chunk_grid", {})
    return (codecs[0].get("name") == "sharding_indexed"
            and config == sharding_codec(chunk_shape)["configuration"]
            and grid == {"name": "regular", "configuration": {"chunk_shape": list(shard_shape)}}
            and zarr_json.get("chunk_key_encoding", {}).get("configuration", {}).get(
                "separator", "/") == "/")

  def read_rows(self, path: str, lo: int, hi: int, out: np.ndarray, first_row: int = 0) -> None:
    """Rows [lo, hi) of the shard file at `path` into `out` (C-contiguous, (hi - lo) rows of
    `row_bytes`). `first_row` (the shard's first row in its array) numbers rows in errors."""
    out = _bytes_of(out)
    assert out.size == (hi - lo) * self.row_bytes
    first, last = lo // self.chunk_rows, -(-hi // self.chunk_rows)
    spare = {}  # chunks only partly wanted: read whole, then their rows copied
    targets = []
    for chunk in range(first, last):
      a, b = chunk * self.chunk_rows, (chunk + 1) * self.chunk_rows
      if lo <= a and b <= hi:
        targets.append(out[(a - lo) * self.row_bytes:(b - lo) * self.row_bytes])
      else:
        spare[chunk] = np.empty(self.chunk_bytes, np.uint8)
        targets.append(spare[chunk])
    with _OpenShard(self, path, first_row) as shard:
      shard.read(np.arange(first, last), targets)
    for chunk, data in spare.items():
      a = max(lo, chunk * self.chunk_rows)
      b = min(hi, (chunk + 1) * self.chunk_rows)
      skip = (a - chunk * self.chunk_rows) * self.row_bytes
      out[(a - lo) * self.row_bytes:(b - lo) * self.row_bytes] = \
          data[skip:skip + (b - a) * self.row_bytes]

  def take_rows(self, path: str, rows: np.ndarray, out: np.ndarray, first_row: int = 0) -> None:
    """Rows `rows` (ascending, distinct, of this shard file) into `out` (len(rows) rows of
    `row_bytes`, C-contiguous): the chunks holding them read once each, a run at a time
    into one reused buffer."""
    out = _bytes_of(out).reshape(len(rows), self.row_bytes)
    chunks, where = np.unique(rows // self.chunk_rows, return_inverse=True)
    bounds = np.searchsorted(where, np.arange(0, len(chunks) + self._run, self._run))
    buffer = np.empty((self._run, self.chunk_rows, self.row_bytes), np.uint8)
    with _OpenShard(self, path, first_row) as shard:
      for i in range(0, len(chunks), self._run):
        part = chunks[i:i + self._run]
        shard.read(part, list(buffer[:len(part)].reshape(len(part), -1)))
        a, b = bounds[i // self._run], bounds[i // self._run + 1]
        out[a:b] = buffer[where[a:b] - i, rows[a:b] % self.chunk_rows]


class _OpenShard:
  """A shard file open for reading, its index read and verified."""

  def __init__(self, reader: ChunkReader, path: str, first_row: int):
    self.reader, self.path, self.first_row = reader, path, first_row
    self.fd = _open_local(path)
    try:
      self.entries = self._index()
    except BaseException:
      os.close(self.fd)
      raise

  def __enter__(self) -> "_OpenShard":
    return self

  def __exit__(self, *exc) -> None:
    os.close(self.fd)

  def _index(self) -> np.ndarray:
    chunks = self.reader.chunks
    index = _local_index(self.fd, chunks, self.path)
    if _CRC32C(index[:-4]) != int.from_bytes(index[-4:], "little"):
      raise ShardError(f"shard file {self.path} is damaged: its index fails its CRC-32C")
    return np.frombuffer(index, "<u8", count=2 * chunks).reshape(chunks, 2)

  def _rows(self, chunk) -> str:
    a = self.first_row + int(chunk) * self.reader.chunk_rows
    return f"rows {a}..{a + self.reader.chunk_rows - 1}"

  def read(self, chunks: np.ndarray, targets) -> None:
    """Reads the inner chunks `chunks` (ascending) into `targets` (one chunk_bytes buffer
    each) and verifies each chunk's CRC-32C."""
    size, path = self.reader.chunk_bytes + 4, self.path
    entries = self.entries[chunks]
    bad = np.flatnonzero(entries[:, 1] != size)  # absent chunks too: (2^64-1, 2^64-1)
    if bad.size:
      chunk, (offset, length) = chunks[bad[0]], entries[bad[0]]
      raise ShardError(f"shard file {path} is damaged: the chunk of {self._rows(chunk)} "
                       + ("is missing" if offset == ABSENT else
                          f"is {int(length)} bytes, not {size}"))
    crcs = np.empty(len(chunks), "<u4")
    crc_bytes = crcs.view(np.uint8)
    i = 0
    while i < len(chunks):
      # A run: chunks that follow each other in the file, read by one call.
      j = i + 1
      while (j < len(chunks) and j - i < self.reader._run
             and entries[j, 0] == entries[j - 1, 0] + size):
        j += 1
      buffers = []
      for k in range(i, j):
        buffers += [targets[k], crc_bytes[4 * k:4 * k + 4]]
      got = os.preadv(self.fd, buffers, int(entries[i, 0]))
      if got != (j - i) * size:
        raise ShardError(f"shard file {path} is damaged: it ends within the chunk of "
                         f"{self._rows(chunks[i + got // size])}")
      for k in range(i, j):
        if _CRC32C(targets[k], gil_release_mode=1) != crcs[k]:
          raise ShardError(f"shard file {path} is damaged: the chunk of "
                           f"{self._rows(chunks[k])} fails its CRC-32C")
      i = j
