"""Float64 certification of the kernels' float32 top-k: exact sets and exact order.

Every kernel scores in float32, each in its own summation order (XLA's dot depends on the
tile's shape, the CPU kernel runs one FMA chain per score, the fused kernels block by
block), so two kernels — or one kernel on two tilings — may order two nearly equal scores
differently. The engine's result is instead defined by real arithmetic on the values the
matmul takes (the stored values, cast to the compute dtype): the real score rounded to
float64 (`exact_dot_products`), then the id.

Why a bound suffices. However a dot product of d terms is summed, its float32 value s~
obeys |s~ - s| <= gamma_d * sum|q_i g_i| <= gamma_d * |q| |g|, gamma_d = d u / (1 - d u),
u = 2^-24 (Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1), plus what
flushed subnormals move (at most 2^-126 per operand or partial result). `error_bound`
takes that with the gallery's largest row norm (and, with `normalize`, the row norm's own
rounding), so one number E per query bounds every row's error.

The certificate. The engine keeps m = k + `margin(k)` candidates per query by s~; any
row it dropped scored at most the m-th s~. Between ranks p-1 and p of the candidates the
order is certain when s~[p-1] - E > s~[p] + E: every row before the cut then truly beats
every row after it (the candidates after it and the dropped rows alike; the cut after the
last candidate is certain only when nothing was dropped). Between two certain cuts lies a
cluster whose inner order is uncertain. A cluster is rescored in float64 from its rows and
sorted by (score descending, id ascending) when it straddles a cut the caller needs:

  * every requested k (the neighbour set at each k is then exact), and
  * every cut among the first `EXACT_ORDER` ranks (their order is then exact).

Elsewhere the order is the kernel's. A needed cluster that reaches the dropped rows fails
the certificate for its query; the engine then searches that query again with more
candidates (with all the prefix's rows kept, every cut is certain). On data without
near-ties nothing is rescored; exact ties (duplicate rows, integer data) are always
rescored, and their order is then the id's.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

UNIT = 2.0 ** -24        # float32 unit roundoff
INPUT_UNIT = 2.0 ** -8   # a matmul that rounds its f32 inputs (bf16 passes, TF32): bf16's
FLUSH = 2.0 ** -125      # twice the smallest normal float32: what one flushed subnormal moves
EXACT_ORDER = 128        # ranks whose order is exact (float64 score, then id)
CHUNK = 2 ** 21          # candidates certified at once (bounds the temporaries)


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


def exact_dot_products(queries, rows, which) -> np.ndarray:
  """Row-wise dot products [M] of float64 [M, d] pairs whose products are exact in float64
  (float32 or narrower values), each the real sum rounded to float64 (to within about
  1e-30 relatively, so equal real scores give equal results); `which` [M]: the query of
  each pair — only pairs of one query are compared.

  A plain float64 sum first (off by at most d 2^-52 sum|p|); pairs of one query whose sums
  lie within their bounds of each other are summed again with compensation (TwoSum; Ogita,
  Rump & Oishi's Sum2: as accurate as twice the precision). Pairs further apart keep the
  plain sum: no rounding can reorder or equalise them."""
  fast = np.einsum("ij,ij->i", queries, rows)
  if fast.size < 2:
    return fast
  bound = queries.shape[1] * 2.0**-52 * np.einsum("ij,ij->i", np.abs(queries), np.abs(rows))
  order = np.lexsort((fast, which))
  near = (which[order][1:] == which[order][:-1]) & (
      fast[order][1:] - fast[order][:-1] <= bound[order][1:] + bound[order][:-1])
  again = np.zeros(fast.size, bool)
  again[order[1:][near]] = True
  again[order[:-1][near]] = True
  if again.any():
    fast[again] = _compensated(queries[again], rows[again])
  return fast


def margin(k: int) -> int:
  """Candidates kept beyond k so that the band of uncertain scores around the k-th rarely
  reaches the dropped rows: at 15M rows, d = 768, k = 150,000 about a thousand rows of
  random data lie within 2E of the k-th score; k/64 is 2,343."""
  return max(8, -(-k // 64))


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
    rescore: (query index [M], position [M]) -> float64 scores [M].
    scale: [Q] divisor of the kernels' scores in the result (|q| with normalize), or None.
  """
  values, positions = np.asarray(values), np.asarray(positions)
  num_q, m = values.shape
  out_pos = np.array(positions[:, :keep], dtype=np.int64)
  out_val = np.array(values[:, :keep], dtype=np.float64)
  if scale is not None:
    out_val /= np.asarray(scale, np.float64)[:, None]
  failed = np.zeros(num_q, bool)
  needed = np.zeros(m + 1, bool)  # cuts p (between ranks p-1 and p) whose sides must be exact
  needed[1:min(EXACT_ORDER, keep) + 1] = True
  needed[[c for c in {*cuts, keep} if c <= m]] = True
  needed_before = np.cumsum(needed)  # needed cuts <= p
  rescored = 0
  step = max(1, CHUNK // max(m, 1))
  for a in range(0, num_q, step):
    b = min(a + step, num_q)
    c = certify_chunk(values[a:b], positions[a:b], np.asarray(bound)[a:b],
                      np.asarray(available)[a:b], needed_before, ids, rescore, a)
    if c is None:
      continue
    rows, ranks, pos, val, bad = c
    keep_mask = ranks < keep
    out_pos[a + rows[keep_mask], ranks[keep_mask]] = pos[keep_mask]
    out_val[a + rows[keep_mask], ranks[keep_mask]] = val[keep_mask]
    failed[a:b] = bad
    rescored += rows.size
  _ties_by_id(out_pos, out_val, needed_before[:keep], ids)
  return Certified(out_pos, out_val.astype(np.float32), rescored, failed)


def _ties_by_id(positions, values, segment, ids) -> None:
  """Past the exactly ordered ranks, equal scores in place by id (the kernels break ties by
  position): the order there is (score descending, id ascending), and on data whose float32
  scores are exact (integers) it is the float64 order. Sorted within segments between the
  needed cuts (`segment`: needed cuts at or before each rank), so no certified set changes."""
  if values.shape[1] <= EXACT_ORDER:
    return
  tail = values[:, EXACT_ORDER:]
  rows = np.flatnonzero((tail[:, 1:] == tail[:, :-1]).any(axis=1))
  if not rows.size:
    return
  pos = positions[rows, EXACT_ORDER:]
  seg = np.broadcast_to(segment[EXACT_ORDER:], pos.shape)
  order = np.lexsort((np.asarray(ids)[pos], -tail[rows], seg), axis=-1)
  positions[rows, EXACT_ORDER:] = np.take_along_axis(pos, order, axis=1)
  values[rows, EXACT_ORDER:] = np.take_along_axis(tail[rows], order, axis=1)


def certify_chunk(values, positions, bound, available, needed_before, ids, rescore,
                  first_query):
  """`certify` on a few queries: (query, rank, position, score) of the rescored ranks in
  their exact order, and the failed queries; None when nothing needs rescoring."""
  num_q, m = values.shape
  v = values.astype(np.float64)
  count = (positions >= 0).sum(axis=1)
  dropped = count < available
  cut = np.arange(m + 1)
  certain = np.ones((num_q, m + 1), bool)
  with np.errstate(invalid="ignore"):  # -inf - -inf past the candidates: masked below
    certain[:, 1:m] = v[:, :-1] - v[:, 1:] > 2 * bound[:, None]
  certain[cut[None, :] > count[:, None]] = True
  certain[np.arange(num_q), count] = ~dropped
  # Each rank's cluster [lo, hi): the last certain cut at or before it, the first after it.
  lo = np.maximum.accumulate(np.where(certain, cut, -1), axis=1)[:, :m]
  hi = np.minimum.accumulate(np.where(certain, cut, m + 1)[:, ::-1], axis=1)[:, ::-1][:, 1:]
  inside = needed_before[np.minimum(hi - 1, m)] - needed_before[lo]  # needed cuts in (lo, hi)
  redo = (inside > 0) & (cut[None, :m] < count[:, None])
  failed = (redo & (hi > count[:, None])).any(axis=1)
  redo &= ~failed[:, None]
  if not redo.any():
    return None if not failed.any() else (np.zeros(0, np.int64),) * 2 + (
        np.zeros(0, np.int64), np.zeros(0), failed)
  rows, ranks = np.nonzero(redo)  # by query, then rank
  pos = positions[rows, ranks].astype(np.int64)
  exact = np.asarray(rescore(first_query + rows, pos), np.float64)
  order = np.lexsort((np.asarray(ids)[pos], -exact, lo[rows, ranks], rows))
  return rows, ranks, pos[order], exact[order], failed
