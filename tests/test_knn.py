"""The exact top-k engine against a float64 brute force, faiss-cpu, and itself across layouts."""
import threading

import jax
import ml_dtypes
import numpy as np
import pytest
from knn_reference import brute_force, integer_rows, one_device_mesh, skip_unless_runs_here

from plato_jax.kernels import cpu_topk
from plato_jax.knn import ArraySource, search, search_prefixes
from plato_jax.knn.sources import TensorStoreSource


@pytest.fixture(params=["xla", "cpu"])
def kernel(request):
  """The engine's CPU kernels: XLA's matmul + selection, and plato_jax.kernels.cpu_topk."""
  skip_unless_runs_here(request.param)
  return request.param


@pytest.mark.parametrize("n,tile", [(1000, 64), (1000, 128), (777, 100), (64, 1024)])
def test_self_join_equals_brute_force_with_ties(rng, n, tile, kernel):
  x = integer_rows(rng, n, 12)
  x[5] = x[17]          # duplicate rows: exact ties between distinct ids
  x[n - 1] = x[3]
  res = search(x, x, 10, tile_rows=tile, kernel=kernel)
  ids, scores = brute_force(x, x, 10, query_ids=np.arange(n))
  np.testing.assert_array_equal(res.ids, ids)
  np.testing.assert_array_equal(res.scores, scores.astype(np.float32))
  assert res.ids.dtype == np.int64 and res.scores.dtype == np.float32


def test_self_join_of_30k_rows_in_query_blocks(rng):
  """queries = gallery at N = 30,000 (15 query blocks, each a pass over the gallery, no N×N
  anywhere); 300 random rows checked against the float64 brute force."""
  n = 30_000
  x = integer_rows(rng, n, 8)
  x[n - 1] = x[0]
  res = search(x, x, 10, query_block=2048)
  rows = np.r_[0, n - 1, rng.choice(n, 298, replace=False)]
  ids, scores = brute_force(x[rows], x, 10, query_ids=rows)
  np.testing.assert_array_equal(res.ids[rows], ids)
  np.testing.assert_array_equal(res.scores[rows], scores.astype(np.float32))


def test_identical_across_tiles_devices_and_runs(rng, kernel):
  x = integer_rows(rng, 1500, 8)
  q = x[:300]
  runs = [search(q, x, 25, query_ids=np.arange(300), tile_rows=t, mesh=m, kernel=kernel)
          for t, m in [(64, None), (256, None), (1024, one_device_mesh()), (192, one_device_mesh())]]
  runs.append(search(q, x, 25, query_ids=np.arange(300), tile_rows=64, query_block=7,
                     kernel=kernel))
  for r in runs[1:]:
    np.testing.assert_array_equal(r.ids, runs[0].ids)
    np.testing.assert_array_equal(r.scores, runs[0].scores)
  if jax.default_backend() == "cpu":  # conftest's 8 devices: the default mesh spans them
    assert len(jax.devices()) == 8


def test_float_duplicates_tie_exactly_wherever_they_sit(rng, kernel):
  """Non-integer rows, so every score is rounded: a duplicate row must still score exactly
  like its twin in any tile, position or device (else rounding, not id, breaks the tie),
  and every layout must give bit-identical results."""
  g = rng.standard_normal((3001, 40)).astype(np.float32)
  twins = rng.choice(3001, size=(60, 2), replace=False)
  g[twins[:, 1]] = g[twins[:, 0]]
  q = np.concatenate([g[twins[:30, 0]], rng.standard_normal((20, 40)).astype(np.float32)])
  runs = [search(q, g, 12, tile_rows=t, mesh=m, kernel=kernel)
          for t, m in [(64, None), (1024, one_device_mesh()), (3008, one_device_mesh())]]
  for r in runs[1:]:
    np.testing.assert_array_equal(r.ids, runs[0].ids)
    np.testing.assert_array_equal(r.scores, runs[0].scores)
  res = runs[0]
  pairs = 0
  for a, b in twins:
    for row in range(len(q)):
      hit = np.flatnonzero(np.isin(res.ids[row], [a, b]))
      if len(hit) == 2:  # both twins listed: equal scores, adjacent, lower id first
        pairs += 1
        assert res.scores[row, hit[0]] == res.scores[row, hit[1]]
        assert hit[1] == hit[0] + 1 and res.ids[row, hit[0]] == min(a, b)
      elif len(hit) == 1:  # one listed: only at the last place, and the lower id
        assert res.ids[row, hit[0]] == min(a, b) and hit[0] == 11
  assert pairs >= 30  # each query that is a twin finds both
  ids, _ = brute_force(q, g, 12)
  np.testing.assert_array_equal(res.ids, ids)


def test_random_gaussian_float32_matches_float64(rng, kernel):
  g = rng.standard_normal((4000, 48)).astype(np.float32)
  q = rng.standard_normal((100, 48)).astype(np.float32)
  res = search(q, g, 20, kernel=kernel)
  ids, scores = brute_force(q, g, 20)
  np.testing.assert_allclose(res.scores, scores, rtol=0, atol=1e-4)
  np.testing.assert_array_equal(res.ids, ids)  # the certificate: float64's lists


