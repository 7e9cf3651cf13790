"""Seals of zarr3 shard files: what binds each file to the place its writer put it.

TensorStore checks every inner chunk against the CRC-32C stored after it, so a bit flipped in
a shard is an error on read. A whole shard file copied or moved onto another's name is not:
its chunks are intact, only in the wrong place. A shard's seal is a 64-bit digest of its index
(each inner chunk's offset and length, at the end of the file) and of every chunk's CRC-32C —
so of its contents — read with a few small range reads, never the data. The writer records
each shard's seal; a reader compares before it trusts a shard (`plato_jax.store`).

Layout read here (zarr v3 `sharding_indexed`, index at the end, index codecs bytes + crc32c,
inner codecs ending in crc32c): the index is [chunks, 2] little-endian uint64 (offset,
length), then 4 bytes of CRC; an absent chunk is (2^64-1, 2^64-1); a chunk's last 4 bytes
are its CRC.
"""
from __future__ import annotations

import hashlib

import numpy as np

ABSENT = 2 ** 64 - 1
UNSEALED = 0  # a shard whose seal was not recorded (yet)


class ShardError(ValueError):
  """A shard file that is missing, damaged, or not the one its writer put there."""


def shard_seals(kv, keys, chunks: int) -> list[int]:
  """The seals of the shard files `keys` (each of `chunks` inner chunks) in `kv`, a
  tensorstore.KvStore; every read is issued before any is awaited. Raises ShardError naming
  the file if one is missing or its index is damaged."""
  size = chunks * 16 + 4
  tails = [kv.read(key, byte_range=slice(-size, None)) for key in keys]
  indexes, crc_reads = [], []
  for key, tail in zip(keys, tails):
    got = tail.result()
    where = f"{kv.url}{key}"
    if got.state != "value":
      raise ShardError(f"shard file {where} is missing")
    index = bytes(got.value)
    if len(index) != size:
      raise ShardError(f"shard file {where} is damaged: {len(index)} bytes where its "
                       f"{chunks}-chunk index needs {size}")
    entries = np.frombuffer(index[:-4], "<u8").reshape(chunks, 2)
    present = entries[entries[:, 0] != ABSENT]
    indexes.append(index)
    crc_reads.append([kv.read(key, byte_range=slice(int(o + n - 4), int(o + n)))
                      for o, n in present])
  seals = []
  for key, index, reads in zip(keys, indexes, crc_reads):
    digest = hashlib.sha256(index)
    for read in reads:
      got = read.result()
      if got.state != "value" or len(got.value) != 4:
        raise ShardError(f"shard file {kv.url}{key} is damaged: its index points past its end")
      digest.update(bytes(got.value))
    seals.append(int.from_bytes(digest.digest()[:8], "little") or 1)  # never UNSEALED
  return seals
