"""Float64 certification of the kernels' float32 top-k: exact sets and exact order.

Every kernel scores in float32, each in its own summation order (XLA's dot depends on the
tile's shape, the CPU kernel runs one FMA chain per score, the fused kernels block by
block), so two kernels — or one kernel on two tilings — may order two nearly equal scores
differently. The engine's result is instead defined by real arithmetic on the values the
matmul takes (the stored values, cast to the compute dtype): the real score rounded to
float64 (`exact_scores`), then the id.

Why a bound suffices. However a dot product of d terms is summed, its float32 value s~
obeys |s~ - s| <= gamma_d * sum|q_i g_i| <= gamma_d * |q| |g|, gamma_d = d u / (1 - d u),
u = 2^-24 (Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1), plus what
flushed subnormals move (at most 2^-126 per operand or partial result). `error_bound`
takes that with the gallery's largest row norm (and, with `normalize`, the row norm's own
rounding), so one number E per query bounds every row's error.

The certificate. The engine keeps m = k + `margin(k, n, d)` candidates per query by s~; any
row it dropped scored at most the m-th s~. A row whose s~ is more than 2E above another's
truly beats it. So (`_plan`):

  * the first `EXACT_ORDER` ranks: only candidates within 2E of the 128th can be among
    them; there, neighbours closer than 2E form clusters, each rescored in float64 from its
    rows and sorted by (score descending, id ascending) — their order is then exact;
  * each requested k beyond: the candidates within 2E of the k-th on either side form a
    band, rescored and sorted — the neighbour set at k is then exact.

Elsewhere the order is the kernel's. A band that reaches the last candidate while rows
were dropped fails the certificate for its query; the engine then searches that query
again with more candidates (with all the prefix's rows kept, nothing can fail). On data
without near-ties little is rescored; exact ties (duplicate rows, integer data) always
are, and their order is then the id's.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import ml_dtypes
import numpy as np
from jax import lax

from plato_jax.knn import threads
from plato_jax.knn.sources import host_rows, take_rows

UNIT = 2.0 ** -24        # float32 unit roundoff
INPUT_UNIT = 2.0 ** -8   # a matmul that rounds its f32 inputs (bf16 passes, TF32): bf16's
FLUSH = 2.0 ** -125      # twice the smallest normal float32: what one flushed subnormal moves
EXACT_ORDER = 128        # ranks whose order is exact (float64 score, then id)
CHUNK = 2 ** 21          # candidates planned at once (bounds the temporaries)
RESCORE_BYTES = 2 ** 30  # rows gathered at once for the float64 rescoring


def _compensated(queries, rows) -> np.ndarray:
  products = queries * rows
  total = products[:, 0].copy()
  error = np.zeros_like(total)
  for column in products.T[1:]:
    t = total + column
    z = t - total
    error += (total - (t - z)) + (column - z)
    total = t
  return total + error


def exact_scores(queries, rows, row_of, which, max_row_norm: float) -> np.ndarray:
  """Dot products [M] of float64 queries [Q, d] with rows: pair i takes query `which[i]`
  (ascending) and row `rows[row_of[i]]` (rows: [R, d], float32 or narrower values, so each
  product is exact in float64). Each is the real sum rounded to float64, to within about
  1e-30 relatively, so equal real scores give equal results. `max_row_norm`: at least every
  row's norm.

  A plain float64 sum first (BLAS, query by query, each query's rows converted while in
  cache; off by at most d 2^-52 sum|q_j g_j| <= d 2^-52 |q| max|g|); a query's rows whose
  sums lie within twice that of each other are summed again with compensation (TwoSum;
  Ogita, Rump & Oishi's Sum2: as accurate as twice the precision). Rows further apart keep
  the plain sum: no rounding can reorder or equalise them."""
  fast = np.empty(which.size, np.float64)
  starts = np.flatnonzero(np.r_[True, which[1:] != which[:-1], True])
  groups = list(zip(starts[:-1], starts[1:]))

  def score(span):
    for s, e in groups[span[0]:span[1]]:
      fast[s:e] = rows[row_of[s:e]].astype(np.float64) @ queries[which[s]]

  threads.each(score, threads.spans(len(groups), -(-which.size // max(len(groups), 1))
                                    * queries.shape[1]))
  if which.size < 2:
    return fast
  bound = queries.shape[1] * 2.0**-52 * max_row_norm * np.linalg.norm(queries, axis=1)[which]
  order = np.lexsort((fast, which))
  f, w = fast[order], which[order]
  near = np.flatnonzero((w[1:] == w[:-1]) & (f[1:] - f[:-1] <= 2 * bound[order][1:]))
  if near.size:
    again = np.unique(np.concatenate([order[near], order[near + 1]]))
    fast[again] = _compensated(queries[which[again]], rows[row_of[again]].astype(np.float64))
  return fast


def margin(k: int, rows: int, dim: int) -> int:
  """Candidates kept beyond k, so that the band of scores within 2E of the k-th rarely
  holds more. For isotropic rows the scores near the k-th of `rows` have density
  phi(z) / (p sigma) per unit (p = k / rows, z its normal quantile), and 2E is about
  3 d^1.5 u sigma: the band holds k phi(z) / p * 3 d^1.5 u rows on average — 27 at
  d = 768, k = n/100 of 262k rows, but 330 at d = 4,096. Twice that plus 16 (a Poisson
  count of mean 27 passes 70 with probability ~1e-12): a query whose band outruns it is
  searched again, which costs a pass."""
  p = min(max(k / max(rows, 1), 1e-12), 0.5)
  lo, hi = 0.0, 40.0  # z with P(Z > z) = p, by bisection on erfc
  for _ in range(60):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if 0.5 * math.erfc(mid / math.sqrt(2)) > p else (lo, mid)
  density = math.exp(-lo * lo / 2) / math.sqrt(2 * math.pi) / p
  return 16 + math.ceil(2 * k * density * 3 * dim ** 1.5 * UNIT)


def error_bound(dim: int, query_norms, max_row_norm: float, min_row_norm: float, *,
                normalize: bool, rounds_inputs: bool = False, slack: float = 1.0) -> np.ndarray:
  """Per query, a bound on |s~ - s| over every gallery row: s~ the kernel's float32 score,
  s the real one (a dot product; with `normalize`, the dot product over the row's norm,
  which is what the kernels select on: the cosine times |q|).

  A sum of d float32 products in any order: gamma_d = d u / (1 - d u) times |q| |g|.
  `normalize` adds the row norm's error (its f32 squared norm, a square root, a reciprocal,
  a product: (d/2 + 4) u relative, on a score at most |q|). `rounds_inputs`: the matmul
  may round f32 inputs to bf16 (a precision below HIGHEST): 3 * 2^-8 relative per product.
  `slack` multiplies the whole (platforms whose f32 matmul is emulated, e.g. TPU passes).
  Flushed subnormals add at most 2^-125 per operand and partial sum."""
  q = np.asarray(query_norms, np.float64)
  gamma = dim * UNIT / (1 - dim * UNIT) + (3 * INPUT_UNIT if rounds_inputs else 0)
  flush = dim * FLUSH * (q + max_row_norm + 1)
  if normalize:
    bound = (gamma + (dim / 2 + 4) * UNIT) * q + flush / max(min_row_norm,
                                                             np.finfo(np.float64).tiny)
  else:
    bound = gamma * q * max_row_norm + flush
  return slack * bound


@dataclasses.dataclass
class Certified:
  """Certified candidates of some queries: `positions` [Q, keep] (gallery positions),
  `scores` f32 [Q, keep] (float64 scores rounded, where rescored), `rescored` rows scored in
  float64, `failed` [Q] bool: queries whose certificate needs more candidates."""
  positions: np.ndarray
  scores: np.ndarray
  rescored: int
  failed: np.ndarray


def certify(values, positions, bound, available, keep: int, cuts, ids,
            rescore: Callable[[np.ndarray, np.ndarray], np.ndarray], scale=None) -> Certified:
  """Exact sets at every cut in `cuts` (and `keep`), exact order in the first EXACT_ORDER.

  Args:
    values: f32 [Q, m], each row descending: the kernels' scores of the candidates (m >= keep
      unless the gallery has fewer rows); -inf after the last candidate.
    positions: int [Q, m] gallery positions of the candidates (-1 after the last).
    bound: [Q] `error_bound`.
    available: [Q] rows each query can get (the gallery's, less its own row): candidates
      fewer than that mean rows were dropped.
    keep: columns returned.
    cuts: the ks whose sets must be exact (<= keep).
    ids: the gallery's ids by position (ties go to the lower id).
    rescore: (query index [M], position [M]) -> float64 scores [M], pairs in any order;
      called once.
    scale: [Q] divisor of the kernels' scores in the result (|q| with normalize), or None.
  """
  values, positions = np.asarray(values), np.asarray(positions)
  num_q, m = values.shape
  ordered = min(EXACT_ORDER, keep)
  later = sorted(c for c in {*cuts, keep} if c > ordered)
  bound, available, ids = (np.asarray(bound, np.float64), np.asarray(available),
                           np.asarray(ids))
  spans = threads.spans(num_q, m, most=CHUNK)
  plans = threads.each(lambda ab: _plan(values[ab[0]:ab[1]], positions[ab[0]:ab[1]],
                                        bound[ab[0]:ab[1]], available[ab[0]:ab[1]],
                                        ordered, later), spans)
  # Every span's rows to rescore, in one call: the rescorer reads each gallery row once.
  which = np.concatenate([a + p.rows for (a, _), p in zip(spans, plans)])
  where = np.concatenate([positions[a + p.rows, p.cols] for (a, _), p in zip(spans, plans)])
  exact = np.asarray(rescore(which, where), np.float64) if which.size else np.zeros(0)
  pieces = np.split(exact, np.cumsum([p.rows.size for p in plans])[:-1])
  out_pos = np.empty((num_q, keep), np.int64)
  out_val = np.empty((num_q, keep), np.float64)
  failed = np.zeros(num_q, bool)

  def apply(i):
    (a, b), plan, scores = spans[i], plans[i], pieces[i]
    pos, val = positions[a:b].astype(np.int64), values[a:b].astype(np.float64)
    is_exact = np.zeros(val.shape, bool)
    if plan.rows.size:  # each run of one label sorted by (float64 score, id)
      p = pos[plan.rows, plan.cols]
      order = np.lexsort((ids[p], -scores, plan.labels, plan.rows))
      pos[plan.rows, plan.cols], val[plan.rows, plan.cols] = p[order], scores[order]
      is_exact[plan.rows, plan.cols] = True
    if scale is not None:
      val = np.where(is_exact, val, val / np.asarray(scale, np.float64)[a:b, None])
    out_pos[a:b], out_val[a:b] = pos[:, :keep], val[:, :keep]
    failed[a:b] = plan.failed

  threads.each(apply, range(len(spans)))
  rescored = which.size
  segment = np.searchsorted(np.array(later, np.int64), np.arange(keep), side="right")
  _ties_by_id(out_pos, out_val, segment, ids)
  return Certified(out_pos, out_val.astype(np.float32), rescored, failed)


@dataclasses.dataclass
class _Plan:
  """What the certificate rescores among some queries' candidates: entries (`rows`, `cols`)
  and the run each belongs to (`labels`: the runs are contiguous ranks, each to be sorted
  by float64 score, then id), and the queries it `failed`."""
  rows: np.ndarray
  cols: np.ndarray
  labels: np.ndarray
  failed: np.ndarray


def _plan(values, positions, bound, available, ordered: int, later) -> _Plan:
  """The certificate of a few queries, decided on their float32 scores alone:

  1. The first `ordered` ranks. Only the candidates with s~ >= s~[ordered-1] - 2E can be
     among them (the others are below `ordered` rows for sure). Within those, neighbours
     closer than 2E form clusters (cuts between clusters are certain); each cluster is
     rescored and sorted.
  2. Each later cut p. Candidates with s~ > s~[p] + 2E are in the top p for sure, those
     with s~ < s~[p-1] - 2E out; the band between is rescored and sorted (a band reaching
     into step 1's candidates starts at `ordered`).
  Clusters and bands that touch form one run: sorting a run of contiguous ranks by float64
  score keeps every cut certain and every order exact. A band or cluster that reaches the
  last candidate while rows were dropped fails its query."""
  num_q, m = values.shape
  v = values.astype(np.float64)
  count = (positions >= 0).sum(axis=1)
  dropped = count < available
  two_e = 2 * bound[:, None]

  edge = (v >= v[:, ordered - 1:ordered] - two_e).sum(axis=1)
  failed = dropped & (edge >= count)
  w = int(edge.max())  # the columns step 1 looks at
  close = np.zeros((num_q, w), bool)  # rank j and j - 1 are within 2E
  with np.errstate(invalid="ignore"):  # -inf - -inf past the last candidate: masked
    close[:, 1:] = (v[:, :w - 1] - v[:, 1:w] <= two_e) & (np.arange(1, w) < edge[:, None])
  member = close.copy()
  member[:, :-1] |= close[:, 1:]
  mask = member

  if later:
    los, his = [], []
    for p in later:
      after = v[:, p:p + 1] if p < m else np.full((num_q, 1), -np.inf)
      lo = (v > after + two_e).sum(axis=1)
      los.append(np.where(lo < edge, ordered, lo))
      his.append((v >= v[:, p - 1:p] - two_e).sum(axis=1))
      failed |= dropped & (his[-1] >= count)
    b = int(np.max(his))
    rank = np.arange(b)[None, :]
    band = np.zeros((num_q, b), bool)
    for lo, hi in zip(los, his):
      band |= (rank >= lo[:, None]) & (rank < hi[:, None])
    band &= rank < count[:, None]
    mask = np.zeros((num_q, max(w, b)), bool)
    mask[:, :w] = member
    mask[:, :b] |= band
  mask &= ~failed[:, None]
  rows, cols = np.nonzero(mask)  # by query, then rank
  labels = np.cumsum(~mask, axis=1)[rows, cols]
  return _Plan(rows, cols, labels, failed)


def _ties_by_id(positions, values, segment, ids) -> None:
  """Past the exactly ordered ranks, equal scores in place by id (the kernels break ties by
  position): the order there is (score descending, id ascending), and on data whose float32
  scores are exact (integers) it is the float64 order. Only runs of equal scores move, and
  never across a requested cut (`segment`: cuts at or before each rank), so no certified
  set changes."""
  if values.shape[1] <= EXACT_ORDER + 1:
    return
  tail = values[:, EXACT_ORDER:]
  seg = segment[EXACT_ORDER:]
  same = np.zeros(tail.shape, bool)  # rank j continues rank j-1's run
  same[:, 1:] = (tail[:, 1:] == tail[:, :-1]) & (seg[1:] == seg[:-1])
  member = same.copy()
  member[:, :-1] |= same[:, 1:]
  rows, ranks = np.nonzero(member)
  if not rows.size:
    return
  run = np.cumsum(~same[rows, ranks])  # members in row-major order: a run is contiguous
  pos = positions[rows, EXACT_ORDER + ranks]
  order = np.lexsort((np.asarray(ids)[pos], run))
  positions[rows, EXACT_ORDER + ranks] = pos[order]


def norm_bound(sumsq, dim: int, *, up: bool) -> float:
  """A bound on a row norm from its float32 squared norm (summed with relative error below
  (dim + 1) u): from above or from below."""
  slack = 2 * (dim + 2) * UNIT
  return float(np.sqrt(max(float(sumsq), 0.0) * ((1 + slack) if up else max(1 - slack, 0))))


def bound_slack(platform: str) -> float:
  """TPUs run f32 matmuls as bf16 passes: their error is near f32's, not within its bound."""
  return 2.0 if platform == "tpu" else 1.0


def rounds_inputs(dtype, precision) -> bool:
  """The matmul may round its f32 inputs: any precision below HIGHEST (TF32, bf16 passes)."""
  if np.dtype(dtype) != np.float32:
    return False
  parts = precision if isinstance(precision, (tuple, list)) else (precision,)
  return any(lax.Precision(p) != lax.Precision.HIGHEST for p in parts)


def _widens_exactly(stored, compute) -> bool:
  """Stored values the compute dtype holds unchanged (bf16/f16 in f32): rescored as they
  lie, with no cast."""
  stored, compute = np.dtype(stored), np.dtype(compute)
  narrow = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))
  return stored == compute or (stored in narrow and compute == np.float32)


