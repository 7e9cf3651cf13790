"""Fused similarity + per-tile selection (Pallas), an exact merge with a certificate, and an
exact fallback (PERFORMANCE.md §8.2).

The kernel scores a block of queries against a block of `block_t` gallery rows and keeps,
per query, only the top `keep` (K′) scores of that block — plus the best score it dropped
(the block's "bound") — so the [Q, T] score tile never leaves the chip. The merge takes the
top-k of the kept candidates and the running top-k by (score desc, id asc). It is exact for
a row when every bound is strictly below the row's merged k-th score: nothing dropped could
have entered. Rows where some bound reaches it (a block held more than K′ of the row's
top-k, or ties at the boundary) make their query block fall back to the exact XLA path
(`kernels.topk.bucket_topk` on the materialised tile); the caller learns how many did.

A streaming search also passes each row's running k-th score as a threshold: a program
whose block no row reaches keeps nothing and skips the selection rounds (its bound is the
block's maximum, below every row's k-th, so the certificate still holds). In a long stream
almost every program skips: the kernel is then a matmul plus one max per row.

The kernel masks what the engine masks: padding columns (id < 0), each query's own id
(self-exclusion), and it multiplies by a per-column scale (cosine: the rows' inverse
norms). -0.0 reads +0.0. Ties inside a block: equal scores are kept lower column first
(columns ascend by id, as in the engine's tiles), so kept candidates keep the tie rule.

Three lowerings of the same kernel (`FusedConfig.backend`): "triton" (any CUDA GPU; f32 or
half inputs), "mosaic_gpu" (Mosaic GPU, Hopper and later: warp-specialized, TMA-pipelined
`wgmma` on bf16/f16 only — its f32 matmul would be tf32, not the engine's f32) and "tpu"
(Pallas TPU: blocks in VMEM, the MXU matmul, the same selection). All run on CPU in
interpret mode (Mosaic GPU's interpreter simulates its shared memory, barriers and wgmma;
Pallas TPU's its VMEM and DMAs), which is how they are tested here.

`reference_block_topk` is the plain-jnp reference of the kernel's output; `fused_topk` is
the jitted single-tile wrapper (`interpret=True` runs the kernel on CPU, as the tests do);
`FusedTopKSelector` is the engine's selector built on it.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.topk import BucketConfig, bucket_topk

NO_QUERY_ID = -2  # matches no column: gallery ids are >= 0, padding is -1
# Each lowering and the platform it compiles for (on CPU every one runs interpreted).
BACKENDS = {"triton": "gpu", "mosaic_gpu": "gpu", "tpu": "tpu"}


@dataclasses.dataclass(frozen=True)
class FusedConfig:
  block_q: int = 128      # queries per program
  block_t: int = 128      # gallery rows per program (the unit whose top-K′ is kept)
  keep: int = 4           # K′: candidates kept per (query, block)
  block_k: int = 64       # feature columns per matmul step (d is zero-padded to a multiple)
  num_warps: int | None = 8      # GPU (Triton) launch parameters; None: the compiler's choice
  num_stages: int | None = 3     # (mosaic_gpu: TMA copies in flight, >= 2)
  backend: str = "triton"        # one of BACKENDS (mosaic_gpu: bf16/f16 inputs only)
  warpgroups: int = 2            # mosaic_gpu: compute warpgroups per program, one gallery block each

  def __post_init__(self):
    if self.backend not in BACKENDS:
      raise ValueError(f"backend must be one of {tuple(BACKENDS)}, got {self.backend!r}")
    if self.warpgroups not in (1, 2):
      raise ValueError(f"warpgroups must be 1 or 2, got {self.warpgroups}")

  @property
  def program_rows(self) -> int:
    """Gallery rows per program: tiles are padded to a multiple of it."""
    return self.block_t * (self.warpgroups if self.backend == "mosaic_gpu" else 1)


def _masked(s, gallery_ids, query_ids, column_scale):
  """The engine's finished scores from raw dot products (shared by kernels and reference)."""
  return _masked_2d(s, gallery_ids[None, :], query_ids[:, None], column_scale[None, :])


def _masked_2d(s, gallery_ids, query_ids, column_scale):
  """`_masked` with the vectors as [1, T] rows and a [Q, 1] column (TPU blocks are 2-D)."""
  s = s * column_scale
  drop = (gallery_ids < 0) | (gallery_ids == query_ids)
  s = jnp.where(drop, -jnp.inf, s)
  return jnp.where(s == 0, 0.0, s)