def test_shuffled_ids_break_ties_by_id_not_position(rng, kernel):
  n = 900
  x = integer_rows(rng, n, 6, -1, 2)  # few distinct rows: massive ties
  gids = rng.permutation(10 * n)[:n]
  res = search(x, x, 15, query_ids=gids, gallery_ids=gids, tile_rows=128, kernel=kernel)
  ids, _ = brute_force(x, x, 15, query_ids=gids, gallery_ids=gids)
  np.testing.assert_array_equal(res.ids, ids)


def test_query_ids_absent_from_gallery_and_no_exclusion(rng, kernel):
  g = integer_rows(rng, 300, 8)
  q = g[:20].copy()
  res = search(q, g, 300, query_ids=np.arange(1000, 1020), kernel=kernel)  # k = n: nothing excluded
  ids, _ = brute_force(q, g, 300)
  np.testing.assert_array_equal(res.ids, ids)
  res = search(q, g, 5, exclude_self=False, query_ids=np.arange(20), kernel=kernel)
  np.testing.assert_array_equal(res.ids, brute_force(q, g, 5)[0])


@pytest.mark.parametrize("k", [1, 299])
def test_k_one_and_n_minus_one(rng, k, kernel):
  x = integer_rows(rng, 300, 8)
  res = search(x, x, k, tile_rows=64, kernel=kernel)
  np.testing.assert_array_equal(res.ids, brute_force(x, x, k, query_ids=np.arange(300))[0])


def test_prefixes_and_multi_k_in_one_pass(rng, kernel):
  x = integer_rows(rng, 2000, 10)
  q = x[::7]
  qid = np.arange(0, 2000, 7)
  sizes = [50, 333, 1024, 2000]
  results = search_prefixes(q, x, [1, 10, 40], query_ids=qid, prefix_sizes=sizes, tile_rows=96,
                   kernel=kernel)
  assert [r.gallery_size for r in results] == sizes
  kept = search_prefixes(q, x, [1, 10, 40], query_ids=qid, prefix_sizes=sizes, prefix_k=[3, 40, 7, 1],
                tile_rows=96, kernel=kernel)
  for r, kr, kk in zip(results, kept, [3, 40, 7, 1]):
    assert kr.k == kk
    np.testing.assert_array_equal(kr.ids, r.top(kk).ids)
  with pytest.raises(ValueError, match="one k <= 40 per prefix"):
    search_prefixes(q, x, 40, query_ids=qid, prefix_sizes=sizes, prefix_k=[41, 1, 1, 1], kernel=kernel)
  for size, r in zip(sizes, results):
    alone = search_prefixes(q, x[:size], 40, query_ids=qid, prefix_sizes=[size], tile_rows=64,
                   kernel=kernel)[0]
    np.testing.assert_array_equal(r.ids, alone.ids)
    ids, _ = brute_force(q, x[:size], 40, query_ids=qid)
    np.testing.assert_array_equal(r.top(40).ids, ids)
    np.testing.assert_array_equal(r.top(10).ids, ids[:, :10])
    np.testing.assert_array_equal(r.top(1).ids, ids[:, :1])


