"""Prefixes by rank (random nested galleries) read in storage order, against a float64 brute
force on the explicit subsets."""
import re

import numpy as np
import pytest
from knn_reference import brute_force, integer_rows, one_device_mesh, skip_unless_runs_here

from plato_jax.knn import bands, search_prefixes
from plato_jax.knn.bands import check_ranks, plan_bands


@pytest.fixture(params=["xla", "cpu"])
def kernel(request):
  skip_unless_runs_here(request.param)
  return request.param


def sorted_gallery(rng, n, d):
  """Integer rows (exact ties) with duplicates, stored sorted by their first coordinates: a
  store written in dataset order, where the first rows are unlike the rest."""
  x = integer_rows(rng, n, d)
  x[7] = x[n - 2]
  x[11] = x[12]
  return x[np.lexsort(x[:, ::-1].T)]


def queries_first_ranks(rng, n, query_rows):
  """A seeded permutation with the queries' rows ranked first (in every prefix)."""
  rest = rng.permutation(np.setdiff1d(np.arange(n), query_rows))
  ranks = np.empty(n, np.int64)
  ranks[np.r_[query_rows, rest]] = np.arange(n)
  return ranks


def expected_prefix(x, q, ids, q_ids, ranks, size, k):
  inside = np.flatnonzero(ranks < size)
  return brute_force(q, x[inside], k, query_ids=q_ids, gallery_ids=ids[inside])


@pytest.mark.parametrize("mesh", ["one", "eight"])
def test_rank_prefixes_equal_brute_force_on_random_subsets(rng, kernel, mesh):
  n, d = 1111, 6  # not a multiple of any tile
  x = sorted_gallery(rng, n, d)
  ids = rng.permutation(10 * n)[:n].astype(np.int64) - 3 * n  # any distinct ids, negatives too
  query_rows = np.sort(rng.choice(n, 40, replace=False))
  ranks = queries_first_ranks(rng, n, query_rows)
  sizes, ks = [40, 97, 400, 1000], [3, 20, 9, 30]
  got = search_prefixes(x[query_rows], x, 30, query_ids=ids[query_rows], gallery_ids=ids,
                        prefix_sizes=sizes, prefix_k=ks, prefix_ranks=ranks, tile_rows=64,
                        kernel=kernel, mesh=one_device_mesh() if mesh == "one" else None)
  for res, size, k in zip(got, sizes, ks):
    want_ids, want_scores = expected_prefix(x, x[query_rows], ids, ids[query_rows], ranks,
                                            size, min(k, size - 1))
    np.testing.assert_array_equal(res.ids, want_ids)
    np.testing.assert_array_equal(res.scores, want_scores.astype(np.float32))
    assert res.gallery_size == size


def test_live_band_states_fit_their_budget(rng, monkeypatch):
  """Interleaved bands hold their states at once: the query block shrinks to fit the
  budget, and the results stay the same."""
  from plato_jax.knn import stream
  n = 700
  x = sorted_gallery(rng, n, 5)
  ranks = queries_first_ranks(rng, n, np.arange(30))
  kw = dict(query_ids=np.arange(30), prefix_sizes=[30, 200, 700], prefix_ranks=ranks,
            tile_rows=64)
  whole = search_prefixes(x[:30], x, 12, **kw)
  blocks = []
  real = stream.selector_that_compiles
  monkeypatch.setattr(stream, "selector_that_compiles",
                      lambda *a: blocks.append(a[6]) or real(*a))
  monkeypatch.setattr(stream, "BAND_STATE_BYTES", 16_000)
  with pytest.warns(UserWarning, match=r"query blocks of \d+ \(not 30\)") as said:
    small = search_prefixes(x[:30], x, 12, **kw)
  most = int(re.search(r"take ([\d,]+) bytes a query", str(said[0].message))[1].replace(",", ""))
  assert 1 < 16_000 // most < 30 and 16_000 // most in blocks
  for a, b in zip(whole, small):
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.scores, b.scores)


def test_random_galleries_differ_from_storage_prefixes(rng):
  """The point of ranks: on a sorted store the first n rows are not a random n."""
  n = 600
  x = rng.standard_normal((n, 6)).astype(np.float32)
  x = x[np.argsort(x[:, 0])]
  ranks = queries_first_ranks(rng, n, np.arange(20))
  kw = dict(query_ids=np.arange(20), prefix_sizes=[100, n], tile_rows=64)
  by_rank = search_prefixes(x[:20], x, 5, prefix_ranks=ranks, **kw)
  by_position = search_prefixes(x[:20], x, 5, **kw)
  assert (by_position[0].ids < 100).all()
  assert set(by_rank[0].ids.ravel()) <= set(np.flatnonzero(ranks < 100))
  assert (np.flatnonzero(ranks < 100) >= 100).sum() > 40  # the random 80 lie mostly past it
  np.testing.assert_array_equal(by_rank[1].ids, by_position[1].ids)  # the whole gallery