def _select(s, best, keep: int):
  """K′ rounds of (max, lowest column holding it, mask it) on a [bq, bt] tile whose row
  maxima are `best` [bq, 1]: (values [bq, K′], block columns [bq, K′], bound [bq, 1])."""
  bq, bt = s.shape
  column = lax.broadcasted_iota(jnp.int32, (bq, bt), 1)
  slot = lax.broadcasted_iota(jnp.int32, (bq, keep), 1)
  values = jnp.full((bq, keep), -jnp.inf, jnp.float32)
  columns = jnp.zeros((bq, keep), jnp.int32)
  left, m = s, best
  for r in range(keep):
    c = jnp.min(jnp.where(left == m, column, bt), axis=1, keepdims=True)
    values = jnp.where(slot == r, m, values)
    columns = jnp.where(slot == r, c, columns)
    left = jnp.where(column == c, -jnp.inf, left)
    m = jnp.max(left, axis=1, keepdims=True)
  return values, columns, m


def _skipped(best, keep: int):
  """A block no row reaches: nothing kept; the bound (the block's maximum) covers it."""
  bq = best.shape[0]
  return (jnp.full((bq, keep), -jnp.inf, jnp.float32), jnp.zeros((bq, keep), jnp.int32), best)


def _reached(best, thresholds):
  """Whether any row of the block reaches its threshold (a max of 0/1, not any(): Pallas'
  Triton lowering has no reduce_or)."""
  return jnp.max(jnp.where(best >= thresholds, 1, 0)) > 0


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
  s = _masked(s, ids_ref[cols], qids_ref[rows], scale_ref[cols])
  best = jnp.max(s, axis=1, keepdims=True)
  values, columns, bound = lax.cond(_reached(best, thr_ref[rows][:, None]),
                                    lambda: _select(s, best, keep), lambda: _skipped(best, keep))
  v_ref[...] = values
  c_ref[...] = columns + j * bt
  b_ref[...] = bound


def _tpu_kernel(q_ref, g_ref, ids_ref, qids_ref, scale_ref, thr_ref, v_ref, c_ref, b_ref, *,
                config: FusedConfig, precision):
  # Pallas TPU: the blocks arrive in VMEM by BlockSpec (whole d: (bq + bt)·d elements,
  # double-buffered, must fit the scoped VMEM); vectors as 2-D blocks.
  j = pl.program_id(1)
  s = lax.dot_general(q_ref[...], g_ref[...], (((1,), (1,)), ((), ())), precision=precision,
                      preferred_element_type=jnp.float32)
  s = _masked_2d(s, ids_ref[...], qids_ref[...], scale_ref[...])
  best = jnp.max(s, axis=1, keepdims=True)
  reached = _reached(best, thr_ref[...])

  def write(values, columns, bound):
    v_ref[0] = values
    c_ref[0] = columns + j * config.block_t
    b_ref[0] = bound

  pl.when(reached)(lambda: write(*_select(s, best, config.keep)))
  pl.when(~reached)(lambda: write(*_skipped(best, config.keep)))


