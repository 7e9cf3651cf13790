"""The alignment metrics of the Platonic Representation Hypothesis, exact and without N×N.

Same names and arguments as platonic-rep's `AlignmentMetrics` (metrics.py, unchanged since the
paper): `mutual_knn`, `cycle_knn`, `lcs_knn`, `edit_distance_knn`, `cka`, `unbiased_cka`,
`cknna`, `svcca`, `SUPPORTED_METRICS` and `measure(name, ...)`, plus the pipeline around them:
`prepare_features` (95th-percentile clamp + row L2 norm) and `compute_score` (the best layer
pair). Beyond both papers, for neighbour lists found at scale (defined in each docstring):
`mutual_knn_per_query`, `chance_corrected` ((m - c)/(1 - c), c = k/(n-1)),
`rank_biased_overlap` (Webber et al.'s RBO of the two rankings), `lift_area` (the mean of
m_NN/chance over log(k/n): a k sweep as one number that compares gallery sizes),
`bootstrap_interval`, `with_interval` and `paired_bootstrap`. The semantics are those of
platonic-rep's `metrics.py`: similarities are raw dot products
(nothing is normalised or centred inside a metric), self is never its own neighbour,
mutual_knn is divided by k, lcs_knn is not, edit_distance_knn = 1 - mean Lev / k, the `+1e-6`
in every CKA-style denominator, cknna's directed joint mask with the unbiased HSIC of M∘K and
M∘L, and svcca's standardisation (centre, divide by std(ddof=1) + 1e-8).

Inputs are numpy or jax arrays [N, D] in float16, bfloat16 (ml_dtypes), float32 or float64;
half precisions are upcast to float32. Every metric returns a Python float.

How the work scales (nothing is N×N once N is large; N = 100,000 fits in a few GB):
* kNN lists come from `plato_jax.knn.search` (exact, tiled, float32 dot products), once per
  layer. mutual_knn counts shared neighbours with one jitted reduction over all layer pairs;
  cycle_knn gathers k×k lists in row blocks; the LCS and Levenshtein DPs loop over the k×k DP
  cells with every row of the batch in one numpy vector.
* cknna needs only the neighbour lists and their scores (the search's float32 dot products
  serve as K_ij): M∘K is nonzero only where j is in both top-k lists of i, so its trace, row
  and column sums are O(N·k).
* Linear CKA and unbiased CKA use centred features (HSIC, biased or unbiased, is unchanged by
  centring the features, and centring removes the huge cancelling terms): the only pair
  quantity is tr(KL) = ||AᵀB||_F², from a D_a×D_b Gram accumulated over row blocks, from
  cached N×N kernels when N <= 2048 and D is large, or from kernel row blocks when both are
  large. The rest are the kernels' diagonals (squared row norms). All of it is float64.
* RBF CKA streams kernel row blocks (float64) and keeps sums, row sums and diagonals.
* svcca takes the leading left singular vectors from the eigendecomposition of the smaller
  Gram matrix (float64).

Deliberate differences from the reference:
* Ties are broken deterministically by (similarity descending, index ascending). The
  reference's `argsort`/`topk` order of equal similarities is undefined.
* Neighbours are ranked by float32 dot products whatever the input dtype (the reference ranks
  in the input dtype: float32 in `measure_alignment.py`, bfloat16 in `platonic.Alignment`).
  HSIC, CKA and SVCCA arithmetic is float64 (the reference: input dtype).
* svcca is deterministic: exact singular vectors (not `torch.svd_lowrank`), no 1e-10 jitter,
  and the CCA in closed form: the canonical correlations of two orthonormal bases are the
  singular values of U_Aᵀ U_B, and the score is their mean. The reference's sklearn CCA
  (iterative, scale=True) followed by np.corrcoef of each pair of transformed components
  estimates the same numbers; its seeds spread by ~1e-2. Our values lie in [0, 1].
* cknna(distance_agnostic=True) works; the reference crashes (`.item()` of an N×N matrix). It
  is the paper's Eq. 19 idea (kernel values replaced by 1 inside the mask) kept inside the
  code's estimator: sim(K, L) = HSIC(M, M) with M = M_K∘M_L, sim(K, K) = HSIC(M_K, M_K), with
  the unbiased or biased HSIC as `unbiased` says, and the same `+1e-6` ratio. (The uncentred
  Eq. 19 sum would be mutual_knn again.)
* cknna with topk None raises ValueError (the reference raises TypeError); topk < 2 raises
  ValueError as in the reference.
* topk >= N raises ValueError (the reference then returns self as the last neighbour).
* Zero-norm rows raise ValueError when normalising (F.normalize would return a zero row).
* lcs_knn and svcca return Python floats (the reference: a torch tensor, numpy.float64).
* compute_score returns `LayerPairScore(score, indices, table)`; with `concat=True` the
  concatenation of all layers is the paper-era candidate -1 (`flatten(1, 2)`, normalised as a
  whole), stored as the LAST row/column of the table so that `table[-1]` is it, and visited
  FIRST in the row-major search order (i, j over [-1, 0, ..., L-1]) as the paper-era loops
  do; that order matters only for ties. The best starts at 0.0 with a strict `>`, so if every
  score is <= 0 the result is (0.0, None).
* prepare_features returns a float32 numpy array (the reference: a CUDA tensor), normalises
  by default (`normalize=True`, what compute_score would do next) and defaults to the exact
  threshold (`platonic.Alignment`; `measure_alignment.py` defaults to exact=False).
"""
from __future__ import annotations

import functools
import math
import warnings
from numbers import Integral, Real
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax

from plato_jax.knn import search

SUPPORTED_METRICS = [
    "cycle_knn",
    "mutual_knn",
    "lcs_knn",
    "cka",
    "unbiased_cka",
    "cknna",
    "svcca",
    "edit_distance_knn",
]