def rescorer(source, queries, query_norms, dtype, normalize: bool, max_row_norm: float):
  """(query index, gallery position) pairs, in any order → float64 scores from the gallery's
  rows, cast to the compute dtype as the matmul takes them (cosines with `normalize`).
  `max_row_norm`: at least the norm of every row (a narrower compute dtype may round a
  row's values up by 2^-8: 1% covers it).

  Rows in host memory in the compute dtype are scored where they lie (others would need the
  whole array converted, so they are gathered). Otherwise the rows the pairs need are read
  once, in position order, by one gather (a store reads each chunk it touches once, however
  many queries want its rows); pairs whose rows exceed RESCORE_BYTES are split into groups
  of whole queries, a gather each."""
  in_memory = host_rows(source)
  if in_memory is not None and not _widens_exactly(in_memory.dtype, dtype):
    in_memory = None
  limit = max(1, RESCORE_BYTES // (source.dim * np.dtype(dtype).itemsize))

  def score(which, positions, out):
    if in_memory is not None:
      rows, row_of = in_memory, positions
    else:
      unique, row_of = np.unique(positions, return_inverse=True)
      parts = threads.each(lambda ab: take_rows(source, unique[ab[0]:ab[1]]),
                           threads.spans(unique.size, source.dim))
      rows = np.concatenate(parts) if parts else np.zeros((0, source.dim), source.dtype)
    if not _widens_exactly(rows.dtype, dtype):
      rows = rows.astype(dtype)
    mine, local = np.unique(which, return_inverse=True)
    out[:] = exact_scores(queries[mine], rows, row_of, local, 1.01 * max_row_norm)
    if normalize:
      used, back = np.unique(row_of, return_inverse=True)
      wide = rows[used].astype(np.float64)
      norms = np.sqrt(np.einsum("ij,ij->i", wide, wide))
      out /= query_norms[which] * norms[back]

  def rescore(which, positions):
    by_query = np.argsort(which, kind="stable")
    which, positions = which[by_query], np.asarray(positions)[by_query]
    out = np.empty(which.size, np.float64)
    start = 0
    for stop in [*(np.flatnonzero(which[1:] != which[:-1]) + 1), which.size]:
      if stop - start >= limit or stop == which.size:
        score(which[start:stop], positions[start:stop], out[start:stop])
        start = stop
    result = np.empty_like(out)
    result[by_query] = out
    return result

  return rescore
