"""Mesh / shard_map plumbing: one gallery tile per device, a running top-k per device, one merge.

Every device keeps its own [Q, k] state (values f32, ids int32). A step scores the queries
against the device's tile, selects the tile's top-k exactly (plato_jax.kernels.topk) and merges it into
the state. `device_merger` folds the per-device states into one result. Because the merge
orders by (score descending, id ascending) — a total order, ids being unique — the result
does not depend on how the gallery was split into tiles or devices.

Where the device is the host's own CPU, the last sort runs in numpy (`host_topk`): XLA:CPU
sorts, and runs `lax.top_k` for k in the thousands, about ten times slower than numpy's
vectorised sorts. The devices then hand over their candidates (`selector.candidates`)
packed as one int64 key each, and nothing is sorted on them.
"""
from __future__ import annotations

import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from plato_jax.kernels.primitives import inverse_norms, row_sumsq, top_by_score_then_id
from plato_jax.knn import threads

AXIS = "gallery"
# Word order of an int64 seen as two int32s: (low, high).
_LOW, _HIGH = (0, 1) if sys.byteorder == "little" else (1, 0)


def default_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.array(devices), (AXIS,))


def mesh_axis(mesh: Mesh) -> str:
  if len(mesh.axis_names) != 1:
    raise ValueError(f"the search mesh must have one axis (gallery tiles), got {mesh.axis_names}")
  return mesh.axis_names[0]


def order_keys(values, ids):
  """[..., 2] int32 words of one int64 key per candidate, ascending in (value desc, id asc).

  High word: the value's bits mapped to a signed integer that increases with the value,
  then inverted; low word: the id (ids >= 0 sort before the filler's -1 at equal values).
  -0.0 is keyed as +0.0.
  """
  bits = lax.bitcast_convert_type(jnp.where(values == 0, 0.0, values).astype(jnp.float32),
                                  jnp.int32)
  rising = jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)
  words = [None, None]
  words[_LOW], words[_HIGH] = ids.astype(jnp.int32), ~rising
  return jnp.stack(words, axis=-1)


def host_topk(keys: np.ndarray, k: int, *, sort: bool = True):
  """The first k of each row of `order_keys` output [Q, m, 2] (or its int64 view [Q, m]) on
  the host: (values f32 [Q, k], ids int32 [Q, k]), ids -1 where the value is -inf. A
  partition, then a sort of k (`sort=False`: the k in no order), on slices of queries in a
  thread per core."""
  keys = np.ascontiguousarray(keys).view(np.int64)
  keys = keys[..., 0] if keys.ndim == 3 else keys
  num_q, m = keys.shape
  values, ids = np.empty((num_q, k), np.float32), np.empty((num_q, k), np.int32)
  if m < k:  # fewer candidates than k: filler (-inf, -1) after them
    filler = np.asarray(order_keys(np.float32(-np.inf), np.int32(-1))).view(np.int64)[0]

  def select(span):
    a, b = span
    part = keys[a:b]
    if m > k:
      part = np.partition(part, k - 1, axis=1)[:, :k]
    elif m < k:
      part = np.pad(part, ((0, 0), (0, k - m)), constant_values=filler)
    words = (np.sort(part, axis=1) if sort else part).view(np.int32).reshape(b - a, k, 2)
    rising = ~words[..., _HIGH]
    values[a:b] = np.where(rising < 0, rising ^ np.int32(0x7FFFFFFF), rising).view(np.float32)
    ids[a:b] = np.where(values[a:b] == -np.inf, -1, words[..., _LOW])

  threads.each(select, threads.spans(num_q, m))
  return values, ids


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ScoreTile:
  """One device tile's f32 scores [Q, T], kept lazy.

  `raw` is the matmul output. Column j's score is raw · `inv_norms[j]` (with normalize: the
  reciprocal of the gallery row's norm; 0 for padding), -inf for padding (tile id < 0,
  always the last columns: `num_valid` columns are real) and, with self-exclusion, for the
  query's own id (`query_ids`). -0.0 and +0.0 are one value for the tie rule (a zero row
  dotted with a negative query gives -0.0): both read as +0.0. Selectors pass these to
  `plato_jax.kernels.topk.bucket_topk`, which applies them without a pass over the tile, or
  materialise `scores()`.
  """
  raw: jax.Array
  tile_ids: jax.Array
  query_ids: jax.Array | None = None
  inv_norms: jax.Array | None = None

  @property
  def num_valid(self):
    return jnp.sum(self.tile_ids >= 0, dtype=jnp.int32)

  def scores(self):
    """The whole finished [Q, T] tile (an expression: XLA fuses it into the pass reading it,
    or materialises it when several passes do)."""
    return self._finish(self.raw, self.tile_ids[None, :],
                        None if self.inv_norms is None else self.inv_norms[None, :])

  def scores_at(self, columns):
    """Finished scores at `columns` [Q, m], read from the raw tile."""
    return self._finish(jnp.take_along_axis(self.raw, columns, axis=1), self.tile_ids[columns],
                        None if self.inv_norms is None else self.inv_norms[columns])

  def _finish(self, s, ids, inv_norms):
    if inv_norms is not None:
      s = s * inv_norms
    masked = ids < 0
    if self.query_ids is not None:
      masked = masked | (ids == self.query_ids[:, None])
    s = jnp.where(masked, -jnp.inf, s)
    return jnp.where(s == 0, jnp.zeros_like(s), s)