def test_large_k_n_over_100(rng, kernel):
  n = 100_000
  g = rng.standard_normal((n, 16)).astype(np.float32)
  q = g[:32]
  res = search(q, g, n // 100, query_ids=np.arange(32), kernel=kernel)
  ids, scores = brute_force(q, g, n // 100, query_ids=np.arange(32))
  np.testing.assert_allclose(res.scores, scores, atol=1e-5)
  np.testing.assert_array_equal(np.sort(res.ids, 1), np.sort(ids, 1))  # the set at k
  np.testing.assert_array_equal(res.ids[:, :128], ids[:, :128])  # the exactly ordered part


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
def test_half_precision_storage_exact_on_integer_data(rng, dtype):
  """bf16 and f16 galleries and queries (integers: every product and sum is exact), with
  ties, prefixes and a gallery not a multiple of the tile."""
  x = integer_rows(rng, 1001, 24)
  x[9] = x[500]
  x = x.astype(dtype)
  q, qids = x[:70], np.arange(70)
  res = search_prefixes(q, x, 12, query_ids=qids, tile_rows=128, prefix_sizes=[333, 1001])
  for r, n in zip(res, [333, 1001]):
    ids, scores = brute_force(q.astype(np.float32), x[:n].astype(np.float32), 12,
                              query_ids=qids)
    np.testing.assert_array_equal(r.ids, ids)
    np.testing.assert_array_equal(r.scores, scores.astype(np.float32))


def test_subnormal_values_count_exactly(kernel):
  """XLA's CPU runtime (and the CPU kernel's threads) flush subnormal products to 0; the
  certificate's bound covers the flush, and the float64 rescoring ranks such rows by their
  tiny true values, ahead of the zero rows."""
  g = np.zeros((40, 4), np.float32)
  g[10:30, 0] = np.float32(1e-40) * np.arange(1, 21, dtype=np.float32)  # subnormal products
  g[35, 0] = 1.0
  q = np.ones((3, 4), np.float32)
  res = search(q, g, 5, kernel=kernel)
  np.testing.assert_array_equal(res.ids, np.tile([35, 29, 28, 27, 26], (3, 1)))
  expected = g[[35, 29, 28, 27, 26], 0].astype(np.float64)
  np.testing.assert_array_equal(res.scores, np.tile(expected.astype(np.float32), (3, 1)))


def test_bfloat16_storage_exact_on_stored_values(rng):
  g = rng.standard_normal((3000, 32)).astype(ml_dtypes.bfloat16)
  q = g[:50]
  res = search(q, g, 10, query_ids=np.arange(50))
  ids, scores = brute_force(q.astype(np.float32), g.astype(np.float32), 10, query_ids=np.arange(50))
  np.testing.assert_allclose(res.scores, scores, atol=1e-4)
  np.testing.assert_array_equal(res.ids, ids)


CPU_ISAS = [pytest.param(isa, marks=pytest.mark.skipif(
    isa not in cpu_topk.available_isas(), reason=f"this CPU has no {isa}"))
    for isa in cpu_topk.ISAS]


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("store,compute_dtype,bf16_queries,normalize", [
    (ml_dtypes.bfloat16, None, True, False),   # a bf16 store: bf16 products (AMX tiles)
    (ml_dtypes.bfloat16, None, True, True),
    (ml_dtypes.bfloat16, None, False, False),  # f32 queries: f32 products of bf16 rows
    (np.float32, ml_dtypes.bfloat16, False, True),  # bf16 asked: the kernel rounds
    (np.float16, None, False, False),          # f16 rows widened in the kernel
    (np.float64, ml_dtypes.bfloat16, False, False),  # rounded once, from f64
])
def test_cpu_kernel_on_narrow_inputs_equals_brute_force(rng, monkeypatch, isa, store,
                                                        compute_dtype, bf16_queries, normalize):
  """Every CPU kernel path (PLATO_CPU_ISA) on bf16/f16 stores and bf16 compute equals the
  float64 brute force on the values the matmul takes: random floats, duplicate rows, a
  gallery not a multiple of the tile, self-exclusion. The f64 gallery sits just above
  halfway between bf16 values: rounded once it goes up; through f32 it would be a tie."""
  skip_unless_runs_here("cpu")
  monkeypatch.setenv(cpu_topk.ISA_ENV, isa)
  g = rng.standard_normal((1500, 48)).astype(store)
  if store == np.float64:
    below = np.abs(g).astype(ml_dtypes.bfloat16).astype(np.float64)
    half_ulp = 2.0 ** (np.floor(np.log2(below)) - 8)
    g = np.sign(g) * (below + half_ulp * (1 + 2.0 ** -30))
    assert not np.array_equal(g.astype(ml_dtypes.bfloat16),
                              g.astype(np.float32).astype(ml_dtypes.bfloat16))
  g[[9, 1200]] = g[30]
  q = g[:40] if bf16_queries else rng.standard_normal((40, 48)).astype(np.float32)
  qids = np.arange(40) if bf16_queries else None
  res = search(q, g, 15, query_ids=qids, tile_rows=256, compute_dtype=compute_dtype,
               normalize=normalize)
  assert res.kernel == "cpu"
  taken = compute_dtype or store
  g64 = g.astype(taken).astype(np.float64)
  if normalize:
    g64 /= np.linalg.norm(g64, axis=1, keepdims=True)
  q64 = q.astype(taken).astype(np.float64) if compute_dtype else q.astype(np.float64)
  ids, scores = brute_force(q64, g64, 15, query_ids=qids)
  if normalize:
    scores /= np.linalg.norm(q64, axis=1, keepdims=True)
  np.testing.assert_array_equal(res.ids, ids)
  np.testing.assert_allclose(res.scores, scores, rtol=1e-6, atol=1e-6)


def test_matches_faiss_inner_product(rng, kernel):
  faiss = pytest.importorskip("faiss")
  g = rng.standard_normal((5000, 64)).astype(np.float32)
  g /= np.linalg.norm(g, axis=1, keepdims=True)
  q = rng.standard_normal((64, 64)).astype(np.float32)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  index = faiss.IndexFlatIP(64)
  index.add(g)
  f_scores, f_ids = index.search(q, 10)
  res = search(q, g, 10, kernel=kernel)
  np.testing.assert_allclose(res.scores, f_scores, atol=1e-5)
  assert (res.ids == f_ids).mean() > 0.99


def test_tensorstore_and_shard_sources(tmp_path, rng):
  ts = pytest.importorskip("tensorstore")
  x = integer_rows(rng, 700, 8)
  arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "g")}},
                create=True, dtype=ts.float32, shape=x.shape).result()
  arr.write(x).result()
  expected = brute_force(x[:40], x, 12)[0]
  np.testing.assert_array_equal(search(x[:40], arr, 12, tile_rows=128).ids, expected)
  with pytest.raises(ValueError, match=r"needs an \[N, L, D\] array, got shape \(700, 8\) "
                                       r"\(file://.*/g/\)"):
    TensorStoreSource(arr, layer=0)
  shards = [ArraySource(x[:250], np.arange(250)), ArraySource(x[250:], np.arange(250, 700))]
  np.testing.assert_array_equal(search(x[:40], shards, 12, tile_rows=64).ids, expected)
  # array shards: rows numbered by their place in the whole gallery, or `gallery_ids`
  arrays = [x[:250], ArraySource(x[250:600]), x[600:]]  # (an ArraySource made without ids)
  np.testing.assert_array_equal(search(x[:40], arrays, 12, tile_rows=64).ids, expected)
  ids = np.arange(700) * 3 + 5
  np.testing.assert_array_equal(
      search(x[:40], arrays, 12, tile_rows=64, gallery_ids=ids).ids,
      brute_force(x[:40], x, 12, gallery_ids=ids)[0])


