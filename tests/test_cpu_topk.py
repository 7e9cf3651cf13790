"""plato_jax.kernels.cpu_topk (the C++ fused matmul + selection for CPU devices) against its numpy
reference, one tile and a stream of tiles, on the cases the engine's tiles produce."""
import jax
import ml_dtypes
import numpy as np
import pytest

from plato_jax.kernels import cpu_topk
from plato_jax.kernels.primitives import top_by_score_then_id

pytestmark = pytest.mark.skipif(cpu_topk.unavailable_reason() is not None,
                                reason=f"CPU kernel unavailable: {cpu_topk.unavailable_reason()}")
# Every instruction set the kernel has; those this CPU lacks are skipped, not passed.
ISAS = [pytest.param(isa, marks=pytest.mark.skipif(
    isa not in cpu_topk.available_isas(), reason=f"this CPU has no {isa}"))
    for isa in cpu_topk.ISAS]


def fold(tiles, queries, query_ids, k, **kw):
  """Streams (rows, ids) tiles through the kernel; returns its sorted top-k. Rows are
  [T, D], or (flat buffer, offset) windows."""
  update = jax.jit(lambda pools, q, qid, rows, offset, ids: cpu_topk.cpu_update(
      pools, q, qid, rows, ids, k=k, row_offset=offset, **kw)[0])
  pools = cpu_topk.empty_pools(len(queries), k)
  for rows, ids in tiles:
    rows, offset = rows if isinstance(rows, tuple) else (rows, 0)
    pools = update(pools, queries, query_ids, rows, offset, ids)
  return tuple(np.asarray(x) for x in top_by_score_then_id(pools[0], pools[1], k))


def reference(tiles, queries, query_ids, k, normalize=False, bf16_inputs=False):
  v = np.full((len(queries), k), -np.inf, np.float32)
  i = np.full((len(queries), k), -1, np.int32)
  for rows, ids in tiles:
    v, i = cpu_topk.reference_update(v, i, queries, query_ids, rows, ids, k, normalize,
                                     bf16_inputs)
  return v, i


def integer_tile(rng, t, d, first_id, pad=0):
  rows = rng.integers(-3, 4, (t, d)).astype(np.float32)
  ids = np.arange(first_id, first_id + t, dtype=np.int32)
  ids[t - pad:] = -1
  return rows, ids


