"""The exactness contract (plato_jax.knn.exact): every kernel, tile size, device count, ring
or stream gives the float64 brute force's neighbour set at every requested k and its order
(float64 score, then id) in the first 128 ranks — on data built to make float32 disagree.

The data are drawn fresh per run; the assertions hold for every draw, since the engine's
result is the float64 one whatever float32 does."""
import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh
from knn_reference import brute_force, integer_rows, skip_unless_runs_here

from plato_jax.knn import exact, search, search_prefixes
from plato_jax.knn.ring import ring_self_join


@pytest.fixture(params=["xla", "cpu"])
def kernel(request):
  skip_unless_runs_here(request.param)
  return request.param


def mesh_of(n):
  return Mesh(np.array(jax.devices()[:n]), ("gallery",))


def assert_contract(res, ref_ids, ks):
  """Sets equal at every k, order equal in the first min(k, 128)."""
  for k in ks:
    got, want = np.sort(res.ids[:, :k], axis=1), np.sort(ref_ids[:, :k], axis=1)
    bad = np.flatnonzero((got != want).any(axis=1))
    assert not bad.size, f"k={k}: sets differ for queries {bad[:10].tolist()}"
  r = min(max(ks), exact.EXACT_ORDER)
  bad = np.flatnonzero((res.ids[:, :r] != ref_ids[:, :r]).any(axis=1))
  assert not bad.size, f"order of the first {r} differs for queries {bad[:10].tolist()}"


def crowded(rng, n, d):
  """Low dimension, many rows: float32 rounding reorders close scores (the case where the
  kernels disagreed with float64 before the certificate: d = 24, k = n/100)."""
  return rng.standard_normal((n, d)).astype(np.float32)


