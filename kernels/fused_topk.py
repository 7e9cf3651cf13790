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
  block_t: int = 128      # gallery rows per program (the unit whose top-K′ is kept)
  keep: int = 4           # K′: candidates kept per (query, block)
  block_k: int = 64       # feature columns per matmul step (d is zero-padded to a multiple)
  num_warps: int | None = None   # GPU (Triton) launch parameters; None: the compiler's choice
  num_stages: int | None = None


def _kernel(q_ref, g_ref, ids_ref, v_ref, c_ref, b_ref, *, config: FusedConfig, precision):
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
  s = jnp.where(ids_ref[cols][None, :] < 0, -jnp.inf, s)
  s = jnp.where(s == 0, 0.0, s)
  column = lax.broadcasted_iota(jnp.int32, (bq, bt), 1)
  slot = lax.broadcasted_iota(jnp.int32, (bq, keep), 1)
  values = jnp.full((bq, keep), -jnp.inf, jnp.float32)
  columns = jnp.zeros((bq, keep), jnp.int32)
  for r in range(keep):  # K′ rounds of (max, lowest column holding it, mask it)
    m = jnp.max(s, axis=1, keepdims=True)
    c = jnp.min(jnp.where(s == m, column, bt), axis=1, keepdims=True)
    values = jnp.where(slot == r, m, values)
    columns = jnp.where(slot == r, c, columns)
    s = jnp.where(column == c, -jnp.inf, s)
  v_ref[...] = values
  c_ref[...] = columns + j * bt
  b_ref[...] = jnp.max(s, axis=1, keepdims=True)


def block_topk(queries, gallery, gallery_ids, config: FusedConfig = FusedConfig(), *,
               precision=None, interpret: bool = False):
  """Per (query, gallery block): the top-K′ scores [Q, nb·K′], their columns (within the
  whole gallery) and each block's best dropped score [Q, nb]. Q and T must be multiples of
  the block sizes (pad with id -1 rows)."""
  q, d = queries.shape
  t = gallery.shape[0]
  bq, bt, bk, keep = config.block_q, config.block_t, config.block_k, config.keep
  if q % bq or t % bt:
    raise ValueError(f"Q={q}, T={t} must be multiples of the blocks ({bq}, {bt})")
  if d % bk:  # zero features add nothing to any score
    queries = jnp.pad(queries, ((0, 0), (0, bk - d % bk)))
    gallery = jnp.pad(gallery, ((0, 0), (0, bk - d % bk)))
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
      in_specs=[pl.no_block_spec] * 3,
      out_specs=(pl.BlockSpec((bq, keep), lambda i, j: (i, j)),
                 pl.BlockSpec((bq, keep), lambda i, j: (i, j)),
                 pl.BlockSpec((bq, 1), lambda i, j: (i, j))),
      interpret=interpret, **params,
  )(queries, gallery, gallery_ids)


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
  values, columns, bounds = block_topk(queries, gallery, gallery_ids, config,
                                       precision=precision, interpret=interpret)
  short = k - values.shape[1]
  if short > 0:  # fewer kept candidates than k: the certificate fails, the exact path runs
    values = jnp.pad(values, ((0, 0), (0, short)), constant_values=-jnp.inf)
    columns = jnp.pad(columns, ((0, 0), (0, short)))
  # Candidate positions order equal scores as their gallery columns do (blocks ascend, and
  # within a block equal scores were kept lower column first), so the engine's selection on
  # positions keeps the tie rule.
  v, pos = bucket_topk(values, k, BucketConfig())
  i = gallery_ids[jnp.take_along_axis(columns, pos, axis=1)]
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
