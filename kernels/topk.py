"""Exact per-row top-k of a score tile, without sorting whole rows.

`bucket_topk` is the XLA-only selection of the engine: split each
row into buckets of `width` columns, keep the k buckets with the largest maxima, and select
the top k among their k·width members. It is exact: the k-th largest bucket maximum is a
lower bound on the k-th largest score (k distinct elements reach it), so every element of
the true top-k lies in a bucket whose maximum is at least that bound.

Ties: like `lax.top_k`, equal scores come out lower column first. The bucket stage keeps
that rule because tied buckets are taken lower-bucket first and the chosen buckets are
re-sorted into column order before the second stage.

`reference_topk` is the plain-jnp reference the tests compare against.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class BucketConfig:
  # Columns per bucket; None picks the widest power of two (at most `max_width`) that
  # still leaves `min_buckets_per_k`·k buckets, so large k keeps a bucket stage too.
  width: int | None = None
  max_width: int = 64
  # Bucket selection pays off only when the bucket count dwarfs k.
  min_buckets_per_k: int = 4

  def width_for(self, columns: int, k: int) -> int:
    if self.width is not None:
      return self.width
    w = 1
    while w * 2 <= self.max_width and columns // (w * 2) >= self.min_buckets_per_k * k:
      w *= 2
    return w


def _one_zero(x):
  return jnp.where(x == 0, jnp.zeros_like(x), x)


def reference_topk(scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  return lax.top_k(scores, k)


@functools.partial(jax.jit, static_argnames=("k", "config"))
def bucket_topk(scores: jax.Array, k: int, config: BucketConfig = BucketConfig(), *,
                column_scale: jax.Array | None = None, num_valid: jax.Array | None = None,
                column_ids: jax.Array | None = None, row_ids: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array]:
  """Top-k values and column indices of each row of `scores` [Q, T] (f32).

  Rows are sorted by value descending, ties by column ascending. Columns that must not
  be selected should hold -inf, or be named by the options below, which cost no pass over
  the tile (on CPU a masked [Q, T] copy costs as much as the selection):
    column_scale [T]: each column is multiplied by it (fused into the bucket-max pass and
      applied again to the gathered candidates: the same product both times).
    num_valid (int32 scalar): columns from there on are padding (-inf).
    column_ids [T], row_ids [Q]: a row never selects a column with its own id (ids are
      unique among the columns: at most one column per row is dropped).
  -0.0 ranks as (and comes back as) +0.0: the two are one value for the tie rule.

  Exactness with the last two: the bucket maxima are taken before them, so they can only
  overstate a bucket, and only the bucket straddling `num_valid` and the one holding the
  excluded column. With s such buckets, the k+s largest maxima are chosen (ties: lower
  bucket first); k of them are not overstated, and each of those has a member ranking
  before everything in an unchosen bucket.
  """
  q, t = scores.shape
  w = config.width_for(t, k)
  n_buckets = t // w
  exclude = column_ids is not None and row_ids is not None
  spare = (num_valid is not None) + exclude

  def finish(values, columns):
    if column_scale is not None:
      values = values * column_scale[columns]
    if num_valid is not None:
      values = jnp.where(columns >= num_valid, -jnp.inf, values)
    if exclude:
      values = jnp.where(column_ids[columns] == row_ids[:, None], -jnp.inf, values)
    return _one_zero(values)

  if w < 2 or t % w or n_buckets < config.min_buckets_per_k * k or k + spare > n_buckets:
    return lax.top_k(finish(scores, jnp.arange(t, dtype=jnp.int32)[None, :]), k)
  buckets = scores.reshape(q, n_buckets, w)
  # The scale broadcast over [Q, buckets, w], not [Q, T] then reshaped: XLA:CPU fuses the
  # former into the reduction at no cost and runs the latter ~10x slower. Zeros are unified
  # after the reduction, which they would keep from fusing (max over {-0, +0} is 0 anyway).
  scaled = buckets if column_scale is None else buckets * column_scale.reshape(n_buckets, w)
  maxima = _one_zero(scaled.max(axis=-1))
  if num_valid is not None:  # buckets wholly in the padding
    maxima = jnp.where(jnp.arange(n_buckets) * w >= num_valid, -jnp.inf, maxima)
  _, chosen = lax.top_k(maxima, k + spare)
  chosen = jnp.sort(chosen, axis=-1)
  raw = jnp.take_along_axis(buckets, chosen[..., None], axis=1)
  columns = (chosen[..., None] * w + jnp.arange(w, dtype=chosen.dtype)).reshape(q, -1)
  values, slot = lax.top_k(finish(raw.reshape(q, -1), columns), k)
  return values, jnp.take_along_axis(columns, slot, axis=1)