def test_prefix_results_hold_only_real_neighbours(rng, kernel):
  """A self-join whose small prefix holds fewer rows than k: that prefix's result has
  n_1 - 1 columns (each query's own row is out), every one a real neighbour. A one-row
  prefix holds none: an error."""
  x = integer_rows(rng, 300, 6)
  small, large = search_prefixes(x, x, 10, prefix_sizes=[6, 300], kernel=kernel)
  assert small.k == 5 and large.k == 10
  with pytest.raises(ValueError, match=r"prefix of 1 rows holds no neighbour for query rows "
                                       r"\[0\], only their own"):
    search_prefixes(x, x, 10, prefix_sizes=[1, 300], kernel=kernel)
  for r, n in [(small, 6), (large, 300)]:
    ids, scores = brute_force(x, x[:n], r.k, query_ids=np.arange(300))
    np.testing.assert_array_equal(r.ids, ids)
    np.testing.assert_array_equal(r.scores, scores.astype(np.float32))
  with pytest.raises(TypeError, match="search_prefixes"):  # one result type per function
    search(x, x, 10, prefix_sizes=[6, 300])


@pytest.mark.parametrize("case,match", [
    ("k_too_big", "larger than the gallery"),
    ("k_after_self", r"after self-exclusion\) for query rows \[0, 1, 2"),
    ("dim", "dimension mismatch"),
    ("nan_gallery", r"NaN/Inf values: ids \[7, 11\]"),
    ("nan_query", r"query rows with NaN/Inf values: \[3\]"),
    ("overflow", r"squared norm that overflows float32: ids \[2\]"),
    ("dup_ids", r"duplicate gallery ids: ids \[4\] at rows \[4, 9\]"),
    ("empty", "empty gallery"),
    ("id_len", r"query ids has shape \(5,\)"),
    ("prefix", "prefix_sizes must increase"),
    ("k_zero", "positive integer"),
    ("k_after_self_prefix", r"after self-exclusion\) for query rows \[0, 1, 2"),
    ("prefix_empty", "prefix_sizes must increase"),
    ("query_overflow", r"query rows with a squared norm that overflows float32: \[2\]"),
    ("gallery_id_len", r"gallery ids has shape \(19,\)"),
    ("gallery_id_dtype", "gallery ids must be integers"),
    ("shard_dims", r"shard 1 has D=3 \(shard 0 has D=4\)"),
])
def test_bad_input_errors(case, match):
  x = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
  q = x[:10].copy()
  call = {
      "k_too_big": lambda: search(q, x, 21),
      "k_after_self": lambda: search(x, x, 20),
      "dim": lambda: search(q[:, :3], x, 2),
      "nan_gallery": lambda: search(q, np.where(np.isin(np.arange(20), [7, 11])[:, None], np.nan, x), 2),
      "overflow": lambda: search(q, np.where(np.arange(20)[:, None] == 2, 1e20, x).astype(np.float32), 2),
      "nan_query": lambda: search(np.where(np.arange(10)[:, None] == 3, np.inf, q), x, 2),
      "dup_ids": lambda: search(q, x, 2, gallery_ids=np.r_[np.arange(9), 4, np.arange(10, 20)]),
      "empty": lambda: search(q, x[:0], 1),
      "id_len": lambda: search(q, x, 2, query_ids=np.arange(5)),
      "prefix": lambda: search_prefixes(q, x, 2, prefix_sizes=[10, 5]),
      "k_zero": lambda: search(q, x, 0),
      "k_after_self_prefix": lambda: search_prefixes(x, x, 20, prefix_sizes=[5, 20]),
      "prefix_empty": lambda: search_prefixes(q, x, 2, prefix_sizes=[]),
      "query_overflow": lambda: search(np.where(np.arange(10)[:, None] == 2, 1e20, q)
                                       .astype(np.float32), x, 2),
      "gallery_id_len": lambda: search(q, x, 2, gallery_ids=np.arange(19)),
      "gallery_id_dtype": lambda: search(q, x, 2, gallery_ids=np.arange(20.0)),
      "shard_dims": lambda: search(q, [x[:10], x[10:, :3]], 2),
  }[case]
  with pytest.raises(ValueError, match=match):
    call()


