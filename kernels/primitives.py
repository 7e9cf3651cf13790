"""Primitives the kernels and the engine share, one copy each: the tie rule (score
descending, then id ascending) as a sort and a merge, the rows' squared norms and their
inverses, the id that matches no row, and host rows read where they lie."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
from jax import lax

NO_ID = -2  # matches no row: gallery ids are >= 0, padding is -1 (and sorts below both)


def top_by_score_then_id(values, ids, k: int):
  """The first k of each row ordered by (value descending, id ascending): a two-key sort."""
  neg, ids = lax.sort((-values, ids), dimension=-1, num_keys=2)
  return -neg[..., :k], ids[..., :k]


def merge_topk(v1, i1, v2, i2, k: int):
  """Top-k of the union of two candidate lists by (value descending, id ascending)."""
  return top_by_score_then_id(jnp.concatenate([v1, v2], -1), jnp.concatenate([i1, i2], -1), k)


def inverse_norms(row_sumsq):
  """1/‖row‖ from f32 squared norms; 0 for zero rows (padding)."""
  return jnp.where(row_sumsq > 0, 1 / jnp.sqrt(jnp.where(row_sumsq > 0, row_sumsq, 1)), 0)


def row_sumsq(tile):
  """The rows' f32 squared norms [T] (one pass over the tile serves them and the checks)."""
  return jnp.sum(jnp.square(tile.astype(jnp.float32)), axis=-1)


class RowWindow(NamedTuple):
  """Rows [T, D] read where they lie: row r is `window[offset + r·D : offset + (r+1)·D]`.

  `window` is a flat, 64-byte-aligned view of the memory around the rows, so the CPU client
  takes it without a copy; kernels that read such windows (`plato_jax.kernels.cpu_topk`) get the
  rows' offset as a value. Whatever the window holds beyond the T rows is never selected
  (those columns are padding). With a leading device axis when sharded: [P, L] and [P].
  """
  window: Any
  offset: Any
