"""Exact per-row top-k of a score tile, without sorting whole rows.

`bucket_topk` is the XLA-only selection of the engine (PERFORMANCE.md §8.1): split each
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


def reference_topk(scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  return lax.top_k(scores, k)


@functools.partial(jax.jit, static_argnames=("k", "config"))
def bucket_topk(scores: jax.Array, k: int, config: BucketConfig = BucketConfig()
                ) -> tuple[jax.Array, jax.Array]:
  """Top-k values and column indices of each row of `scores` [Q, T] (f32).

  Rows are sorted by value descending, ties by column ascending. Columns that must not
  be selected should hold -inf.
  """
  q, t = scores.shape
  w = config.width_for(t, k)
  n_buckets = t // w
  if w < 2 or t % w or n_buckets < config.min_buckets_per_k * k:
    return lax.top_k(scores, k)
  buckets = scores.reshape(q, n_buckets, w)
  _, chosen = lax.top_k(buckets.max(axis=-1), k)
  chosen = jnp.sort(chosen, axis=-1)
  candidates = jnp.take_along_axis(buckets, chosen[..., None], axis=1).reshape(q, k * w)
  values, slot = lax.top_k(candidates, k)
  columns = jnp.take_along_axis(chosen, slot // w, axis=1) * w + slot % w
  return values, columns
