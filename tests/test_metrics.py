"""plato_jax.metrics against an independent dense float64 restatement of platonic-rep's metrics.

The reference below restates platonic-rep's `metrics.py`: full N×N similarity matrices,
self masked on the diagonal, neighbours ordered by (score desc, index asc) via np.lexsort
(our deterministic tie rule; torch's order of ties is undefined), LCS/Levenshtein row by row.
Random data is drawn from a logged seed. Continuous data is redrawn until no two candidate
neighbours are closer than float32 rounding could reorder; integer data makes ties exact.
"""
import math
import time
import warnings
from typing import NamedTuple

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import scipy.sparse
import torch
from sklearn.cross_decomposition import CCA

from plato_jax import metrics
from plato_jax.knn import search
from plato_jax.metrics import (SUPPORTED_METRICS, cka, cknna, compute_score, cycle_knn,
                               edit_distance_knn, lcs_knn, measure, mutual_knn,
                               prepare_features, svcca, unbiased_cka)

KNN_METRICS = ["mutual_knn", "cycle_knn", "lcs_knn", "edit_distance_knn"]


# ---------------------------------------------------------------------------------------------
# The independent float64 reference (dense, small N)


def ref_knn(x, k, self_value=-1e8):
  s = x.astype(np.float64) @ x.astype(np.float64).T
  if self_value is not None:
    np.fill_diagonal(s, self_value)
  index = np.broadcast_to(np.arange(len(x)), s.shape)
  return np.lexsort((index, -s), axis=1)[:, :k]


def ref_masks(knn, n):
  mask = np.zeros((n, n))
  mask[np.arange(n)[:, None], knn] = 1.0
  return mask


def ref_mutual_knn(a, b, k):
  n = len(a)
  mask_a, mask_b = ref_masks(ref_knn(a, k), n), ref_masks(ref_knn(b, k), n)
  return float(np.mean((mask_a * mask_b).sum(axis=1) / k))


def ref_cycle_knn(a, b, k):
  knn_a, knn_b = ref_knn(a, k), ref_knn(b, k)
  back = knn_a[knn_b]
  return float(np.mean((back == np.arange(len(a))[:, None, None]).reshape(len(a), -1).max(1)))


def ref_lcs_length(x, y):
  dp = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
  for i in range(1, len(x) + 1):
    for j in range(1, len(y) + 1):
      if x[i - 1] == y[j - 1]:
        dp[i][j] = dp[i - 1][j - 1] + 1
      else:
        dp[i][j] = max(dp[i - 1][j], dp[i][j - 1])
  return dp[len(x)][len(y)]


def ref_edit_distance(x, y):
  dold = list(range(len(y) + 1))
  for i in range(1, len(x) + 1):
    dnew = [i] + [0] * len(y)
    for j in range(1, len(y) + 1):
      if x[i - 1] == y[j - 1]:
        dnew[j] = dold[j - 1]
      else:
        dnew[j] = min(dold[j - 1] + 1, dnew[j - 1] + 1, dold[j] + 1)
    dold = dnew
  return dold[-1]


def ref_lcs_knn(a, b, k):
  knn_a, knn_b = ref_knn(a, k), ref_knn(b, k)
  return float(np.mean([ref_lcs_length(x, y) for x, y in zip(knn_a, knn_b)]))


def ref_edit_distance_knn(a, b, k):
  knn_a, knn_b = ref_knn(a, k), ref_knn(b, k)
  return 1 - float(np.mean([ref_edit_distance(x, y) for x, y in zip(knn_a, knn_b)])) / k


REF_KNN = {"mutual_knn": ref_mutual_knn, "cycle_knn": ref_cycle_knn, "lcs_knn": ref_lcs_knn,
           "edit_distance_knn": ref_edit_distance_knn}


def ref_hsic_unbiased(K, L):
  m = K.shape[0]
  K, L = K.copy(), L.copy()
  np.fill_diagonal(K, 0)
  np.fill_diagonal(L, 0)
  value = (np.sum(K * L.T) + np.sum(K) * np.sum(L) / ((m - 1) * (m - 2))
           - 2 * np.sum(K @ L) / (m - 2))
  return value / (m * (m - 3))


def ref_hsic_biased(K, L):
  H = np.eye(len(K)) - 1 / len(K)
  return np.trace(K @ H @ L @ H)


def ref_kernel(x, kernel_metric, sigma):
  x = x.astype(np.float64)
  if kernel_metric == "ip":
    return x @ x.T
  d2 = np.sum((x[:, None, :] - x[None, :, :]) ** 2, axis=-1)
  return np.exp(-d2 / (2 * sigma**2))


def ref_cka(a, b, kernel_metric="ip", sigma=1.0, unbiased=False):
  K, L = ref_kernel(a, kernel_metric, sigma), ref_kernel(b, kernel_metric, sigma)
  hsic = ref_hsic_unbiased if unbiased else ref_hsic_biased
  return hsic(K, L) / (np.sqrt(hsic(K, K) * hsic(L, L)) + 1e-6)


def ref_cknna(a, b, k, distance_agnostic=False, unbiased=True):
  n = len(a)
  K, L = ref_kernel(a, "ip", None), ref_kernel(b, "ip", None)

  def similarity(K, L):
    def mask(S):
      S = S.copy()
      if unbiased:
        np.fill_diagonal(S, -np.inf)
      index = np.broadcast_to(np.arange(n), S.shape)
      return ref_masks(np.lexsort((index, -S), axis=1)[:, :k], n)
    M = mask(K) * mask(L)
    P, Q = (M, M) if distance_agnostic else (M * K, M * L)
    return ref_hsic_unbiased(P, Q) if unbiased else ref_hsic_biased(P, Q)

  return similarity(K, L) / (np.sqrt(similarity(K, K) * similarity(L, L)) + 1e-6)


