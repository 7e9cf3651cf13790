"""The fused top-k kernel's contract, shared by its lowerings (`fused_topk`: Triton;
`fused_topk_mosaic_gpu`; `fused_topk_tpu`), which import it and not each other: the
block-size config, how raw dot products become the engine's scores, and the selection rounds
that keep K′ candidates and a bound per (query, block)."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from plato_jax.kernels.primitives import NO_ID

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


def masked(s, gallery_ids, query_ids, column_scale):
  """The engine's finished scores from raw dot products (shared by kernels and reference)."""
  return finish_scores(s, gallery_ids[None, :], query_ids[:, None], column_scale[None, :])


def finish_scores(s, gallery_ids, query_ids, column_scale):
  """`masked` with the vectors as [1, T] rows and a [Q, 1] column (TPU blocks are 2-D);
  shared by the lowerings, like `select_top`, `nothing_kept` and `any_row_reaches`."""
  s = s * column_scale
  drop = (gallery_ids < 0) | (gallery_ids == query_ids)
  s = jnp.where(drop, -jnp.inf, s)
  return jnp.where(s == 0, 0.0, s)


def select_top(s, best, keep: int):
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


def nothing_kept(best, keep: int):
  """A block no row reaches: nothing kept; the bound (the block's maximum) covers it."""
  bq = best.shape[0]
  return (jnp.full((bq, keep), -jnp.inf, jnp.float32), jnp.zeros((bq, keep), jnp.int32), best)


def any_row_reaches(best, thresholds):
  """Whether any row of the block reaches its threshold (a max of 0/1, not any(): Pallas'
  Triton lowering has no reduce_or)."""
  return jnp.max(jnp.where(best >= thresholds, 1, 0)) > 0


def defaults(q, t, query_ids, column_scale, thresholds):
  return (jnp.full((q,), NO_ID, jnp.int32) if query_ids is None else query_ids,
          jnp.ones((t,), jnp.float32) if column_scale is None else column_scale,
          jnp.full((q,), -jnp.inf, jnp.float32) if thresholds is None else thresholds)
