"""Mutual k-NN as the gallery grows (Koepke et al. §4.1): one pass per model, every size, every k.

The galleries are `plato_jax.gallery`'s: queries first, then the other rows in seeded
random order; sizes are prefixes; queries are excluded as self; each model's layer is fixed
on the queries (optionally after PRH's outlier clamp, and among the layers' concatenation
too: `plato_jax.clamp`). For each size n and each k (an int or `n/100`), m_NN = mean over queries of
|N_a(q) ∩ N_b(q)| / k with its 95% bootstrap interval over queries (`metrics.bootstrap_interval`:
which queries were drawn, not which gallery), the chance level c = k/(n-1) and the
chance-corrected (m_NN - c)/(1 - c). Per size, the rank-biased overlap (p = 0.9, depth 100)
of the two neighbour rankings with its interval; per k, how much m_NN falls from the smallest
gallery to the largest (a paired bootstrap over the same queries: interval and p-value); per
modality the mean cosine of the top-1 and top-10 neighbours (Koepke Table 1). For a k sweep
(`log:M`), per size the mean lift of m_NN over chance across the k/n range every size covers
(`metrics.lift_area`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from plato_jax import metrics
from plato_jax.clamp import gallery_threshold
from plato_jax.gallery import (DEFAULT_KS, DEFAULT_SIZES, choose_layers, layer_neighbours,
                               plan_galleries, query_features)
from plato_jax.store import FeatureStore

RBO_P, RBO_DEPTH = 0.9, 100  # the first 100 ranks carry all but 0.9^100 ≈ 3e-5 of the weight


@dataclasses.dataclass
class ScalingResult:
  layer_a: int | str          # a layer index, or `clamp.CONCAT`
  layer_b: int | str
  layer_table: list | None
  num_queries: int
  rows: list[dict]            # one per (size, k): size, k_spec, k, mutual_knn (with
                              # mutual_knn_low/high), chance, chance_corrected (low/high),
                              # and the size's top-1 / top-10 cosines of each model
  quality: list[dict]         # one per (size, modality): mean cosine of top-1 / top-10
  ranking: list[dict] = dataclasses.field(default_factory=list)  # one per size: rank-biased
                              # overlap (rbo, rbo_low/high) at RBO_DEPTH, RBO_P
  change: list[dict] = dataclasses.field(default_factory=list)  # one per k: m_NN at the
                              # smallest size minus at the largest, paired over queries
                              # (difference, low, high, p_value)
  clamp: str = "none"         # the outlier clamp, and each model's threshold (None: none)
  thresholds: dict = dataclasses.field(default_factory=dict)
  lift: list[dict] = dataclasses.field(default_factory=list)  # per k sweep and size: the
                              # mean lift of m_NN over chance across the k/n range all
                              # sizes' sweeps cover (lift_area, low/high; `metrics.lift_area`)


def run_scaling(store_a: FeatureStore, store_b: FeatureStore, *, layer_a="auto", layer_b="auto",
                queries: int | Sequence[int] = 1024, sizes: Sequence[str | int] = DEFAULT_SIZES,
                ks: Sequence[str] = DEFAULT_KS, seed: int = 0, gallery_seed: int | None = None,
                common_rows: bool = False, clamp: str = "none", concat: bool = False,
                gallery_ids=None, resume_dir: str | None = None,
                checkpoint_every: int = 16, mesh=None, tile_rows: int | None = None,
                progress: bool = True) -> ScalingResult:
  """Runs the scaling protocol on two stores of the same rows (see the module docstring).

  `queries` is a count (drawn with `seed`) or explicit row ids present in both stores.
  Sizes above the stores' rows are an error; `sizes` are counts like '10k'. `gallery_seed`
  (default `seed`) draws the gallery order alone: the same queries in another gallery.
  `common_rows`: stores whose rows differ are measured on the ids both hold.
  `gallery_ids`: the rows galleries draw from besides the queries (`plan_galleries`).
  `clamp` ("none", "exact", "approx"): PRH's 95-percentile clamp, each model's threshold
  from its largest gallery, every layer (`plato_jax.clamp`); `concat`: `auto` layers may
  choose the concatenation of all layers.
  """
  plan = plan_galleries(store_a, store_b, queries, sizes, ks, seed, gallery_seed, common_rows,
                        gallery_ids)
  query_rows, size_list, k_by_size = plan.query_rows, plan.sizes, plan.k_by_size
  num_q = len(query_rows)
  # Per size: its largest k, 10 for the top-10 cosine, RBO_DEPTH for the rank-biased overlap.
  keep = [max([k for _, k in k_by_size[n]] + [min(RBO_DEPTH, n - 1)]) for n in size_list]

  q_a = store_a.gather(query_rows).astype(np.float32)
  q_b = store_b.gather(plan.on(store_b).query_rows).astype(np.float32)
  thresholds = {name: gallery_threshold(store, plan.on(store).order, clamp, progress=progress)
                for name, store in (("a", store_a), ("b", store_b))}
  la, lb, table = choose_layers(store_a, store_b, q_a, q_b, layer_a, layer_b,
                                (thresholds["a"], thresholds["b"]), concat)

  found = {}
  for name, store, layer, q in (("a", store_a, la, q_a), ("b", store_b, lb, q_b)):
    if progress:
      print(f"model {name}: layer {layer} of {store.root}", flush=True)
    found[name] = layer_neighbours(
        store, layer, query_features(q, layer, thresholds[name]), plan, keep,
        threshold=thresholds[name], mesh=mesh, tile_rows=tile_rows,
        progress=progress, checkpoint_every=checkpoint_every,
        resume_dir=None if resume_dir is None else os.path.join(resume_dir, name))

  rows, quality, ranking, overlaps = [], [], [], {}
  for i, n in enumerate(size_list):
    na, nb = found["a"][i], found["b"][i]
    for name, nbrs in (("a", na), ("b", nb)):
      top = nbrs.top(min(10, nbrs.k))
      quality.append(dict(size=n, model=name, top1_cosine=float(top.scores[:, 0].mean()),
                          top10_cosine=float(top.scores.mean())))
    # The CSV's rows carry this size's cosines too (Koepke Table 1).
    cosines = {f"{what}_{q['model']}": q[what] for q in quality[-2:]
               for what in ("top1_cosine", "top10_cosine")}
    for spec, k in k_by_size[n]:
      overlap = overlaps[n, spec, k] = metrics.mutual_knn_per_query(na.top(k).ids,
                                                                    nb.top(k).ids)
      row = dict(size=n, k_spec=spec, k=k,
                 **metrics.with_interval("mutual_knn", overlap, seed=seed), chance=k / (n - 1))
      # An affine map of m_NN: its interval maps with it. At k = n - 1 every row is a
      # neighbour: m_NN is 1, and its chance correction 0/0.
      m = [row["mutual_knn"], row["mutual_knn_low"], row["mutual_knn_high"]]
      corrected = metrics.chance_corrected(m, k, n).tolist() if k < n - 1 else [None] * 3
      rows.append(dict(row, **dict(zip(["chance_corrected", "chance_corrected_low",
                                        "chance_corrected_high"], corrected)), **cosines))
    depth = min(RBO_DEPTH, na.k)
    rbo = metrics.rank_biased_overlap(na.top(depth).ids, nb.top(depth).ids, RBO_P)
    ranking.append(dict(size=n, depth=depth, p=RBO_P,
                        **metrics.with_interval("rbo", rbo, seed=seed)))

  def one_k(size):  # spec -> its k at this size, for specs naming one k (not a log grid)
    specs = [spec for spec, _ in k_by_size[size]]
    return {spec: k for spec, k in k_by_size[size] if specs.count(spec) == 1}

  small, large = size_list[0], size_list[-1]
  at_large = one_k(large)
  change = [dict(k_spec=spec, from_size=small, to_size=large,
                 **metrics.paired_bootstrap(overlaps[small, spec, k],
                                            overlaps[large, spec, at_large[spec]], seed=seed))
            for spec, k in one_k(small).items() if spec in at_large and small != large]
  return ScalingResult(la, lb, table, num_q, rows, quality, ranking, change, clamp, thresholds,
                       _lift_areas(k_by_size, overlaps, seed))


def _lift_areas(k_by_size, overlaps, seed) -> list[dict]:
  """Per k sweep (a spec naming several k's at a size) and size: the mean lift of m_NN over
  chance (`metrics.lift_area`) over the range of k/n every size's sweep covers."""
  out = []
  for spec in dict.fromkeys(spec for pairs in k_by_size.values() for spec, _ in pairs):
    sweeps = {n: [k for s, k in pairs if s == spec] for n, pairs in k_by_size.items()}
    if max(len(ks) for ks in sweeps.values()) < 2:
      continue
    lo = max(np.log(ks[0] / n) for n, ks in sweeps.items())
    hi = min(np.log(ks[-1] / n) for n, ks in sweeps.items())
    if lo >= hi:
      continue
    for n, ks in sweeps.items():
      per_query = np.stack([overlaps[n, spec, k] for k in ks], axis=1)
      areas = metrics.lift_area(ks, per_query, n, lo, hi)
      out.append(dict(k_spec=spec, size=n, from_k_over_n=float(np.exp(lo)),
                      to_k_over_n=float(np.exp(hi)),
                      **metrics.with_interval("lift_area", areas, seed=seed)))
  return out