def standardized(x):
  x = x.astype(np.float64)
  x = x - x.mean(axis=0)
  return x / (x.std(axis=0, ddof=1) + 1e-8)


def ref_svcca_sklearn(a, b, cca_dim=10):
  """The reference's recipe with an exact SVD: sklearn CCA on U's, mean np.corrcoef."""
  u_a = np.linalg.svd(standardized(a), full_matrices=False)[0][:, :cca_dim]
  u_b = np.linalg.svd(standardized(b), full_matrices=False)[0][:, :cca_dim]
  cca = CCA(n_components=cca_dim, max_iter=5000, tol=1e-10)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    cca.fit(u_a, u_b)
    c_a, c_b = cca.transform(u_a, u_b)
  return float(np.mean([np.corrcoef(c_a[:, i], c_b[:, i])[0, 1] for i in range(cca_dim)]))


def unit_rows(x):
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ---------------------------------------------------------------------------------------------
# Data


def planted(rng, n, noise, dims=(32, 24), rank=8, normalize=True):
  """A = z W_A + noise·ε_A, B = z W_B + noise·ε_B: a shared latent z seen by both."""
  z = rng.normal(size=(n, rank))
  out = []
  for d in dims:
    x = (z @ rng.normal(size=(rank, d)) / math.sqrt(rank) + noise * rng.normal(size=(n, d)))
    x = x.astype(np.float32)
    out.append(unit_rows(x) if normalize else x)
  return out


def well_separated(x, k, include_self=False, boundary_only=False, rel_gap=1e-6):
  """No two of each row's k+1 best candidates (or only the k-th and the (k+1)-th) are so
  close that float32 rounding could swap them."""
  s = x.astype(np.float64) @ x.astype(np.float64).T
  scale = np.abs(s).max()
  if not include_self:
    np.fill_diagonal(s, -np.inf)
  top = -np.sort(-s, axis=1)[:, :k + 1]
  gaps = top[:, -2:-1] - top[:, -1:] if boundary_only else top[:, :-1] - top[:, 1:]
  return bool(np.min(gaps) > rel_gap * scale)


def draw(rng, make, k, include_self=False, boundary_only=False):
  for _ in range(100):
    xs = make(rng)
    if all(well_separated(x, k, include_self, boundary_only) for x in xs):
      return xs
  raise AssertionError("could not draw well-separated data")


def integer_rows(rng, n, d, lo=-1, hi=2):
  """Entries in {lo..hi-1}: every float32 dot product is exact, so ties are exact too."""
  x = rng.integers(lo, hi, size=(n, d)).astype(np.float32)
  x[np.abs(x).sum(axis=1) == 0, 0] = 1  # no zero rows
  return x


# ---------------------------------------------------------------------------------------------
# kNN metrics


@pytest.mark.parametrize("noise", [None, 0.1, 0.5, 2.0])
def test_knn_metrics_equal_reference(rng, noise):
  k = 10
  if noise is None:  # independent data
    make = lambda r: [unit_rows(r.normal(size=(200, d)).astype(np.float32)) for d in (32, 24)]
  else:
    make = lambda r: planted(r, 200, noise)
  a, b = draw(rng, make, k)
  for name in KNN_METRICS:
    assert measure(name, a, b, topk=k) == pytest.approx(REF_KNN[name](a, b, k), abs=1e-12), name


def test_knn_metrics_with_exact_ties(rng):
  a, b = integer_rows(rng, 150, 6), integer_rows(rng, 150, 5)
  a[10], a[11] = a[3], a[3]  # duplicate rows: equal similarities between distinct indices
  b[20] = b[7]
  for k in (1, 4, 15):
    for name in KNN_METRICS:
      ours = measure(name, a, b, topk=k)
      assert ours == pytest.approx(REF_KNN[name](a, b, k), abs=1e-12), (name, k)


def test_identical_inputs(rng):
  (a,) = draw(rng, lambda r: planted(r, 150, 0.3, dims=(16,)), 8)
  assert mutual_knn(a, a, 8) == 1.0
  assert lcs_knn(a, a, 8) == 8.0
  assert edit_distance_knn(a, a, 8) == 1.0
  assert cycle_knn(a, a, 8) == pytest.approx(ref_cycle_knn(a, a, 8))
  assert cka(a, a) == pytest.approx(1.0, abs=1e-5)
  assert unbiased_cka(a, a) == pytest.approx(1.0, abs=1e-4)
  assert svcca(a, a) == pytest.approx(1.0, abs=1e-9)
  assert cknna(a, a, topk=8) == pytest.approx(1.0, abs=1e-4)


def test_independent_inputs_score_chance(rng):
  n, k = 1000, 10
  a, b = (rng.normal(size=(n, 32)).astype(np.float32) for _ in range(2))
  # Per row the overlap is ~Binomial(k, k/(n-1)); the mean over 1000 rows has std ~0.001.
  assert abs(mutual_knn(a, b, k) - k / (n - 1)) < 0.006
  assert abs(cycle_knn(a, b, k) - (1 - (1 - k / (n - 1)) ** k)) < 0.04