def test_normalize_gives_cosine_neighbours(rng, kernel):
  g = rng.standard_normal((2000, 24)).astype(np.float32) * rng.uniform(0.1, 10, (2000, 1)).astype(np.float32)
  q = rng.standard_normal((40, 24)).astype(np.float32) * 3
  res = search(q, g, 10, normalize=True, tile_rows=320, kernel=kernel)
  g64, q64 = g.astype(np.float64), q.astype(np.float64)
  gn = g64 / np.linalg.norm(g64, axis=1, keepdims=True)
  qn = q64 / np.linalg.norm(q64, axis=1, keepdims=True)
  ids, scores = brute_force(qn, gn, 10)
  np.testing.assert_allclose(res.scores, scores, atol=1e-5)
  np.testing.assert_array_equal(res.ids, ids)
  zero = g.copy()
  zero[[3, 8]] = 0
  with pytest.raises(ValueError, match=r"zero norm .*ids \[3, 8\]"):
    search(q, zero, 10, normalize=True, kernel=kernel)
  with pytest.raises(ValueError, match=r"query rows with zero norm .*\[1\]"):
    search(np.where(np.arange(40)[:, None] == 1, 0, q), g, 10, normalize=True, kernel=kernel)


class SimulatedCrash(BaseException):
  """What a killed process leaves: nothing catches it on the way out."""


class CrashingSource(ArraySource):
  """Dies (like a killed process) after `limit` tile reads."""

  def __init__(self, rows, limit):
    super().__init__(rows)
    self.limit = limit

  def read(self, start, stop):
    self.limit -= 1
    if self.limit < 0:
      raise SimulatedCrash(f"after {start} rows")
    return super().read(start, stop)


def test_resume_after_crash_gives_identical_results(rng, tmp_path, kernel):
  # Float rows: no query needs a second pass (which would read the gallery again).
  x = rng.standard_normal((3000, 8)).astype(np.float32)
  q = x[:100]
  kw = dict(query_ids=np.arange(100), prefix_sizes=[500, 3000], tile_rows=64, query_block=60,
            kernel=kernel)
  clean = search_prefixes(q, x, 20, **kw)
  with pytest.raises(SimulatedCrash):
    search_prefixes(q, CrashingSource(x, 70), 20, resume_dir=str(tmp_path / "ck"), checkpoint_every=2, **kw)
  assert any((tmp_path / "ck").iterdir()), "a checkpoint was written before the crash"
  reads = CrashingSource(x, 10**9)
  resumed = search_prefixes(q, reads, 20, resume_dir=str(tmp_path / "ck"), checkpoint_every=2, **kw)
  assert reads.limit > 10**9 - 2 * 3000 // 64, "the rerun skipped the finished tiles"
  for a, b in zip(clean, resumed):
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.scores, b.scores)
  with pytest.raises(ValueError, match="checkpoint of another run"):
    search_prefixes(q, x, 19, resume_dir=str(tmp_path / "ck"), **kw)


def test_resume_refuses_a_gallery_whose_rows_changed(rng, tmp_path):
  """Same ids, other values: the checkpoint is of another gallery, never resumed from."""
  x = rng.standard_normal((3000, 8)).astype(np.float32)
  kw = dict(query_ids=np.arange(50), tile_rows=64, query_block=50,
            resume_dir=str(tmp_path / "ck"), checkpoint_every=2)
  with pytest.raises(SimulatedCrash):
    search(x[:50], CrashingSource(x, 20), 10, **kw)
  changed = x.copy()
  changed[2500] += 1
  with pytest.raises(ValueError, match="checkpoint of another run"):
    search(x[:50], changed, 10, **kw)


def test_tiles_are_read_ahead_of_the_compute(rng):
  """Reads run in the background, ahead of the step that consumes them: the first two
  tiles' reads meet at a barrier, which breaks (failing the search) if reads came one by
  one."""
  x = integer_rows(rng, 1024, 8)
  meet = threading.Barrier(2, timeout=60)

  class Meeting(ArraySource):
    def read(self, start, stop):
      if start < 256:
        meet.wait()
      return super().read(start, stop)

  res = search(x[:20], Meeting(x), 5, tile_rows=128, mesh=one_device_mesh())
  np.testing.assert_array_equal(res.ids, brute_force(x[:20], x, 5)[0])


