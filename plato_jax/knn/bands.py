"""Prefixes by rank, read in storage order.

A gallery row's rank says which prefixes hold it: prefix j holds the rows of rank < n_j. Ranks
from a seeded permutation make the prefixes random nested subsets of the rows, as both
papers draw their galleries; the default rank of a row is its position (prefix j: the first
n_j rows). Band j holds the rows of rank in [n_{j-1}, n_j), so prefix j is bands 0..j.

The stream keeps one selector state per band and folds each tile into its band's state: a
row is scored once, whichever prefixes hold it. `plan_bands` cuts each band's rows, in
storage order, into tile groups (one tile per device) and orders the groups by their last
row, so the rows are read once, front to back (`band_tiles`: in superblocks, each tile
assembled from its band's rows). A band whose rows all come after the earlier bands' (as
with positional ranks) continues their state instead of starting its own
(`BandPlan.continues`): then one state lives at a time and its candidates are already the
prefix's. `merge_bands` makes each prefix's candidates from its bands'.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Iterator, Sequence

import numpy as np

from plato_jax.kernels.primitives import RowWindow
from plato_jax.knn import threads
from plato_jax.knn.sharding import host_topk, order_keys
from plato_jax.knn.sources import Tile, TileBuffers, aligned_empty, stream_tiles

# Rows of one sequential read of the assembling reader (`band_tiles`): about this many bytes.
SUPERBLOCK_BYTES = 64 * 2**20


@dataclasses.dataclass(frozen=True)
class Group:
  """One step of the stream: a tile per device (`slots`: ascending positions), one band."""
  band: int
  slots: tuple

  @property
  def rows(self) -> int:
    return sum(len(s) for s in self.slots)


@dataclasses.dataclass(frozen=True)
class BandPlan:
  """The stream's groups in reading order, and where each band begins and ends in it."""
  groups: tuple
  first: tuple       # per band: its first group
  last: tuple        # per band: its last group
  continues: tuple   # per band: it starts from the previous band's final state
  covers: tuple      # per band: rows its final state holds (its own, and continued bands')

  def live(self, done: int) -> list[int]:
    """Bands holding a state when groups [0, done) are done: started and not ended, or
    handed the state of the band before (keyed by the band that continues it)."""
    return [b for b in range(len(self.first))
            if self.first[b] < done <= self.last[b]
            or (self.continues[b] and self.last[b - 1] < done <= self.first[b])]

  def chain_start(self, band: int) -> int:
    """The band whose fresh state `band`'s final state continues (itself if none)."""
    while self.continues[band]:
      band -= 1
    return band

  def slots_seen(self, band: int) -> list[np.ndarray]:
    """The positions folded into `band`'s final state: its own, and the continued bands'."""
    start = self.chain_start(band)
    return [s for g in self.groups if start <= g.band <= band for s in g.slots]

  def rows_before(self, group: int) -> int:
    return sum(g.rows for g in self.groups[:group])


def check_ranks(ranks, num_rows: int) -> np.ndarray:
  """`ranks` as int64 [num_rows], a permutation of [0, num_rows); else a ValueError naming
  the first row at fault."""
  ranks = np.asarray(ranks)
  if ranks.shape != (num_rows,) or not np.issubdtype(ranks.dtype, np.integer):
    raise ValueError(f"prefix_ranks must be integers, one per gallery row ({num_rows}), got "
                     f"{ranks.dtype} {ranks.shape}")
  ranks = ranks.astype(np.int64)
  outside = np.flatnonzero((ranks < 0) | (ranks >= num_rows))
  if outside.size:
    raise ValueError(f"prefix_ranks must lie in [0, {num_rows}): row {outside[0]} has rank "
                     f"{ranks[outside[0]]}")
  seen = np.bincount(ranks, minlength=num_rows)
  if (seen != 1).any():
    repeated = np.flatnonzero(ranks == np.flatnonzero(seen > 1)[0])
    raise ValueError(f"prefix_ranks repeat: rows {repeated[:10].tolist()} share rank "
                     f"{ranks[repeated[0]]} (they must be a permutation of [0, {num_rows}))")
  return ranks


