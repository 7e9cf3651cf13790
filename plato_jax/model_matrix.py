"""Alignment among many models of one modality on one set of rows (PRH Fig. 2 and 12: 78
vision models on 1,000 Places-365 images): the model-by-model matrix of a metric, its
within-bin means when models are binned by a score (PRH: VTAB tasks solved), a 2-D
embedding of −log(alignment), and how the eight metrics rank the pairs alike (Spearman).

Each model is one layer of its store, clamped and L2-normalised as PRH prepares features
(`metrics.prepare_features`). The matrix comes from `metrics.score_table`: every model's
neighbours (or kernel, or basis) once, then all pairs — for mutual k-NN one batched pass
over the [M, N, k] neighbour ids.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from plato_jax import metrics
from plato_jax.clamp import CLAMPS, QUANTILE
from plato_jax.grid import MetricSpec, model_name, query_features


def model_features(stores, layer="-1", *, queries=1000, seed: int = 0,
                   clamp: str = "exact") -> tuple[list[str], list[np.ndarray]]:
  """(model names, one [Q, D_m] float32 matrix per store): `layer` (an index or a layer name,
  of every store) of the same query rows, clamped at PRH's quantile (`clamp`: "exact",
  "approx" or "none") and L2-normalised."""
  if clamp not in CLAMPS:
    raise ValueError(f"clamp must be one of {CLAMPS}, got {clamp!r}")
  _, feats = query_features(list(stores), queries, seed)
  out = []
  for store, f in zip(stores, feats):
    # PRH's clamp: one threshold over all the model's layers; then the chosen layer.
    prepared = metrics.prepare_features(f, q=1.0 if clamp == "none" else QUANTILE,
                                        exact=clamp == "exact")
    out.append(prepared[:, store.layer_index(str(layer))])
  return [model_name(s) for s in stores], out


def pairwise_matrix(features: Sequence[np.ndarray], spec: MetricSpec) -> np.ndarray:
  """[M, M] float64: entry (i, j) the metric of model i against model j (the diagonal: each
  against itself; cycle_knn is not symmetric, the pair tables take i < j)."""
  return metrics.score_table(spec.metric, list(features), list(features), spec.topk)


def pair_values(matrix: np.ndarray) -> np.ndarray:
  """The M(M−1)/2 entries above the diagonal (pair i < j), row-major."""
  i, j = np.triu_indices(len(matrix), 1)
  return matrix[i, j]


def bin_alignment(matrix: np.ndarray, scores: Sequence[float], bins: int | Sequence[float]
                  ) -> list[dict]:
  """Models binned by `scores` (an int: that many equal-count bins; else bin edges, each
  bin [lo, hi), the last closed); per bin its models and the mean alignment over its pairs
  (off the diagonal), with the spread over pairs (sd) — PRH Fig. 2's bars."""
  scores = np.asarray(scores, np.float64)
  if isinstance(bins, (int, np.integer)):
    # (integer scores repeat quantiles: equal edges merge, so fewer bins may come out)
    edges = np.unique(np.quantile(scores, np.linspace(0, 1, int(bins) + 1)))
    if len(edges) == 1:
      edges = np.repeat(edges, 2)
  else:
    edges = np.asarray(bins, np.float64)
    outside = np.flatnonzero((scores < edges[0]) | (scores > edges[-1])) if len(edges) else []
    if len(outside):
      raise ValueError(f"scores {scores[outside][:5].tolist()} lie outside the bin edges "
                       f"[{edges[0]}, {edges[-1]}]")
  if len(edges) < 2 or np.any(np.diff(edges) < 0):
    raise ValueError(f"bin edges must be at least two ascending values, got {edges.tolist()}")
  which = np.clip(np.searchsorted(edges, scores, side="right") - 1, 0, len(edges) - 2)
  rows = []
  for b in range(len(edges) - 1):
    members = np.flatnonzero(which == b)
    pairs = pair_values(matrix[np.ix_(members, members)]) if len(members) > 1 else np.zeros(0)
    rows.append(dict(bin=b, low=float(edges[b]), high=float(edges[b + 1]),
                     models=members.tolist(), pairs=len(pairs),
                     alignment=float(pairs.mean()) if len(pairs) else float("nan"),
                     alignment_sd=float(pairs.std(ddof=1)) if len(pairs) > 1 else float("nan")))
  return rows


def distances(matrix: np.ndarray, floor: float) -> np.ndarray:
  """−log(alignment), symmetrised, zero on the diagonal; alignments under `floor` (none
  shared: −log 0) count as `floor`."""
  sym = (matrix + matrix.T) / 2
  d = -np.log(np.maximum(sym, floor))
  np.fill_diagonal(d, 0.0)
  return d


def embedding(matrix: np.ndarray, floor: float, seed: int = 0) -> np.ndarray:
  """[M, 2] UMAP embedding (umap-learn, precomputed distances) of `distances`."""
  try:
    import umap
  except ImportError:
    raise ImportError("the embedding needs umap-learn (pip install 'plato-jax[analysis]'); "
                      "experiments.vision_vision runs without it with --noumap") from None
  d = distances(matrix, floor)
  reducer = umap.UMAP(metric="precomputed", n_neighbors=max(2, min(15, len(d) - 1)),
                      random_state=seed, init="random")
  return reducer.fit_transform(d)


def cluster_order(matrix: np.ndarray, floor: float) -> np.ndarray:
  """Models in the leaf order of an average-linkage clustering of `distances` (the
  clustered matrix)."""
  from scipy.cluster.hierarchy import leaves_list, linkage
  from scipy.spatial.distance import squareform
  if len(matrix) < 3:
    return np.arange(len(matrix))
  return leaves_list(linkage(squareform(distances(matrix, floor), checks=False), "average"))


@dataclasses.dataclass
class RankCorrelation:
  metric_a: str
  metric_b: str
  spearman: float
  p_value: float
  pairs: int


def metric_rank_correlations(matrices: dict[str, np.ndarray]) -> list[RankCorrelation]:
  """Spearman's ρ (and its p-value) between every two metrics' values over the same model
  pairs (PRH Fig. 12)."""
  from scipy.stats import spearmanr
  names = list(matrices)
  values = {n: pair_values(m) for n, m in matrices.items()}
  out = []
  for a in names:
    for b in names:
      rho, p = spearmanr(values[a], values[b])
      out.append(RankCorrelation(a, b, float(rho), float(p), len(values[a])))
  return out
