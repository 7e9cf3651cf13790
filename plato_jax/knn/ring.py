"""Multi-device exact self-join: queries and gallery sharded by rows, gallery shards on a ring.

`ring_self_join(x, k)` finds every row's k nearest rows of `x` (itself excluded by id).
Each device holds one block of rows as its queries and, in turn, every block as gallery:
P ring steps, each scoring the local queries against the block in hand while the block is
passed on with `lax.ppermute` (issued before the compute, so the transfer overlaps it).
Nothing is gathered and nothing N×N exists: per device, three blocks of rows and the
[rows, k] running state. The selection is the engine's (`TopKSelector` / `ThresholdSelector`
on score tiles of `block` columns, or with `kernel="fused"` the fused Pallas kernel, which
never writes the score tile), and the candidates go through the same float64 certificate
(`plato_jax.knn.exact`), so results are exactly `search(x, x, k)`'s — the float64 top-k,
ties to the lower id — for any device count.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from plato_jax.knn import exact, sharding
from plato_jax.knn.kernel_choice import row_unit, selector_for
from plato_jax.knn.search import Neighbours, plan_search

DEFAULT_BLOCK = 2048


def _varying(a, axis):
  if hasattr(lax, "pcast"):
    return lax.pcast(a, (axis,), to="varying")
  return lax.pvary(a, (axis,))


@functools.lru_cache(maxsize=32)
def _ring_fn(mesh: Mesh, selector, block: int, exclude_self: bool, precision, k: int):
  axis = sharding.mesh_axis(mesh)
  p = mesh.devices.size
  perm = [(i, (i + 1) % p) for i in range(p)]

  def score_block(state, queries, query_ids, gallery, gallery_ids):
    """Folds one gallery block into the states of all local queries, tile by tile."""
    n = queries.shape[0]
    d = queries.shape[1]

    def per_query_block(args):
      st, q, qid = args

      def per_tile(st, tile):
        rows, ids = tile
        st, _ = sharding.fold_tile(selector, st, q, qid, rows, ids, exclude_self=exclude_self,
                                   precision=precision)
        return st, None

      st, _ = lax.scan(per_tile, st, (gallery.reshape(-1, block, d),
                                      gallery_ids.reshape(-1, block)))
      return st

    # Per-row parts split into query blocks; a scalar part (the fused kernel's fallback
    # count) starts at 0 in each block and is summed back.
    blocks = jax.tree.map(lambda a: a.reshape(n // block, block, *a.shape[1:]) if a.ndim
                          else jnp.zeros((n // block,), a.dtype), state)
    out = lax.map(per_query_block, (blocks, queries.reshape(-1, block, d),
                                    query_ids.reshape(-1, block)))
    return jax.tree.map(lambda o, a: o.reshape(n, *o.shape[2:]) if a.ndim else a + o.sum(),
                        out, state)

  def local(x, ids):
    # The state varies over the mesh axis like x (shard_map's types for the loops).
    state = jax.tree.map(lambda a: _varying(jnp.asarray(a), axis), selector.init(x.shape[0]))

    def step(_, carry):
      state, g, gid = carry
      nxt, nxt_id = lax.ppermute(g, axis, perm), lax.ppermute(gid, axis, perm)
      return score_block(state, x, ids, g, gid), nxt, nxt_id

    state, _, _ = lax.fori_loop(0, p, step, (state, x, ids))
    v, i = selector.result(state)
    fallbacks = selector.fallbacks(state)
    return v[:, :k], i[:, :k], fallbacks[None]

  # (A Pallas call declares no per-axis variance for its outputs: the check is off then.)
  fused = selector.fused
  fn = jax.shard_map(local, mesh=mesh, in_specs=(P(axis), P(axis)),
                     out_specs=(P(axis), P(axis), P(axis)), check_vma=not fused)
  return jax.jit(fn)


def ring_self_join(x, k, *, ids=None, exclude_self: bool = True, mesh: Mesh | None = None,
                   block: int | None = None, compute_dtype=None, precision=None,
                   kernel: str = "auto") -> Neighbours:
  """Exact k nearest rows of every row of `x` [N, D] among the rows of `x`.

  Args:
    ids: int ids of the rows (default 0..N-1); a row never gets its own id back when
      `exclude_self`.
    mesh: a one-axis Mesh (default: all devices); rows are split evenly over it.
    block: rows per query block and per score tile (default 2048, at most the rows per
      device); each device's rows are padded to a multiple of it.
    compute_dtype / precision: as `search` (f32 inputs: a true-f32 matmul by default).
    kernel: as `search`'s ("auto", "xla", "cpu", "fused", "fused:<backend>"; the fused ones round
      blocks to their gallery rows per program and run interpreted on CPU).
  Returns `Neighbours` [N, max k] in the input row order, with the kernel used and the
  fused kernel's fallback count.
  """
  x_host = np.asarray(x)
  if x_host.ndim != 2 or x_host.shape[0] == 0:
    raise ValueError(f"x must be a non-empty [N, D] array, got shape {x_host.shape}")
  # The same checks, ids, own rows, k's, dtypes and kernel as `search(x, x, k)`.
  plan = plan_search(x_host, x_host, k, gallery_ids=ids, exclude_self=exclude_self, mesh=mesh,
                     compute_dtype=compute_dtype, precision=precision, kernel=kernel)
  n, d = x_host.shape
  mesh, dtype, precision, kernel = plan.mesh, plan.dtype, plan.precision, plan.kernel
  p = mesh.devices.size
  per_device = -(-n // p)
  block = min(block or DEFAULT_BLOCK, per_device)
  align = 32 if kernel == "xla" else row_unit(kernel)  # (XLA's selection: any multiple of 32)
  block = -(-block // align) * align
  per_device = -(-per_device // block) * block

  # Rows by position (the devices' ids, ascending in every tile), padded at the end.
  padded = np.zeros((per_device * p, d), dtype)
  padded[:n] = x_host
  padded_ids = np.full(per_device * p, -1, np.int32)
  padded_ids[:n] = np.arange(n)
  split = NamedSharding(mesh, P(sharding.mesh_axis(mesh)))
  norms = plan.query_norms
  bound = exact.error_bound(d, norms, exact.norm_bound(np.square(norms).max(), d, up=True), 0.0,
                            normalize=False, rounds_inputs=exact.rounds_inputs(dtype, precision),
                            slack=exact.bound_slack(plan.platform))
  rescore = exact.rescorer(plan.source, plan.exact_queries, norms, dtype, False,
                           float(norms.max()))
  queries = np.arange(n)
  available = np.where(plan.own >= 0, n - 1, n)  # rows a query can get back
  most = int(available.max())
  keep, kept = plan.keep[n], min(plan.kept[n], most)
  fallbacks, rescored, searched_again = 0, 0, 0
  result = None
  while queries.size:  # a query whose certificate needs more candidates runs again
    selector = selector_for(kernel, kept, block, None, mesh, plan.bf16_products)
    fn = _ring_fn(mesh, selector, block, plan.exclude_self, precision, kept)
    v, i, more = fn(jax.device_put(padded, split), jax.device_put(padded_ids, split))
    fallbacks += int(np.asarray(more).sum())
    v, i = np.asarray(v)[:n][queries], np.asarray(i)[:n][queries]
    got = exact.certify(v, i, bound[queries], available[queries], keep, plan.ks,
                        plan.gallery_ids, lambda which, pos: rescore(queries[which], pos))
    if result is None:
      result = got
      searched_again = int(got.failed.sum())
    else:
      result.positions[queries] = got.positions
      result.scores[queries] = got.scores
    rescored += got.rescored
    queries = queries[got.failed]
    kept = min(8 * kept, most)
  return Neighbours(plan.gallery_ids[result.positions], result.scores, n, kernel, fallbacks,
                    rescored, searched_again)