def test_return_types_are_python_floats(rng):
  a, b = planted(rng, 60, 0.5)
  for name in SUPPORTED_METRICS:
    kwargs = {"topk": 5} if "knn" in name else {}
    assert type(measure(name, a, b, **kwargs)) is float, name


def test_half_precision_inputs(rng):
  """bf16/f16 inputs are upcast; the reference sees the same rounded values in float64."""
  k = 6
  for dtype in (ml_dtypes.bfloat16, np.float16):
    a, b = draw(rng, lambda r: [x.astype(dtype).astype(np.float32)
                                for x in planted(r, 120, 0.5)], k)
    a_half, b_half = a.astype(dtype), b.astype(dtype)
    for inputs in ((a_half, b_half), (jnp.asarray(a_half), jnp.asarray(b_half))):
      for name in KNN_METRICS:
        assert measure(name, *inputs, topk=k) == pytest.approx(REF_KNN[name](a, b, k),
                                                               abs=1e-12)
      assert cka(*inputs) == pytest.approx(ref_cka(a, b), rel=1e-9)
      assert unbiased_cka(*inputs) == pytest.approx(ref_cka(a, b, unbiased=True), rel=1e-9)
      assert cknna(*inputs, topk=k) == pytest.approx(ref_cknna(a, b, k), rel=1e-5, abs=1e-6)


def test_float64_and_jax_inputs(rng):
  a, b = draw(rng, lambda r: planted(r, 100, 0.5), 5)
  a64, b64 = a.astype(np.float64), b.astype(np.float64)
  assert mutual_knn(jnp.asarray(a), jnp.asarray(b), 5) == pytest.approx(ref_mutual_knn(a, b, 5))
  assert lcs_knn(a64, b64, 5) == pytest.approx(ref_lcs_knn(a, b, 5))
  assert cka(a64, b64) == pytest.approx(ref_cka(a, b), rel=1e-12)
  assert svcca(jnp.asarray(a), b64) == pytest.approx(svcca(a, b), abs=1e-12)