@pytest.mark.parametrize("q,t,d,k,block_cols,threads,normalize,blocking", [
    (37, 1000, 24, 7, 128, 2, False, {}),   # q not a multiple of 6, t not of 16
    (37, 1000, 24, 7, 128, 2, True, {}),    # cosine: columns scaled by the rows' inverse norms
    (6, 64, 16, 1, 64, 1, False, {}),       # k = 1
    (50, 700, 33, 300, 64, 3, True, {}),    # k past the first compactions (capacity 556)
    (13, 40, 5, 60, 16, 4, False, {}),      # k larger than a tile: filler comes back
    # features in chunks (the last one short) and query panels in groups (the last one short)
    (50, 700, 33, 300, 64, 2, True, dict(group_panels=2, depth_chunk=8)),
    (37, 1000, 41, 7, 128, 1, False, dict(group_panels=4, depth_chunk=16)),
    # ids falling along the stream: a score equal to the threshold's value now ranks
    # before it (ties go to the smaller id), which ascending ids never exercise
    (37, 1000, 24, 40, 128, 2, False, dict(descending_ids=True)),
    (50, 700, 33, 300, 64, 2, True, dict(descending_ids=True, depth_chunk=8)),
])
def test_stream_of_integer_tiles_equals_reference(rng, q, t, d, k, block_cols, threads,
                                                  normalize, blocking):
  """Integer rows: every raw score and squared norm is exact, so ties are exact and ids
  must match exactly."""
  blocking = dict(blocking)
  descending = blocking.pop("descending_ids", False)
  tiles = []
  for n in range(3):
    rows, ids = integer_tile(rng, t, d, n * t, pad=11 if n == 2 else 0)
    if descending:
      ids = np.where(ids < 0, ids, 3 * t - 1 - ids)
    rows[3] = rows[t // 2]  # duplicate rows: ties decided by id
    rows[5] = 0             # a zero row: scale 0 under normalize
    tiles.append((rows, ids))
  queries = rng.integers(-3, 4, (q, d)).astype(np.float32)
  query_ids = np.full(q, -2, np.int32)
  query_ids[::4] = rng.integers(0, 3 * t, len(query_ids[::4]))  # self-exclusion by id
  got = fold(tiles, queries, query_ids, k, block_cols=block_cols, threads=threads,
             normalize=normalize, **blocking)
  want = reference(tiles, queries, query_ids, k, normalize)
  np.testing.assert_array_equal(got[1], want[1])
  np.testing.assert_array_equal(got[0], want[0])


@pytest.mark.parametrize("k", [5, 300])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("outlier", [False, True])
def test_ties_across_compactions_keep_the_smallest_ids(rng, k, isa, outlier):
  """Many equal scores, ids in random order: every compaction splits a run of ties at the
  k-th value, and must keep the smallest ids (and make the largest kept one the
  threshold), or the final top-k differs. outlier: one score of 1e30 stretches the
  compaction's histogram so that all the others share its lowest bin."""
  t, d = 1500, 8
  rows = np.zeros((t, d), np.float32)
  rows[:, 0] = rng.choice([1.0, 2.0], t, p=[0.2, 0.8])  # scores 1 or 2: long runs of ties
  rows[rng.choice(t, 3, replace=False), 0] = 3.0
  if outlier:
    rows[rng.integers(t), 0] = 1e30
  ids = rng.permutation(10 * t)[:t].astype(np.int32)
  tiles = [(rows[:700], ids[:700]), (rows[700:], ids[700:])]
  queries = np.zeros((7, d), np.float32)
  queries[:, 0] = 1
  query_ids = np.full(7, -2, np.int32)
  got = fold(tiles, queries, query_ids, k, isa=isa)
  want = reference(tiles, queries, query_ids, k)
  np.testing.assert_array_equal(got[1], want[1])
  np.testing.assert_array_equal(got[0], want[0])


@pytest.mark.parametrize("offset", [0, 5, 15])
def test_rows_read_from_a_window_at_an_offset(rng, offset):
  """Rows inside a longer flat buffer, at any offset (what the engine passes for unaligned
  host rows), give what the rows alone give, and their squared norms come back."""
  t, d, k = 100, 24, 9
  rows, ids = integer_tile(rng, t, d, 0, pad=3)
  window = rng.integers(-3, 4, t * d + 16).astype(np.float32)  # neighbours: not rows
  window[offset:offset + t * d] = rows.reshape(-1)
  queries = rng.integers(-3, 4, (14, d)).astype(np.float32)
  query_ids = np.full(14, -2, np.int32)
  alone = fold([(rows, ids)], queries, query_ids, k)
  for threads in (1, 2):
    got = fold([((window, offset), ids)], queries, query_ids, k, threads=threads)
    np.testing.assert_array_equal(got[1], alone[1])
    np.testing.assert_array_equal(got[0], alone[0])
  _, sumsq = jax.jit(lambda *a: cpu_topk.cpu_update(*a, k=k, row_offset=offset))(
      cpu_topk.empty_pools(14, k), queries, query_ids, window, ids)
  # trailing padding is skipped: its norms read 0
  want_sumsq = np.where(ids >= 0, np.square(rows).sum(1), 0)
  np.testing.assert_array_equal(np.asarray(sumsq), want_sumsq)
  no_queries = jax.jit(lambda *a: cpu_topk.cpu_update(*a, k=k, row_offset=offset)[1])(
      cpu_topk.empty_pools(0, k), queries[:0], query_ids[:0], window, ids)
  np.testing.assert_array_equal(np.asarray(no_queries), want_sumsq)


def test_a_window_too_short_for_its_rows_is_an_error(rng):
  rows = np.zeros(10 * 8 + 3, np.float32)
  update = jax.jit(lambda *a: cpu_topk.cpu_update(*a, k=2, row_offset=4))
  with pytest.raises(Exception, match="overrun"):
    jax.block_until_ready(update(cpu_topk.empty_pools(3, 2), np.zeros((3, 8), np.float32),
                                 np.full(3, -2, np.int32), rows, np.arange(10, dtype=np.int32)))


def test_float_scores_are_position_invariant_and_every_isa_agrees(rng):
  """Each score is one FMA chain: the same number wherever its row sits in the tile, with
  any block size, thread count or feature chunking (partial sums stored and reloaded), on
  every instruction set this CPU has (AVX-512's strip pairs, odd strips and partial strips
  included)."""
  t, d, k = 500, 77, 20
  rows = rng.standard_normal((t, d)).astype(np.float32)
  queries = rng.standard_normal((31, d)).astype(np.float32)
  no_ids = np.full(31, -2, np.int32)
  ids = np.arange(t, dtype=np.int32)
  base = fold([(rows, ids)], queries, no_ids, k, block_cols=128, threads=2)
  perm = rng.permutation(t)
  for kw in [dict(block_cols=16, threads=1), dict(block_cols=512, threads=5),
             dict(block_cols=48, threads=2, group_panels=1, depth_chunk=10),
             *[dict(block_cols=b, threads=2, group_panels=3, depth_chunk=32, isa=isa)
               for isa in cpu_topk.available_isas() for b in (48, 64, 80)]]:
    moved = fold([(rows[perm], ids[perm])], queries, no_ids, k, **kw)
    np.testing.assert_array_equal(moved[1], base[1])
    np.testing.assert_array_equal(moved[0], base[0])
  exact = queries.astype(np.float64) @ rows.astype(np.float64).T
  np.testing.assert_allclose(base[0], np.take_along_axis(exact, base[1], 1), atol=1e-4)


@pytest.mark.parametrize("isa", ISAS)
def test_negative_zero_nan_and_overflow_handling(isa):
  d = 8
  queries = np.zeros((2, d), np.float32)
  queries[:, 0] = [1, -1]
  rows = np.zeros((40, d), np.float32)
  rows[:, 0] = np.linspace(-1, 1, 40).astype(np.float32)
  rows[:, 1] = 1
  rows[7, 0] = -1e20  # squared norm overflows: scale 0, so a negative score becomes -0.0,
  ids = np.arange(40, dtype=np.int32)  # which must rank (and come back) as +0.0
  rows[[20, 39], 2] = np.nan  # a NaN score is never selected (a full strip and a partial one)
  got = fold([(rows, ids)], queries, np.full(2, -2, np.int32), 40 - 2, normalize=True,
             isa=isa)
  want = reference([(rows, ids)], queries, np.full(2, -2, np.int32), 40 - 2, normalize=True)
  np.testing.assert_array_equal(got[1], want[1])
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)  # norms summed in another order
  assert 7 in got[1][0] and not np.signbit(got[0][got[1] == 7]).any()
  assert 20 not in got[1] and 39 not in got[1]
  _, sumsq = jax.jit(lambda *a: cpu_topk.cpu_update(*a, k=3, normalize=True))(
      cpu_topk.empty_pools(2, 3), queries, np.full(2, -2, np.int32), rows, ids)
  sumsq = np.asarray(sumsq)
  assert np.isinf(sumsq[7]) and np.isnan(sumsq[[20, 39]]).all()
  assert np.isfinite(np.delete(sumsq, [7, 20, 39])).all()