def score_tile(queries, query_ids, tile, tile_ids, *, exclude_self: bool, precision,
               row_sumsq=None) -> ScoreTile:
  """The scores of `queries` against `tile` rows; see `ScoreTile` for what is excluded.

  With `row_sumsq` (the gallery rows' f32 squared norms) each column is multiplied by the
  reciprocal of its row's norm — cosine when the queries are unit rows — leaving the matmul
  in the storage dtype. (A product, not a division: XLA may turn x / y into x · (1/y) in
  one place and not in another, and the selection needs one number per score.)
  """
  s = lax.dot_general(queries, tile.astype(queries.dtype), (((1,), (1,)), ((), ())),
                      precision=precision, preferred_element_type=jnp.float32)
  inv_norms = None if row_sumsq is None else inverse_norms(row_sumsq)
  return ScoreTile(s, tile_ids, query_ids if exclude_self else None, inv_norms)


def count_bad_rows(row_sumsq, tile_ids, normalize: bool):
  """Rows (not padding) whose f32 squared norm is NaN/Inf — a NaN/Inf value, or an overflow —
  or zero when they must be normalised."""
  bad = ~jnp.isfinite(row_sumsq)
  if normalize:
    bad = bad | (row_sumsq == 0)
  return jnp.sum(bad & (tile_ids >= 0), dtype=jnp.int32)


def fold_tile(selector, state, queries, query_ids, tile, tile_ids, *, exclude_self: bool,
              precision, normalize: bool = False):
  """One tile folded into a device's running state: scored and selected (`score_tile`,
  `selector.update`), or in one fused kernel (`selector.update_rows`). Returns (state, the
  tile rows' f32 squared norms)."""
  if selector.fused:
    return selector.update_rows(state, queries, query_ids if exclude_self else None, tile,
                                tile_ids, normalize=normalize, precision=precision)
  sumsq = row_sumsq(tile.astype(queries.dtype))  # the values the matmul takes
  s = score_tile(queries, query_ids, tile, tile_ids, exclude_self=exclude_self,
                 precision=precision, row_sumsq=sumsq if normalize else None)
  return selector.update(state, s), sumsq


def empty_row_stats(num_devices: int):
  """Per-device row statistics before any tile (`update_row_stats`): no bad row, and a
  [largest, smallest] squared norm of [0, inf] that the first tile replaces."""
  return (np.zeros(num_devices, np.int32),
          np.tile(np.array([[0, np.inf]], np.float32), (num_devices, 1)))


def update_row_stats(stats, row_sumsq, tile_ids, normalize: bool):
  """One device's (bad rows, [largest, smallest] f32 squared norm of its valid rows) with a
  tile's rows added: the count for the engine's bad-row check (`count_bad_rows`), the
  norms for the certificate's error bound (`plato_jax.knn.exact`)."""
  bad, norms = stats
  valid = tile_ids >= 0
  largest = jnp.max(jnp.where(valid, row_sumsq, 0))
  smallest = jnp.min(jnp.where(valid, row_sumsq, jnp.inf))
  return (bad + count_bad_rows(row_sumsq, tile_ids, normalize),
          jnp.stack([jnp.maximum(norms[0], largest), jnp.minimum(norms[1], smallest)]))