def test_vectorised_dynamic_programs_on_many_rows(rng):
  n, k = 100_000, 10
  x = rng.integers(0, 30, size=(n, k))  # small alphabet: many matches, repeats inside rows
  y = rng.integers(0, 30, size=(n, k))
  y[: n // 2] = x[: n // 2]
  start = time.perf_counter()
  lcs, lev = metrics._lcs_lengths(x, y), metrics._levenshtein(x, y)
  assert time.perf_counter() - start < 20
  for r in list(rng.choice(n, 300, replace=False)) + [0, n - 1]:
    assert lcs[r] == ref_lcs_length(list(x[r]), list(y[r]))
    assert lev[r] == ref_edit_distance(list(x[r]), list(y[r]))


# ---------------------------------------------------------------------------------------------
# CKA


@pytest.mark.parametrize("noise", [0.1, 1.0, 4.0])
def test_linear_cka_equals_reference(rng, noise):
  a, b = planted(rng, 150, noise, normalize=noise != 4.0)
  a = a + 3.0 * (noise == 4.0)  # a large common offset: centring must remove it exactly
  assert cka(a, b) == pytest.approx(ref_cka(a, b), rel=1e-10)
  assert unbiased_cka(a, b) == pytest.approx(ref_cka(a, b, unbiased=True), rel=1e-9, abs=1e-12)


def test_linear_cka_every_route_agrees(rng, monkeypatch):
  """D×D Gram (in row blocks), cached N×N kernels and kernel row blocks: the same numbers."""
  shapes = [(40, 300, 200),   # N small, D large: cached kernels
            (300, 20, 12)]    # N large, D small: D×D Gram
  for n, da, db in shapes:
    a, b = planted(rng, n, 0.7, dims=(da, db))
    want = [ref_cka(a, b), ref_cka(a, b, unbiased=True)]
    np.testing.assert_allclose([cka(a, b), unbiased_cka(a, b)], want, rtol=1e-9)
    with monkeypatch.context() as m:  # 7-row blocks for the Gram and the diagonals
      m.setattr(metrics, "_BLOCK_ELEMENTS", 7 * max(da, db))
      np.testing.assert_allclose([cka(a, b), unbiased_cka(a, b)], want, rtol=1e-9)
    with monkeypatch.context() as m:  # kernel rows in blocks of 7
      m.setattr(metrics, "_KERNEL_MAX_ROWS", 0)
      m.setattr(metrics, "_GRAM_MAX_ELEMENTS", 0)
      m.setattr(metrics, "_BLOCK_ELEMENTS", 7 * n)
      np.testing.assert_allclose([cka(a, b), unbiased_cka(a, b)], want, rtol=1e-9)


def test_linear_cka_at_n_2000(rng):
  n = 2000
  a, b = planted(rng, n, 0.8, dims=(64, 48))
  a = a + 0.2
  K, L = ref_kernel(a, "ip", None), ref_kernel(b, "ip", None)
  # Dense O(N²) restatements: tr(KHLH) = Σ (HKH)∘L; 1ᵀK̃L̃1 = colsum(K̃)·rowsum(L̃).
  def hsic_biased(K, L):
    Kc = K - K.mean(0) - K.mean(1)[:, None] + K.mean()
    return np.sum(Kc * L)
  def hsic_unbiased(K, L):
    K, L = K - np.diag(np.diag(K)), L - np.diag(np.diag(L))
    return (np.sum(K * L.T) + K.sum() * L.sum() / ((n - 1) * (n - 2))
            - 2 * (K.sum(0) @ L.sum(1)) / (n - 2)) / (n * (n - 3))
  for unbiased, hsic in ((False, hsic_biased), (True, hsic_unbiased)):
    want = hsic(K, L) / (np.sqrt(hsic(K, K) * hsic(L, L)) + 1e-6)
    assert cka(a, b, unbiased=unbiased) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_rbf_cka_equals_reference_in_row_blocks(rng, monkeypatch, sigma):
  a, b = planted(rng, 120, 0.5)
  monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 13 * 120)  # 10 blocks, the last one short
  for unbiased in (False, True):
    want = ref_cka(a, b, "rbf", sigma, unbiased)
    assert cka(a, b, kernel_metric="rbf", rbf_sigma=sigma, unbiased=unbiased) == pytest.approx(
        want, rel=1e-9, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# CKNNA


@pytest.mark.parametrize("dense_rows_limit", [2048, 0])
@pytest.mark.parametrize("noise", [None, 0.2, 1.0])
def test_cknna_equals_reference(rng, noise, monkeypatch, dense_rows_limit):
  """Both HSIC paths: N×N arrays (small N) and the sparse pair search (large N, forced
  here by a zero limit)."""
  from plato_jax import metrics
  monkeypatch.setattr(metrics, "_KERNEL_MAX_ROWS", dense_rows_limit)
  n = 150
  if noise is None:
    make = lambda r: [unit_rows(r.normal(size=(n, d)).astype(np.float32)) for d in (16, 12)]
  else:
    make = lambda r: planted(r, n, noise)
  for k in (2, 10, 60):
    for unbiased in (True, False):
      # Only the mask matters, and without `unbiased` self is a candidate.
      a, b = draw(rng, make, k, include_self=not unbiased, boundary_only=True)
      for agnostic in (False, True):
        ours = cknna(a, b, topk=k, distance_agnostic=agnostic, unbiased=unbiased)
        want = ref_cknna(a, b, k, agnostic, unbiased)
        assert ours == pytest.approx(want, rel=1e-5, abs=1e-6), (k, unbiased, agnostic)


def test_cknna_with_exact_ties(rng):
  a, b = integer_rows(rng, 100, 5, -2, 3), integer_rows(rng, 100, 4, -2, 3)
  a[5] = a[9]
  for k in (2, 7, 30):
    for unbiased in (True, False):
      for agnostic in (False, True):
        want = ref_cknna(a, b, k, agnostic, unbiased)
        ours = cknna(a, b, topk=k, distance_agnostic=agnostic, unbiased=unbiased)
        assert ours == pytest.approx(want, rel=1e-9, abs=1e-12), (k, unbiased, agnostic)


def test_cknna_tiny_example():
  # Five rows, exact ties at distance 0 and 0.01; NaN (sqrt of a negative) must match too.
  a = np.array([[1, 0], [1, 0.01], [-1, 0], [-1, 0.01], [0, 1]], np.float32)
  b = np.array([[1, 0], [0, 1], [1, 0.01], [0, 1.01], [-1, 0]], np.float32)
  for k, agnostic, unbiased in [(2, False, True), (2, False, False), (3, True, True),
                                (3, True, False), (4, False, True)]:
    want = ref_cknna(a, b, k, agnostic, unbiased)
    ours = cknna(a, b, topk=k, distance_agnostic=agnostic, unbiased=unbiased)
    assert (math.isnan(ours) and math.isnan(want)) or ours == pytest.approx(want, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# SVCCA


@pytest.mark.parametrize("n,dims,cca_dim", [(300, (32, 24), 10), (200, (16, 40), 5),
                                            (40, (64, 50), 10)])
def test_svcca_equals_sklearn_cca_on_the_same_bases(rng, n, dims, cca_dim):
  for noise in (0.3, 1.5):
    a, b = planted(rng, n, noise, dims=dims, rank=12)
    assert svcca(a, b, cca_dim=cca_dim) == pytest.approx(ref_svcca_sklearn(a, b, cca_dim),
                                                         abs=1e-4)


def test_svcca_is_deterministic_and_symmetric(rng):
  a, b = planted(rng, 100, 0.5)
  assert svcca(a, b) == svcca(a, b)
  assert svcca(a, b) == pytest.approx(svcca(b, a), abs=1e-12)
  assert 0 <= svcca(a, b) <= 1 + 1e-12


# ---------------------------------------------------------------------------------------------
# prepare_features


def test_prepare_features_exact_threshold(rng):
  layer_scale = np.array([1, 5, 1, 0.1])[None, :, None]
  x = (rng.standard_t(3, size=(50, 4, 16)) * layer_scale).astype(np.float32)
  t = np.sort(np.abs(x).ravel())[int(0.95 * x.size)]  # one threshold for all layers
  clamped = np.clip(x, -t, t)
  np.testing.assert_array_equal(prepare_features(x, normalize=False), clamped)
  normalized = clamped / np.maximum(np.linalg.norm(clamped, axis=-1, keepdims=True), 1e-12)
  out = prepare_features(x)
  assert out.dtype == np.float32 and out.shape == x.shape
  np.testing.assert_allclose(out, normalized, rtol=1e-6, atol=1e-7)
  layer = x[:, 1]
  t = np.sort(np.abs(layer).ravel())[int(0.9 * layer.size)]
  np.testing.assert_array_equal(prepare_features(layer, q=0.9, normalize=False),
                                np.clip(layer, -t, t))


def test_prepare_features_approximate_threshold_is_torch_quantile(rng):
  x = rng.standard_t(3, size=(40, 3, 33)).astype(np.float32)
  t_torch = torch.quantile(torch.from_numpy(np.abs(x)).flatten(start_dim=1), 0.95, dim=1).mean()
  want = torch.from_numpy(x).clamp(-t_torch, t_torch).numpy()
  np.testing.assert_allclose(prepare_features(x, exact=False, normalize=False), want, rtol=1e-6)
  t_numpy = np.quantile(np.abs(x).reshape(40, -1), 0.95, axis=1).mean()
  np.testing.assert_allclose(prepare_features(x, exact=False, normalize=False),
                             np.clip(x, -t_numpy, t_numpy), rtol=1e-6)


def test_prepare_features_q1_lists_and_half_inputs(rng):
  x = rng.normal(size=(20, 8)).astype(np.float32)
  np.testing.assert_array_equal(prepare_features(x, q=1, normalize=False), x)
  layers = [rng.normal(size=(20, 8)), 10 * rng.normal(size=(20, 5))]
  out = prepare_features(layers, normalize=False)
  for layer, got in zip(layers, out):  # a list is clamped layer by layer
    np.testing.assert_array_equal(got, prepare_features(layer, normalize=False))
  half = prepare_features(x.astype(ml_dtypes.bfloat16))
  assert half.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(half, axis=-1), 1, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# compute_score


def brute_force_score(feats_A, feats_B, metric, topk, concat):
  """The paper-era loop over layer pairs (range(-1, L) with concat) with single-pair metrics."""
  def candidates(feats):
    layers = feats if isinstance(feats, list) else [feats[:, l] for l in range(feats.shape[1])]
    out = {-1: unit_rows(np.concatenate(layers, axis=1))} if concat else {}
    out.update((l, unit_rows(x)) for l, x in enumerate(layers))
    return out
  kwargs = {"topk": topk} if "knn" in metric else {}
  best, indices, table = 0, None, {}
  for i, x in candidates(feats_A).items():
    for j, y in candidates(feats_B).items():
      table[i, j] = measure(metric, x, y, **kwargs)
      if table[i, j] > best:
        best, indices = table[i, j], (i, j)
  return best, indices, table


@pytest.mark.parametrize("metric", SUPPORTED_METRICS)
def test_compute_score_equals_loop_over_pairs(rng, metric):
  n = 80
  z = rng.normal(size=(n, 6))
  feats_A = np.stack([unit_rows(z @ rng.normal(size=(6, 12)) + s * rng.normal(size=(n, 12)))
                      for s in (0.3, 1.0, 3.0)], axis=1).astype(np.float32)
  feats_B = [(z @ rng.normal(size=(6, d)) + s * rng.normal(size=(n, d))).astype(np.float32)
             for s, d in ((0.5, 10), (2.0, 16))]  # layers of different widths
  for concat in (True, False) if metric in ("mutual_knn", "cka") else (True,):
    result = compute_score(feats_A, feats_B, metric=metric, topk=5, concat=concat)
    best, indices, table = brute_force_score(feats_A, feats_B, metric, 5, concat)
    assert result.table.shape == (3 + concat, 2 + concat)
    for (i, j), score in table.items():
      assert result.table[i, j] == pytest.approx(score, rel=1e-12, abs=1e-15), (i, j)
    assert result.score == pytest.approx(best, rel=1e-12) and result.indices == indices
    assert type(result.score) is float


@pytest.mark.parametrize("metric", ["mutual_knn", "cknna", "cycle_knn"])
def test_compute_score_one_device_equals_eight(rng, monkeypatch, metric):
  import jax
  from jax.sharding import Mesh

  from plato_jax.knn import sharding
  z = rng.normal(size=(300, 4))
  feats_A = np.stack([z @ rng.normal(size=(4, 8)) + s * rng.normal(size=(300, 8))
                      for s in (0.2, 1.0)], axis=1).astype(np.float32)
  feats_B = np.stack([z @ rng.normal(size=(4, 6)) + s * rng.normal(size=(300, 6))
                      for s in (0.5, 2.0, 0.1)], axis=1).astype(np.float32)
  eight = compute_score(feats_A, feats_B, metric=metric, topk=7)
  assert len(jax.devices()) == 8
  monkeypatch.setattr(sharding, "default_mesh",
                      lambda devices=None: Mesh(np.array(jax.devices()[:1]), (sharding.AXIS,)))
  one = compute_score(feats_A, feats_B, metric=metric, topk=7)
  np.testing.assert_array_equal(one.table, eight.table)
  assert one.indices == eight.indices


def test_compute_score_ties_keep_the_first_pair_visited(rng):
  x, y = draw(rng, lambda r: planted(r, 100, 0.5, dims=(12, 12)), 5)
  feats_A, feats_B = np.stack([x, x], axis=1), np.stack([y, y, y], axis=1)
  with_concat = compute_score(feats_A, feats_B, topk=5, concat=True)
  assert np.all(with_concat.table == with_concat.table[0, 0]) and with_concat.score > 0
  assert with_concat.indices == (-1, -1)  # the concatenation is visited first
  assert compute_score(feats_A, feats_B, topk=5).indices == (0, 0)


def test_compute_score_without_a_positive_score():
  # k=1 neighbours: A pairs (0,1) and (2,3), B pairs (0,2) and (1,3): never shared.
  a = np.array([[1, 0], [1, 0.1], [-1, 0], [-1, 0.1]], np.float32)
  b = a[[0, 2, 1, 3]]
  result = compute_score(a[:, None], b[:, None], topk=1)
  assert result.score == 0.0 and result.indices is None
  assert result.table.tolist() == [[0.0]]


def test_mutual_knn_at_scale(rng, monkeypatch):
  n, k = 20_000, 10
  a, b = planted(rng, n, 0.7, dims=(64, 64), rank=16)
  results = []
  def recording_search(*args, **kwargs):
    results.append(search(*args, **kwargs))
    return results[-1]
  monkeypatch.setattr(metrics, "search", recording_search)
  start = time.perf_counter()
  score = mutual_knn(a, b, k)
  assert time.perf_counter() - start < 120  # engine-bound; seconds on a loaded 2-core machine
  nb_a, nb_b = results
  overlap = sum(len(set(p) & set(q)) for p, q in zip(nb_a.ids.tolist(), nb_b.ids.tolist()))
  assert score == pytest.approx(overlap / (n * k), abs=1e-12)
  # Sampled rows equal a float64 brute force (rows that float32 rounding could reorder skipped).
  rows = rng.choice(n, 50, replace=False)
  for x, nb in ((a, nb_a), (b, nb_b)):
    s = x[rows].astype(np.float64) @ x.astype(np.float64).T
    s[np.arange(len(rows)), rows] = -np.inf
    want = np.lexsort((np.broadcast_to(np.arange(n), s.shape), -s), axis=1)[:, :k]
    top = -np.sort(-s, axis=1)[:, :k + 1]
    safe = np.min(top[:, :-1] - top[:, 1:], axis=1) > 1e-6
    assert safe.sum() > 25
    np.testing.assert_array_equal(nb.ids[rows][safe], want[safe])


class NeighbourLists(NamedTuple):
  ids: np.ndarray
  scores: np.ndarray


def test_neighbour_list_metrics_at_n_100k(rng, monkeypatch):
  """Everything after the search is O(N·k): checked at N = 100,000 against scipy.sparse
  restatements of the reference's N×N formulas, with the search replaced by fixed lists."""
  n, k = 100_000, 10
  def lists():
    # Distinct ids near i (so reciprocal and shared neighbours are common), never i itself.
    offsets = 1 + np.argsort(rng.random((n, 3 * k)), axis=1)[:, :k]
    ids = (np.arange(n)[:, None] + offsets * rng.choice([-1, 1], size=(n, k))) % n
    return NeighbourLists(ids, (1 + 0.5 * rng.normal(size=(n, k))).astype(np.float32))
  by_source = {0.0: lists(), 1.0: lists()}
  monkeypatch.setattr(metrics, "search", lambda rows, gallery, k, exclude_self: by_source[
      float(rows[0, 0])])
  a, b = np.zeros((n, 1), np.float32), np.ones((n, 1), np.float32)

  start = time.perf_counter()
  ours = [mutual_knn(a, b, k), cycle_knn(a, b, k), cknna(a, b, topk=k),
          cknna(a, b, topk=k, distance_agnostic=True)]
  assert time.perf_counter() - start < 60  # seconds on a loaded 2-core machine
  assert all(math.isfinite(x) for x in ours)

  def matrix(nb, values=None):
    rows = np.repeat(np.arange(n), k)
    data = np.ones(n * k) if values is None else values.ravel().astype(np.float64)
    return scipy.sparse.csr_matrix((data, (rows, nb.ids.ravel())), shape=(n, n))
  def hsic_unbiased(K, L):  # zero diagonals already
    m = n
    return ((K.multiply(L.T)).sum() + K.sum() * L.sum() / ((m - 1) * (m - 2))
            - 2 * (K @ L).sum() / (m - 2)) / (m * (m - 3))
  def sim(nb_k, nb_l, agnostic):
    mask = matrix(nb_k).multiply(matrix(nb_l))
    if agnostic:
      return hsic_unbiased(mask, mask)
    return hsic_unbiased(mask.multiply(matrix(nb_k, nb_k.scores)),
                         mask.multiply(matrix(nb_l, nb_l.scores)))
  def ref_cknna_sparse(agnostic):
    nb_a, nb_b = by_source[0.0], by_source[1.0]
    return sim(nb_a, nb_b, agnostic) / (
        np.sqrt(sim(nb_a, nb_a, agnostic) * sim(nb_b, nb_b, agnostic)) + 1e-6)
  knn_a, knn_b = by_source[0.0].ids, by_source[1.0].ids
  want = [matrix(by_source[0.0]).multiply(matrix(by_source[1.0])).sum() / (n * k),
          np.mean((knn_a[knn_b] == np.arange(n)[:, None, None]).reshape(n, -1).max(axis=1)),
          ref_cknna_sparse(False), ref_cknna_sparse(True)]
  np.testing.assert_allclose(ours, want, rtol=1e-9)


def test_linear_cka_and_svcca_at_n_100k(rng):
  n = 100_000
  a, b = planted(rng, n, 0.5, dims=(64, 48))
  start = time.perf_counter()
  values = [cka(a, b), unbiased_cka(a, b), svcca(a, b)]
  assert time.perf_counter() - start < 60
  # Subsampling changes the estimate only slightly (both are consistent estimators).
  sub = rng.choice(n, 600, replace=False)
  np.testing.assert_allclose(values[:2], [ref_cka(a[sub], b[sub]),
                                          ref_cka(a[sub], b[sub], unbiased=True)], atol=0.05)


# ---------------------------------------------------------------------------------------------
# Bad input


def raises(match, fn, *args, **kwargs):
  with pytest.raises(ValueError, match=match):
    fn(*args, **kwargs)


def test_errors_name_the_problem(rng):
  a, b = rng.normal(size=(10, 4)), rng.normal(size=(11, 4))
  for name in SUPPORTED_METRICS:
    kwargs = {"topk": 3} if "knn" in name else {}
    raises("10 rows but feats_B has 11", measure, name, a, b, **kwargs)
    raises("2-D", measure, name, a[:, :, None], a, **kwargs)
  raises("2-D", mutual_knn, a[0], a[0], 1)
  raises("smaller than N=10", mutual_knn, a, a, 10)
  raises("topk must be >= 1", lcs_knn, a, a, 0)
  raises("topk must be an integer", cycle_knn, a, a, 2.5)
  raises("topk >= 2", cknna, a, a, topk=1)
  raises("topk >= 2", cknna, a, a)
  raises("smaller than N=10", cknna, a, a, topk=10)
  raises("Unrecognized metric", measure, "nope", a, a)
  raises("Unrecognized metric", compute_score, a[:, None], a[:, None], metric="nope")
  raises("Invalid kernel metric", cka, a, a, kernel_metric="poly")
  raises("D=4 < cca_dim=10", svcca, a, a)
  raises("float16, bfloat16, float32 or float64", mutual_knn, a.astype(int), a, 2)


def test_errors_list_the_offending_rows(rng):
  a = rng.normal(size=(30, 5))
  bad = a.copy()
  bad[3, 1], bad[17, 0], bad[29, 4] = np.nan, np.inf, -np.inf
  for name in SUPPORTED_METRICS:
    kwargs = {"topk": 3} if "knn" in name else {}
    raises(r"feats_B has NaN/Inf values in 3 row\(s\): \[3, 17, 29\]", measure, name, a, bad,
           **kwargs)
  many = a.copy()
  many[::2] = np.nan
  raises(r"15 row\(s\): \[0, 2, 4, 6, 8, 10, 12, 14, 16, 18\] and 5 more", mutual_knn, many, a, 2)
  raises(r"feats_A has NaN/Inf values in 3 row\(s\): \[3, 17, 29\]", compute_score,
         bad[:, None], a[:, None])
  raises(r"\[3, 17, 29\]", prepare_features, bad)

  zero = np.stack([a, a], axis=1)
  zero[[4, 9], 1] = 0
  raises(r"zero-norm rows after clamping.*rows \[4, 9\] \(layers \[1\]\)", prepare_features, zero)
  raises(r"feats_B layer 1 has zero-norm rows.*rows \[4, 9\]", compute_score,
         np.stack([a, a], axis=1), zero)


def test_errors_for_too_few_rows(rng):
  a = rng.normal(size=(3, 12))
  raises("at least 4 rows", unbiased_cka, a, a)
  raises("at least 4 rows", cka, a, a, unbiased=True)
  raises("at least 4 rows", cknna, a, a, topk=2)
  raises("at least 4 rows", compute_score, a[:, None], a[:, None], metric="unbiased_cka")
  assert math.isfinite(cka(a, a))  # the biased estimator has no such limit
  raises("more rows than cca_dim", svcca, rng.normal(size=(10, 12)), rng.normal(size=(10, 12)))
  raises("D=6 < cca_dim=10", compute_score, rng.normal(size=(20, 2, 6)),
         rng.normal(size=(20, 1, 12)), metric="svcca")


def test_mutual_knn_from_neighbours_refuses_repeated_ids():
  from plato_jax.metrics import mutual_knn_from_neighbours
  a = np.array([[1, 2, -1, -1], [4, 5, 6, 7]])
  b = np.array([[1, 2, -1, -1], [4, 5, 6, 8]])
  with pytest.raises(ValueError, match=r"ids_A: rows \[0\] repeat an id"):
    mutual_knn_from_neighbours(a, b)
  assert mutual_knn_from_neighbours(a[1:], b[1:]) == 0.75


def test_constant_features_warn(rng):
  x = rng.standard_normal((30, 4)).astype(np.float32)
  with pytest.warns(UserWarning, match="feats_B: all 30 rows are equal"):
    metrics.mutual_knn(x, np.ones((30, 4), np.float32), 3)


# ---- per-query agreement, its intervals, chance correction and rank-biased overlap ----------


def _random_rankings(rng, q, k, universe):
  """Two [q, k] neighbour rankings per query that share a random part of their ids."""
  a = np.stack([rng.choice(universe, k, replace=False) for _ in range(q)])
  b = a.copy()
  for row in b:
    swap = rng.random(k) < rng.random()
    row[swap] = rng.choice(np.setdiff1d(np.arange(universe), row), swap.sum(), replace=False)
    rng.shuffle(row[: int(rng.integers(0, k + 1))])
  return a, b


def _rbo_by_definition(s, t, p):
  """Webber et al. (2010) eq. 32, from running sets of the two prefixes."""
  k = len(s)
  seen_s, seen_t, x, total = set(), set(), 0, 0.0
  for d in range(1, k + 1):
    x += (s[d - 1] in seen_t) + (t[d - 1] in seen_s) + (s[d - 1] == t[d - 1])
    seen_s.add(s[d - 1])
    seen_t.add(t[d - 1])
    total += x / d * p ** d
  return x / k * p ** k + (1 - p) / p * total


def test_per_query_overlap_and_chance_correction(rng):
  a, b = _random_rankings(rng, 40, int(rng.integers(2, 30)), 200)
  k = a.shape[1]
  want = np.array([len(set(r) & set(t)) / k for r, t in zip(a, b)])
  got = metrics.mutual_knn_per_query(a, b)
  np.testing.assert_allclose(got, want)
  assert metrics.mutual_knn_from_neighbours(a, b) == pytest.approx(want.mean())
  n = int(rng.integers(k + 2, 10_000))
  c = k / (n - 1)
  np.testing.assert_allclose(metrics.chance_corrected(got, k, n), (want - c) / (1 - c))
  assert metrics.chance_corrected(c, k, n) == pytest.approx(0.0)
  assert metrics.chance_corrected(1.0, k, n) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="must lie in"):
    metrics.chance_corrected(0.5, 10, 11)


def test_rank_biased_overlap_equals_its_definition(rng):
  for p in (0.5, 0.9, 0.98):
    a, b = _random_rankings(rng, 25, int(rng.integers(1, 60)), 120)
    want = [_rbo_by_definition(list(r), list(t), p) for r, t in zip(a, b)]
    np.testing.assert_allclose(metrics.rank_biased_overlap(a, b, p), want, rtol=1e-12)
  a = rng.permutation(1000)[:50][None]
  assert metrics.rank_biased_overlap(a, a)[0] == pytest.approx(1.0)
  assert metrics.rank_biased_overlap(a, a + 1000)[0] == 0.0
  # one swap at the top costs more than one at the bottom
  top, bottom = a.copy(), a.copy()
  top[0, [0, 1]] = top[0, [1, 0]]
  bottom[0, [48, 49]] = bottom[0, [49, 48]]
  assert metrics.rank_biased_overlap(a, top)[0] < metrics.rank_biased_overlap(a, bottom)[0] < 1
  with pytest.raises(ValueError, match="p must lie in"):
    metrics.rank_biased_overlap(a, a, 1.0)


def test_bootstrap_equals_a_plain_numpy_bootstrap(rng):
  values = rng.random(int(rng.integers(5, 300)))
  seed, resamples = int(rng.integers(1000)), int(rng.integers(10, 700))
  draw = np.random.default_rng(seed)
  means = [values[draw.integers(0, values.size, values.size)].mean() for _ in range(resamples)]
  lo, hi = metrics.bootstrap_interval(values, resamples=resamples, seed=seed)
  assert (lo, hi) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])), rel=1e-12)
  other = rng.random(values.size)
  draw = np.random.default_rng(seed)
  diffs = np.array([(values - other)[draw.integers(0, values.size, values.size)].mean()
                    for _ in range(resamples)])
  got = metrics.paired_bootstrap(values, other, resamples=resamples, seed=seed)
  assert got["difference"] == pytest.approx((values - other).mean())
  assert (got["low"], got["high"]) == pytest.approx(tuple(np.quantile(diffs, [0.025, 0.975])))
  tail = min((diffs <= 0).sum(), (diffs >= 0).sum())
  assert got["p_value"] == pytest.approx(min(1, 2 * (tail + 1) / (resamples + 1)))
  assert metrics.paired_bootstrap(values, values)["p_value"] == 1.0
  assert metrics.paired_bootstrap(values + 1, values)["p_value"] == pytest.approx(2 / 1001)
  with pytest.raises(ValueError, match="same queries"):
    metrics.paired_bootstrap(values, other[1:])