def plan_bands(sizes: Sequence[int], tile_rows: int, num_devices: int,
               ranks: np.ndarray | None = None) -> BandPlan:
  """The groups of a pass over prefixes `sizes` (ascending): each band's positions in
  storage order, cut into groups of `num_devices` tiles of at most `tile_rows` rows, in the
  order of their last row. Rows of rank >= sizes[-1] are in no group (never read)."""
  edges = np.asarray([0, *sizes], np.int64)
  if ranks is None:
    by_band = [np.arange(lo, hi, dtype=np.int64) for lo, hi in zip(edges[:-1], edges[1:])]
  else:
    band_of = np.searchsorted(edges[1:], ranks, side="right")
    order = np.argsort(band_of, kind="stable")  # by band; storage order within one
    cuts = np.searchsorted(band_of[order], np.arange(len(sizes) + 1))
    by_band = [order[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
  width = tile_rows * num_devices
  pieces = [(rows[s:s + width], band) for band, rows in enumerate(by_band)
            for s in range(0, len(rows), width)]
  pieces.sort(key=lambda p: (int(p[0][-1]), p[1]))
  groups = tuple(Group(band, tuple(rows[s:s + tile_rows] for s in range(0, len(rows), tile_rows)))
                 for rows, band in pieces)
  bands = range(len(sizes))
  first = tuple(min(i for i, g in enumerate(groups) if g.band == b) for b in bands)
  last = tuple(max(i for i, g in enumerate(groups) if g.band == b) for b in bands)
  continues = tuple(b > 0 and max(last[:b]) < first[b] for b in bands)
  covers = []
  for b in bands:
    covers.append(len(by_band[b]) + (covers[b - 1] if continues[b] else 0))
  return BandPlan(groups, first, last, continues, tuple(covers))


def merge_bands(plan: BandPlan, band_candidates: Sequence[tuple], widths: Sequence[int]):
  """Each prefix's candidates [(values, ids)], sorted, from its bands' ((values, ids) of each
  band's final state, in any order): prefix j's `widths[j]` best of bands 0..j. A band whose
  state continued the bands before it holds their rows already; otherwise it merges with
  the prefix where its state began. The merges keep sort keys unsorted; only each prefix's
  own candidates are sorted."""
  merged, out = [], []
  for b, (values, ids) in enumerate(band_candidates):
    keys = np.asarray(order_keys(values, ids)).view(np.int64)[..., 0]
    start = plan.chain_start(b)
    if start > 0:  # the prefix before its state began, then its own candidates
      keys = _best_keys(np.concatenate([merged[start - 1], keys], axis=1), max(widths[b:]))
    merged.append(keys)
    out.append(host_topk(keys, widths[b]))
  return out


def _best_keys(keys: np.ndarray, k: int) -> np.ndarray:
  """The k smallest keys of each row (the k best candidates), in no order."""
  if keys.shape[1] <= k:
    return keys
  out = np.empty((keys.shape[0], k), keys.dtype)

  def select(span):
    a, b = span
    out[a:b] = np.partition(keys[a:b], k - 1, axis=1)[:, :k]

  threads.each(select, threads.spans(*keys.shape))
  return out


def band_tiles(source, positions: np.ndarray, slots: Sequence[np.ndarray], *, dtype,
               tile_rows: int, buffers: TileBuffers | None = None,
               window: int | None = None) -> Iterator[Tile]:
  """The tiles of `slots` (ascending positions each), in order. Where every slot is a run of
  positions, `stream_tiles` reads them in place; else `_assembled` reads the rows they need
  once, front to back, and copies each into its tile."""
  if all(len(s) == s[-1] - s[0] + 1 for s in slots):
    return stream_tiles(source, positions, [(int(s[0]), int(s[-1]) + 1) for s in slots],
                        dtype=dtype, buffers=buffers, window=window)
  return _assembled(source, positions, slots, dtype, tile_rows, buffers, window)


def _assembled(source, positions, slots, dtype, tile_rows, buffers, window,
               prefetch: int = 2) -> Iterator[Tile]:
  """Tiles assembled from sequential reads of superblocks: each slot's buffer fills as the
  superblocks holding its rows pass, and goes out once its last row is in."""
  dim, dtype = source.dim, np.dtype(dtype)
  span = max(1, SUPERBLOCK_BYTES // max(1, dim * np.dtype(source.dtype).itemsize))
  firsts = np.array([s[0] for s in slots], np.int64)
  lasts = np.array([s[-1] for s in slots], np.int64)
  needed = np.zeros(-(-source.num_rows // span), bool)
  for s in slots:
    needed[np.unique(s // span)] = True
  reads = [(int(b * span), int(min((b + 1) * span, source.num_rows)))
           for b in np.flatnonzero(needed)]

  def read(r):
    rows = np.asarray(source.read(*r))
    if rows.shape != (r[1] - r[0], dim):
      raise ValueError(f"gallery source {type(source).__name__} returned shape {rows.shape} "
                       f"for rows [{r[0]}, {r[1]}), expected {(r[1] - r[0], dim)}")
    return rows

  def new_buffer():
    shape = (window,) if window is not None else (tile_rows, dim)
    return aligned_empty(shape, dtype) if buffers is None else buffers.take(shape, dtype)

  filling: dict[int, np.ndarray] = {}
  with concurrent.futures.ThreadPoolExecutor(max_workers=prefetch) as pool:
    pending = [pool.submit(read, r) for r in reads[:prefetch]]
    done_reads, read_upto = 0, 0
    for i, slot in enumerate(slots):
      while read_upto <= lasts[i]:
        lo, hi = reads[done_reads]
        rows = pending.pop(0).result()
        done_reads += 1
        if done_reads + len(pending) < len(reads):
          pending.append(pool.submit(read, reads[done_reads + len(pending)]))
        for j in i + np.flatnonzero((firsts[i:] < hi) & (lasts[i:] >= lo)):
          a, b = np.searchsorted(slots[j], [lo, hi])
          if a < b:
            if j not in filling:
              filling[j] = new_buffer()
            filling[j].reshape(-1)[a * dim:b * dim].reshape(b - a, dim)[...] = \
                rows[slots[j][a:b] - lo]
        read_upto = hi
      out = filling.pop(i)
      out.reshape(-1)[len(slot) * dim:] = 0  # padding rows: never selected, and finite
      yield Tile(int(slot[0]), int(slot[-1]) + 1,
                 RowWindow(out, np.int32(0)) if window is not None else out, positions[slot])
