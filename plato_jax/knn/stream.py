"""The streaming pass: queries in blocks, each block meeting the gallery's tiles in groups
(one tile per device, `plato_jax.knn.bands`), a selector state per band of prefixes, each
band's candidates taken at its last group, every prefix's merged from its bands' at the
block's end.

A pass is resumable: a checkpoint holds the live states, the row statistics and the
candidates found so far, at a `Position` (query block, tile group). Host tiles copied into
reused buffers (`TileBuffers`) go back to them once the step that reads them is done.
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings

import jax
import numpy as np

from plato_jax.kernels.primitives import NO_ID, RowWindow
from plato_jax.knn import sharding
from plato_jax.knn.bands import band_tiles, merge_bands, plan_bands
from plato_jax.knn.kernel_choice import selector_that_compiles, travelling_dtype
from plato_jax.knn.sources import (TileBuffers, aligned_empty, digest, fingerprint,
                                   on_accelerator, raise_for_bad_rows, window_length)
from plato_jax.progress import Progress
from plato_jax.resume import ResumePoint

# Platforms whose devices hand their candidates to numpy for the final sort
# (`sharding.host_topk`): the host's own CPU, where XLA sorts ~10x slower than numpy
# (the merge for k = 2,621 of ~8.9k candidates per row, 1,024 rows, 2026-11-23: 528–594 ms
# on the device, 121–139 ms so).
FINISH_ON_HOST: frozenset[str] = frozenset({"cpu"})
# Selector states of one device's live bands stay under this many bytes (random galleries
# keep every band's state until the pass's end: a query block shrinks to fit).
BAND_STATE_BYTES = 4 * 2**30


@dataclasses.dataclass(frozen=True)
class Position:
  """Where a pass stands: query block `block`, the tile groups before `group` done. A
  checkpoint records it as the steps done, block * groups + group."""
  block: int = 0
  group: int = 0

  @classmethod
  def after(cls, steps: int, groups: int) -> "Position":
    return cls(steps // groups, steps % groups)

  def steps(self, groups: int) -> int:
    return self.block * groups + self.group


@dataclasses.dataclass
class Stream:
  """One streaming pass's plan: `run` streams the gallery's prefixes past some queries and
  returns each prefix's candidates (the kernel's top `kept[size]` by float32 score, ids =
  gallery positions) and row norm range."""
  source: object
  ids: np.ndarray  # the gallery's ids, by position
  sizes: tuple
  mesh: object
  kernel: str
  required: bool  # the kernel was asked for by name: it must compile
  tile_rows: int
  bucket_width: int | None
  block: int
  dtype: np.dtype
  exclude_self: bool
  precision: object
  normalize: bool
  ranks: np.ndarray | None = None  # each position's rank (`plato_jax.knn.bands`); None: itself
  fallbacks: int = 0
  bf16_products: bool = False  # every product of two bf16 values (the CPU kernel's AMX path)

  def run(self, q_host, own, kept: dict, resume_dir, checkpoint_every: int, progress: bool):
    source, sizes, mesh = self.source, list(self.sizes), self.mesh
    num_q, dtype = q_host.shape[0], self.dtype
    block = min(self.block, num_q)
    tile_dtype = travelling_dtype(self.kernel, dtype, source.dtype)
    bands = plan_bands(sizes, self.tile_rows, mesh.devices.size, self.ranks)
    # A band's state keeps what the largest prefix holding it needs, at most its rows.
    widths = [kept[s] for s in sizes]
    band_widths = [min(max(widths[b:]), bands.covers[b]) for b in range(len(sizes))]
    selectors, block = self._selectors(bands, band_widths, block, tile_dtype)
    steps = [sharding.sharded_step(mesh, sel, self.exclude_self, self.precision, self.normalize)
             for sel in selectors]
    # Host rows go to the CPU kernel where they lie (no copy of unaligned numpy rows).
    window = (window_length(self.tile_rows, source.dim, tile_dtype.itemsize)
              if selectors[0].reads_windows else None)
    on_host = mesh.devices.flat[0].platform in FINISH_ON_HOST
    groups = bands.groups
    mine = sharding.local_slots(mesh)
    positions = np.arange(source.num_rows, dtype=np.int64)  # the devices' row ids
    num_blocks = -(-num_q // block)
    found = {"values": {str(s): np.full((num_q, kept[s]), -np.inf, np.float32) for s in sizes},
             "ids": {str(s): np.full((num_q, kept[s]), -1, np.int32) for s in sizes},
             "norms": {str(s): np.zeros(2, np.float32) for s in sizes},
             "bands": {str(b): {"values": np.full((block, w), -np.inf, np.float32),
                                "ids": np.full((block, w), -1, np.int32),
                                "norms": np.zeros(2, np.float32)}
                       for b, w in enumerate(band_widths)}}
    point, at, live = None, Position(), {}
    if resume_dir is not None:
      point = ResumePoint(resume_dir, self._identity(q_host, own, kept, block, selectors),
                          every=checkpoint_every)
      at, found, live = self._restore(point, at, found, selectors, block, bands)

    try:
      # The CPU backend aliases aligned host tiles (no copy), so a copied tile's buffer is free
      # again only when its step is done; accelerators copy tiles to their own memory.
      buffers = TileBuffers() if mesh.devices.flat[0].platform == "cpu" else None
      rows_per_block = bands.rows_before(len(groups))
      meter = Progress(rows_per_block * num_blocks,
                       initial=rows_per_block * at.block + bands.rows_before(at.group),
                       label=f"knn ({self.kernel})", enabled=progress)
      for b in range(at.block, num_blocks):
        q0 = b * block
        rows = min(block, num_q - q0)
        qb = np.zeros((block, source.dim), dtype)
        qb[:rows] = q_host[q0:q0 + rows]
        qb_ids = np.full(block, NO_ID, np.int32)
        qb_ids[:rows] = own[q0:q0 + rows]
        qd, qd_ids = sharding.put_whole(mesh, qb), sharding.put_whole(mesh, qb_ids)
        first = at.group if b == at.block else 0
        live = live if first else {}
        tiles = band_tiles(source, positions, [g.slots[slot] for g in groups[first:]
                                               for slot in mine if slot < len(g.slots)],
                           dtype=tile_dtype, tile_rows=self.tile_rows, buffers=buffers,
                           window=window)
        for gi in range(first, len(groups)):
          group, band = groups[gi], groups[gi].band
          read = [next(tiles) if slot < len(group.slots) else None for slot in mine]
          rows_by_slot, ids_by_slot = zip(*(
              _padded(tile, self.tile_rows, source.dim, tile_dtype, window) for tile in read))
          state, stats = live.pop(str(band), None) or (
              sharding.empty_state(mesh, selectors[band], block), self._empty_stats())
          with _read_by_step(buffers, read, window) as done:
            state, stats = steps[band](state, stats, qd, qd_ids,
                                sharding.put_local_slots(mesh, dict(zip(mine, rows_by_slot))),
                                sharding.put_local_slots(mesh, dict(zip(mine, ids_by_slot))))
            done(state)
          live[str(band)] = (state, stats)
          if gi == bands.last[band]:
            self._take_candidates(found["bands"][str(band)], band_widths[band], live[str(band)],
                                  selectors[band], on_host, lambda: bands.slots_seen(band))
            handed = live.pop(str(band))
            if band + 1 < len(sizes) and bands.continues[band + 1]:
              live[str(band + 1)] = handed
            elif self.kernel != "xla":
              self.fallbacks += int(sharding.replicated_sum(mesh)(
                  selectors[band].fallbacks(handed[0])))
          if gi == len(groups) - 1:
            self._prefix_candidates(found, bands, band_widths, widths, q0, rows)
          if point is not None:
            point.maybe_save(Position(b, gi + 1).steps(len(groups)),
                             {"live": live, **found},
                             force=b == num_blocks - 1 and gi == len(groups) - 1)
          meter.update(group.rows, group.rows * source.dim * tile_dtype.itemsize)
      meter.close()
    except BaseException:  # a failed run gives its resume folder back (its checkpoint stays)
      if point is not None:
        point.abandon()
      raise
    if point is not None:
      point.close()
    return {key: found[key] for key in ("values", "ids", "norms")}

  def _selectors(self, bands, band_widths, block: int, tile_dtype):
    """(each band's selector, the query block). A band's state is as wide as its band needs
    (a continued state: the widest of its bands). Bands whose tiles interleave hold their
    states at once: the block shrinks until those states fit `BAND_STATE_BYTES`."""
    count = len(band_widths)
    chain = [bands.chain_start(b) for b in range(count)]
    k = [max(w for c, w in zip(chain, band_widths) if c == chain[b]) for b in range(count)]
    kernel, requested = self.kernel, block

    def choose(block):
      picked = [selector_that_compiles(
          kernel, self.required, k[b], self.tile_rows, self.bucket_width, self.mesh, block,
          self.source.dim, self.dtype, tile_dtype, self.exclude_self, self.precision,
          self.normalize, self.bf16_products) for b in range(count)]
      self.kernel = picked[int(np.argmax(k))][1]
      return [selector for selector, _ in picked]

    selectors = choose(block)
    per_query = [sum(np.asarray(x).nbytes for x in jax.tree.leaves(sel.init(1)))
                 for sel in selectors]
    most = max(sum(per_query[b] for b in {*bands.live(g), group.band})
               for g, group in enumerate(bands.groups))
    if most * block > BAND_STATE_BYTES:
      block = max(1, BAND_STATE_BYTES // most)
      warnings.warn(f"query blocks of {block} (not {requested}): the states of the bands "
                    f"streamed together take {most:,} bytes a query (BAND_STATE_BYTES = "
                    f"{BAND_STATE_BYTES:,})")
      selectors = choose(block)
    return selectors, block

  def _identity(self, q_host, own, kept, block, selectors) -> dict:
    """What a checkpoint must match to be resumed: everything that determines the pass."""
    source = self.source
    return dict(
        n=source.num_rows, dim=source.dim, dtype=str(source.dtype), queries=digest(q_host, own),
        gallery_ids=digest(self.ids), gallery=fingerprint(source), kept=list(kept.values()),
        sizes=list(self.sizes), tile_rows=self.tile_rows, block=block,
        devices=self.mesh.devices.size, exclude_self=self.exclude_self,
        normalize=self.normalize, compute_dtype=str(self.dtype), precision=str(self.precision),
        ranks=None if self.ranks is None else digest(self.ranks),
        selectors=[repr(sel) for sel in selectors],
        state=str(jax.tree.structure(selectors[0].init(1))))

  def _restore(self, point, at, found, selectors, block, bands):
    """(position, candidates, live band states) from the checkpoint, if there is one."""
    def template(steps):
      live = {str(b): (sharding.empty_state(self.mesh, selectors[b], block), self._empty_stats())
              for b in bands.live(Position.after(steps, len(bands.groups)).group)}
      return {"live": live, **found}

    try:
      loaded = point.load(template)
    except BaseException:  # another run's checkpoint: the folder stays free
      point.abandon()
      raise
    if loaded is None:
      return at, found, {}
    steps, tree = loaded
    return (Position.after(steps, len(bands.groups)), {key: tree[key] for key in found},
            tree["live"])

  def _take_candidates(self, into, width, live, selector, on_host, band_slots) -> None:
    """A band's end: its rows' checks, and its state's best `width` candidates (in no
    order) for this query block (`band_slots`: the positions its state has seen, to name bad rows)."""
    state, stats = live
    num_bad, largest, smallest = sharding.row_stats_total(self.mesh)(stats)
    if int(num_bad):
      raise_for_bad_rows(self.source, self.ids, band_slots(), nonzero=self.normalize)
      raise ValueError(f"{int(num_bad)} gallery rows have non-finite or overflowing norms "
                       f"on the device, but a host scan could not name them")
    v, i = sharding.device_merger(self.mesh, selector, width, on_host, sort=False)(state)
    into["values"][...] = np.asarray(v)
    into["ids"][...] = np.asarray(i)
    into["norms"][:] = [float(largest), float(smallest)]

  def _prefix_candidates(self, found, bands, band_widths, widths, q0, rows) -> None:
    """The query block's candidates and norm range of every prefix, from its bands'."""
    per_band = [found["bands"][str(b)] for b in range(len(self.sizes))]
    merged = merge_bands(bands, [(c["values"], c["ids"]) for c in per_band], widths)
    for j, (size, (v, i)) in enumerate(zip(self.sizes, merged)):
      found["values"][str(size)][q0:q0 + rows] = v[:rows]
      found["ids"][str(size)][q0:q0 + rows] = i[:rows]
      norms = np.array([c["norms"] for c in per_band[:j + 1]])
      found["norms"][str(size)][:] = [norms[:, 0].max(), norms[:, 1].min()]

  def _empty_stats(self):
    return jax.tree.map(lambda a: sharding.put_split(self.mesh, a),
                        sharding.empty_row_stats(self.mesh.devices.size))


@contextlib.contextmanager
def _read_by_step(buffers: TileBuffers | None, tiles, window):
  """A step that reads these tiles: inside, `done(out)` waits for the step's output `out`;
  after it, the tiles' buffers go back to `buffers` (the CPU backend reads host tiles in
  place, so a buffer is free only once its step is done). Without buffers, nothing waits."""
  if buffers is None:
    yield lambda out: None
    return
  yield jax.block_until_ready
  for tile in tiles:
    if tile is not None:
      buffers.give_back(tile.rows.window if window else tile.rows)


def _padded(tile, tile_rows: int, dim: int, dtype, window: int | None = None):
  """A device slot's rows and int32 ids, padded to `tile_rows` (id -1: never selected).
  With `window`, the rows are a `RowWindow` of that many elements (already sized)."""
  ids = np.full(tile_rows, -1, np.int32)
  if tile is None:
    rows = aligned_empty((tile_rows, dim) if window is None else (window,), dtype)
    rows[...] = 0
    return (rows if window is None else RowWindow(rows, np.int32(0))), ids
  ids[:tile.ids.shape[0]] = tile.ids
  if window is not None or tile.rows.shape[0] == tile_rows:
    return tile.rows, ids
  if on_accelerator(tile.rows):
    return jax.numpy.pad(tile.rows, ((0, tile_rows - tile.rows.shape[0]), (0, 0))), ids
  rows = aligned_empty((tile_rows, dim), dtype)
  rows[...] = 0
  rows[:tile.rows.shape[0]] = tile.rows
  return rows, ids