def test_bootstrap_interval_covers_a_known_mean_95_times_in_100(rng):
  """Per-query overlaps of k = 10 drawn around a known mean: the 95% interval of 2,000
  samples of 400 queries covers it in 93–97% of them (binomial sd of the rate: 0.5%;
  measured 94.7%. With 100 queries the percentile interval runs narrow: 93.5%)."""
  truth, covered = 0.3, 0
  for trial in range(2000):
    overlaps = rng.binomial(10, truth, 400) / 10
    lo, hi = metrics.bootstrap_interval(overlaps, resamples=1000, seed=trial)
    covered += lo <= truth <= hi
  assert 0.93 <= covered / 2000 <= 0.97, covered / 2000


def test_lift_area_equals_a_fine_integral_and_is_one_at_chance(rng):
  n, ks = 200, np.array([1, 2, 5, 11, 30, 80, 199])
  overlaps = rng.integers(0, 1000, (6, len(ks))) / 1000
  lo, hi = np.log(1.5 / n), np.log(150 / n)
  got = metrics.lift_area(ks, overlaps, n, lo, hi)
  fine = np.linspace(lo, hi, 200_001)
  lift = overlaps / (ks / (n - 1))
  want = [np.trapezoid(np.interp(fine, np.log(ks / n), row), fine) / (hi - lo) for row in lift]
  np.testing.assert_allclose(got, want, rtol=1e-7)
  # two independent random neighbour sets of each query (itself excluded): lift 1 on average
  q = 4000
  sets = {k: [np.stack([rng.choice(n - 1, k, replace=False) for _ in range(q)])
              for _ in range(2)] for k in ks}
  chance = np.stack([[len(np.intersect1d(a, b)) / k for a, b in zip(*sets[k])] for k in ks], 1)
  assert metrics.lift_area(ks, chance, n, np.log(1 / n), np.log(199 / n)).mean() == \
      pytest.approx(1, abs=0.08)  # sd 0.019 over seeds
  with pytest.raises(ValueError, match="cover"):
    metrics.lift_area(ks, overlaps, n, np.log(0.5 / n), hi)
