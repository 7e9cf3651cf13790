"""The fused kernel (`plato_jax.kernels.fused_topk`) lowered by Mosaic GPU (Hopper and later):
warp-specialized — one warpgroup issues the TMA pipeline, 1 or 2 compute warpgroups share
the query block and each multiplies it with its own gallery block (wgmma, f32 accumulator in
registers), then selects from it in registers. bf16/f16 inputs only: its f32 matmul would
be tf32. Tested with Mosaic GPU's interpreter on CPU (shared memory, TMA, barriers, wgmma)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from plato_jax.kernels.fused_contract import FusedConfig


def _kernel(q_gmem, g_gmem, ids_gmem, qids_gmem, scale_gmem, thr_gmem,
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
  pl.run_scoped(functools.partial(_program, q_gmem, g_gmem, ids_gmem, qids_gmem,
                                  scale_gmem, thr_gmem, v_gmem, c_gmem, b_gmem, config=config,
                                  interpret=interpret),
                *scratch, collective_axes="wg")


def _program(q_gmem, g_gmem, ids_gmem, qids_gmem, scale_gmem, thr_gmem, v_gmem, c_gmem,
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
    _select(s, ids_all.at[wg], qids_all.at[wg], scale_all.at[wg], thr_all.at[wg],
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


def _select(s, ids_smem, qids_smem, scale_smem, thr_smem, v_smem, c_smem, b_smem,
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


def block_topk(queries, gallery, gallery_ids, query_ids, column_scale, thresholds,
               config: FusedConfig, interpret: bool):
  """`plato_jax.kernels.fused_topk.block_topk`'s outputs (ids, vectors already int32/f32)."""
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
    params["interpret"] = _interpret_params()
  v, c, b = plgpu.kernel(
      functools.partial(_kernel, config=config, interpret=interpret),
      out_type=(jax.ShapeDtypeStruct((nb, keep, q), jnp.float32),
                jax.ShapeDtypeStruct((nb, keep, q), jnp.int32),
                jax.ShapeDtypeStruct((nb, q), jnp.float32)),
      grid=(q // bq, nb // w), grid_names=("q", "t"), num_threads=w + 1, thread_name="wg",
      **params,
  )(queries, gallery.T, gallery_ids, query_ids, column_scale, thresholds)
  # Outputs are written query-minor (1-D TMA rows); the engine's layout is [Q, blocks, K′].
  return (jnp.moveaxis(v, 2, 0).reshape(q, nb * keep), jnp.moveaxis(c, 2, 0).reshape(q, nb * keep),
          b.T)


def _interpret_params():
  try:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  except ImportError as e:  # a JAX without Mosaic GPU's interpreter
    raise NotImplementedError("this JAX cannot interpret Mosaic GPU kernels") from e
  return InterpretGPUParams()
