"""Fused similarity + per-tile selection (Pallas), an exact merge with a certificate, and an
exact fallback (PERFORMANCE.md §8.2).

The kernel scores a block of queries against a block of `block_t` gallery rows and keeps,
per query, only the top `keep` (K′) scores of that block — plus the best score it dropped
(the block's "bound") — so the [Q, T] score tile never leaves the chip. The merge takes the
top-k of all kept candidates by (score desc, id asc). It is exact for a row when every
bound is strictly below the row's k-th score: nothing dropped could have entered. Rows
where some bound reaches the k-th score (a block held more than K′ of the row's top-k, or
ties at the boundary) make the whole query block fall back to the exact XLA path
(`kernels.topk.bucket_topk`); the caller learns how many blocks did.

Ties inside a block: equal scores are kept lower column first (columns ascend by id, as in
the engine's tiles), so kept candidates agree with the engine's tie rule. -0.0 reads +0.0.

`reference_block_topk` is the plain-jnp reference of the kernel's output; `fused_topk` is
the jitted wrapper (`interpret=True` runs the kernel on CPU, as the tests do).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels.topk import BucketConfig, bucket_topk


@dataclasses.dataclass(frozen=True)
class FusedConfig:
  block_q: int = 64       # queries per program
  block_t: int = 256      # gallery rows per program (the unit whose top-K′ is kept)
  keep: int = 4           # K′: candidates kept per (query, block)


def _kernel(q_ref, g_ref, ids_ref, v_ref, c_ref, b_ref, *, keep: int, precision):
  s = lax.dot_general(q_ref[...], g_ref[...], (((1,), (1,)), ((), ())),
                      precision=precision, preferred_element_type=jnp.float32)
  ids = ids_ref[...]
  s = jnp.where(ids[None, :] < 0, -jnp.inf, s)
  s = jnp.where(s == 0, 0.0, s)
  cols = lax.broadcasted_iota(jnp.int32, s.shape, 1)
  width = s.shape[1]
  values, columns = [], []
  for _ in range(keep):  # K′ rounds of (max, lowest column holding it, mask it)
    m = jnp.max(s, axis=1, keepdims=True)
    c = jnp.min(jnp.where(s == m, cols, width), axis=1, keepdims=True)
    values.append(m)
    columns.append(c)
    s = jnp.where(cols == c, -jnp.inf, s)
  v_ref[...] = jnp.concatenate(values, axis=1)
  c_ref[...] = jnp.concatenate(columns, axis=1)
  b_ref[...] = jnp.max(s, axis=1, keepdims=True)


def block_topk(queries, gallery, gallery_ids, config: FusedConfig = FusedConfig(), *,
               precision=None, interpret: bool = False):
  """Per (query, gallery block): the top-K′ scores [Q, nb·K′], their columns (within the
  whole gallery) and each block's best dropped score [Q, nb]. Q and T must be multiples of
  the block sizes (pad with id -1 rows)."""
  q, d = queries.shape
  t = gallery.shape[0]
  bq, bt, keep = config.block_q, config.block_t, config.keep
  if q % bq or t % bt:
    raise ValueError(f"Q={q}, T={t} must be multiples of the blocks ({bq}, {bt})")
  nb = t // bt
  kernel = functools.partial(_kernel, keep=keep, precision=precision)
  values, columns, bounds = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((q, nb * keep), jnp.float32),
                 jax.ShapeDtypeStruct((q, nb * keep), jnp.int32),
                 jax.ShapeDtypeStruct((q, nb), jnp.float32)),
      grid=(q // bq, nb),
      in_specs=[pl.BlockSpec((bq, d), lambda i, j: (i, 0)),
                pl.BlockSpec((bt, d), lambda i, j: (j, 0)),
                pl.BlockSpec((bt,), lambda i, j: (j,))],
      out_specs=(pl.BlockSpec((bq, keep), lambda i, j: (i, j)),
                 pl.BlockSpec((bq, keep), lambda i, j: (i, j)),
                 pl.BlockSpec((bq, 1), lambda i, j: (i, j))),
      interpret=interpret,
  )(queries, gallery, gallery_ids)
  offsets = (jnp.arange(nb * keep, dtype=jnp.int32) // keep) * bt
  return values, columns + offsets[None, :], bounds


def reference_block_topk(queries, gallery, gallery_ids, config: FusedConfig = FusedConfig(),
                         *, precision=None):
  """Plain jnp: the same outputs from a materialised score tile and `lax.top_k`."""
  q = queries.shape[0]
  bt, keep = config.block_t, config.keep
  s = lax.dot_general(queries, gallery, (((1,), (1,)), ((), ())), precision=precision,
                      preferred_element_type=jnp.float32)
  s = jnp.where(gallery_ids[None, :] < 0, -jnp.inf, s)
  s = jnp.where(s == 0, 0.0, s).reshape(q, -1, bt)
  v, c = lax.top_k(s, keep + 1)
  nb = s.shape[1]
  cols = c[..., :keep] + (jnp.arange(nb, dtype=jnp.int32) * bt)[None, :, None]
  return v[..., :keep].reshape(q, -1), cols.reshape(q, -1), v[..., keep]


@functools.partial(jax.jit, static_argnames=("k", "config", "precision", "interpret"))
def fused_topk(queries, gallery, gallery_ids, k: int, config: FusedConfig = FusedConfig(), *,
               precision=None, interpret: bool = False):
  """Exact top-k of each query over the gallery tile: (values [Q, k], ids [Q, k], the
  number of query blocks that fell back to the exact path). Sorted by (score desc, id asc);
  equal to `bucket_topk` on the materialised, masked scores."""
  from plato_jax.knn.sharding import top_by_score_then_id
  values, columns, bounds = block_topk(queries, gallery, gallery_ids, config,
                                       precision=precision, interpret=interpret)
  ids = jnp.where(values > -jnp.inf, gallery_ids[columns], jnp.iinfo(jnp.int32).max)
  short = k - values.shape[1]
  if short > 0:  # fewer kept candidates than k: the certificate fails, the exact path runs
    values = jnp.pad(values, ((0, 0), (0, short)), constant_values=-jnp.inf)
    ids = jnp.pad(ids, ((0, 0), (0, short)), constant_values=jnp.iinfo(jnp.int32).max)
  v, i = top_by_score_then_id(values, ids, k)
  # Certificate: every dropped score is below the k-th kept one (strictly: equal scores
  # could outrank by id).
  certified = jnp.max(bounds, axis=1) < v[:, -1]
  certified = certified | (jnp.max(bounds, axis=1) == -jnp.inf)
  bq = config.block_q
  blocks_ok = certified.reshape(-1, bq).all(axis=1)

  def exact():
    s = lax.dot_general(queries, gallery, (((1,), (1,)), ((), ())), precision=precision,
                        preferred_element_type=jnp.float32)
    s = jnp.where(gallery_ids[None, :] < 0, -jnp.inf, s)
    ev, ec = bucket_topk(s, k, BucketConfig())
    ev = ev.reshape(-1, bq, k)
    ei = gallery_ids[ec].reshape(-1, bq, k)
    keep_fast = blocks_ok[:, None, None]
    return (jnp.where(keep_fast, v.reshape(-1, bq, k), ev).reshape(-1, k),
            jnp.where(keep_fast, i.reshape(-1, bq, k), ei).reshape(-1, k))

  v, i = lax.cond(blocks_ok.all(), lambda: (v, i), exact)
  i = jnp.where(v > -jnp.inf, i, -1)
  return v, i, jnp.sum(~blocks_ok, dtype=jnp.int32)
