"""Fused similarity + per-tile selection (Pallas), an exact merge with a certificate, and an
exact fallback.

The kernel scores a block of queries against a block of `block_t` gallery rows and keeps,
per query, only the top `keep` (K′) scores of that block — plus the best score it dropped
(the block's "bound") — so the [Q, T] score tile never leaves the chip. The merge takes the
top-k of the kept candidates and the running top-k by (score desc, id asc). It is exact for
a row when every bound is strictly below the row's merged k-th score: nothing dropped could
have entered. Rows where some bound reaches it (a block held more than K′ of the row's
top-k, or ties at the boundary) make their query block fall back to the exact XLA path
(`plato_jax.kernels.topk.bucket_topk` on the materialised tile); the caller learns how many did.

A streaming search also passes each row's running k-th score as a threshold: a program
whose block no row reaches keeps nothing and skips the selection rounds (its bound is the
block's maximum, below every row's k-th, so the certificate still holds). In a long stream
almost every program skips: the kernel is then a matmul plus one max per row.

The kernel masks what the engine masks: padding columns (id < 0), each query's own id
(self-exclusion), and it multiplies by a per-column scale (cosine: the rows' inverse
norms). -0.0 reads +0.0. Ties inside a block: equal scores are kept lower column first
(columns ascend by id, as in the engine's tiles), so kept candidates keep the tie rule.

Three lowerings of the same kernel (`FusedConfig.backend`): "triton" (here; any CUDA GPU;
f32 or half inputs), "mosaic_gpu" (`plato_jax.kernels.fused_topk_mosaic_gpu`: Hopper and later,
warp-specialized TMA + wgmma, bf16/f16 only) and "tpu" (`plato_jax.kernels.fused_topk_tpu`: Pallas
TPU). All run on CPU in interpret mode (Mosaic GPU's interpreter simulates its shared
memory, barriers and wgmma; Pallas TPU's its VMEM and DMAs), which is how they are tested
here.

`reference_block_topk` is the plain-jnp reference of the kernel's output; `fused_topk` is
the jitted single-tile wrapper (`interpret=True` runs the kernel on CPU, as the tests do).
The engine's selector built on it is `plato_jax.knn.selectors.FusedTopKSelector`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from plato_jax.kernels.fused_contract import (FusedConfig, any_row_reaches,
                                              defaults, masked, nothing_kept, select_top)
from plato_jax.kernels.primitives import merge_topk
from plato_jax.kernels.topk import BucketConfig, bucket_topk

def _kernel(q_ref, g_ref, ids_ref, qids_ref, scale_ref, thr_ref, v_ref, c_ref, b_ref, *,
            config: FusedConfig, precision):
  # Whole-array refs indexed by hand: the blocks stay power-of-two shaped (as Triton needs)
  # whatever d is, and the matmul runs in block_k steps with the [bq, bt] tile in registers.
  bq, bt, bk, keep = config.block_q, config.block_t, config.block_k, config.keep
  i, j = pl.program_id(0), pl.program_id(1)
  rows = pl.ds(pl.multiple_of(i * bq, bq), bq)
  cols = pl.ds(pl.multiple_of(j * bt, bt), bt)

  def step(kk, acc):
    feats = pl.ds(pl.multiple_of(kk * bk, bk), bk)
    return acc + lax.dot_general(q_ref[rows, feats], g_ref[cols, feats],
                                 (((1,), (1,)), ((), ())), precision=precision,
                                 preferred_element_type=jnp.float32)

  s = lax.fori_loop(0, q_ref.shape[1] // bk, step, jnp.zeros((bq, bt), jnp.float32))
  s = masked(s, ids_ref[cols], qids_ref[rows], scale_ref[cols])
  best = jnp.max(s, axis=1, keepdims=True)
  values, columns, bound = lax.cond(any_row_reaches(best, thr_ref[rows][:, None]),
                                    lambda: select_top(s, best, keep),
                                    lambda: nothing_kept(best, keep))
  v_ref[...] = values
  c_ref[...] = columns + j * bt
  b_ref[...] = bound


def block_topk(queries, gallery, gallery_ids, config: FusedConfig = FusedConfig(), *,
               query_ids=None, column_scale=None, thresholds=None, precision=None,
               interpret: bool = False):
  """Per (query, gallery block): the top-K′ scores [Q, nb·K′], their columns (within the
  whole gallery) and each block's best dropped score [Q, nb]. Q and T must be multiples of
  the block sizes (pad with id -1 rows).

  query_ids [Q]: a query never scores the column with its own id. column_scale [T]: scores
  are multiplied by it. thresholds [Q]: a hint — a program whose block holds no score
  reaching its rows' thresholds keeps nothing (its bound is then the block's maximum).
  Pass a lower bound on each row's final k-th score; a wrong hint costs the certificate
  (the caller's exact fallback), never a wrong result."""
  q, d = queries.shape
  t = gallery.shape[0]
  bq, bt, bk, keep = config.block_q, config.block_t, config.block_k, config.keep
  if q % bq or t % config.program_rows:
    raise ValueError(f"Q={q}, T={t} must be multiples of the blocks ({bq}, "
                     f"{config.program_rows})")
  if d % bk:  # zero features add nothing to any score
    queries = jnp.pad(queries, ((0, 0), (0, bk - d % bk)))
    gallery = jnp.pad(gallery, ((0, 0), (0, bk - d % bk)))
  query_ids, column_scale, thresholds = defaults(q, t, query_ids, column_scale, thresholds)
  lowered = (queries, gallery, gallery_ids.astype(jnp.int32), query_ids.astype(jnp.int32),
             column_scale.astype(jnp.float32), thresholds.astype(jnp.float32), config)
  if config.backend == "mosaic_gpu":
    from plato_jax.kernels import fused_topk_mosaic_gpu
    return fused_topk_mosaic_gpu.block_topk(*lowered, interpret)
  if config.backend == "tpu":
    from plato_jax.kernels import fused_topk_tpu
    return fused_topk_tpu.block_topk(*lowered, precision, interpret)
  nb = t // bt
  params = {}
  if not interpret:  # compiled: the Triton backend (GPU)
    from jax.experimental.pallas import triton as pl_triton
    params["compiler_params"] = pl_triton.CompilerParams(num_warps=config.num_warps,
                                                         num_stages=config.num_stages)
  return pl.pallas_call(
      functools.partial(_kernel, config=config, precision=precision),
      out_shape=(jax.ShapeDtypeStruct((q, nb * keep), jnp.float32),
                 jax.ShapeDtypeStruct((q, nb * keep), jnp.int32),
                 jax.ShapeDtypeStruct((q, nb), jnp.float32)),
      grid=(q // bq, nb),
      in_specs=[pl.no_block_spec] * 6,
      out_specs=(pl.BlockSpec((bq, keep), lambda i, j: (i, j)),
                 pl.BlockSpec((bq, keep), lambda i, j: (i, j)),
                 pl.BlockSpec((bq, 1), lambda i, j: (i, j))),
      interpret=interpret, **params,
  )(queries, gallery, gallery_ids.astype(jnp.int32), query_ids.astype(jnp.int32),
    column_scale.astype(jnp.float32), thresholds.astype(jnp.float32))


def reference_block_topk(queries, gallery, gallery_ids, config: FusedConfig = FusedConfig(),
                         *, query_ids=None, column_scale=None, thresholds=None,
                         precision=None):
  """Plain jnp: the same outputs from a materialised score tile and `lax.top_k`. Columns
  of kept -inf values (a block with fewer than K′ finite scores) are unspecified in the
  kernels — the merge never reads them — so compare columns where values are finite."""
  q, t = queries.shape[0], gallery.shape[0]
  bq, bt, keep = config.block_q, config.block_t, config.keep
  query_ids, column_scale, thresholds = defaults(q, t, query_ids, column_scale, thresholds)
  s = lax.dot_general(queries, gallery, (((1,), (1,)), ((), ())), precision=precision,
                      preferred_element_type=jnp.float32)
  s = masked(s, gallery_ids, query_ids, column_scale).reshape(q, -1, bt)
  v, c = lax.top_k(s, keep + 1)
  nb = s.shape[1]
  cols = c[..., :keep] + (jnp.arange(nb, dtype=jnp.int32) * bt)[None, :, None]
  best = v[..., 0]  # [Q, nb]
  reached = (best >= thresholds[:, None]).reshape(q // bq, bq, nb).any(axis=1)
  selected = jnp.repeat(reached, bq, axis=0)  # [Q, nb]: the program ran its selection
  values = jnp.where(selected[..., None], v[..., :keep], -jnp.inf)
  cols = jnp.where(selected[..., None], cols, (jnp.arange(nb, dtype=jnp.int32) * bt)[:, None])
  bounds = jnp.where(selected, v[..., keep], best)
  return values.reshape(q, -1), cols.reshape(q, -1), bounds


def fused_update(prior, queries, gallery, gallery_ids, k: int,
                 config: FusedConfig = FusedConfig(), *, query_ids=None, column_scale=None,
                 precision=None, interpret: bool = False):
  """The running top-k `prior` (values [Q, k] sorted, ids [Q, k]) merged with one tile:
  (values, ids, number of query blocks that took the exact path). The tile's ids ascend
  with its columns; a row's running k-th score is the kernel's threshold."""
  prior_v, prior_i = prior
  q = queries.shape[0]
  query_ids, column_scale, _ = defaults(q, gallery.shape[0], query_ids, column_scale, None)
  values, columns, bounds = block_topk(queries, gallery, gallery_ids, config,
                                       query_ids=query_ids, column_scale=column_scale,
                                       thresholds=prior_v[:, -1], precision=precision,
                                       interpret=interpret)
  short = k - values.shape[1]
  if short > 0:  # fewer kept candidates than k: padded, and the certificate decides
    values = jnp.pad(values, ((0, 0), (0, short)), constant_values=-jnp.inf)
    columns = jnp.pad(columns, ((0, 0), (0, short)))
  # Candidate positions order equal scores as their gallery columns do (blocks ascend, and
  # within a block equal scores were kept lower column first), so the engine's selection on
  # positions keeps the tie rule.
  tv, pos = bucket_topk(values, k, BucketConfig())
  ti = jnp.where(tv > -jnp.inf, gallery_ids[jnp.take_along_axis(columns, pos, axis=1)], -1)
  v, i = merge_topk(prior_v, prior_i, tv, ti, k)
  # Certificate: every dropped score is below the merged k-th (strictly: an equal score
  # could outrank it by id).
  worst = jnp.max(bounds, axis=1)
  certified = (worst < v[:, -1]) | (worst == -jnp.inf)
  bq = config.block_q
  blocks_ok = certified.reshape(-1, bq).all(axis=1)

  def exact():
    s = lax.dot_general(queries, gallery, (((1,), (1,)), ((), ())), precision=precision,
                        preferred_element_type=jnp.float32)
    ev, ec = bucket_topk(masked(s, gallery_ids, query_ids, column_scale),
                         min(k, s.shape[1]), BucketConfig())  # a tile may be narrower than k
    ei = jnp.where(ev > -jnp.inf, gallery_ids[ec], -1)
    ev, ei = merge_topk(prior_v, prior_i, ev, ei, k)
    fast = jnp.repeat(blocks_ok, bq)[:, None]
    return jnp.where(fast, v, ev), jnp.where(fast, i, ei)

  v, i = lax.cond(blocks_ok.all(), lambda: (v, i), exact)
  return v, jnp.where(v > -jnp.inf, i, -1), jnp.sum(~blocks_ok, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnames=("k", "config", "precision", "interpret"))
def fused_topk(queries, gallery, gallery_ids, k: int, config: FusedConfig = FusedConfig(), *,
               precision=None, interpret: bool = False):
  """Exact top-k of each query over one gallery tile: (values [Q, k], ids [Q, k], the
  number of query blocks that fell back to the exact path). Sorted by (score desc, id asc);
  equal to `bucket_topk` on the materialised, masked scores."""
  q = queries.shape[0]
  prior = (jnp.full((q, k), -jnp.inf, jnp.float32), jnp.full((q, k), -1, jnp.int32))
  return fused_update(prior, queries, gallery, gallery_ids, k, config, precision=precision,
                      interpret=interpret)