def test_rows_past_the_largest_prefix_are_never_read(rng):
  x = integer_rows(rng, 1000, 6)

  class Recording(ArraySource):
    stops = []

    def read(self, start, stop):
      self.stops.append(stop)
      return super().read(start, stop)

  source = Recording(x)
  res = search_prefixes(x[:30], source, 5, query_ids=np.arange(30), prefix_sizes=[100, 400], tile_rows=64)
  assert max(source.stops) == 400
  np.testing.assert_array_equal(res[1].ids, brute_force(x[:30], x[:400], 5, query_ids=np.arange(30))[0])


def test_gallery_in_accelerator_memory_is_sliced_there(rng, monkeypatch):
  """A jax gallery in accelerator memory is tiled on the device (no host round trip). The
  CPU devices stand in for accelerators here; results equal the host-streamed ones."""
  import sys

  from plato_jax.knn import sources
  stream_module = sys.modules["plato_jax.knn.stream"]
  x = integer_rows(rng, 1000, 8)
  ids = rng.permutation(5000)[:1000]  # not ascending: tiles are reordered on the device
  # kernel="xla": an accelerator's kernel (the CPU kernel reads host rows, never these)
  host = search(x[:50], x, 7, query_ids=ids[:50], gallery_ids=ids, tile_rows=128, kernel="xla")
  sliced = []  # shapes of the jax arrays the engine asked about: the gallery, then its tiles

  def on_device(a):
    if isinstance(a, jax.Array):
      sliced.append(a.shape)
    return isinstance(a, jax.Array)

  monkeypatch.setattr(sources, "on_accelerator", on_device)
  monkeypatch.setattr(stream_module, "on_accelerator", on_device)
  dev = search(x[:50], jax.device_put(x), 7, query_ids=ids[:50], gallery_ids=ids,
               tile_rows=128, kernel="xla")
  # full tiles and the last, short one (1000 = 7·128 + 104) stayed jax arrays
  assert (128, 8) in sliced and (104, 8) in sliced
  np.testing.assert_array_equal(dev.ids, host.ids)
  np.testing.assert_array_equal(dev.scores, host.scores)


@pytest.mark.parametrize("normalize,dtype", [(False, np.float32), (True, np.float32),
                                             (False, ml_dtypes.bfloat16)])
def test_fused_kernel_in_the_engine_equals_brute_force(rng, normalize, dtype):
  """kernel="fused" (the Pallas kernel, interpreted on the 8 CPU devices): self-exclusion,
  duplicate rows, a gallery not a multiple of the tile, prefixes, cosine, bf16 (multiplied
  in bf16, as on a GPU: on CPU the engine would otherwise widen bf16 tiles to f32)."""
  x = integer_rows(rng, 900, 16)
  x[7] = x[300]  # exact ties between distinct ids
  if normalize:
    x[np.all(x == 0, axis=1), 0] = 1
  x = x.astype(dtype)
  q, qids = x[:130], np.arange(130)
  kw = dict(query_ids=qids, tile_rows=128, prefix_sizes=[500, 900], normalize=normalize,
            compute_dtype=dtype)
  res = search_prefixes(q, x, 6, kernel="fused", **kw)
  xla = search_prefixes(q, x, 6, kernel="xla", **kw)
  for r, other, n in zip(res, xla, [500, 900]):
    assert r.kernel == "fused:triton" and other.kernel == "xla"
    np.testing.assert_array_equal(r.ids, other.ids)
    np.testing.assert_array_equal(r.scores, other.scores)
    if not normalize:  # cosine's f32 rounding is checked against the XLA kernel above
      ids, scores = brute_force(q.astype(np.float32), x[:n].astype(np.float32), 6,
                                query_ids=qids)
      np.testing.assert_array_equal(r.ids, ids)
      np.testing.assert_array_equal(r.scores, scores.astype(np.float32))


@pytest.mark.parametrize("kernel,normalize", [("fused:mosaic_gpu", False),
                                              ("fused:mosaic_gpu", True), ("fused:tpu", True)])
def test_mosaic_kernels_in_the_engine_equal_brute_force(rng, kernel, normalize):
  """kernel="fused:mosaic_gpu" / "fused:tpu" (Mosaic GPU / Pallas TPU; on CPU interpreted,
  one device): bf16 tiles,
  self-exclusion, duplicate rows, prefixes, a gallery not a multiple of the tile, cosine."""
  skip_unless_runs_here(kernel)
  x = integer_rows(rng, 600, 40)
  x[7] = x[300]
  if normalize:
    x[np.all(x == 0, axis=1), 0] = 1
  x = x.astype(ml_dtypes.bfloat16)
  q, qids = x[:100], np.arange(100)
  kw = dict(query_ids=qids, tile_rows=256, prefix_sizes=[300, 600], normalize=normalize,
            mesh=one_device_mesh(), compute_dtype=ml_dtypes.bfloat16)
  res = search_prefixes(q, x, 6, kernel=kernel, **kw)
  xla = search_prefixes(q, x, 6, kernel="xla", **kw)
  for r, other, n in zip(res, xla, [300, 600]):
    assert r.kernel == kernel
    np.testing.assert_array_equal(r.ids, other.ids)
    np.testing.assert_array_equal(r.scores, other.scores)
    if not normalize:
      ids, scores = brute_force(q.astype(np.float32), x[:n].astype(np.float32), 6,
                                query_ids=qids)
      np.testing.assert_array_equal(r.ids, ids)
      np.testing.assert_array_equal(r.scores, scores.astype(np.float32))
  if jax.default_backend() == "cpu" and kernel == "fused:mosaic_gpu":
    with pytest.raises(ValueError, match="one-device mesh"):
      search(q, x, 6, kernel="fused:mosaic_gpu", compute_dtype=ml_dtypes.bfloat16)
    with pytest.raises(ValueError, match="bf16/f16 only"):
      search(q, x, 6, kernel="fused:mosaic_gpu", mesh=one_device_mesh())  # f32 on CPU