@pytest.mark.parametrize("k", [5, 300])
@pytest.mark.parametrize("isa", ISAS)
def test_infinite_scores_and_ranges_past_f32(rng, k, isa):
  """Scores of +inf (ties among them decided by id), and finite scores whose range overflows
  f32 (the compaction's histogram cannot bin either), through several compactions."""
  t, d = 1200, 4
  rows = np.zeros((t, d), np.float32)
  rows[:, 0] = rng.choice(np.float32([-3e38, -1, 0, 1, 3e38]), t)
  rows[:, 1] = rng.integers(-3, 4, t)
  rows[:, 2] = rng.choice(np.float32([0, 3e38]), t, p=[0.8, 0.2])
  ids = rng.permutation(10 * t)[:t].astype(np.int32)
  tiles = [(rows[:500], ids[:500]), (rows[500:], ids[500:])]
  queries = np.float32([[1, 1, 0, 0],     # finite scores from -3e38 to 3e38
                        [1, 0, 10, 0],    # + inf wherever rows[:, 2] = 3e38
                        [1, -1, 0, 0]])
  query_ids = np.full(3, -2, np.int32)
  got = fold(tiles, queries, query_ids, k, isa=isa)
  with np.errstate(over="ignore"):
    want = reference(tiles, queries, query_ids, k)
  assert np.isfinite(want[0][0]).all() and np.isposinf(want[0][1, :5]).all()  # tied infs
  np.testing.assert_array_equal(got[1], want[1])
  np.testing.assert_array_equal(got[0], want[0])


def test_a_missing_compiler_is_a_clear_error(monkeypatch, tmp_path):
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  monkeypatch.setenv("PLATO_JAX_CACHE", str(tmp_path / "cache"))
  with pytest.raises(cpu_topk.Unavailable, match="no-such-compiler"):
    cpu_topk._build()


