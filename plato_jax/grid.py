"""Best-layer alignment of every (model A, model B) pair on one query set (PRH Fig. 3/4,
Koepke Fig. 3b), and the OLS trend tests of Koepke et al. App. D.

The PRH protocol on N queries (WIT-1024 in the papers): every model's features of all
layers for the same rows; the outlier clamp (`clamp`: "exact" or "approx" at the 0.95
quantile, or "none") and per-layer L2 norm (`metrics.prepare_features`); then `metrics.compute_score` — the metric's maximum over all
layer pairs (optionally with the concatenation of all layers as a candidate). The stores
must hold the same row ids; the queries are drawn once with the seed. mutual_knn scores
carry a 95% bootstrap interval over the queries (`score_low`, `score_high`) for the layer
pair the search chose (the choice itself is not resampled: it selects upward, see
`plato_jax.null`).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from plato_jax import metrics
from plato_jax.clamp import CLAMPS, QUANTILE
from plato_jax.gallery import resolve_queries


def model_name(store) -> str:
  """A store's model name: its metadata's, else the last part of its path."""
  name = store.meta.get("model")
  if name:
    return str(name)
  return store.root.rstrip("/").rsplit("/", 1)[-1]


def query_features(stores, queries, seed: int):
  """[Q, L, D] float32 features of the same query rows from each store (ids must agree)."""
  ids = stores[0].ids()
  for s in stores[1:]:
    other = s.ids()
    if other.shape != ids.shape or not np.array_equal(other, ids):
      raise ValueError(f"stores {stores[0].root} and {s.root} do not hold the same row ids")
  rows = resolve_queries(ids, queries, seed)
  return rows, [s.gather(rows).astype(np.float32) for s in stores]


def prepared_queries(stores, queries, seed: int, clamp: str):
  """(query rows, [Q, L, D] features per store) clamped as PRH does (`clamp`: "exact",
  "approx" at the 0.95 quantile, or "none"); compute_score normalises the layers."""
  if clamp not in CLAMPS:
    raise ValueError(f"clamp must be one of {CLAMPS}, got {clamp!r}")
  rows, feats = query_features(stores, queries, seed)
  return rows, [f if clamp == "none" else
                metrics.prepare_features(f, q=QUANTILE, exact=clamp == "exact") for f in feats]


@dataclasses.dataclass(frozen=True)
class MetricSpec:
  metric: str
  topk: int | None = None  # kNN metrics and CKNNA

  @property
  def label(self) -> str:
    return self.metric if self.topk is None else f"{self.metric}@{self.topk}"


def metric_specs(names: Sequence[str], topk: int, cknna_ks: Sequence[int]) -> list[MetricSpec]:
  """'all' expands to the eight metrics; kNN metrics take `topk`; CKNNA each of `cknna_ks`."""
  names = metrics.SUPPORTED_METRICS if list(names) == ["all"] else list(names)
  out = []
  for name in names:
    if name not in metrics.SUPPORTED_METRICS:
      raise ValueError(f"unknown metric {name!r}; supported: {metrics.SUPPORTED_METRICS}")
    if name == "cknna":
      out += [MetricSpec(name, k) for k in cknna_ks]
    else:
      out.append(MetricSpec(name, topk if "knn" in name else None))
  return out


def alignment_grid(stores_a, stores_b, specs: Sequence[MetricSpec], *, queries=1024,
                   seed: int = 0, clamp: str = "exact", concat: bool = False,
                   progress: bool = True) -> list[dict]:
  """One row per (model a, model b, metric): best score and its layer pair (-1: concat)."""
  rows, prepared = prepared_queries(list(stores_a) + list(stores_b), queries, seed, clamp)
  fa, fb = prepared[:len(stores_a)], prepared[len(stores_a):]
  out = []
  for i, (sa, xa) in enumerate(zip(stores_a, fa)):
    for j, (sb, xb) in enumerate(zip(stores_b, fb)):
      if progress:
        print(f"pair {i + 1}/{len(stores_a)} x {j + 1}/{len(stores_b)}: {model_name(sa)} vs "
              f"{model_name(sb)}", flush=True)
      for spec in specs:
        if spec.metric == "mutual_knn":
          score, (layer_a, layer_b), per_row = best_pair_overlaps(xa, xb, spec.topk, concat)
        else:
          best = metrics.compute_score(xa, xb, spec.metric, topk=spec.topk, normalize=True,
                                       concat=concat)
          score, per_row = best.score, None
          layer_a, layer_b = best.indices if best.indices is not None else (None, None)
        row = dict(model_a=model_name(sa), model_b=model_name(sb), metric=spec.label,
                   score=score, layer_a=layer_a, layer_b=layer_b, num_queries=len(rows))
        if per_row is not None:
          row["score_low"], row["score_high"] = metrics.bootstrap_interval(per_row, seed=seed)
        out.append(row)
  return out


def best_pair_overlaps(xa, xb, topk: int, concat: bool = False):
  """(score, (layer a, layer b), per-query overlaps |N_a ∩ N_b| / k [Q] or None) of mutual
  k-NN's best layer pair of prepared features [Q, L, D] (-1: the concatenation): what its
  interval over the queries resamples (the choice itself is not resampled)."""
  best = metrics.compute_score(xa, xb, "mutual_knn", topk=topk, normalize=True, concat=concat)
  if best.indices is None:
    return best.score, (None, None), None
  layer_a, layer_b = best.indices
  return best.score, (layer_a, layer_b), metrics.mutual_knn_per_row(
      _layer(xa, layer_a), _layer(xb, layer_b), topk)


def caption_length_alignment(stores_a, texts: dict, *, topk: int = 10, queries=1024,
                             seed: int = 0, clamp: str = "exact", concat: bool = False,
                             words: dict | None = None) -> list[dict]:
  """Alignment against caption length (PRH Fig. 9, Koepke Fig. 25): `texts` maps each
  caption length (a name, in order) to the language models' stores of the same rows'
  captions at that length. Per model a and length: best-layer mutual k-NN against each
  language model, their mean, its 95% interval (bootstrap over the queries of the
  per-query overlap averaged over the language models) and the spread over them (sd).
  `words`: each length's mean caption words, reported beside it."""
  lengths = list(texts)
  flat = [s for name in lengths for s in texts[name]]
  rows, prepared = prepared_queries(list(stores_a) + flat, queries, seed, clamp)
  fa, fb = prepared[:len(stores_a)], iter(prepared[len(stores_a):])
  by_length = {name: [(s, next(fb)) for s in texts[name]] for name in lengths}
  out = []
  for sa, xa in zip(stores_a, fa):
    for position, name in enumerate(lengths):
      scores, per_rows = [], []
      for sb, xb in by_length[name]:
        score, _, per_row = best_pair_overlaps(xa, xb, topk, concat)
        scores.append(score)
        per_rows.append(per_row if per_row is not None else np.zeros(len(rows)))
      mean_rows = np.mean(per_rows, axis=0)
      low, high = metrics.bootstrap_interval(mean_rows, seed=seed)
      out.append(dict(model_a=model_name(sa), length=name, position=position,
                      words=(words or {}).get(name), models_b=[model_name(s) for s, _ in
                                                               by_length[name]],
                      alignment=float(np.mean(scores)), alignment_low=low, alignment_high=high,
                      sd_over_models_b=float(np.std(scores, ddof=1)) if len(scores) > 1
                      else float("nan"), num_queries=len(rows)))
  return out