def _tpu_block_topk(queries, gallery, gallery_ids, query_ids, column_scale, thresholds,
                    config: FusedConfig, precision, interpret: bool):
  bq, bt, keep = config.block_q, config.block_t, config.keep
  if bq % 8 or bt % 128:
    raise ValueError(f"TPU blocks: block_q a multiple of 8 (sublanes), block_t a multiple of "
                     f"128 (lanes); got {config}")
  q, d = queries.shape
  nb = gallery.shape[0] // bt
  from jax.experimental.pallas import tpu as pltpu
  if interpret:
    params = {"interpret": pltpu.InterpretParams() if hasattr(pltpu, "InterpretParams") else True}
  else:  # programs are independent: megacore chips split them over their cores
    params = {"compiler_params": pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel"))}
  per_block = lambda i, j: (j, i, 0)  # outputs [blocks, Q, K′]: K′ is their whole last dim
  v, c, b = pl.pallas_call(
      functools.partial(_tpu_kernel, config=config, precision=precision),
      out_shape=(jax.ShapeDtypeStruct((nb, q, keep), jnp.float32),
                 jax.ShapeDtypeStruct((nb, q, keep), jnp.int32),
                 jax.ShapeDtypeStruct((nb, q, 1), jnp.float32)),
      grid=(q // bq, nb),
      in_specs=[pl.BlockSpec((bq, d), lambda i, j: (i, 0)),
                pl.BlockSpec((bt, d), lambda i, j: (j, 0)),
                pl.BlockSpec((1, bt), lambda i, j: (0, j)),
                pl.BlockSpec((bq, 1), lambda i, j: (i, 0)),
                pl.BlockSpec((1, bt), lambda i, j: (0, j)),
                pl.BlockSpec((bq, 1), lambda i, j: (i, 0))],
      out_specs=(pl.BlockSpec((1, bq, keep), per_block), pl.BlockSpec((1, bq, keep), per_block),
                 pl.BlockSpec((1, bq, 1), per_block)),
      **params,
  )(queries, gallery, gallery_ids[None, :], query_ids[:, None], column_scale[None, :],
    thresholds[:, None])
  return (jnp.moveaxis(v, 0, 1).reshape(q, nb * keep), jnp.moveaxis(c, 0, 1).reshape(q, nb * keep),
          b[..., 0].T)


def _mgpu_kernel(q_gmem, g_gmem, ids_gmem, qids_gmem, scale_gmem, thr_gmem,
                   v_gmem, c_gmem, b_gmem, *, config: FusedConfig, interpret: bool):
  # A warp-specialized program per (query block i, W gallery blocks): one warpgroup issues
  # the TMA copies of the pipeline, W compute warpgroups each multiply the shared query
  # block with their own gallery block into registers (wgmma) and select from it.
  w = config.warpgroups
  scratch = (plgpu.SMEM((w, config.keep, config.block_q), jnp.float32),
             plgpu.SMEM((w, config.keep, config.block_q), jnp.int32),
             plgpu.SMEM((w, config.block_q), jnp.float32),
             plgpu.SMEM((w, config.block_t), jnp.int32), plgpu.SMEM((w, config.block_q), jnp.int32),
             plgpu.SMEM((w, config.block_t), jnp.float32),
             plgpu.SMEM((w, config.block_q), jnp.float32), plgpu.Barrier(num_barriers=4 * w))
  pl.run_scoped(functools.partial(_mgpu_program, q_gmem, g_gmem, ids_gmem, qids_gmem,
                                  scale_gmem, thr_gmem, v_gmem, c_gmem, b_gmem, config=config,
                                  interpret=interpret),
                *scratch, collective_axes="wg")


def _mgpu_program(q_gmem, g_gmem, ids_gmem, qids_gmem, scale_gmem, thr_gmem, v_gmem, c_gmem,
                    b_gmem, v_all, c_all, b_all, ids_all, qids_all, scale_all, thr_all, copied, *,
                    config: FusedConfig, interpret: bool):
  bq, bt, bk, w = config.block_q, config.block_t, config.block_k, config.warpgroups
  i, j, wg = lax.axis_index("q"), lax.axis_index("t"), lax.axis_index("wg")
  itemsize = jnp.dtype(q_gmem.dtype).itemsize
  swizzle = plgpu.find_swizzle(bk * itemsize * 8)
  transforms = (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))

  def compute(eval_pipeline):  # runs on each compute warpgroup
    block = j * w + wg  # this warpgroup's gallery block
    # The small per-row/per-column vectors come in by TMA while the matmul runs.
    for n, (src, dst) in enumerate([(ids_gmem.at[pl.ds(block * bt, bt)], ids_all.at[wg]),
                                    (qids_gmem.at[pl.ds(i * bq, bq)], qids_all.at[wg]),
                                    (scale_gmem.at[pl.ds(block * bt, bt)], scale_all.at[wg]),
                                    (thr_gmem.at[pl.ds(i * bq, bq)], thr_all.at[wg])]):
      plgpu.copy_gmem_to_smem(src, dst, copied.at[4 * wg + n])

    def scores(acc):
      eval_pipeline(acc)
      return acc[...]

    s = pl.run_scoped(scores, plgpu.ACC((bq, bt), jnp.float32))
    for n in range(4):
      plgpu.barrier_wait(copied.at[4 * wg + n])
    _mgpu_select(s, ids_all.at[wg], qids_all.at[wg], scale_all.at[wg], thr_all.at[wg],
                   v_all.at[wg], c_all.at[wg], b_all.at[wg], block, config, interpret)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(v_all.at[wg], v_gmem.at[block, :, pl.ds(i * bq, bq)])
    plgpu.copy_smem_to_gmem(c_all.at[wg], c_gmem.at[block, :, pl.ds(i * bq, bq)])
    plgpu.copy_smem_to_gmem(b_all.at[wg], b_gmem.at[block, pl.ds(i * bq, bq)])
    plgpu.wait_smem_to_gmem(0)

  def step(_, q_smem, g_smem, acc):
    plgpu.wgmma(acc, q_smem, g_smem.at[:, pl.ds(wg * bt, bt)])
    plgpu.wgmma_wait(1)  # one wgmma stays in flight; delay_release keeps its operands
    return acc

  plgpu.emit_pipeline_warp_specialized(
      step, grid=(q_gmem.shape[1] // bk,), memory_registers=40, wg_axis="wg",
      num_compute_wgs=w, max_concurrent_steps=config.num_stages, compute_context=compute,
      in_specs=[plgpu.BlockSpec((bq, bk), lambda k: (i, k), transforms=transforms,
                                delay_release=1),
                plgpu.BlockSpec((bk, w * bt), lambda k: (k, j), transforms=transforms,
                                delay_release=1)])(q_gmem, g_gmem)


def _mgpu_select(s, ids_smem, qids_smem, scale_smem, thr_smem, v_smem, c_smem, b_smem,
                   block, config: FusedConfig, interpret: bool):
  """The kernel's epilogue on one warpgroup's [bq, bt] score tile (in registers): the
  engine's masks, then K′ rounds of selection, or nothing where no row reaches its
  threshold; results into shared memory."""
  bq, bt, keep = config.block_q, config.block_t, config.keep

  def vector(ref, axis):  # a row (axis 1) or column (axis 0) vector in the tile's layout
    if interpret:  # (the interpreter has no plgpu.load; layouts are a compiler matter)
      return ref[...]
    return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(axis))

  def per_column(x):
    return lax.broadcast_in_dim(x, (bq, bt), [1])

  def per_row(x):
    return lax.broadcast_in_dim(x, (bq, bt), [0])

  column_ids, own_ids = vector(ids_smem, 0), vector(qids_smem, 1)
  s = s * per_column(vector(scale_smem, 0))
  drop = (per_column(column_ids) < 0) | (per_column(column_ids) == per_row(own_ids))
  s = jnp.where(drop, -jnp.inf, s)
  s = jnp.where(s == 0, 0.0, s)
  column = (lax.broadcasted_iota(jnp.int32, (bq, bt), 1) if interpret else
            plgpu.broadcasted_iota(jnp.int32, (bq, bt), 1, layout=plgpu.Layout.WGMMA))
  # Columns as negated floats (exact below 2**24): the lowest column holding a value is one
  # more max-reduction, the reduction the tile's layout has.
  neg_column = -column.astype(jnp.float32)
  best = s.max(axis=1)
  reached = jnp.max(jnp.where(best >= vector(thr_smem, 1), 1.0, 0.0)) > 0

  @pl.when(reached)
  def _select():
    left, m = s, best
    for r in range(keep):  # K′ rounds of (max, lowest column holding it, mask it)
      c = -jnp.max(jnp.where(left == per_row(m), neg_column, -float(bt)), axis=1)
      v_smem[r] = m
      c_smem[r] = c.astype(jnp.int32) + block * bt
      left = jnp.where(neg_column == per_row(-c), -jnp.inf, left)
      m = left.max(axis=1)
    b_smem[...] = m

  @pl.when(~reached)
  def _skip():  # keep nothing; the bound covers the block
    for r in range(keep):
      v_smem[r] = jnp.full_like(best, -jnp.inf)
      c_smem[r] = jnp.zeros_like(best, jnp.int32) + block * bt
    b_smem[...] = best


def _mgpu_block_topk(queries, gallery, gallery_ids, query_ids, column_scale, thresholds,
                       config: FusedConfig, interpret: bool):
  half = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if jnp.dtype(queries.dtype) not in half or gallery.dtype != queries.dtype:
    raise ValueError(f"the Mosaic GPU kernel multiplies bf16/f16 only (its f32 wgmma is tf32), "
                     f"got {queries.dtype} x {gallery.dtype}: use the Triton lowering "
                     f"(kernel='fused:triton'), or compute_dtype=bfloat16 if rounding is fine")
  bq, bt, keep, w = config.block_q, config.block_t, config.keep, config.warpgroups
  itemsize = jnp.dtype(queries.dtype).itemsize
  lanes = plgpu.find_swizzle(config.block_k * itemsize * 8) // itemsize  # swizzled row width
  if bq % 64 or bt % lanes or bt > 256 or (config.num_stages or 0) < 2:
    raise ValueError(f"Mosaic GPU blocks: block_q a multiple of 64 (wgmma rows), block_t a "
                     f"multiple of {lanes} (the swizzle block_k sets) up to 256, num_stages "
                     f">= 2; got {config}")
  q, t = queries.shape[0], gallery.shape[0]
  nb = t // bt
  params = {}
  if interpret:
    params["interpret"] = _mgpu_interpret_params()
  v, c, b = plgpu.kernel(
      functools.partial(_mgpu_kernel, config=config, interpret=interpret),
      out_type=(jax.ShapeDtypeStruct((nb, keep, q), jnp.float32),
                jax.ShapeDtypeStruct((nb, keep, q), jnp.int32),
                jax.ShapeDtypeStruct((nb, q), jnp.float32)),
      grid=(q // bq, nb // w), grid_names=("q", "t"), num_threads=w + 1, thread_name="wg",
      **params,
  )(queries, gallery.T, gallery_ids, query_ids, column_scale, thresholds)
  # Outputs are written query-minor (1-D TMA rows); the engine's layout is [Q, blocks, K′].
  return (jnp.moveaxis(v, 2, 0).reshape(q, nb * keep), jnp.moveaxis(c, 2, 0).reshape(q, nb * keep),
          b.T)


def _mgpu_interpret_params():
  try:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  except ImportError as e:  # a JAX without Mosaic GPU's interpreter
    raise NotImplementedError("this JAX cannot interpret Mosaic GPU kernels") from e
  return InterpretGPUParams()


def _defaults(q, t, query_ids, column_scale, thresholds):
  return (jnp.full((q,), NO_QUERY_ID, jnp.int32) if query_ids is None else query_ids,
          jnp.ones((t,), jnp.float32) if column_scale is None else column_scale,
          jnp.full((q,), -jnp.inf, jnp.float32) if thresholds is None else thresholds)


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
  query_ids, column_scale, thresholds = _defaults(q, t, query_ids, column_scale, thresholds)
  if config.backend == "mosaic_gpu":
    return _mgpu_block_topk(queries, gallery, gallery_ids.astype(jnp.int32),
                              query_ids.astype(jnp.int32), column_scale.astype(jnp.float32),
                              thresholds.astype(jnp.float32), config, interpret)
  if config.backend == "tpu":
    return _tpu_block_topk(queries, gallery, gallery_ids.astype(jnp.int32),
                           query_ids.astype(jnp.int32), column_scale.astype(jnp.float32),
                           thresholds.astype(jnp.float32), config, precision, interpret)
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
  query_ids, column_scale, thresholds = _defaults(q, t, query_ids, column_scale, thresholds)
  s = lax.dot_general(queries, gallery, (((1,), (1,)), ((), ())), precision=precision,
                      preferred_element_type=jnp.float32)
  s = _masked(s, gallery_ids, query_ids, column_scale).reshape(q, -1, bt)
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
  from plato_jax.knn.sharding import merge_topk
  prior_v, prior_i = prior
  q = queries.shape[0]
  query_ids, column_scale, _ = _defaults(q, gallery.shape[0], query_ids, column_scale, None)
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
    ev, ec = bucket_topk(_masked(s, gallery_ids, query_ids, column_scale), k, BucketConfig())
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


@dataclasses.dataclass(frozen=True)
class FusedTopKSelector:
  """The engine's running exact top-k (like `TopKSelector`), fed raw rows instead of a
  score tile: `update_rows` runs the fused kernel. State: (values [Q, k], ids [Q, k],
  fallbacks []) — the last counts query blocks that took the exact path."""
  k: int
  config: FusedConfig = FusedConfig()
  interpret: bool = False

  def init(self, num_queries: int):
    return (np.full((num_queries, self.k), -np.inf, np.float32),
            np.full((num_queries, self.k), -1, np.int32), np.zeros((), np.int32))

  def update_rows(self, state, queries, query_ids, tile, tile_ids, *, column_scale, precision):
    bq = self.config.block_q
    q, t = queries.shape[0], tile.shape[0]
    pad_q, pad_t = -q % bq, -t % self.config.program_rows  # the engine sizes tiles so: 0
    queries = jnp.pad(queries, ((0, pad_q), (0, 0)))
    tile = jnp.pad(tile.astype(queries.dtype), ((0, pad_t), (0, 0)))
    tile_ids = jnp.pad(tile_ids, (0, pad_t), constant_values=-1)
    if query_ids is not None:
      query_ids = jnp.pad(query_ids, (0, pad_q), constant_values=NO_QUERY_ID)
    if column_scale is not None:
      column_scale = jnp.pad(column_scale, (0, pad_t))
    values, ids, fallbacks = state
    prior = tuple(jnp.pad(x, ((0, pad_q), (0, 0)), constant_values=c)
                  for x, c in ((values, -jnp.inf), (ids, -1)))
    v, i, fell = fused_update(prior, queries, tile, tile_ids, self.k, self.config,
                              query_ids=query_ids, column_scale=column_scale,
                              precision=precision, interpret=self.interpret)
    return v[:q], i[:q], fallbacks + fell

  def result(self, state):
    return state[0], state[1]

  def candidates(self, state):
    return state[0], state[1]
