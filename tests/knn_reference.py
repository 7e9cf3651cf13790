"""The float64 brute-force top-k the engine's tests compare against, and their data helpers."""
import math

import jax
import numpy as np
from jax.sharding import Mesh


def brute_force(queries, gallery, k, query_ids=None, gallery_ids=None, exclude_self=True):
  """Each row's top-k by (score desc, id asc), self excluded by id, and the scores: the real
  dot products rounded to float64 (math.fsum of the exact float64 products of float32 or
  narrower values) wherever they decide the top-k; BLAS's float64 elsewhere."""
  g_ids = np.arange(len(gallery)) if gallery_ids is None else np.asarray(gallery_ids)
  q64, g64 = queries.astype(np.float64), gallery.astype(np.float64)
  s = q64 @ g64.T
  if exclude_self and query_ids is not None:
    s[np.asarray(query_ids)[:, None] == g_ids[None, :]] = -np.inf
  # BLAS's sums are off by far less than this: every row that could be in the top-k by the
  # exact score is within it of the BLAS k-th.
  slack = 1e-9 * (np.abs(q64) @ np.abs(g64).T).max(axis=1)
  kth = -np.partition(-s, k - 1, axis=1)[:, k - 1]
  for i in range(len(s)):
    near = np.flatnonzero(s[i] >= kth[i] - slack[i])
    s[i, near] = [math.fsum(q64[i] * g64[j]) if np.isfinite(s[i, j]) else -np.inf
                  for j in near]
  order = np.stack([np.lexsort((g_ids, -row))[:k] for row in s])
  return g_ids[order], np.take_along_axis(s, order, 1)


def integer_rows(rng, n, d, lo=-2, hi=3):
  """Small integers: every f32 dot product is exact, so ties are exact too."""
  return rng.integers(lo, hi, size=(n, d)).astype(np.float32)


def one_device_mesh():
  return Mesh(np.array(jax.devices()[:1]), ("gallery",))


def cosine_top_k(x, num_queries, k):
  """float64 cosine top-k of rows 0..num_queries-1 among all rows of x, self excluded
  (ties: lower row first)."""
  x = x.astype(np.float64)
  x = x / np.linalg.norm(x, axis=1, keepdims=True)
  s = x[:num_queries] @ x.T
  s[np.arange(num_queries), np.arange(num_queries)] = -np.inf
  return np.argsort(-s, axis=1, kind="stable")[:, :k]


def brute_mutual_knn(xa, xb, num_queries, k):
  """Mutual k-NN of the first `num_queries` rows of two paired galleries (float64 cosine)."""
  a, b = cosine_top_k(xa, num_queries, k), cosine_top_k(xb, num_queries, k)
  return np.mean([len(np.intersect1d(r, t)) for r, t in zip(a, b)]) / k


def skip_unless_runs_here(kernel: str):
  """A fused lowering runs on its own accelerator, or interpreted on CPU; the CPU kernel on
  CPU devices, where it builds."""
  import pytest

  if kernel in ("xla", "cpu"):
    if kernel == "cpu":
      from plato_jax.kernels.cpu_topk import unavailable_reason
      if jax.default_backend() != "cpu" or unavailable_reason() is not None:
        pytest.skip(f"the CPU kernel does not run here: {unavailable_reason()}")
    return
  from plato_jax.kernels.fused_contract import BACKENDS
  if jax.default_backend() not in ("cpu", BACKENDS[kernel.split(":")[1]]):
    pytest.skip(f"{kernel} does not run on {jax.default_backend()}")