def test_kernel_choice_is_checked_and_reported(rng):
  from plato_jax.kernels.cpu_topk import unavailable_reason
  x = integer_rows(rng, 200, 8)
  auto = "cpu" if unavailable_reason() is None else "xla"
  assert search(x[:5], x, 3).kernel == auto  # auto on CPU, f32
  assert search(x[:5], x, 3, compute_dtype=ml_dtypes.bfloat16).kernel == auto  # and bf16
  assert search(x[:5], x, 3, compute_dtype=np.float16).kernel == "xla"
  with pytest.raises(ValueError, match="f32 or bf16"):
    search(x[:5], x, 3, kernel="cpu", compute_dtype=np.float16)
  with pytest.raises(ValueError, match="kernel must be"):
    search(x[:5], x, 3, kernel="triton")
  import types

  from plato_jax.knn.kernel_choice import check_kernel_runs_on, pick_kernel
  assert pick_kernel("fused", 10, "tpu") == "fused:tpu"
  assert pick_kernel("fused", 10, "gpu") == "fused:triton"
  assert pick_kernel("auto", 10, "gpu") == "xla"  # until measured exact there
  gpu = types.SimpleNamespace(devices=types.SimpleNamespace(
      flat=[types.SimpleNamespace(platform="gpu")], size=1))
  check_kernel_runs_on("fused:mosaic_gpu", gpu)
  assert pick_kernel("auto", 10, "gpu", np.float32) == "xla"
  with pytest.raises(ValueError, match="runs on CPU devices"):
    check_kernel_runs_on("cpu", gpu)
  with pytest.raises(ValueError, match="runs on tpu devices"):
    check_kernel_runs_on("fused:tpu", gpu)


def test_a_fused_kernel_that_does_not_compile_falls_back_to_xla(rng, monkeypatch):
  import sys

  from plato_jax.knn import kernel_choice, selectors
  search_module = sys.modules["plato_jax.knn.search"]
  x = integer_rows(rng, 300, 8)

  def broken(*args, **kwargs):
    raise NotImplementedError("no lowering for this primitive")

  kernel_choice._selector_that_compiles.cache_clear()  # probes are cached per shape
  monkeypatch.setattr(selectors.FusedTopKSelector, "update_rows", broken)
  monkeypatch.setattr(search_module, "pick_kernel", lambda *args: "fused:triton")
  with pytest.warns(UserWarning, match="did not compile.*using the XLA kernel"):
    res = search(x[:20], x, 4, query_ids=np.arange(20))
  assert res.kernel == "xla"
  ids, _ = brute_force(x[:20], x, 4, query_ids=np.arange(20))
  np.testing.assert_array_equal(res.ids, ids)
  with pytest.raises(NotImplementedError):
    search(x[:20], x, 4, kernel="fused")
  kernel_choice._selector_that_compiles.cache_clear()


def test_host_topk_orders_by_score_then_id(rng):
  """The host finish (int64 keys, partition, sort) against np.lexsort, on rows with ties,
  negatives, +/-0.0, huge and tiny magnitudes, and -inf filler (id -1)."""
  import jax.numpy as jnp

  from plato_jax.knn.sharding import host_topk, order_keys
  q, m, k = 40, 300, 37
  values = rng.choice(np.array([-3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, 7.25, 3e38, -3e38],
                               np.float32), size=(q, m))
  values[:, ::3] = rng.standard_normal((q, len(range(0, m, 3)))).astype(np.float32)
  ids = np.stack([rng.permutation(10**6)[:m] for _ in range(q)]).astype(np.int32)
  ids[:, :3] = np.iinfo(np.int32).max - np.arange(3)  # the largest ids sort last at ties
  values[-5:, 20:] = -np.inf  # rows with fewer than k candidates: filler comes last
  ids[-5:, 20:] = -1
  got_v, got_i = host_topk(np.asarray(order_keys(jnp.asarray(values), jnp.asarray(ids))), k)
  clean = np.where(values == 0, np.float32(0), values)
  for r in range(q):
    order = np.lexsort((np.where(ids[r] < 0, np.iinfo(np.int64).max, ids[r]), -clean[r]))[:k]
    np.testing.assert_array_equal(got_v[r], clean[r, order])
    np.testing.assert_array_equal(got_i[r], np.where(clean[r, order] == -np.inf, -1,
                                                     ids[r, order]))
  assert not np.signbit(got_v[got_v == 0]).any()  # -0.0 reads +0.0
  keys = np.asarray(order_keys(jnp.asarray(values[:, :20]), jnp.asarray(ids[:, :20])))
  all_v, all_i = host_topk(keys, 20)  # m == k: no partition
  more_v, more_i = host_topk(keys, 23)  # m < k: filler after the candidates
  np.testing.assert_array_equal(more_v[:, :20], all_v)
  np.testing.assert_array_equal(more_i[:, :20], all_i)
  assert (more_v[:, 20:] == -np.inf).all() and (more_i[:, 20:] == -1).all()
  np.testing.assert_array_equal(all_v[:, 0], clean[:, :20].max(axis=1))