_FLOAT_DTYPES = {np.dtype(t) for t in (np.float16, ml_dtypes.bfloat16, np.float32, np.float64)}
_ROWS_SHOWN = 10
_KERNEL_MAX_ROWS = 2048      # N×N float64 kernels are cached only up to this N (32 MB each)
_GRAM_MAX_ELEMENTS = 2**26   # a D_a×D_b Gram above this: kernel row blocks instead
_BLOCK_ELEMENTS = 2**22      # one [rows, N] kernel block, float64: 32 MB
_CKA_EPS = 1e-6              # the reference's denominator epsilon (not scale-free; kept on purpose)
_STD_EPS = 1e-8              # svcca's standardisation epsilon
_NORM_EPS = 1e-12            # F.normalize's epsilon


# ---------------------------------------------------------------------------------------------
# The metrics


def measure(metric, *args, **kwargs):
  """`metric(*args, **kwargs)` for a name in SUPPORTED_METRICS."""
  if metric not in SUPPORTED_METRICS:
    raise ValueError(f"Unrecognized metric: {metric!r}; supported: {SUPPORTED_METRICS}")
  return globals()[metric](*args, **kwargs)


def mutual_knn(feats_A, feats_B, topk):
  """Mean over rows of |N_A(i) ∩ N_B(i)| / k."""
  a, b = _paired_rows(feats_A, feats_B)
  k = _check_topk(topk, len(a))
  return float(_mutual_knn_table([_neighbours(a, k)], [_neighbours(b, k)])[0, 0])


def mutual_knn_per_row(feats_A, feats_B, topk) -> np.ndarray:
  """|N_A(i) ∩ N_B(i)| / k for each row i (float64 [N]): what `mutual_knn` averages, and what
  its bootstrap interval (`with_interval`) resamples."""
  a, b = _paired_rows(feats_A, feats_B)
  k = _check_topk(topk, len(a))
  return mutual_knn_per_query(_neighbours(a, k).ids, _neighbours(b, k).ids)


def cycle_knn(feats_A, feats_B, topk):
  """Fraction of rows i found among the A-neighbours of i's B-neighbours (not symmetric)."""
  a, b = _paired_rows(feats_A, feats_B)
  k = _check_topk(topk, len(a))
  return _cycle_knn(_neighbours(a, k), _neighbours(b, k))


def lcs_knn(feats_A, feats_B, topk):
  """Mean over rows of the LCS length of the two ordered top-k lists (in [0, k], not ÷k)."""
  a, b = _paired_rows(feats_A, feats_B)
  k = _check_topk(topk, len(a))
  return _lcs_knn(_neighbours(a, k), _neighbours(b, k))


def edit_distance_knn(feats_A, feats_B, topk):
  """1 - mean over rows of Levenshtein(ordered top-k lists) / k."""
  a, b = _paired_rows(feats_A, feats_B)
  k = _check_topk(topk, len(a))
  return _edit_distance_knn(_neighbours(a, k), _neighbours(b, k))


def cka(feats_A, feats_B, kernel_metric="ip", rbf_sigma=1.0, unbiased=False):
  """HSIC(K, L) / (sqrt(HSIC(K, K) HSIC(L, L)) + 1e-6); linear ('ip') or RBF kernels."""
  a, b = _paired_rows(feats_A, feats_B)
  if unbiased:
    _check_unbiased_rows(len(a))
  if kernel_metric == "ip":
    return _linear_cka(_LinearKernel(a), _LinearKernel(b), unbiased)
  if kernel_metric == "rbf":
    if not isinstance(rbf_sigma, Real) or not rbf_sigma > 0:
      raise ValueError(f"rbf_sigma must be a positive number, got {rbf_sigma!r}")
    return _rbf_cka(a, b, float(rbf_sigma), unbiased)
  raise ValueError(f"Invalid kernel metric {kernel_metric!r}; use 'ip' or 'rbf'")


def unbiased_cka(*args, **kwargs):
  """cka(..., unbiased=True)."""
  kwargs["unbiased"] = True
  return cka(*args, **kwargs)


def cknna(feats_A, feats_B, topk=None, distance_agnostic=False, unbiased=True):
  """CKA restricted to mutual neighbours: HSIC of M∘K and M∘L, M = M_K∘M_L (directed)."""
  a, b = _paired_rows(feats_A, feats_B)
  k = _check_cknna_topk(topk, len(a), unbiased)
  layer_a = _knn_kernel(a, k, distance_agnostic, unbiased)
  layer_b = _knn_kernel(b, k, distance_agnostic, unbiased)
  return _cknna(layer_a, layer_b)


def svcca(feats_A, feats_B, cca_dim=10):
  """Mean canonical correlation of the top-cca_dim left singular subspaces (standardised)."""
  a, b = _paired_rows(feats_A, feats_B)
  return _mean_canonical_correlation(_svcca_basis(a, cca_dim, "feats_A"),
                                     _svcca_basis(b, cca_dim, "feats_B"))


# ---------------------------------------------------------------------------------------------
# The pipeline: outlier clamp + normalisation, and the layer-pair search


class LayerPairScore(NamedTuple):
  """The best layer pair: `score`, `indices` (i, j) or None, and the whole `table`."""
  score: float
  indices: tuple[int, int] | None
  table: np.ndarray


def prepare_features(feats, q=0.95, exact=True, normalize=True):
  """Clamp to ±(q-quantile of |feats|) over the whole tensor of one model, then row-L2-normalise.

  `feats` is [N, L, D] or [N, D] (one threshold for all layers together), or a list of
  [N, D_l] layers, each clamped on its own (as the 2025 reference does for lists).
  exact=True: t = sort(|x|.ravel())[int(q·numel)]. exact=False: t = the mean over samples of
  each sample's linearly interpolated q-quantile of |x_i| (torch.quantile). q == 1: no clamp.
  normalize: x / max(||x||, 1e-12) over the last axis, per layer. Returns float32 numpy.
  """
  if isinstance(feats, (list, tuple)):
    return [_prepare(f, q, exact, normalize, f"feats[{l}]") for l, f in enumerate(feats)]
  return _prepare(feats, q, exact, normalize, "feats")


