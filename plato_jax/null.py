"""The permutation null of layer-searched mutual k-NN (Koepke et al. App. A.2 after Gröger et
al.): how much of the best-layer score is the search itself?

Searching all L_a × L_b layer pairs for the best mutual k-NN selects upward: even with the
pairing destroyed, the maximum over pairs is above any one pair's chance level. The null
shuffles the pairing — model b's rows are relabelled by a random permutation π of the
gallery — and recomputes every pair's score and their maximum, as the search would.

One neighbour computation serves every permutation. With N_b(q) the neighbours of row q in
model b, the relabelled model's neighbours are N_{b∘π}(q) = π⁻¹(N_b(π(q))). π maps queries
to queries and the other gallery rows among themselves (under the null any permutation is
as good, and this one only needs neighbours of queries, which the engine has). Per
permutation a pair's score costs one sort of [Q, 2k].

Reported per gallery size n and k (Koepke et al. App. A.2):
  raw_fixed        the pair chosen on the queries alone (n = Q), as the papers fix it
  raw_reselected   the best pair at this n (per-scale re-selection, Fig. 15)
  null_fixed       E_π[score of the fixed pair]: its chance level
  null_max         E_π[max over pairs]: the selection-aware chance level
  tau              the critical value: the ⌈quantile·(P+1)⌉-th smallest of the observed
                   maximum and the P permutation maxima (Gröger et al., Algorithm 2)
  p_value          (1 + #{permutation maxima ≥ raw_reselected}) / (P + 1)
  calibrated       raw_reselected − null_max (Koepke's subtraction, selection-aware)
  calibrated_tau   (raw_reselected − tau) / (1 − tau), clipped to [0, 1] (Gröger's form, as
                   their `calibrated-similarity` package computes it: tested equal on the
                   same permutations)

The two calibrations answer different questions. raw − E_π[max] is an effect size: how far
the score sits above what the layer search finds by chance on average; it can be negative
and is not scaled. (raw − τ)/(1 − τ) is a thresholded, rescaled score: 0 for every score a
test at level 1 − quantile would not reject, and the share of the room above τ otherwise;
it depends on the number of permutations through τ.
raw_fixed and raw_reselected carry 95% bootstrap intervals over queries (`_low`, `_high`:
which queries were drawn; the re-selected pair is taken as chosen); the null terms are
Monte-Carlo means over the permutations.
"""
from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from plato_jax import metrics
from plato_jax.gallery import layer_neighbours, plan_galleries
from plato_jax.knn import IdRows

CALIBRATION_EPS = 1e-12  # the smallest 1 − τ divided by (τ = 1: every score maps to 0)


@dataclasses.dataclass
class NullResult:
  layer_a: int                # the pair fixed on the queries alone
  layer_b: int
  permutations: int
  quantile: float
  rows: list[dict]            # per (size, k): the numbers of the module docstring


def pair_scores(pos_a, pos_b):
  """[L_a, L_b] mutual k-NN of every layer pair; pos_* [L, Q, k] neighbour positions."""
  return np.array([[metrics.mutual_knn_from_neighbours(a, b) for b in pos_b] for a in pos_a])


def permuted(pos_b, n: int, num_queries: int, rng):
  """Model b's neighbour lists after relabelling its rows by a random π (queries among
  queries, the rest among the rest of the first n gallery positions)."""
  perm = np.concatenate([rng.permutation(num_queries),
                         num_queries + rng.permutation(n - num_queries)])
  inverse = np.empty(n, np.int64)
  inverse[perm] = np.arange(n)
  # Query i of b∘π sees π⁻¹ of the neighbours of query π(i) of b.
  return inverse[pos_b[:, perm[:num_queries]]]


