"""kernels.cpu_topk (the C++ fused matmul + selection for CPU devices) against its numpy
reference, one tile and a stream of tiles, on the cases the engine's tiles produce."""
import jax
import numpy as np
import pytest

from kernels import cpu_topk
from plato_jax.knn.sharding import top_by_score_then_id

pytestmark = pytest.mark.skipif(cpu_topk.unavailable_reason() is not None,
                                reason=f"CPU kernel unavailable: {cpu_topk.unavailable_reason()}")


def fold(tiles, queries, query_ids, k, **kw):
  """Streams (rows, ids, scale) tiles through the kernel; returns its sorted top-k."""
  update = jax.jit(lambda pools, *a: cpu_topk.cpu_update(pools, *a, k=k, **kw))
  pools = cpu_topk.empty_pools(len(queries), k)
  for rows, ids, scale in tiles:
    pools = update(pools, queries, query_ids, rows, ids, scale)
  return tuple(np.asarray(x) for x in top_by_score_then_id(pools[0], pools[1], k))


def reference(tiles, queries, query_ids, k):
  v = np.full((len(queries), k), -np.inf, np.float32)
  i = np.full((len(queries), k), -1, np.int32)
  for rows, ids, scale in tiles:
    v, i = cpu_topk.reference_update(v, i, queries, query_ids, rows, ids, scale, k)
  return v, i


def integer_tile(rng, t, d, first_id, pad=0):
  rows = rng.integers(-3, 4, (t, d)).astype(np.float32)
  ids = np.arange(first_id, first_id + t, dtype=np.int32)
  ids[t - pad:] = -1
  return rows, ids


@pytest.mark.parametrize("q,t,d,k,block_cols,threads", [
    (37, 1000, 24, 7, 128, 2),    # q not a multiple of 6, t not of 16
    (6, 64, 16, 1, 64, 1),        # k = 1
    (50, 700, 33, 300, 64, 3),    # k past the first compactions (capacity 556)
    (13, 40, 5, 60, 16, 4),       # k larger than a tile: filler comes back
])
def test_stream_of_integer_tiles_equals_reference(rng, q, t, d, k, block_cols, threads):
  """Integer rows: every score is exact, so ties are exact and ids must match exactly."""
  tiles = []
  for n in range(3):
    rows, ids = integer_tile(rng, t, d, n * t, pad=11 if n == 2 else 0)
    rows[3] = rows[t // 2]  # duplicate rows: ties decided by id
    scale = np.ones(t, np.float32)
    scale[::5] = 0.5         # a column scale (cosine's inverse norms), exact in f32
    tiles.append((rows, ids, scale))
  queries = rng.integers(-3, 4, (q, d)).astype(np.float32)
  query_ids = np.full(q, -2, np.int32)
  query_ids[::4] = rng.integers(0, 3 * t, len(query_ids[::4]))  # self-exclusion by id
  got = fold(tiles, queries, query_ids, k, block_cols=block_cols, threads=threads)
  want = reference(tiles, queries, query_ids, k)
  np.testing.assert_array_equal(got[1], want[1])
  np.testing.assert_array_equal(got[0], want[0])


def test_float_scores_are_position_invariant_and_portable_path_agrees(rng):
  """Each score is one FMA chain: the same number wherever its row sits in the tile, with
  any block size or thread count, on the AVX2 and the portable path alike."""
  t, d, k = 500, 77, 20
  rows = rng.standard_normal((t, d)).astype(np.float32)
  queries = rng.standard_normal((31, d)).astype(np.float32)
  no_ids = np.full(31, -2, np.int32)
  ones = np.ones(t, np.float32)
  ids = np.arange(t, dtype=np.int32)
  base = fold([(rows, ids, ones)], queries, no_ids, k, block_cols=128, threads=2)
  perm = rng.permutation(t)
  for kw in [dict(block_cols=16, threads=1), dict(block_cols=512, threads=5),
             dict(block_cols=64, threads=2, portable=True)]:
    moved = fold([(rows[perm], ids[perm], ones)], queries, no_ids, k, **kw)
    np.testing.assert_array_equal(moved[1], base[1])
    np.testing.assert_array_equal(moved[0], base[0])
  exact = queries.astype(np.float64) @ rows.astype(np.float64).T
  np.testing.assert_allclose(base[0], np.take_along_axis(exact, base[1], 1), atol=1e-4)


def test_negative_zero_and_nan_handling(rng):
  d = 8
  queries = np.zeros((2, d), np.float32)
  queries[1, 0] = -1
  rows = np.zeros((40, d), np.float32)
  rows[:, 0] = np.linspace(-1, 1, 40).astype(np.float32)
  rows[7, 0] = 0.0  # a zero score, times a negative scale: -0.0, which must rank (and come
  ids = np.arange(40, dtype=np.int32)  # back) as +0.0, below the +0.0 of lower ids
  scale = np.ones(40, np.float32)
  scale[7] = -1
  scale[39] = np.nan  # a NaN score is never selected
  got = fold([(rows, ids, scale)], queries, np.full(2, -2, np.int32), 40 - 1)
  want = reference([(rows, ids, scale)], queries, np.full(2, -2, np.int32), 40 - 1)
  np.testing.assert_array_equal(got[1], want[1])
  assert not np.signbit(got[0][got[0] == 0]).any()
  assert 39 not in got[1]


def test_a_missing_compiler_is_a_clear_error(monkeypatch, tmp_path):
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  monkeypatch.setenv("PLATO_JAX_CACHE", str(tmp_path / "cache"))
  with pytest.raises(cpu_topk.Unavailable, match="no-such-compiler"):
    cpu_topk._build()