def compute_score(feats_A, feats_B, metric="mutual_knn", topk=10, normalize=True, concat=False):
  """Max of `metric` over all (layer of A, layer of B) pairs, as the reference's compute_score.

  feats_A, feats_B: [N, L, D] arrays or lists of [N, D_l] layers. Each layer is L2-normalised
  (normalize=True) and summarised once (kNN lists, kernels, bases), then every pair scored.
  `topk` reaches only metrics whose name contains 'knn' (cknna included, as in the reference).
  concat=True adds the paper-era candidate -1: all layers side by side, normalised as a whole.
  """
  if metric not in SUPPORTED_METRICS:
    raise ValueError(f"Unrecognized metric: {metric!r}; supported: {SUPPORTED_METRICS}")
  layers_a = _layers(feats_A, "feats_A", normalize, concat)
  layers_b = _layers(feats_B, "feats_B", normalize, concat)
  if len(layers_a[0]) != len(layers_b[0]):
    raise ValueError(f"feats_A has {len(layers_a[0])} rows but feats_B has {len(layers_b[0])}; "
                     "row i of both must describe the same sample")
  table = score_table(metric, layers_a, layers_b, topk)

  def visit_order(num_layers):
    # The concatenation (stored last, index -1) is visited first, as range(-1, L) does.
    return [-1, *range(num_layers - 1)] if concat else list(range(num_layers))

  best, indices = 0.0, None
  for i in visit_order(len(layers_a)):
    for j in visit_order(len(layers_b)):
      if table[i, j] > best:  # strict: the first pair visited keeps a tie; NaN never wins
        best, indices = float(table[i, j]), (i, j)
  return LayerPairScore(best, indices, table)


def _prepare(feats, q, exact, normalize, name):
  # The reference clamps `feats.float()`: float64 inputs are rounded to float32 first.
  x = _float_array(feats, name).astype(np.float32)
  if x.ndim not in (2, 3):
    raise ValueError(f"{name} must be [N, L, D] or [N, D], got shape {x.shape}")
  _check_finite(x, name)
  if not isinstance(q, Real) or not 0 < q <= 1:
    raise ValueError(f"q must be in (0, 1], got {q!r}")
  if q != 1:
    t = _clamp_threshold(np.abs(x), q, exact)
    x = np.clip(x, -t, t)
  if normalize:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    zero = np.argwhere(norms[..., 0] == 0)
    if zero.size:
      rows = np.unique(zero[:, 0])
      where = "" if x.ndim == 2 else f" (layers {np.unique(zero[:, 1]).tolist()})"
      raise ValueError(f"{name} has zero-norm rows after clamping, which cannot be "
                       f"L2-normalised: rows {_row_list(rows)}{where}")
    x = x / np.maximum(norms, np.float32(_NORM_EPS))
  return x


def _clamp_threshold(abs_x, q, exact):
  if exact:
    flat = abs_x.ravel()
    # The reference indexes a full sort at int(q·numel): no interpolation.
    at = min(int(q * flat.size), flat.size - 1)
    return np.partition(flat, at)[at]
  per_sample = np.quantile(abs_x.reshape(len(abs_x), -1), q, axis=1)  # 'linear' = torch.quantile
  return np.float32(per_sample.mean(dtype=np.float64))


def _layers(feats, name, normalize, concat):
  if isinstance(feats, (list, tuple)):
    if not feats:
      raise ValueError(f"{name} is an empty list of layers")
    layers = [_rows(f, f"{name}[{l}]") for l, f in enumerate(feats)]
    sizes = {len(x) for x in layers}
    if len(sizes) > 1:
      raise ValueError(f"the layers of {name} have different row counts: "
                       f"{[len(x) for x in layers]}")
  else:
    x = _float_array(feats, name)
    if x.ndim != 3 or x.shape[1] == 0:
      raise ValueError(f"{name} must be an [N, L, D] array (L >= 1) or a list of [N, D] layers, "
                       f"got shape {x.shape}")
    _check_finite(x, name)
    layers = [x[:, l] for l in range(x.shape[1])]
  names = [f"{name} layer {l}" for l in range(len(layers))]
  if concat:
    layers.append(np.concatenate(layers, axis=1))  # = flatten(1, 2) for a tensor
    names.append(f"{name} (all layers concatenated)")
  if normalize:
    layers = [_unit_rows(x, n) for x, n in zip(layers, names)]
  return layers


def _unit_rows(x, name):
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  zero = np.flatnonzero(norms[:, 0] == 0)
  if zero.size:
    raise ValueError(f"{name} has zero-norm rows, which cannot be L2-normalised: "
                     f"rows {_row_list(zero)}")
  return x / np.maximum(norms, _NORM_EPS).astype(x.dtype)


class _PairMetric(NamedTuple):
  summarize: Callable  # (layer [N, D], name) -> what the metric needs of one layer
  compare: Callable    # (summary_a, summary_b) -> float


def _pair_metric(metric, topk) -> _PairMetric:
  """The metric split into a once-per-layer part and a per-pair part (what compute_score runs)."""
  def knn(compare):
    return _PairMetric(lambda x, name: _neighbours(x, _check_topk(topk, len(x))), compare)

  def linear_cka(unbiased):
    def summarize(x, name):
      if unbiased:
        _check_unbiased_rows(len(x))
      return _LinearKernel(x)
    return _PairMetric(summarize, functools.partial(_linear_cka, unbiased=unbiased))

  if metric == "cycle_knn":
    return knn(_cycle_knn)
  if metric == "lcs_knn":
    return knn(_lcs_knn)
  if metric == "edit_distance_knn":
    return knn(_edit_distance_knn)
  if metric == "cknna":
    return _PairMetric(
        lambda x, name: _knn_kernel(x, _check_cknna_topk(topk, len(x), True), False, True),
        _cknna)
  if metric == "cka":
    return linear_cka(unbiased=False)
  if metric == "unbiased_cka":
    return linear_cka(unbiased=True)
  if metric == "svcca":
    return _PairMetric(lambda x, name: _svcca_basis(x, 10, name), _mean_canonical_correlation)
  raise ValueError(f"Unrecognized metric: {metric!r}")