def test_queries_outside_small_prefixes_and_large_k(rng):
  """Queries ranked anywhere (a query's own row absent from small prefixes), k near the
  prefix size, and the threshold selector's large k."""
  n = 900
  x = sorted_gallery(rng, n, 5)
  ranks = rng.permutation(n)
  query_rows = rng.choice(n, 25, replace=False)
  sizes, ks = [30, 300, 900], [29, 200, 300]
  got = search_prefixes(x[query_rows], x, 300, query_ids=query_rows, prefix_sizes=sizes,
                        prefix_k=ks, prefix_ranks=ranks, tile_rows=128)
  for res, size, k in zip(got, sizes, ks):
    k = min(k, size - (ranks[query_rows] < size).any())
    want_ids, _ = expected_prefix(x, x[query_rows], np.arange(n), query_rows, ranks, size, k)
    np.testing.assert_array_equal(res.ids[:, :k], want_ids)


def test_band_plan_reads_each_row_once_in_storage_order(rng):
  n, sizes, tile, devices = 5000, [10, 300, 2000, 4500], 64, 3
  ranks = rng.permutation(n)
  plan = plan_bands(sizes, tile, devices, ranks)
  seen = np.concatenate([s for g in plan.groups for s in g.slots])
  np.testing.assert_array_equal(np.sort(seen), np.flatnonzero(ranks < sizes[-1]))
  edges = [0, *sizes]
  for g in plan.groups:
    assert len(g.slots) <= devices and all(len(s) <= tile for s in g.slots)
    rows = np.concatenate(g.slots)
    assert np.all(np.diff(rows) > 0)
    assert np.all((edges[g.band] <= ranks[rows]) & (ranks[rows] < edges[g.band + 1]))
  lasts = [g.slots[-1][-1] for g in plan.groups]
  assert lasts == sorted(lasts)  # the reader moves front to back
  assert not any(plan.continues)
  positional = plan_bands(sizes, tile, devices)
  assert positional.continues == (False, True, True, True)
  assert all(len(positional.live(g)) == 1 for g in range(1, len(positional.groups)))
  assert [g.slots[0][0] for g in positional.groups if g.slots[0][0] in sizes] == sizes[:-1]


def test_ranks_are_checked():
  x = np.ones((5, 2), np.float32)
  for ranks, match in [([0, 1, 2, 3], r"one per gallery row \(5\)"),
                       ([0, 1, 2, 3, 5], r"row 4 has rank 5"),
                       ([0, 1, 1, 3, 4], r"rows \[1, 2\] share rank 1"),
                       ([0.0, 1, 2, 3, 4], "must be integers")]:
    with pytest.raises(ValueError, match=match):
      search_prefixes(x[:1], x, 1, prefix_sizes=[3, 5], prefix_ranks=np.asarray(ranks))
  np.testing.assert_array_equal(check_ranks([4, 3, 2, 1, 0], 5), [4, 3, 2, 1, 0])


def test_bad_rows_named_only_inside_the_galleries(rng):
  x = rng.standard_normal((400, 4)).astype(np.float32)
  q = rng.standard_normal((3, 4)).astype(np.float32)
  ranks = rng.permutation(400)
  outside, inside = np.flatnonzero(ranks >= 300)[0], np.flatnonzero(ranks < 50)[0]
  x[outside] = np.nan  # in no gallery: never read into a tile
  res = search_prefixes(q, x, 2, prefix_sizes=[50, 300], prefix_ranks=ranks, tile_rows=64)
  assert outside not in res[1].ids
  x[inside] = np.inf
  with pytest.raises(ValueError, match=rf"NaN/Inf values: ids \[{inside}\]"):
    search_prefixes(q, x, 2, prefix_sizes=[50, 300], prefix_ranks=ranks, tile_rows=64)


class CrashingSource:
  """An array source whose reads fail after `limit` reads."""

  def __init__(self, x, limit):
    self.x, self.limit = x, limit
    self.num_rows, self.dim, self.dtype = x.shape[0], x.shape[1], x.dtype

  def ids(self):
    return np.arange(self.num_rows)

  def read(self, start, stop):
    self.limit -= 1
    if self.limit < 0:
      raise RuntimeError("simulated crash")
    return self.x[start:stop]

  def take(self, positions):
    return self.x[positions]

  def fingerprint(self):
    return "fixed"


def test_resume_mid_pass_with_bands(rng, tmp_path, monkeypatch, kernel):
  monkeypatch.setattr(bands, "SUPERBLOCK_BYTES", 100 * 8 * 4)  # 100-row reads
  x = rng.standard_normal((3000, 8)).astype(np.float32)
  ranks = queries_first_ranks(rng, 3000, np.arange(60))
  kw = dict(query_ids=np.arange(60), prefix_sizes=[60, 500, 2000, 3000], prefix_k=[5, 20, 20, 9],
            prefix_ranks=ranks, tile_rows=64, query_block=40, kernel=kernel)
  clean = search_prefixes(x[:60], x, 20, **kw)
  with pytest.raises(RuntimeError, match="simulated crash"):
    search_prefixes(x[:60], CrashingSource(x, 40), 20, resume_dir=str(tmp_path / "ck"),
                    checkpoint_every=3, **kw)
  resumed = search_prefixes(x[:60], CrashingSource(x, 10**9), 20,
                            resume_dir=str(tmp_path / "ck"), checkpoint_every=3, **kw)
  for a, b in zip(clean, resumed):
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.scores, b.scores)
