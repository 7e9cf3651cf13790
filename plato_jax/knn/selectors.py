"""The selectors: what each device streams its tiles through, keeping a running exact top-k.

Every selector follows `Selector`. It declares how it is fed — `fused`: raw rows through
`update_rows` (one kernel scores and selects; no score tile is written), else score tiles
(`sharding.ScoreTile`) through `update`; `reads_windows`: it takes host rows in place
(`RowWindow` tiles) — and it names what its state holds: `result` (the sorted top-k),
`candidates` (an unsorted superset of it, for the host's final sort) and `fallbacks` (query
blocks that took an exact fallback path; 0 for kernels that have none).

Here: `TopKSelector` (XLA: each tile's top-k by buckets, merged), `CpuTopKSelector` (the
CPU kernel's candidate pools) and `FusedTopKSelector` (the fused kernel's). The large-k
selector, `large_k.ThresholdSelector`, lives with its algorithm.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol

import jax.numpy as jnp
import numpy as np

from plato_jax.kernels.cpu_topk import cpu_update, empty_pools
from plato_jax.kernels.fused_topk import FusedConfig, fused_update
from plato_jax.kernels.primitives import (NO_ID, RowWindow, inverse_norms, merge_topk,
                                          row_sumsq, top_by_score_then_id)
from plato_jax.kernels.topk import BucketConfig, bucket_topk
from plato_jax.knn.sharding import ScoreTile


class Selector(Protocol):
  k: int
  fused: bool          # fed raw rows (`update_rows`), not score tiles (`update`)
  reads_windows: bool  # takes `RowWindow` tiles (host rows read in place)

  def init(self, num_queries: int) -> Any:
    """The empty state of `num_queries` queries (a pytree of arrays, leading axis Q)."""

  def update(self, state, tile: ScoreTile) -> Any:
    """The state with a score tile folded in (its ids int32 [T] ascending)."""

  def update_rows(self, state, queries, query_ids, tile, tile_ids, *, normalize: bool,
                  precision) -> tuple[Any, Any]:
    """(state with a tile of rows folded in, the rows' f32 squared norms)."""

  def result(self, state) -> tuple[Any, Any]:
    """(values [Q, k] sorted by (score desc, id asc), ids [Q, k])."""

  def candidates(self, state) -> tuple[Any, Any]:
    """(values, ids) [Q, m >= k], unsorted, holding the top-k."""

  def fallbacks(self, state) -> Any:
    """Query blocks that took an exact fallback path (an int32 count; any leading axes of
    a stacked state are kept)."""


class Best(NamedTuple):
  """A running top-k kept sorted (score desc, id asc): values f32 [Q, k], ids i32 [Q, k]."""
  values: Any
  ids: Any


class CpuPools(NamedTuple):
  """The CPU kernel's candidate pools: C = `pool_capacity(k)` slots a row, unused ones
  (-inf, -1), and each row's threshold."""
  values: Any     # f32 [Q, C]
  ids: Any        # i32 [Q, C]
  counts: Any     # i32 [Q]
  tau_value: Any  # f32 [Q]
  tau_id: Any     # i32 [Q]


class FusedBest(NamedTuple):
  """The fused kernel's running top-k, and the query blocks that took its exact path."""
  values: Any     # f32 [Q, k], sorted
  ids: Any        # i32 [Q, k]
  fallbacks: Any  # i32 []


@dataclasses.dataclass(frozen=True)
class TopKSelector:
  """XLA: each tile's top-k by `bucket_topk`, sort-merged into the running top-k. State:
  (values [Q, k], ids [Q, k]), kept sorted."""
  k: int
  config: BucketConfig = BucketConfig()
  fused = False
  reads_windows = False

  def init(self, num_queries: int):
    return Best(np.full((num_queries, self.k), -np.inf, np.float32),
                np.full((num_queries, self.k), -1, np.int32))

  def update(self, state, tile: ScoreTile):
    v, col = bucket_topk(tile.raw, min(self.k, tile.raw.shape[1]), self.config,
                         column_scale=tile.inv_norms, num_valid=tile.num_valid,
                         column_ids=tile.tile_ids, row_ids=tile.query_ids)
    return Best(*merge_topk(state.values, state.ids, v, tile.tile_ids[col], self.k))

  def result(self, state):
    return state.values, state.ids

  candidates = result  # (already the exact top-k)

  def fallbacks(self, state):
    return jnp.zeros((), jnp.int32)


@dataclasses.dataclass(frozen=True)
class CpuTopKSelector:
  """The CPU kernel (`plato_jax.kernels.cpu_topk`): scores go from registers into candidate
  pools (state: `CpuPools`). Its tiles may come as `RowWindow`s: the engine's host rows,
  read where they lie."""
  k: int
  block_cols: int = 128
  threads: int | None = None
  # Products of queries and rows rounded to bf16 (AMX where it is), and the instruction set
  # (`cpu_topk.ISAS`; None: `cpu_topk.default_isa()` when traced). Not in the repr, which
  # resumes compare: the inputs' dtypes decide the first, and no path changes what a
  # checkpoint's candidates mean (the certificate bounds every path's rounding).
  bf16_inputs: bool = dataclasses.field(default=False, repr=False)
  isa: str | None = dataclasses.field(default=None, repr=False)
  fused = True
  reads_windows = True

  def init(self, num_queries: int):
    return CpuPools(*empty_pools(num_queries, self.k))

  def update_rows(self, state, queries, query_ids, tile, tile_ids, *, normalize, precision):
    del precision  # exact products added in f32: what HIGHEST asks of an f32 matmul
    if query_ids is None:
      query_ids = jnp.full((queries.shape[0],), NO_ID, jnp.int32)
    rows, offset = (tile.window, tile.offset) if isinstance(tile, RowWindow) else (tile, 0)
    pools, sumsq = cpu_update(state, queries, query_ids, rows, tile_ids, k=self.k,
                              row_offset=offset, normalize=normalize,
                              bf16_inputs=self.bf16_inputs, block_cols=self.block_cols,
                              threads=self.threads, isa=self.isa)
    return CpuPools(*pools), sumsq

  def result(self, state):
    return top_by_score_then_id(state.values, state.ids, self.k)

  def candidates(self, state):
    return state.values, state.ids

  def fallbacks(self, state):
    return jnp.zeros((), jnp.int32)  # no inexact path


@dataclasses.dataclass(frozen=True)
class FusedTopKSelector:
  """The fused kernel (`plato_jax.kernels.fused_topk`): scores and per-block selection in
  one Pallas kernel, then an exact merge (state: `FusedBest`)."""
  k: int
  config: FusedConfig = FusedConfig()
  interpret: bool = False
  fused = True
  reads_windows = False

  def init(self, num_queries: int):
    return FusedBest(np.full((num_queries, self.k), -np.inf, np.float32),
                     np.full((num_queries, self.k), -1, np.int32), np.zeros((), np.int32))

  def update_rows(self, state, queries, query_ids, tile, tile_ids, *, normalize, precision):
    sumsq = row_sumsq(tile.astype(queries.dtype))  # the values the matmul takes
    column_scale = inverse_norms(sumsq) if normalize else None
    bq = self.config.block_q
    q, t = queries.shape[0], tile.shape[0]
    pad_q, pad_t = -q % bq, -t % self.config.program_rows  # the engine sizes tiles so: 0
    queries = jnp.pad(queries, ((0, pad_q), (0, 0)))
    tile = jnp.pad(tile.astype(queries.dtype), ((0, pad_t), (0, 0)))
    tile_ids = jnp.pad(tile_ids, (0, pad_t), constant_values=-1)
    if query_ids is not None:
      query_ids = jnp.pad(query_ids, (0, pad_q), constant_values=NO_ID)
    if column_scale is not None:
      column_scale = jnp.pad(column_scale, (0, pad_t))
    prior = tuple(jnp.pad(x, ((0, pad_q), (0, 0)), constant_values=c)
                  for x, c in ((state.values, -jnp.inf), (state.ids, -1)))
    v, i, fell = fused_update(prior, queries, tile, tile_ids, self.k, self.config,
                              query_ids=query_ids, column_scale=column_scale,
                              precision=precision, interpret=self.interpret)
    return FusedBest(v[:q], i[:q], state.fallbacks + fell), sumsq

  def result(self, state):
    return state.values, state.ids

  candidates = result  # (already the exact top-k)

  def fallbacks(self, state):
    return state.fallbacks