def test_tile_buffers_are_reused_only_once_given_back(rng):
  from plato_jax.knn.sources import TileBuffers, aligned_empty, host_aligned

  def unaligned(x):  # 4 bytes past a 64-byte boundary: host_aligned must copy it
    out = aligned_empty((x.size + 1,), x.dtype)[1:].reshape(x.shape)
    out[...] = x
    return out

  buffers = TileBuffers()
  rows = unaligned(rng.standard_normal((64, 16)).astype(np.float32))
  first = host_aligned(rows, buffers=buffers)
  assert first.ctypes.data % 64 == 0 and np.array_equal(first, rows)
  second = host_aligned(rows, buffers=buffers)
  assert second is not first  # `first` not given back: still in use
  buffers.give_back(first)
  buffers.give_back(rows)  # not one of its buffers: ignored
  third = host_aligned(unaligned(rows * 2), buffers=buffers)
  assert third is first and np.array_equal(third, rows * 2)
  assert host_aligned(rows, np.float64, buffers=buffers).dtype == np.float64  # another key


def test_host_windows_read_rows_in_place_or_copy_them(rng):
  """Interior rows of an in-memory gallery come as an aligned view around them; rows at the
  ends of their allocation, converted or reordered rows are copied (zero past the rows)."""
  from plato_jax.knn.sources import TileBuffers, aligned_empty, host_window, window_length

  d, t = 24, 10
  length = window_length(t, d)
  for shift in range(0, 16, 3):  # every alignment a float32 array can have
    memory = aligned_empty((100 * d + 16,), np.float32)[shift:shift + 100 * d]
    gallery = np.frombuffer(memoryview(memory), np.float32).reshape(100, d)  # owns no more
    memory[...] = rng.standard_normal(memory.shape)
    for start in (0, 40, 90, 95):
      rows = gallery[start:start + t]
      w = host_window(rows, length, np.float32)
      assert w.window.shape == (length,) and w.window.ctypes.data % 64 == 0
      got = w.window[w.offset:w.offset + rows.size].reshape(rows.shape)
      np.testing.assert_array_equal(got, rows)
      in_place = start == 40 or (start == 0 and shift == 0)
      assert np.shares_memory(w.window, gallery) == in_place, (shift, start)
      if not in_place:
        assert w.offset == 0 and not w.window[rows.size:].any()
  buffers = TileBuffers()
  half = rng.standard_normal((t, d)).astype(np.float16)
  w = host_window(half, length, np.float32, buffers)  # a conversion: a copy, reused later
  np.testing.assert_array_equal(w.window[:half.size].reshape(t, d), half.astype(np.float32))
  buffers.give_back(w.window)
  assert host_window(half, length, np.float32, buffers).window is w.window
  reordered = host_window(gallery[40:50][::-1], length, np.float32)
  assert not np.shares_memory(reordered.window, gallery)


def test_two_runs_on_one_resume_folder(rng, tmp_path):
  """A second run on a resume folder in use is a clear error (not an orbax crash); once
  the first is done or has failed, the folder is free again."""
  import subprocess
  import sys

  from plato_jax.lock import Busy
  from plato_jax.resume import ResumePoint
  folder = str(tmp_path / "ck")
  first = ResumePoint(folder, {"run": 1})
  code = f"from plato_jax.resume import ResumePoint\nResumePoint({folder!r}, {{'run': 1}})"
  other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
  assert other.returncode != 0 and "resume folder" in other.stderr and "in use by" in other.stderr
  with pytest.raises(Busy, match="resume folder .* in use by pid"):
    ResumePoint(folder, {"run": 1})
  first.close()
  x = rng.standard_normal((500, 8)).astype(np.float32)
  with pytest.raises(SimulatedCrash):
    search(x[:10], CrashingSource(x, 3), 5, tile_rows=64, resume_dir=folder, checkpoint_every=1)
  res = search(x[:10], x, 5, tile_rows=64, resume_dir=folder, checkpoint_every=1)
  np.testing.assert_array_equal(res.ids, brute_force(x[:10], x, 5)[0])