def score_table(metric, layers_a, layers_b, topk=None) -> np.ndarray:
  """[len(layers_a), len(layers_b)] float64: the metric of every pair of unit-row feature
  matrices [N, D] (the same N rows; D may differ), each side's once-per-matrix work (its
  neighbours, its kernel) done once: what compute_score maximises, or a model-by-model
  matrix when each entry is a model."""
  if metric == "mutual_knn":
    k = _check_topk(topk, len(layers_a[0]))
    return _mutual_knn_table([_neighbours(x, k) for x in layers_a],
                             [_neighbours(x, k) for x in layers_b])
  summarize, compare = _pair_metric(metric, topk)
  summaries_a = [summarize(x, f"feats_A layer {l}") for l, x in enumerate(layers_a)]
  summaries_b = [summarize(x, f"feats_B layer {l}") for l, x in enumerate(layers_b)]
  return np.array([[compare(sa, sb) for sb in summaries_b] for sa in summaries_a],
                  dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# kNN metrics: everything from the neighbour lists of `plato_jax.knn.search`


def _neighbours(x, k, exclude_self=True):
  # One array for both sides makes it a self-join, where self-exclusion is by row id.
  rows = np.ascontiguousarray(x, dtype=np.float32)
  return search(rows, rows, k, exclude_self=exclude_self)


@jax.jit
def _shared_neighbour_counts(ids_a, ids_b):
  """[La, N, k] and [Lb, N, k] neighbour ids → [La, Lb] total |N_a(i) ∩ N_b(i)| over rows i."""
  # A row's ids are distinct, so each shared neighbour matches exactly one (p, q) slot pair.
  # Looping over B's k slots keeps XLA from materialising an [Lb, N, k, k] comparison.
  def table_row(one_a):
    def add_slot(q, counts):
      slot = lax.dynamic_index_in_dim(ids_b, q, axis=2, keepdims=True)  # [Lb, N, 1]
      return counts + jnp.sum(one_a[None] == slot, axis=(1, 2), dtype=jnp.int32)
    return lax.fori_loop(0, ids_b.shape[2], add_slot, jnp.zeros(ids_b.shape[0], jnp.int32))
  return lax.map(table_row, ids_a)


def _mutual_knn_table(neighbours_a, neighbours_b):
  ids_a = np.stack([nb.ids for nb in neighbours_a]).astype(np.int32)
  ids_b = np.stack([nb.ids for nb in neighbours_b]).astype(np.int32)
  n, k = ids_a.shape[1:]
  counts = np.asarray(_shared_neighbour_counts(ids_a, ids_b)).astype(np.float64)
  return counts / (n * k)


def _cycle_knn(nb_a, nb_b):
  ids_a, ids_b = nb_a.ids, nb_b.ids
  n, k = ids_a.shape
  block = max(1, _BLOCK_ELEMENTS // (k * k))
  found = 0
  for start in range(0, n, block):
    stop = min(start + block, n)
    back = ids_a[ids_b[start:stop]]  # [rows, k, k]: A-neighbours of each B-neighbour
    found += int(np.sum((back == np.arange(start, stop)[:, None, None]).any(axis=(1, 2))))
  return found / n


def _lcs_knn(nb_a, nb_b):
  return float(np.mean(_lcs_lengths(nb_a.ids, nb_b.ids), dtype=np.float64))


def _edit_distance_knn(nb_a, nb_b):
  k = nb_a.ids.shape[1]
  return float(1.0 - np.mean(_levenshtein(nb_a.ids, nb_b.ids), dtype=np.float64) / k)


def _lcs_lengths(x, y):
  """Longest-common-subsequence length of x[r] and y[r] for every row r ([N, k] each)."""
  x, y = x.T, y.T  # [k, N]: each DP step works on one contiguous vector of all rows
  prev = np.zeros((y.shape[0] + 1, x.shape[1]), np.int32)
  for xi in x:
    cur = np.zeros_like(prev)
    for j, yj in enumerate(y, start=1):
      cur[j] = np.where(xi == yj, prev[j - 1] + 1, np.maximum(prev[j], cur[j - 1]))
    prev = cur
  return prev[-1]


def _levenshtein(x, y):
  """Edit distance (insert, delete, substitute: cost 1 each) of x[r] and y[r] for every row r."""
  x, y = x.T, y.T
  n = x.shape[1]
  prev = np.repeat(np.arange(y.shape[0] + 1, dtype=np.int32)[:, None], n, axis=1)
  for i, xi in enumerate(x, start=1):
    cur = np.empty_like(prev)
    cur[0] = i
    for j, yj in enumerate(y, start=1):
      edit = np.minimum(np.minimum(prev[j - 1], prev[j]), cur[j - 1]) + 1
      cur[j] = np.where(xi == yj, prev[j - 1], edit)
    prev = cur
  return prev[-1]


# ---------------------------------------------------------------------------------------------
# CKNNA from the neighbour lists: M∘K lives on at most N·k entries


class _KnnKernel(NamedTuple):
  """One layer for cknna: its top-k lists and scores, and sim(K, K) (mask M_K∘M_K = M_K)."""
  neighbours: object
  distance_agnostic: bool
  unbiased: bool
  self_similarity: float


def _knn_kernel(x, k, distance_agnostic, unbiased):
  # Without `unbiased` the reference keeps the diagonal, so self usually ranks first.
  nb = _neighbours(x, k, exclude_self=unbiased)
  return _KnnKernel(nb, distance_agnostic, unbiased,
                    _masked_hsic(nb, nb, distance_agnostic, unbiased))


def _cknna(layer_a, layer_b):
  sim_kl = _masked_hsic(layer_a.neighbours, layer_b.neighbours, layer_a.distance_agnostic,
                        layer_a.unbiased)
  return _cka_ratio(sim_kl, layer_a.self_similarity, layer_b.self_similarity)


def _masked_hsic(nb_k, nb_l, distance_agnostic, unbiased):
  """HSIC(M∘K, M∘L) with M_ij = 1 iff j is among the top-k of i under both K and L."""
  n = nb_k.ids.shape[0]
  if n <= _KERNEL_MAX_ROWS:
    return _masked_hsic_dense(nb_k, nb_l, distance_agnostic, unbiased)
  keys, k_vals, l_vals = _joint_neighbours(nb_k, nb_l)
  if distance_agnostic:
    k_vals = l_vals = np.ones_like(k_vals)
  rows, cols = np.divmod(keys, n)
  # tr(PQ) = Σ_ij P_ij Q_ji: only pairs that are joint neighbours both ways contribute.
  reverse = cols * n + rows
  at = np.minimum(np.searchsorted(keys, reverse), max(len(keys) - 1, 0))
  both_ways = keys[at] == reverse if len(keys) else np.zeros(0, bool)
  trace_kl = float(np.sum(k_vals[both_ways] * l_vals[at[both_ways]]))
  sums = [np.bincount(idx, weights=v, minlength=n)
          for v in (k_vals, l_vals) for idx in (rows, cols)]
  row_k, col_k, row_l, col_l = sums
  # Self-excluded lists give a zero diagonal, so the unbiased estimator's K̃ is M∘K itself.
  hsic = _hsic_unbiased if unbiased else _hsic_biased
  return hsic(trace_kl, row_k, col_k, row_l, col_l)


def _masked_hsic_dense(nb_k, nb_l, distance_agnostic, unbiased):
  """`_masked_hsic` through N×N arrays: for N up to _KERNEL_MAX_ROWS and large k (PRH's
  k up to 1000 on 1,024 rows) the mask is nearly full and the sparse pair search costs
  ~50x more than a few dense passes."""
  n = nb_k.ids.shape[0]

  def dense(nb):
    mask = np.zeros((n, n), bool)
    values = np.zeros((n, n), np.float64)
    rows = np.repeat(np.arange(n), nb.ids.shape[1])
    mask[rows, nb.ids.ravel()] = True
    values[rows, nb.ids.ravel()] = nb.scores.ravel()
    return mask, values

  mask_k, p = dense(nb_k)
  mask_l, q = dense(nb_l)
  joint = mask_k & mask_l
  if distance_agnostic:
    p = q = joint.astype(np.float64)
  else:
    p, q = np.where(joint, p, 0.0), np.where(joint, q, 0.0)
  trace_kl = float(np.sum(p * q.T))  # tr(PQ) = Σ_ij P_ij Q_ji
  hsic = _hsic_unbiased if unbiased else _hsic_biased
  return hsic(trace_kl, p.sum(axis=1), p.sum(axis=0), q.sum(axis=1), q.sum(axis=0))


def _joint_neighbours(nb_k, nb_l):
  """Sorted keys i·N + j of the joint-neighbour pairs, with their K_ij and L_ij (float64)."""
  n = nb_k.ids.shape[0]
  def keys(nb):
    return np.repeat(np.arange(n, dtype=np.int64) * n, nb.ids.shape[1]) + nb.ids.ravel()
  joint, at_k, at_l = np.intersect1d(keys(nb_k), keys(nb_l), assume_unique=True,
                                     return_indices=True)
  return (joint, nb_k.scores.ravel()[at_k].astype(np.float64),
          nb_l.scores.ravel()[at_l].astype(np.float64))


# ---------------------------------------------------------------------------------------------
# HSIC from sums (no N×N products)


def _hsic_unbiased(trace_kl, row_k, col_k, row_l, col_l):
  """Song et al. 2012 eq. 5 for zero-diagonal K, L, given tr(KL) and row/column sums.

  [tr(KL) + ΣK·ΣL/((m-1)(m-2)) - 2·1ᵀKL1/(m-2)] / (m(m-3)), 1ᵀKL1 = colsum(K)·rowsum(L).
  """
  m = len(row_k)
  return float((trace_kl + row_k.sum() * row_l.sum() / ((m - 1) * (m - 2))
                - 2 * (col_k @ row_l) / (m - 2)) / (m * (m - 3)))


def _hsic_biased(trace_kl, row_k, col_k, row_l, col_l):
  """tr(KHLH), H = I - 11ᵀ/n, without the 1/(n-1)² factor (as the reference)."""
  n = len(row_k)
  return float(trace_kl - (col_l @ row_k + col_k @ row_l) / n
               + row_k.sum() * row_l.sum() / n**2)


def _symmetric_hsic(sum_kl, row_k, diag_k, row_l, diag_l, unbiased):
  """HSIC of symmetric K, L from Σ K∘L, row sums and diagonals."""
  if not unbiased:
    return _hsic_biased(sum_kl, row_k, row_k, row_l, row_l)
  # The unbiased estimator zeroes both diagonals first.
  row_k, row_l = row_k - diag_k, row_l - diag_l
  return _hsic_unbiased(sum_kl - diag_k @ diag_l, row_k, row_k, row_l, row_l)


def _cka_ratio(hsic_kl, hsic_kk, hsic_ll):
  product = hsic_kk * hsic_ll
  if product < 0:  # torch.sqrt of a negative number is NaN, and so is the reference's score
    return math.nan
  return float(hsic_kl / (math.sqrt(product) + _CKA_EPS))


# ---------------------------------------------------------------------------------------------
# CKA


class _LinearKernel:
  """One layer for linear CKA: what K = X_c X_cᵀ (X_c: centred features) needs of it.

  The layer is kept as given and centred in float64 one row block at a time, so a summary
  costs no copy of the features (compute_score keeps one per layer).
  """

  def __init__(self, x):
    self.x = x
    self.mean = np.mean(x, axis=0, dtype=np.float64)
    self.diag = np.concatenate([np.einsum("ij,ij->i", c, c) for c in self.row_blocks()])
    self._kernel = None
    self.self_product = _kernel_product(self, self)

  def centred(self, start=0, stop=None):
    return self.x[start:stop].astype(np.float64) - self.mean

  def row_blocks(self):
    for start, stop in _row_blocks(len(self.x), self.x.shape[1]):
      yield self.centred(start, stop)

  @property
  def kernel(self):
    if self._kernel is None:
      x = self.centred()
      self._kernel = x @ x.T
    return self._kernel

  def hsic(self, other, sum_kl, unbiased):
    zeros = np.zeros(len(self.x))  # centred features: every kernel row sums to zero
    return _symmetric_hsic(sum_kl, zeros, self.diag, zeros, other.diag, unbiased)


def _kernel_product(a, b):
  """Σ_ij K_ij L_ij = tr(KL) of two linear kernels, by the cheapest exact route."""
  n, dim_a = a.x.shape
  dim_b = b.x.shape[1]
  if n <= _KERNEL_MAX_ROWS and n * (dim_a + dim_b) < dim_a * dim_b:
    return float(np.vdot(a.kernel, b.kernel))
  if dim_a * dim_b <= _GRAM_MAX_ELEMENTS:
    gram = np.zeros((dim_a, dim_b))
    for start, stop in _row_blocks(n, max(dim_a, dim_b)):
      gram += a.centred(start, stop).T @ b.centred(start, stop)
    return float(np.sum(np.square(gram)))  # tr(AAᵀBBᵀ) = ||AᵀB||_F²
  # Both N and D large: kernel rows block by block (the centred features held once, float64).
  x_a, x_b = a.centred(), b.centred()
  total = 0.0
  for start, stop in _row_blocks(n, n):
    total += float(np.vdot(x_a[start:stop] @ x_a.T, x_b[start:stop] @ x_b.T))
  return total


def _linear_cka(a, b, unbiased):
  hsic_kl = a.hsic(b, _kernel_product(a, b), unbiased)
  hsic_kk = a.hsic(a, a.self_product, unbiased)
  hsic_ll = b.hsic(b, b.self_product, unbiased)
  return _cka_ratio(hsic_kl, hsic_kk, hsic_ll)


def _rbf_cka(a, b, sigma, unbiased):
  n = len(a)
  a, b = (np.asarray(x, np.float64) - np.mean(x, axis=0, dtype=np.float64) for x in (a, b))
  sq_a, sq_b = (np.einsum("ij,ij->i", x, x) for x in (a, b))
  sum_kl = sum_kk = sum_ll = 0.0
  row_k, row_l = np.zeros(n), np.zeros(n)
  for start, stop in _row_blocks(n, n):
    k_rows = _rbf_rows(a, sq_a, start, stop, sigma)
    l_rows = _rbf_rows(b, sq_b, start, stop, sigma)
    sum_kl += float(np.vdot(k_rows, l_rows))
    sum_kk += float(np.vdot(k_rows, k_rows))
    sum_ll += float(np.vdot(l_rows, l_rows))
    row_k[start:stop] = k_rows.sum(axis=1)
    row_l[start:stop] = l_rows.sum(axis=1)
  ones = np.ones(n)  # exp(-0)
  hsic_kl = _symmetric_hsic(sum_kl, row_k, ones, row_l, ones, unbiased)
  hsic_kk = _symmetric_hsic(sum_kk, row_k, ones, row_k, ones, unbiased)
  hsic_ll = _symmetric_hsic(sum_ll, row_l, ones, row_l, ones, unbiased)
  return _cka_ratio(hsic_kl, hsic_kk, hsic_ll)


def _rbf_rows(x, sq_norms, start, stop, sigma):
  """Rows start:stop of exp(-||x_i - x_j||² / (2σ²))."""
  d2 = sq_norms[start:stop, None] + sq_norms[None, :] - 2 * (x[start:stop] @ x.T)
  d2 = np.maximum(d2, 0.0)
  d2[np.arange(stop - start), np.arange(start, stop)] = 0.0  # exactly 0, not rounding noise
  return np.exp(-d2 / (2 * sigma**2))


def _row_blocks(n, width):
  """Row ranges whose [rows, width] blocks hold about _BLOCK_ELEMENTS elements."""
  rows = max(1, _BLOCK_ELEMENTS // max(width, 1))
  return [(s, min(s + rows, n)) for s in range(0, n, rows)]


# ---------------------------------------------------------------------------------------------
# SVCCA


def _svcca_basis(x, cca_dim, name):
  """The cca_dim leading left singular vectors of the standardised features (orthonormal)."""
  if isinstance(cca_dim, bool) or not isinstance(cca_dim, Integral) or cca_dim < 1:
    raise ValueError(f"cca_dim must be a positive integer, got {cca_dim!r}")
  n, dim = x.shape
  if dim < cca_dim:
    raise ValueError(f"svcca needs D >= cca_dim: {name} has D={dim} < cca_dim={cca_dim}")
  if n <= cca_dim:
    raise ValueError(f"svcca needs more rows than cca_dim: {name} has N={n}, cca_dim={cca_dim}")
  x = np.asarray(x, np.float64)
  x = x - x.mean(axis=0)
  x = x / (x.std(axis=0, ddof=1) + _STD_EPS)
  return _leading_left_singular_vectors(x, int(cca_dim))


def _leading_left_singular_vectors(x, q):
  n, dim = x.shape
  if n <= dim:
    _, vectors = np.linalg.eigh(x @ x.T)  # ascending eigenvalues
    return vectors[:, ::-1][:, :q]
  values, vectors = np.linalg.eigh(x.T @ x)
  values, vectors = values[::-1][:q], vectors[:, ::-1][:, :q]
  if not values[-1] > 1e-12 * values[0]:
    # Rank below q: U = XV/σ is undefined there; the SVD completes the basis.
    return np.linalg.svd(x, full_matrices=False)[0][:, :q]
  # The D×D eigenproblem is ~5x cheaper than an SVD of the tall matrix; QR re-orthonormalises.
  return np.linalg.qr(x @ vectors / np.sqrt(values))[0]


def _mean_canonical_correlation(u_a, u_b):
  # Canonical correlations of two orthonormal bases = singular values of U_aᵀ U_b.
  return float(np.mean(np.linalg.svd(u_a.T @ u_b, compute_uv=False)))


# ---------------------------------------------------------------------------------------------
# Input checks


def _row_list(rows):
  shown = [int(r) for r in rows[:_ROWS_SHOWN]]
  more = f" and {len(rows) - _ROWS_SHOWN} more" if len(rows) > _ROWS_SHOWN else ""
  return f"{shown}{more}"


def _float_array(feats, name):
  x = np.asarray(feats)
  if x.dtype not in _FLOAT_DTYPES:
    raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
  # Half precisions are upcast: their products are exact in float32, and CPU top-k on halves
  # is very slow.
  return x if x.dtype in (np.float32, np.float64) else x.astype(np.float32)


def _check_finite(x, name):
  bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
  if bad.size:
    raise ValueError(f"{name} has NaN/Inf values in {bad.size} row(s): {_row_list(bad)}")


def _rows(feats, name):
  x = _float_array(feats, name)
  if x.ndim != 2:
    raise ValueError(f"{name} must be a 2-D [N, D] array, got shape {x.shape}")
  if x.shape[0] == 0 or x.shape[1] == 0:
    raise ValueError(f"{name} is empty: shape {x.shape}")
  _check_finite(x, name)
  return x


def _paired_rows(feats_A, feats_B):
  a, b = _rows(feats_A, "feats_A"), _rows(feats_B, "feats_B")
  if len(a) != len(b):
    raise ValueError(f"feats_A has {len(a)} rows but feats_B has {len(b)}; "
                     "row i of both must describe the same sample")
  for x, name in ((a, "feats_A"), (b, "feats_B")):
    if len(x) > 1 and not np.ptp(x, axis=0).any():
      warnings.warn(f"{name}: all {len(x)} rows are equal; every similarity ties and the "
                    f"metric's value says nothing about the model", stacklevel=3)
  return a, b


def _check_topk(topk, n, minimum=1):
  if isinstance(topk, bool) or not isinstance(topk, Integral):
    raise ValueError(f"topk must be an integer, got {topk!r}")
  if topk < minimum:
    raise ValueError(f"topk must be >= {minimum}, got {topk}")
  if topk >= n:
    raise ValueError(f"topk={topk} must be smaller than N={n}: self is excluded, so each row "
                     f"has only N-1 candidate neighbours")
  return int(topk)


def _check_cknna_topk(topk, n, unbiased):
  if topk is None or (isinstance(topk, Integral) and not isinstance(topk, bool) and topk < 2):
    raise ValueError(f"CKNNA requires topk >= 2, got {topk!r}")
  if unbiased:
    _check_unbiased_rows(n)
  return _check_topk(topk, n, minimum=2)


def _check_unbiased_rows(n):
  if n < 4:
    raise ValueError(f"the unbiased HSIC estimator needs at least 4 rows (it divides by "
                     f"m(m-3)), got N={n}")


# ---------------------------------------------------------------------------------------------
# Alignment from neighbour lists computed elsewhere (query-vs-gallery searches at scale)


def mutual_knn_from_neighbours(ids_A, ids_B):
  """mean_i |ids_A[i] ∩ ids_B[i]| / k for two [Q, k] lists of distinct neighbour ids.

  mutual_knn's arithmetic on neighbours found by `plato_jax.knn.search`; costs a sort of
  [Q, 2k], so k = n/100 at n = 15M (k = 150,000) is fine.
  """
  return float(np.mean(mutual_knn_per_query(ids_A, ids_B)))


def mutual_knn_per_query(ids_A, ids_B) -> np.ndarray:
  """|ids_A[i] ∩ ids_B[i]| / k for each query i (float64 [Q]): what `mutual_knn_from_neighbours`
  averages, and what its bootstrap interval resamples."""
  a, b = _neighbour_lists(ids_A, ids_B)
  return _shared_counts_sorted(a, b) / a.shape[1]


def chance_corrected(m, k: int, n: int):
  """(m - c) / (1 - c) with c = k / (n - 1), the m_NN of two independent random rankings of
  a gallery of n rows (the query excluded): 0 at chance, 1 for identical neighbour sets. The
  raw m_NN stays the papers' number; this one compares gallery sizes and k's fairly."""
  c = k / (n - 1)
  if not 0 < c < 1:
    raise ValueError(f"chance k/(n-1) = {k}/{n - 1} must lie in (0, 1)")
  return (np.asarray(m, np.float64) - c) / (1 - c)


def rank_biased_overlap(ids_A, ids_B, p: float = 0.9) -> np.ndarray:
  """Extrapolated rank-biased overlap (Webber, Moffat and Zobel 2010, eq. 32) of each query's
  two neighbour rankings [Q, k] (best first), float64 [Q]:

      RBO_ext = (X_k / k) p^k + (1 - p) / p · sum_{d=1..k} (X_d / d) p^d,

  X_d = |top-d of A ∩ top-d of B|. 1 for identical rankings, 0 for disjoint ones; p sets how
  deep it looks (the first d ranks carry 1 - p^d of the weight: p = 0.9 weighs the top 10 at
  65%). Unlike m_NN at k = n/100 it grades agreement by rank, with a depth that does not
  change with the gallery's size.
  """
  if not 0 < p < 1:
    raise ValueError(f"p must lie in (0, 1), got {p}")
  a, b = _neighbour_lists(ids_A, ids_B)
  q, k = a.shape
  depth = np.arange(1, k + 1)
  weights = (1 - p) / p * p ** depth / depth
  out = np.empty(q)
  for i in range(q):
    # A shared id counts in X_d from depth max(rank in A, rank in B) + 1 on.
    order = np.argsort(b[i], kind="stable")
    at = np.minimum(np.searchsorted(b[i], a[i], sorter=order), k - 1)
    shared = b[i][order[at]] == a[i]
    deepest = np.maximum(np.flatnonzero(shared), order[at[shared]])
    x = np.cumsum(np.bincount(deepest, minlength=k))
    out[i] = x[-1] / k * p ** k + float(np.dot(x, weights))
  return out


def lift_area(ks, overlaps, n: int, lo: float, hi: float) -> np.ndarray:
  """Each query's mean lift of m_NN over chance across a k sweep, float64 [Q]:

      A = 1 / (hi - lo) · ∫_lo^hi m(k) / c(k) d log(k/n),   c(k) = k / (n - 1),

  with m(k) the query's |N_a ∩ N_b| / k (`overlaps` [Q, len(ks)], ks ascending) taken as
  piecewise linear in log(k/n) between the swept k's (trapezoids). 1 at chance at every k;
  above it, how many times chance the neighbourhoods agree, on average over the scales
  k/n in [e^lo, e^hi]. Over the same [lo, hi] it compares gallery sizes (the k's it weighs
  are the same fractions of the gallery), which m_NN at a fixed k does not. [lo, hi] must lie
  within the sweep: log(ks[0]/n) <= lo < hi <= log(ks[-1]/n)."""
  ks = np.asarray(ks, np.float64)
  x = np.log(ks / n)
  if not (x[0] - 1e-12 <= lo < hi <= x[-1] + 1e-12) or np.any(np.diff(x) <= 0):
    raise ValueError(f"lift_area needs ascending k's whose log(k/n) cover [{lo}, {hi}]; "
                     f"they span [{x[0]}, {x[-1]}]")
  grid = np.concatenate([[lo], x[(x > lo) & (x < hi)], [hi]])
  # Row i of `weights`: the linear interpolation at grid[i] as weights on the swept k's.
  weights = np.stack([np.interp(grid, x, column) for column in np.eye(len(x))], axis=1)
  lift = np.asarray(overlaps, np.float64) / (ks / (n - 1))
  values = lift @ weights.T
  widths = np.diff(grid)
  return (values[:, 1:] + values[:, :-1]) @ widths / 2 / (hi - lo)


def bootstrap_interval(values, *, level: float = 0.95, resamples: int = 1000,
                       seed: int = 0) -> tuple[float, float]:
  """Percentile bootstrap interval of the mean of per-query `values` [Q]: `resamples` means
  of Q queries drawn with replacement (numpy's default generator seeded with `seed`, draws in
  order), their (1 - level) / 2 and (1 + level) / 2 quantiles. It covers the spread from
  which queries were drawn, not the choice of gallery (see `--gallery_seeds`)."""
  return _percentiles(_bootstrap_means(np.asarray(values, np.float64), resamples, seed), level)


def with_interval(name: str, values, *, level: float = 0.95, resamples: int = 1000,
                  seed: int = 0) -> dict:
  """A result row's columns for per-query `values`: {name: their mean, name_low / name_high:
  its `bootstrap_interval`}."""
  low, high = bootstrap_interval(values, level=level, resamples=resamples, seed=seed)
  return {name: float(np.mean(values)), f"{name}_low": low, f"{name}_high": high}


def paired_bootstrap(values_A, values_B, *, level: float = 0.95, resamples: int = 1000,
                     seed: int = 0) -> dict:
  """The difference mean(A) - mean(B) of two per-query value lists of the same queries, its
  percentile bootstrap interval (queries resampled together), and a two-sided p-value from
  the B resamples, 2 · (min(#(diff <= 0), #(diff >= 0)) + 1) / (B + 1), at most 1 (never 0:
  its smallest value, 2 / (B + 1), says "below what B resamples can resolve")."""
  a, b = np.asarray(values_A, np.float64), np.asarray(values_B, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f"paired values must be two [Q] arrays of the same queries, got "
                     f"{a.shape} and {b.shape}")
  diffs = _bootstrap_means(a - b, resamples, seed)
  lo, hi = _percentiles(diffs, level)
  tail = min(int(np.sum(diffs <= 0)), int(np.sum(diffs >= 0)))
  p = min(1.0, 2 * (tail + 1) / (resamples + 1))
  return dict(difference=float(np.mean(a - b)), low=lo, high=hi, p_value=p)


def _percentiles(means: np.ndarray, level: float) -> tuple[float, float]:
  lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
  return float(lo), float(hi)


def _bootstrap_means(values: np.ndarray, resamples: int, seed: int, block: int = 2**24):
  """`resamples` means of `values` [Q] resampled with replacement, drawn in order."""
  q = values.shape[0]
  if q == 0:
    raise ValueError("no values to resample")
  if int(resamples) != resamples or resamples < 1:
    raise ValueError(f"resamples must be a positive integer, got {resamples!r}")
  rng = np.random.default_rng(seed)
  means = np.empty(resamples)
  step = max(1, block // q)  # draws of at most `block` indices at a time
  for s in range(0, resamples, step):
    picks = rng.integers(0, q, size=(min(step, resamples - s), q))
    means[s:s + len(picks)] = values[picks].mean(axis=1)
  return means


def _neighbour_lists(ids_A, ids_B):
  a, b = np.asarray(ids_A), np.asarray(ids_B)
  if a.ndim != 2 or a.shape != b.shape:
    raise ValueError(f"neighbour lists must both be [Q, k], got {a.shape} and {b.shape}")
  for name, ids in (("ids_A", a), ("ids_B", b)):  # repeats (padding) would count twice
    ordered = np.sort(ids, axis=1)
    bad = np.flatnonzero((ordered[:, 1:] == ordered[:, :-1]).any(axis=1))
    if bad.size:
      raise ValueError(f"{name}: rows {bad[:10].tolist()} repeat an id (padding?); each "
                       f"row must list k distinct neighbours")
  return a, b


def _shared_counts_sorted(a, b, block=256):
  # A shared id appears twice in the sorted union of two duplicate-free rows.
  counts = np.empty(len(a), np.int64)
  for s in range(0, len(a), block):
    both = np.sort(np.concatenate([a[s:s + block], b[s:s + block]], axis=1), axis=1)
    counts[s:s + block] = (both[:, 1:] == both[:, :-1]).sum(axis=1)
  return counts