def test_a_damaged_cached_build_is_rebuilt(tmp_path, monkeypatch):
  """A truncated or foreign handler in the cache (a killed build, a disk error) is not
  loaded (it would SIGBUS the process): its digest does not match, so it is built again."""
  if cpu_topk.unavailable_reason() is not None:
    pytest.skip(cpu_topk.unavailable_reason())
  monkeypatch.setenv("PLATO_JAX_CACHE", str(tmp_path))
  built = cpu_topk._build()
  good = built.read_bytes()
  built.write_bytes(good[:len(good) // 3])
  again = cpu_topk._build()
  import hashlib
  digest = again.with_name(again.name + ".sha256").read_text().strip()
  assert again == built and len(again.read_bytes()) == len(good)
  assert hashlib.sha256(again.read_bytes()).hexdigest() == digest


def test_the_instruction_set_is_chosen_by_the_cpu_or_forced(monkeypatch):
  monkeypatch.delenv(cpu_topk.ISA_ENV, raising=False)
  assert cpu_topk.default_isa() == cpu_topk.available_isas()[-1]
  monkeypatch.setenv(cpu_topk.ISA_ENV, "portable")
  assert cpu_topk.default_isa() == "portable"
  monkeypatch.setenv(cpu_topk.ISA_ENV, "sse9")
  with pytest.raises(ValueError, match=r"PLATO_CPU_ISA='sse9': not one of"):
    cpu_topk.default_isa()
  missing = [isa for isa in cpu_topk.ISAS if isa not in cpu_topk.available_isas()]
  if missing:
    monkeypatch.setenv(cpu_topk.ISA_ENV, missing[0])
    with pytest.raises(ValueError, match="this CPU has only"):
      cpu_topk.default_isa()


ROW_DTYPES = [np.float32, ml_dtypes.bfloat16, np.float16]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("row_dtype", ROW_DTYPES)
@pytest.mark.parametrize("normalize", [False, True])
def test_bf16_inputs_equal_the_rounded_reference(rng, isa, row_dtype, normalize):
  """bf16_inputs: queries and rows rounded to bf16 (to nearest even, as numpy), from f32, bf16
  or f16 rows, on every instruction set (AMX tiles on "amx"). Integers below 2^10 — most
  change when rounded to bf16's 8 bits, none in f16 — with 12 features: every product and
  sum is exact in f32 whatever the order, so scores, ties and norms must match exactly.
  Duplicate and zero rows, padding, self-exclusion, compactions (k = 300), tiles of 700
  rows (no whole number of AMX's 32-row blocks) and 37 queries (nor of its 32 queries)."""
  t, d, k = 700, 12, 300 if normalize else 7
  tiles = []
  for n in range(3):
    rows = rng.integers(-1023, 1024, (t, d)).astype(np.float32)
    rows[3], rows[5] = rows[t // 2], 0
    ids = np.arange(n * t, (n + 1) * t, dtype=np.int32)
    if n == 2:
      ids[t - 11:] = -1
    tiles.append((rows, ids))
  queries = rng.integers(-1023, 1024, (37, d)).astype(np.float32)
  query_ids = np.full(37, -2, np.int32)
  query_ids[::4] = rng.integers(0, 3 * t, len(query_ids[::4]))
  got = fold([(r.astype(row_dtype), i) for r, i in tiles], queries, query_ids, k,
             normalize=normalize, bf16_inputs=True, isa=isa, block_cols=64, threads=2)
  want = reference(tiles, queries, query_ids, k, normalize, bf16_inputs=True)
  assert not np.array_equal(tiles[0][0].astype(ml_dtypes.bfloat16).astype(np.float32),
                            tiles[0][0])  # the rounding matters
  np.testing.assert_array_equal(got[1], want[1])
  np.testing.assert_array_equal(got[0], want[0])
  _, sumsq = jax.jit(lambda *a: cpu_topk.cpu_update(*a, k=3, bf16_inputs=True, isa=isa))(
      cpu_topk.empty_pools(2, 3), queries[:2], query_ids[:2], tiles[0][0].astype(row_dtype),
      tiles[0][1])
  rounded = tiles[0][0].astype(ml_dtypes.bfloat16).astype(np.float64)
  np.testing.assert_array_equal(np.asarray(sumsq), np.square(rounded).sum(1).astype(np.float32))


@pytest.mark.parametrize("isa", ISAS)
def test_rounding_to_bf16_is_numpys(isa):
  """Halfway cases (ties to even, both ways), carries into the exponent, the largest finite
  values (some round to inf: a bad row's overflow), negative values, and values already bf16:
  the rows' rounded values come back as the scores of a query of ones on one feature."""
  bits = np.array([0x3f808000, 0x3f818000, 0x3f80c000, 0x3f807fff, 0x3fff8000, 0x7f7f7fff,
                   0x7f7f8000, 0x7f7fffff, 0xbf808000, 0xbf818000, 0x3f800000, 0x00800000,
                   0x4b7fffff, 0x3effffff], np.uint32)
  values = bits.view(np.float32)
  rows = np.zeros((len(values), 16), np.float32)
  rows[:, 0] = values
  ids = np.arange(len(values), dtype=np.int32)
  queries = np.zeros((1, 16), np.float32)
  queries[0, 0] = 1
  got_v, got_i = fold([(rows, ids)], queries, np.full(1, -2, np.int32), len(values),
                      bf16_inputs=True, isa=isa)
  rounded = values.astype(ml_dtypes.bfloat16).astype(np.float32)
  np.testing.assert_array_equal(got_v[0], rounded[got_i[0]])
  assert np.isinf(rounded).sum() == 2  # 0x7f7f8000 and 0x7f7fffff round to inf


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("row_dtype", [ml_dtypes.bfloat16, np.float16])
def test_narrow_rows_are_widened_exactly_in_the_kernel(rng, isa, row_dtype):
  """bf16 and f16 rows read as they are (not widened on the host) give the bits of the same
  rows widened to f32, on random floats — f16's subnormals, infinities and NaN included
  (the NaN row is never selected, the inf rows always are)."""
  t, d, k = 300, 40, 25
  rows = rng.standard_normal((t, d)).astype(row_dtype)
  if row_dtype == np.float16:
    rows[10, :3] = np.float16(3e-6)   # subnormal in f16
    rows[11, 0] = np.inf
    rows[12, 1] = np.nan
  queries = rng.standard_normal((9, d)).astype(np.float32)
  queries[:, :2] = np.abs(queries[:, :2])  # inf times a positive value: +inf
  ids = np.arange(t, dtype=np.int32)
  no_ids = np.full(9, -2, np.int32)
  with np.errstate(invalid="ignore"):
    want = fold([(rows.astype(np.float32), ids)], queries, no_ids, k, isa=isa)
    got = fold([(rows, ids)], queries, no_ids, k, isa=isa)
  np.testing.assert_array_equal(got[1], want[1])
  np.testing.assert_array_equal(got[0], want[0])
  if row_dtype == np.float16:
    assert (got[1][:, 0] == 11).all() and 12 not in got[1]


@pytest.mark.skipif("amx" not in cpu_topk.available_isas(), reason="this CPU has no AMX-BF16")
def test_amx_scores_are_position_invariant_and_near_the_fma_path(rng):
  """On AMX tiles each score is added in the tiles' order, the same wherever its row sits
  (block size, threads, tile position): permuted rows give the same bits, and duplicate rows
  tie exactly. Against the FMA path (another order) the scores differ by rounding only."""
  t, d, k = 900, 100, 30
  rows = rng.standard_normal((t, d)).astype(ml_dtypes.bfloat16)
  rows[700] = rows[3]
  queries = rng.standard_normal((40, d)).astype(ml_dtypes.bfloat16).astype(np.float32)
  queries[7] = rows[3].astype(np.float32)  # rows 3 and 700 are query 7's two best
  no_ids = np.full(40, -2, np.int32)
  ids = np.arange(t, dtype=np.int32)
  base = fold([(rows, ids)], queries, no_ids, k, bf16_inputs=True, isa="amx", block_cols=128)
  assert list(base[1][7, :2]) == [3, 700] and base[0][7, 0] == base[0][7, 1]
  perm = rng.permutation(t)
  for kw in [dict(block_cols=32, threads=1), dict(block_cols=512, threads=3)]:
    moved = fold([(rows[perm], ids[perm])], queries, no_ids, k, bf16_inputs=True, isa="amx",
                 **kw)
    np.testing.assert_array_equal(moved[1], base[1])
    np.testing.assert_array_equal(moved[0], base[0])
  exact = queries.astype(np.float64) @ rows.astype(np.float64).T
  np.testing.assert_allclose(base[0], np.take_along_axis(exact, base[1], 1), atol=1e-3)
  fma = fold([(rows, ids)], queries, no_ids, k, bf16_inputs=True, isa="avx512")
  np.testing.assert_allclose(base[0], fma[0], atol=1e-3)