def near_ties(rng, n, d):
  """Rows in groups of four that differ in one feature by an ulp: their scores differ by
  less than float32 rounding, which orders them differently in every kernel and tiling."""
  base = rng.standard_normal((-(-n // 4), d)).astype(np.float32)
  rows = np.repeat(base, 4, axis=0)[:n]
  j = rng.integers(2, d, size=rows.shape[0])
  rows[np.arange(rows.shape[0]), j] = np.nextafter(
      rows[np.arange(rows.shape[0]), j], np.float32(np.inf) * rng.choice([-1, 1], rows.shape[0]))
  return rows[rng.permutation(rows.shape[0])]


def int64_ids(rng, n):
  """Distinct ids across the whole int64 range: negative, past 2**31, hashed 63-bit keys."""
  ids = np.unique(rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, size=2 * n,
                               dtype=np.int64))
  return rng.permutation(ids)[:n]


@pytest.mark.parametrize("make", [crowded, near_ties])
def test_stream_equals_float64_for_tiles_devices_and_ids(rng, kernel, make):
  n, d, ks = 6001, 24, [1, 10, 60, 200]
  x = make(rng, n, d)
  gids = int64_ids(rng, n)
  q_rows = rng.choice(n, 48, replace=False)
  q, qids = x[q_rows], gids[q_rows]
  ref, _ = brute_force(q, x, max(ks), query_ids=qids, gallery_ids=gids)
  for tile_rows, devices in [(128, 8), (1000, 1), (4096, 8)]:
    res = search(q, x, ks, query_ids=qids, gallery_ids=gids, tile_rows=tile_rows,
                 mesh=mesh_of(devices), kernel=kernel)
    assert res.ids.dtype == np.int64
    assert_contract(res, ref, ks)
    assert not (res.ids == qids[:, None]).any()  # each query's own row excluded by its id


def test_crowded_scores_at_k_n_over_100(rng, kernel):
  """The case float32 got wrong before the certificate: d = 24, 120,000 rows, k = 1,200
  (15 of 96 queries were ordered differently from float64)."""
  n, d, k = 120_000, 24, 1_200
  x = crowded(rng, n, d)
  q_rows = rng.choice(n, 96, replace=False)
  res = search(x[q_rows], x, [10, k], query_ids=q_rows, kernel=kernel)
  ref, _ = brute_force(x[q_rows], x, k, query_ids=q_rows)
  assert_contract(res, ref, [10, k])


def test_kernels_agree_where_float32_does_not(rng):
  """On near-tie data the XLA and CPU kernels' float32 scores differ, and the certificate
  rescores where it matters: the results are identical in the exact part."""
  skip_unless_runs_here("cpu")
  x = near_ties(rng, 4000, 24)
  q = x[:64]
  a = search(q, x, [10, 150], query_ids=np.arange(64), kernel="xla", tile_rows=256)
  b = search(q, x, [10, 150], query_ids=np.arange(64), kernel="cpu", tile_rows=512)
  np.testing.assert_array_equal(a.ids[:, :128], b.ids[:, :128])
  np.testing.assert_array_equal(np.sort(a.ids, 1), np.sort(b.ids, 1))
  assert a.rescored > 0 and b.rescored > 0


def test_integer_ties_exact_at_every_rank(rng, kernel):
  """Integer rows: float32 scores are exact, ties massive; the whole result (past 128 too)
  is the float64 order, ties by id, scores equal."""
  x = integer_rows(rng, 3001, 6, -2, 3)
  gids = int64_ids(rng, 3001)
  q, qids = x[:20], gids[:20]
  res = search(q, x, [5, 300], query_ids=qids, gallery_ids=gids, tile_rows=256, kernel=kernel)
  ids, scores = brute_force(q, x, 300, query_ids=qids, gallery_ids=gids)
  np.testing.assert_array_equal(res.ids, ids)
  np.testing.assert_array_equal(res.scores, scores.astype(np.float32))
  assert res.searched_again > 0  # ties wider than the margin: searched again, still exact


def test_prefixes_and_multi_k_exact(rng, kernel):
  x = crowded(rng, 5000, 16)
  q = x[:30]
  sizes, ks = [700, 2048, 5000], [1, 7, 50]
  parts = search_prefixes(q, x, ks, query_ids=np.arange(30), prefix_sizes=sizes, tile_rows=256,
                 kernel=kernel)
  for size, part in zip(sizes, parts):
    ref, _ = brute_force(q, x[:size], 50, query_ids=np.arange(30))
    assert_contract(part, ref, ks)


def test_cosine_exact(rng, kernel):
  x = crowded(rng, 4000, 12) * rng.uniform(0.1, 10, size=(4000, 1)).astype(np.float32)
  q = x[:40]
  res = search(q, x, [3, 40], query_ids=np.arange(40), normalize=True, tile_rows=512,
               kernel=kernel)
  x64 = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
  ref, cos = brute_force(x64[:40], x64, 40, query_ids=np.arange(40))
  assert_contract(res, ref, [3, 40])
  np.testing.assert_allclose(res.scores, cos, atol=4 * 20 * 2.0**-24)


def test_bfloat16_exact_on_stored_values(rng):
  g = crowded(rng, 3000, 32).astype(ml_dtypes.bfloat16)
  q = g[:50]
  res = search(q, g, [10, 100], query_ids=np.arange(50), tile_rows=512)
  ref, _ = brute_force(q.astype(np.float64), g.astype(np.float64), 100, query_ids=np.arange(50))
  assert_contract(res, ref, [10, 100])


def test_ring_equals_stream_and_float64(rng, kernel):
  x = near_ties(rng, 1600, 16)
  ids = int64_ids(rng, 1600)
  ks = [4, 30]
  ring = ring_self_join(x, ks, ids=ids, mesh=mesh_of(8), block=64, kernel=kernel)
  stream = search(x, x, ks, gallery_ids=ids, tile_rows=384, kernel=kernel)
  ref, _ = brute_force(x, x, 30, query_ids=ids, gallery_ids=ids)
  assert_contract(ring, ref, ks)
  assert_contract(stream, ref, ks)
  np.testing.assert_array_equal(ring.ids, stream.ids)


def test_error_bound_holds_for_the_kernels(rng, kernel):
  """The bound the certificate relies on, checked against the kernels' actual float32
  scores (their top-k's scores against float64) on badly conditioned rows."""
  x = near_ties(rng, 2000, 40) * np.float32(1e-3)
  q = x[:25]
  res = search(q, x, 50, exclude_self=False, tile_rows=512, kernel=kernel)
  truth = np.einsum("qd,qkd->qk", q.astype(np.float64),
                    x.astype(np.float64)[np.asarray(res.ids)])
  norms = np.linalg.norm(x.astype(np.float64), axis=1)
  bound = exact.error_bound(40, norms[:25], norms.max(), norms.min(), normalize=False)
  assert (np.abs(res.scores - truth) <= bound[:, None]).all()


def test_certify_needs_more_candidates_when_ties_reach_the_dropped_rows():
  """A tie cluster that runs past the candidates fails the query's certificate (the engine
  then searches it again); one inside them is rescored and ordered by id."""
  values = np.array([[5, 4, 3, 3, 3, 3]], np.float32)
  positions = np.array([[0, 1, 2, 3, 4, 5]])
  ids = np.array([10, 11, 15, 14, 13, 12])
  score = lambda which, pos: values[which, pos].astype(np.float64)
  bound = np.array([1e-3])
  got = exact.certify(values, positions, bound, np.array([9]), 3, [3], ids, score)
  assert got.failed.tolist() == [True]
  got = exact.certify(values, positions, bound, np.array([6]), 3, [3], ids, score)
  assert not got.failed.any()
  np.testing.assert_array_equal(ids[got.positions[0]], [10, 11, 12])
  assert got.rescored == 4