def _layer(x, index: int) -> np.ndarray:
  """One layer of [N, L, D] features as unit rows, as `metrics.compute_score` takes it
  (-1: all layers concatenated, normalised as a whole)."""
  rows = x.reshape(len(x), -1) if index == -1 else x[:, index]
  return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def ols(x, y):
  """(intercept, slope) of the least-squares line y ≈ intercept + slope · x."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if len(x) < 2 or np.ptp(x) == 0:
    raise ValueError(f"OLS needs at least two distinct x values, got {x.tolist()}")
  slope, intercept = np.polyfit(x, y, 1)
  return float(intercept), float(slope)


def trend_fit(x_base, y_base, x_new=(), y_new=()) -> dict:
  """Koepke et al. App. D: OLS on the base models; R²(base) = r² there; on the new models
  R²(new) = 1 − Σ(y − ŷ)² / Σ(y − ȳ_new)² with ŷ from the base line (negative: worse than
  predicting their mean). NaN where undefined (fewer than two new models, or no spread)."""
  intercept, slope = ols(x_base, y_base)
  yb = np.asarray(y_base, np.float64)
  fit_b = intercept + slope * np.asarray(x_base, np.float64)
  ss_b = np.sum((yb - yb.mean()) ** 2)
  r2_base = float(1 - np.sum((yb - fit_b) ** 2) / ss_b) if ss_b > 0 else float("nan")
  r2_new = float("nan")
  if len(x_new) >= 2:
    yn = np.asarray(y_new, np.float64)
    ss_n = np.sum((yn - yn.mean()) ** 2)
    if ss_n > 0:
      r2_new = float(1 - np.sum((yn - (intercept + slope * np.asarray(x_new))) ** 2) / ss_n)
  return dict(intercept=intercept, slope=slope, r2_base=r2_base, r2_new=r2_new)
