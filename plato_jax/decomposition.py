"""Class versus instance: what the alignment that survives is made of (Koepke et al. §4.2,
App. B).

Protocol. One query per class; the gallery holds `ipc` other items of every class (ImageNet
val: 1 query + up to 49 gallery images of each class's 50). Each class's items are put in
one seeded random order: its first item is the query, the rest are its gallery candidates
in that order, so the galleries are nested (ipc = 1 ⊂ 9 ⊂ …) and one engine pass per model
gives every ipc (gallery order: every class's first candidate, then every class's second,
…). Queries are not in the gallery (the paper leaves this open; this reading keeps "1
query + ipc gallery items" literal).

Per query q of class c(q), with N_k(q) its k cosine neighbours in a model:
    acc_img  = |{j ∈ N_k^a(q) : c(j) = c(q)}| / k      (k = 1: "DINOv2 acc.")
    acc_txt  = the same in model b                      ("OpenLlama acc.")
    both     = acc_img · acc_txt                        (k = 1: both correct)
    strict   = |N_k^a(q) ∩ N_k^b(q)| / k                (mutual k-NN: the same instances)
each averaged over the queries, with 95% bootstrap intervals over queries (`_low`, `_high`).
At k = 1 these are the paper's indicators; at k = 10 they are precisions at k (the paper's
App. B.3 does not define its k = 10 variant), capped at ipc / k where a class has fewer
than k gallery items; `hit_img` / `hit_txt` say whether any of the k is of the query's
class (hit@k, what a retrieval curve needs).

With class-name features for model b (every item of a class described by its class name
alone, so all of a class's items are exact ties), the same numbers show how much of the
alignment is the label: ties are broken by id, the engine's rule.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from plato_jax import metrics
from plato_jax.knn import IdRows, search_prefixes


def class_order(labels, seed: int):
  """(query rows [C], gallery rows in order [C × m], classes [C], m): per class a seeded
  random order, its first item the query; m = the smallest class size − 1."""
  labels = np.asarray(labels)
  classes, counts = np.unique(labels, return_counts=True)
  if len(classes) < 2:
    raise ValueError(f"need at least two classes, got {classes.tolist()}")
  smallest = int(counts.min())
  if smallest < 2:
    raise ValueError(f"class {classes[counts.argmin()]} has {smallest} item(s): a query and at "
                     f"least one gallery item are needed per class")
  rng = np.random.default_rng([seed, 7])
  members = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
  queries = np.array([m[0] for m in members])
  depth = smallest - 1
  gallery = np.stack([m[1:1 + depth] for m in members], axis=1).reshape(-1)  # round-robin
  return queries, gallery, classes, depth


def class_decomposition(features_a, features_b, labels, ipcs: Sequence[int],
                        ks: Sequence[int] = (1, 10), *, seed: int = 0, ids=None,
                        features_b_names=None, progress: bool = False, **search_options
                        ) -> list[dict]:
  """One row per (ipc, k): acc_img, acc_txt, both, strict (and with `features_b_names`,
  the class-name variant's acc_txt_names, both_names, strict_names). features_* [N, D] (one
  layer), labels [N]; ids [N] default to row numbers."""
  labels = np.asarray(labels)
  n = len(labels)
  ids = np.arange(n) if ids is None else np.asarray(ids)
  queries, gallery, classes, depth = class_order(labels, seed)
  ipcs = sorted({int(i) for i in ipcs})
  if ipcs[0] < 1 or ipcs[-1] > depth:
    raise ValueError(f"ipc must lie in [1, {depth}] (the smallest class has {depth + 1} items, "
                     f"one of them the query), got {ipcs}")
  sizes = [len(classes) * i for i in ipcs]
  ks = sorted({int(k) for k in ks})
  if ks[-1] > sizes[0]:
    raise ValueError(f"k={ks[-1]} exceeds the smallest gallery ({sizes[0]} items at ipc="
                     f"{ipcs[0]})")
  order = gallery[:sizes[-1]]
  models = {"a": features_a, "b": features_b}
  if features_b_names is not None:
    models["b_names"] = features_b_names
  found = {}
  for name, x in models.items():
    x = np.asarray(x)
    if x.shape[0] != n:
      raise ValueError(f"features of model {name} have {x.shape[0]} rows, labels {n}")
    found[name] = search_prefixes(x[queries], x[order], ks[-1], gallery_ids=ids[order],
                         exclude_self=False, prefix_sizes=sizes, normalize=True,
                         progress=progress, **search_options)
  rows_of = IdRows(ids)
  query_class = labels[queries][:, None]
  rows = []
  for s, ipc in enumerate(ipcs):
    for k in ks:
      nb = {name: f[s].top(k).ids for name, f in found.items()}
      hit = {name: labels[rows_of(v)] == query_class for name, v in nb.items()}
      acc = {name: h.mean(axis=1) for name, h in hit.items()}
      found_any = {name: h.any(axis=1).astype(np.float64) for name, h in hit.items()}
      row = dict(ipc=ipc, k=k, gallery_size=sizes[s],
                 **metrics.with_interval("acc_img", acc["a"], seed=seed),
                 **metrics.with_interval("acc_txt", acc["b"], seed=seed),
                 **metrics.with_interval("both", acc["a"] * acc["b"], seed=seed),
                 **metrics.with_interval(
                     "strict", metrics.mutual_knn_per_query(nb["a"], nb["b"]), seed=seed),
                 hit_img=float(found_any["a"].mean()), hit_txt=float(found_any["b"].mean()))
      if "b_names" in nb:
        row.update(acc_txt_names=float(acc["b_names"].mean()),
                   both_names=float((acc["a"] * acc["b_names"]).mean()),
                   strict_names=metrics.mutual_knn_from_neighbours(nb["a"], nb["b_names"]))
      rows.append(row)
  return rows


def class_name_features(features, labels):
  """Stand-in class-name features: every item gets its class's mean feature (identical
  within a class), for data without class-name captions (the synthetic world)."""
  features, labels = np.asarray(features, np.float32), np.asarray(labels)
  out = np.empty_like(features)
  for c in np.unique(labels):
    mask = labels == c
    out[mask] = features[mask].mean(axis=0)
  return out