@functools.lru_cache(maxsize=64)
def sharded_step(mesh: Mesh, selector, exclude_self: bool, precision, normalize: bool = False):
  """jit(shard_map(score + selector.update)): per-device state [P, ...], tiles [P, T, D] (or
  `RowWindow`s [P, L] and [P], for selectors that read them).

  Also folds the tile's rows into per-device row statistics (`empty_row_stats`: bad rows,
  norm range): rows are checked on the device, where they are anyway, and named on the
  host only on error.
  """
  axis = mesh_axis(mesh)

  def local(state, stats, queries, query_ids, tiles, tile_ids):
    state, stats, tile = jax.tree.map(lambda x: x[0], (state, stats, tiles))
    state, sumsq = fold_tile(selector, state, queries, query_ids, tile, tile_ids[0],
                             exclude_self=exclude_self, precision=precision, normalize=normalize)
    stats = update_row_stats(stats, sumsq, tile_ids[0], normalize)
    return jax.tree.map(lambda x: x[None], (state, stats))

  split, whole = P(axis), P()
  # A Pallas call inside declares no per-axis variance for its outputs; JAX then asks for
  # the check to be off (the specs above state the layout either way).
  fn = jax.shard_map(local, mesh=mesh, in_specs=(split, split, whole, whole, split, split),
                     out_specs=(split, split), check_vma=not selector.fused)
  return jax.jit(fn, donate_argnums=(0, 1))


@functools.lru_cache(maxsize=8)
def row_stats_total(mesh: Mesh):
  """Per-device row statistics → (bad rows, largest squared norm, smallest), on every process."""
  def total(stats):
    bad, norms = stats
    return jnp.sum(bad), jnp.max(norms[:, 0]), jnp.min(norms[:, 1])
  return jax.jit(total, out_shardings=NamedSharding(mesh, P()))


@functools.lru_cache(maxsize=8)
def replicated_sum(mesh: Mesh):
  return jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))


@functools.lru_cache(maxsize=64)
def device_merger(mesh: Mesh, selector, k: int, on_host: bool = False, sort: bool = True):
  """Per-device states [P, ...] → the top-k [Q, k] of their union, on every process.
  on_host: the devices pack their candidates as sort keys and numpy selects (`host_topk`;
  `sort=False`: the k in no order)."""

  if on_host:
    def keys(state):
      v, i = jax.vmap(selector.candidates)(state)
      p, q, m = v.shape
      return order_keys(jnp.moveaxis(v, 0, 1).reshape(q, p * m),
                        jnp.moveaxis(i, 0, 1).reshape(q, p * m))

    packed = jax.jit(keys, out_shardings=NamedSharding(mesh, P()))
    return lambda state: host_topk(np.asarray(packed(state)), k, sort=sort)

  def merge(state):
    state_v, state_i = jax.vmap(selector.result)(state)
    p, q, kk = state_v.shape
    if p == 1:  # one device: its result is already sorted
      return state_v[0, :, :k], state_i[0, :, :k]
    return top_by_score_then_id(jnp.moveaxis(state_v, 0, 1).reshape(q, p * kk),
                                jnp.moveaxis(state_i, 0, 1).reshape(q, p * kk), k)

  return jax.jit(merge, out_shardings=NamedSharding(mesh, P()))


def local_slots(mesh: Mesh) -> list[int]:
  """Positions on the mesh axis of this process's devices (each process reads its own tiles)."""
  me = jax.process_index()
  return [slot for slot, dev in enumerate(mesh.devices.flat) if dev.process_index == me]


def empty_state(mesh: Mesh, selector, num_queries: int):
  p = mesh.devices.size
  return jax.tree.map(lambda x: put_split(mesh, np.broadcast_to(x, (p, *x.shape))),
                      selector.init(num_queries))


def put_split(mesh: Mesh, array: np.ndarray):
  """A host array that every process holds whole, split over the mesh axis."""
  sharding = NamedSharding(mesh, P(mesh_axis(mesh)))
  return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


def put_local_slots(mesh: Mesh, per_slot: dict):
  """[P, ...] arrays (of each leaf, when the slots hold pytrees) from this process's slots
  only (other processes supply theirs)."""
  devices, slots = mesh.devices.flat, sorted(per_slot)
  split = NamedSharding(mesh, P(mesh_axis(mesh)))

  def put(*leaves):
    arrays = [jax.device_put(np.asarray(a)[None], devices[s]) for s, a in zip(slots, leaves)]
    return jax.make_array_from_single_device_arrays(
        (mesh.devices.size, *np.shape(leaves[0])), split, arrays)

  return jax.tree.map(put, *[per_slot[s] for s in slots])


def put_whole(mesh: Mesh, array: np.ndarray):
  """A host array that every process holds whole, replicated on every device."""
  return jax.make_array_from_callback(array.shape, NamedSharding(mesh, P()),
                                      lambda idx: array[idx])