def permutation_null(pos_a, pos_b, n: int, fixed: tuple[int, int], permutations: int,
                     quantile: float, seed) -> dict:
  """The docstring's numbers for one gallery size n and one k, from every layer's neighbour
  positions pos_* [L, Q, k] (positions < n)."""
  num_queries = pos_a.shape[1]
  raw = pair_scores(pos_a, pos_b)
  rng = np.random.default_rng(seed)
  maxima, at_fixed = [], []
  for _ in range(permutations):
    null = pair_scores(pos_a, permuted(pos_b, n, num_queries, rng))
    maxima.append(null.max())
    at_fixed.append(null[fixed])
  null_max = float(np.mean(maxima))
  best = float(raw.max())
  # Gröger et al.'s Algorithm 2: τ is an order statistic of the observed maximum together
  # with the permutation maxima, the p-value counts the maxima that reach the observed one.
  combined = np.sort(np.r_[best, maxima])
  tau = float(combined[min(max(math.ceil(quantile * (permutations + 1)) - 1, 0),
                           permutations)])
  p_value = (1 + int(np.sum(np.asarray(maxima) >= best))) / (permutations + 1)
  pair = tuple(int(i) for i in np.unravel_index(raw.argmax(), raw.shape))
  interval_seed = int(np.random.default_rng(seed).integers(2**31))
  fixed_per_query = metrics.mutual_knn_per_query(pos_a[fixed[0]], pos_b[fixed[1]])
  best_per_query = metrics.mutual_knn_per_query(pos_a[pair[0]], pos_b[pair[1]])
  return dict(**metrics.with_interval("raw_fixed", fixed_per_query, seed=interval_seed),
              **metrics.with_interval("raw_reselected", best_per_query, seed=interval_seed),
              reselected_pair=list(pair),
              null_fixed=float(np.mean(at_fixed)), null_max=null_max, tau=tau,
              calibrated=best - null_max, p_value=p_value,
              calibrated_tau=min(max((best - tau) / max(1 - tau, CALIBRATION_EPS), 0.0), 1.0))


def run_null(store_a, store_b, *, queries=1024, sizes=("1024", "10k", "50k"), ks=("1", "10"),
             permutations: int = 100, quantile: float = 0.95, seed: int = 0,
             resume_dir: str | None = None, progress: bool = True, **search_options
             ) -> NullResult:
  """The null for every gallery size and k: one engine pass per layer of each model (all
  sizes from it, as in `plato_jax.scaling`), then `permutation_null` per (size, k). The
  fixed pair is the best at n = Q with k = 10 (ties: lower layers first)."""
  plan = plan_galleries(store_a, store_b, queries, sizes, ks, seed)
  num_q = len(plan.query_rows)
  k_fixed = min(10, num_q - 1)
  keep = [max([k for _, k in plan.k_by_size[n]] + [k_fixed if i == 0 else 1])
          for i, n in enumerate(plan.sizes)]
  rows_in_order = IdRows(plan.ids[plan.order])  # neighbour ids → gallery positions
  positions = {}  # model -> [L, sizes] lists of [Q, keep] positions
  for name, store in (("a", store_a), ("b", store_b)):
    queries_all = store.gather(plan.on(store).query_rows).astype(np.float32)
    per_layer = []
    for layer in range(store.num_layers):
      if progress:
        print(f"model {name}: layer {layer + 1}/{store.num_layers}", flush=True)
      found = layer_neighbours(
          store, layer, queries_all[:, layer], plan, keep, progress=progress,
          resume_dir=None if resume_dir is None else os.path.join(resume_dir, f"{name}{layer}"),
          **search_options)
      per_layer.append([rows_in_order(f.ids, "neighbour ids outside the gallery")
                        for f in found])
    positions[name] = per_layer

  def at(name, size_index, k):
    return np.stack([layer[size_index][:, :k] for layer in positions[name]])

  fixed_scores = pair_scores(at("a", 0, k_fixed), at("b", 0, k_fixed))
  fixed = tuple(int(i) for i in np.unravel_index(fixed_scores.argmax(), fixed_scores.shape))
  rows = []
  for i, n in enumerate(plan.sizes):
    for spec, k in plan.k_by_size[n]:
      stats = permutation_null(at("a", i, k), at("b", i, k), n, fixed, permutations, quantile,
                               seed=[seed, n, k])
      rows.append(dict(size=n, k_spec=spec, k=k, chance=k / (n - 1), **stats))
  return NullResult(fixed[0], fixed[1], permutations, quantile, rows)
