"""Relaxed mutual k-NN when one modality has several items per source (Koepke et al. §4.3,
Fig. 9/22): several images per prompt (T2I) or captions per image (I2T).

Data. A dense store (several items per source; a "group" column holds each item's source
id) and a sparse store of the other modality (one row per source, its id the source id).
Queries are sources; a query's dense item is its source's first item (store order). The
dense gallery at multiplicity m holds the first m items of every source (all of them if a
source has fewer): items are ordered round-robin by their rank within their source, so the
galleries are nested and one engine pass gives every m. The sparse gallery holds every
source. Each query excludes its own item (by id) in both; its source's other dense items
stay retrievable, as in the paper's Fig. 10.

Counting (the paper leaves the rule open; both readings are reported). With G_d(q) the
source ids of q's k dense neighbours (a source may repeat) and G_s(q) those of its k
sparse neighbours (distinct: one item per source):
    group_set      |set(G_d) ∩ G_s| / k                 distinct sources retrieved by both
    matched_slots  |{j ∈ N_k^d(q) : g(j) ∈ G_s}| / k    dense neighbours whose source the
                                                        sparse side retrieved ("a match is
                                                        counted when the retrieved item
                                                        corresponds to the same source")
Both equal mutual k-NN when every source has one item (m = 1); they part when the dense
neighbours hold several items of a source the sparse side also found. Each carries a 95%
bootstrap interval over queries (`_low`, `_high`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from plato_jax import metrics
from plato_jax.gallery import choose_layers, resolve_queries
from plato_jax.knn import IdRows, search, search_prefixes


def round_robin(groups) -> tuple[np.ndarray, np.ndarray]:
  """(rows ordered by (rank within source, row), the rank of each row in that order)."""
  groups = np.asarray(groups)
  by_group = np.lexsort((np.arange(len(groups)), groups))
  sorted_groups = groups[by_group]
  starts = np.r_[0, np.flatnonzero(sorted_groups[1:] != sorted_groups[:-1]) + 1]
  rank = np.empty(len(groups), np.int64)
  rank[by_group] = np.arange(len(groups)) - np.repeat(starts, np.diff(np.r_[starts, len(groups)]))
  order = np.lexsort((np.arange(len(groups)), rank))
  return order, rank[order]


def relaxed_scores(groups_d, groups_s):
  """Per query (group_set, matched_slots) for [Q, k] source ids of the two neighbour lists."""
  k = groups_d.shape[1]
  group_set = np.array([len(np.intersect1d(d, s)) for d, s in zip(groups_d, groups_s)]) / k
  slots = np.array([np.isin(d, s).sum() for d, s in zip(groups_d, groups_s)]) / k
  return group_set, slots


def run_many_to_many(dense, sparse, *, layer_dense="auto", layer_sparse="auto", queries=1024,
                     multiplicities: Sequence[int] = (1, 4, 7, 12), ks: Sequence[int] = (1, 10),
                     seed: int = 0, progress: bool = False, **search_options) -> dict:
  """{"layer_dense", "layer_sparse", "rows": one per (m, k)}; see the module docstring."""
  if "group" not in dense.meta.get("columns", []):
    raise ValueError(f"{dense.root} has no 'group' column (the source id of each item)")
  groups = dense.column("group")
  if not np.all(groups == np.round(groups)):
    raise ValueError(f"{dense.root}: group ids of rows "
                     f"{np.flatnonzero(groups != np.round(groups))[:10].tolist()} are not integers")
  groups = groups.astype(np.int64)
  sources = sparse.ids()
  unknown = np.setdiff1d(groups, sources)
  if unknown.size:
    raise ValueError(f"{dense.root}: groups {unknown[:10].tolist()} have no row in {sparse.root}")
  order, rank = round_robin(groups)
  first_item = {}
  for r, g in zip(order, groups[order]):
    first_item.setdefault(int(g), int(r))
  missing = np.setdiff1d(sources, groups)
  if missing.size:
    raise ValueError(f"sources {missing[:10].tolist()} of {sparse.root} have no item in "
                     f"{dense.root}")
  ms = sorted({int(m) for m in multiplicities})
  sizes = [int(np.sum(rank < m)) for m in ms]
  if len(set(sizes)) < len(sizes):
    raise ValueError(f"multiplicities {ms} give equal galleries {sizes}: no source has that "
                     f"many items")
  ks = sorted({int(k) for k in ks})
  q_rows = resolve_queries(sources, queries, seed, where=sparse.root)
  q_sources = sources[q_rows]
  q_dense_rows = np.array([first_item[int(s)] for s in q_sources])
  dense_ids = dense.ids()
  qd = dense.gather(q_dense_rows).astype(np.float32)
  qs = sparse.gather(q_rows).astype(np.float32)
  ld, ls, _ = choose_layers(dense, sparse, qd, qs, layer_dense, layer_sparse)
  ranks = np.empty(len(order), np.int64)
  ranks[order] = np.arange(len(order))
  near_dense = search_prefixes(qd[:, ld], dense.layer(ld), ks[-1],
                               query_ids=dense_ids[q_dense_rows], prefix_sizes=sizes,
                               prefix_ranks=ranks, normalize=True, progress=progress,
                               **search_options)
  near_sparse = search(qs[:, ls], sparse.layer(ls), ks[-1], query_ids=q_sources,
                       normalize=True, progress=progress, **search_options)
  dense_rows = IdRows(dense_ids)
  rows = []
  for m, size, found in zip(ms, sizes, near_dense):
    for k in ks:
      gd = groups[dense_rows(found.top(k).ids)]
      gs = near_sparse.top(k).ids
      group_set, slots = relaxed_scores(gd, gs)
      rows.append(dict(multiplicity=m, k=k, dense_gallery=size, sparse_gallery=len(sources),
                       **metrics.with_interval("group_set", group_set, seed=seed),
                       **metrics.with_interval("matched_slots", slots, seed=seed),
                       own_source_in_dense=float(np.mean(gd == q_sources[:, None]))))
  return dict(layer_dense=int(ld), layer_sparse=int(ls), num_queries=len(q_rows), rows=rows)
