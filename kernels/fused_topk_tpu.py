"""The fused kernel (`plato_jax.kernels.fused_topk`) lowered by Pallas TPU: one program per (query
block, gallery block), both blocks in VMEM by BlockSpec, the MXU matmul, the Triton
kernel's masks and selection rounds (shared), outputs [blocks, Q, K′] (a TPU block's last
dimension must be 128-aligned or whole). Tested with Pallas TPU's interpreter on CPU."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from plato_jax.kernels.fused_contract import (FusedConfig, any_row_reaches, finish_scores,
                                              nothing_kept, select_top)


def _kernel(q_ref, g_ref, ids_ref, qids_ref, scale_ref, thr_ref, v_ref, c_ref, b_ref, *,
            config: FusedConfig, precision):
  # Pallas TPU: the blocks arrive in VMEM by BlockSpec (whole d: (bq + bt)·d elements,
  # double-buffered, must fit the scoped VMEM); vectors as 2-D blocks.
  j = pl.program_id(1)
  s = lax.dot_general(q_ref[...], g_ref[...], (((1,), (1,)), ((), ())), precision=precision,
                      preferred_element_type=jnp.float32)
  s = finish_scores(s, ids_ref[...], qids_ref[...], scale_ref[...])
  best = jnp.max(s, axis=1, keepdims=True)
  reached = any_row_reaches(best, thr_ref[...])

  def write(values, columns, bound):
    v_ref[0] = values
    c_ref[0] = columns + j * config.block_t
    b_ref[0] = bound

  pl.when(reached)(lambda: write(*select_top(s, best, config.keep)))
  pl.when(~reached)(lambda: write(*nothing_kept(best, config.keep)))


def block_topk(queries, gallery, gallery_ids, query_ids, column_scale, thresholds,
               config: FusedConfig, precision, interpret: bool):
  """`plato_jax.kernels.fused_topk.block_topk`'s outputs (ids, vectors already int32/f32)."""
  bq, bt, keep = config.block_q, config.block_t, config.keep
  if bq % 8 or bt % 128:
    raise ValueError(f"TPU blocks: block_q a multiple of 8 (sublanes), block_t a multiple of "
                     f"128 (lanes); got {config}")
  q, d = queries.shape
  nb = gallery.shape[0] // bt
  if interpret:
    params = {"interpret": pltpu.InterpretParams() if hasattr(pltpu, "InterpretParams") else True}
  else:  # programs are independent: megacore chips split them over their cores
    params = {"compiler_params": pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel"))}
  per_block = lambda i, j: (j, i, 0)  # outputs [blocks, Q, K′]: K′ is their whole last dim
  v, c, b = pl.pallas_call(
      functools.partial(_kernel, config=config, precision=precision),
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
