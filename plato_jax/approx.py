"""Approximate k-NN against the exact engine, in alignment terms (experiment exact_vs_approx).

Methods (each: build an index over a gallery of unit rows, then the queries' top-k by
inner product = cosine; a query's own row is excluded by id, as the engine does — methods
that cannot exclude by id are asked for k + 1 and the query's own id is dropped):
  exact          `plato_jax.knn.search` (recall 1 by construction: the reference)
  approx_max_k   `jax.lax.approx_max_k` per tile at a recall target. Approximate only on TPU;
                 on CPU and GPU it sorts exactly (reported in the `approximate` field).
  bucketed       TPU-KNN's partial reduce, in plain jnp (any backend): each tile's columns
                 fall into L buckets, only each bucket's maximum survives, then an exact
                 top-k of the survivors. A top-k element is lost when a better one shares
                 its bucket: expected recall = 1 − (k − 1) / (2L), so L = ⌈(k−1)/(2(1−r))⌉
                 for a recall target r (columns are in random gallery order).
  faiss_ivf      faiss IndexIVFFlat (inner product; nlist ≈ 4√n, at most n/39), at each nprobe
  faiss_hnsw     faiss IndexHNSWFlat (inner product, M = 32), at each efSearch
  usearch        usearch HNSW (inner product), at each expansion_search, when installed
  hnswlib        hnswlib HNSW (inner product), at each ef, when installed

Measures (ANN-benchmarks conventions): recall@k = |A ∩ E| / k;
tie-aware recall counts an approximate neighbour as right when its exact score reaches the
exact k-th score minus ε, with ε = γ_d = d·u / (1 − d·u), u = 2⁻²⁴ — the float32 rounding
bound of a dot product of unit vectors, so results that differ only by rounding are not
misses; the per-query histogram of |A ∩ E|; mutual k-NN between two models from
approximate neighbours against the exact one (Δ m_NN); queries/s, build seconds, index
bytes.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from typing import Callable

import numpy as np

from plato_jax import metrics
from plato_jax.gallery import choose_layers, plan_galleries
from plato_jax.knn import IdRows, search

F32_UNIT = 2.0**-24


def tie_epsilon(dim: int) -> float:
  """γ_d for float32: the rounding bound of a d-term dot product of unit vectors."""
  return dim * F32_UNIT / (1 - dim * F32_UNIT)


def buckets_for(k: int, recall_target: float) -> int:
  """L with expected recall 1 − (k−1)/(2L) ≥ the target (TPU-KNN)."""
  if not 0 < recall_target < 1:
    raise ValueError(f"recall target must lie in (0, 1), got {recall_target}")
  return max(1, math.ceil((k - 1) / (2 * (1 - recall_target)) - 1e-9))  # 1 − 0.9 ≠ 0.1


@dataclasses.dataclass
class Run:
  method: str
  setting: str
  ids: np.ndarray         # [Q, k] gallery ids
  build_s: float
  search_s: float
  index_bytes: int
  approximate: bool       # False where the method ran exactly on this backend


def _drop_self(ids, query_ids, k):
  """From k + 1 candidates per row (sorted best first), drop the row's own id (else the last)."""
  out = np.empty((ids.shape[0], k), ids.dtype)
  for r, (row, me) in enumerate(zip(ids, query_ids)):
    keep = row[row != me]
    out[r] = keep[:k] if len(keep) >= k else np.pad(keep, (0, k - len(keep)), constant_values=-1)
  return out


def _timed(fn, warm_up: bool = False):
  """(fn(), seconds); with `warm_up` a first untimed call takes compilation out."""
  if warm_up:
    fn()
  t = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t


def run_exact(gallery, gallery_ids, queries, query_ids, k) -> Run:
  found, seconds = _timed(lambda: search(queries, gallery, k, query_ids=query_ids,
                                         gallery_ids=gallery_ids), warm_up=True)
  return Run("exact", "-", found.ids, 0.0, seconds, gallery.nbytes, False)


def _tiled_candidates(gallery, queries, select, tile_rows: int):
  """Per tile: `select(scores [Q, T])` → (values, columns) candidates; all tiles' together."""
  import jax.numpy as jnp
  values, columns = [], []
  q = jnp.asarray(queries)
  for start in range(0, len(gallery), tile_rows):
    tile = jnp.asarray(gallery[start:start + tile_rows])
    v, c = select(q @ tile.T)
    values.append(np.asarray(v))
    columns.append(np.asarray(c) + start)
  return np.concatenate(values, 1), np.concatenate(columns, 1)


def _finish(values, columns, gallery_ids, query_ids, k):
  """Exact top-(k+1) of the candidates, ids, own id dropped."""
  order = np.argsort(-values, axis=1, kind="stable")[:, :k + 1]
  ids = gallery_ids[np.take_along_axis(columns, order, 1)]
  return _drop_self(ids, query_ids, k)


def run_approx_max_k(gallery, gallery_ids, queries, query_ids, k, recall_target,
                     tile_rows=65536) -> Run:
  import jax
  from jax import lax
  select = jax.jit(lambda s: lax.approx_max_k(s, min(k + 1, s.shape[1]),
                                              recall_target=recall_target))
  (values, columns), seconds = _timed(
      lambda: _tiled_candidates(gallery, queries, select, tile_rows), warm_up=True)
  ids = _finish(values, columns, gallery_ids, query_ids, k)
  return Run("approx_max_k", f"recall_target={recall_target}", ids, 0.0, seconds,
             gallery.nbytes, jax.default_backend() == "tpu")


def run_bucketed(gallery, gallery_ids, queries, query_ids, k, recall_target,
                 tile_rows=65536) -> Run:
  import jax
  import jax.numpy as jnp
  buckets = buckets_for(k + 1, recall_target)

  def select(s):
    t = s.shape[1]
    width = max(1, -(-t // buckets))
    pad = width * buckets - t
    s = jnp.pad(s, ((0, 0), (0, pad)), constant_values=-jnp.inf).reshape(s.shape[0], -1, width)
    return s.max(axis=2), s.argmax(axis=2) + jnp.arange(s.shape[1]) * width

  select = jax.jit(select)
  (values, columns), seconds = _timed(
      lambda: _tiled_candidates(gallery, queries, select, tile_rows), warm_up=True)
  keep = np.isfinite(values)
  columns = np.where(keep, columns, 0)
  ids = _finish(np.where(keep, values, -np.inf), columns, gallery_ids, query_ids, k)
  return Run("bucketed", f"recall_target={recall_target} (L={buckets}/tile)", ids, 0.0,
             seconds, gallery.nbytes, True)


def _faiss_index_bytes(index) -> int:
  import faiss
  return int(faiss.serialize_index(index).size)


def run_faiss_ivf(gallery, gallery_ids, queries, query_ids, k, nprobes) -> list[Run]:
  import faiss
  n, d = gallery.shape
  nlist = max(1, min(n // 39, int(4 * math.sqrt(n))))  # faiss wants >= 39 points per list
  quantizer = faiss.IndexFlatIP(d)
  index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
  _, build = _timed(lambda: (index.train(gallery), index.add(gallery)))
  size = _faiss_index_bytes(index)
  runs = []
  for nprobe in nprobes:
    index.nprobe = min(nprobe, nlist)
    (_, rows), seconds = _timed(lambda: index.search(queries, k + 1))
    ids = _drop_self(np.where(rows >= 0, gallery_ids[rows], -1), query_ids, k)
    runs.append(Run("faiss_ivf", f"nprobe={nprobe}", ids, build, seconds, size,
                    index.nprobe < nlist))  # nprobe >= nlist scans every list: exact
  return runs


def run_faiss_hnsw(gallery, gallery_ids, queries, query_ids, k, efs) -> list[Run]:
  import faiss
  index = faiss.IndexHNSWFlat(gallery.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
  _, build = _timed(lambda: index.add(gallery))
  size = _faiss_index_bytes(index)
  runs = []
  for ef in efs:
    index.hnsw.efSearch = max(ef, k + 1)
    (_, rows), seconds = _timed(lambda: index.search(queries, k + 1))
    ids = _drop_self(np.where(rows >= 0, gallery_ids[rows], -1), query_ids, k)
    runs.append(Run("faiss_hnsw", f"M=32 efSearch={index.hnsw.efSearch}", ids, build, seconds,
                    size, True))
  return runs


def run_usearch(gallery, gallery_ids, queries, query_ids, k, efs) -> list[Run]:
  from usearch.index import Index
  index = Index(ndim=gallery.shape[1], metric="ip", dtype="f32")
  _, build = _timed(lambda: index.add(np.asarray(gallery_ids, np.uint64), gallery))
  runs = []
  for ef in efs:
    index.expansion_search = max(ef, k + 1)
    found, seconds = _timed(lambda: index.search(queries, k + 1))
    ids = _drop_self(np.asarray(found.keys, np.int64), query_ids, k)
    runs.append(Run("usearch", f"expansion_search={index.expansion_search}", ids, build,
                    seconds, int(index.memory_usage), True))
  return runs


def run_hnswlib(gallery, gallery_ids, queries, query_ids, k, efs) -> list[Run]:
  import hnswlib
  index = hnswlib.Index(space="ip", dim=gallery.shape[1])
  index.init_index(max_elements=len(gallery), M=32, ef_construction=200)
  _, build = _timed(lambda: index.add_items(gallery, gallery_ids))
  with tempfile.TemporaryDirectory() as tmp:  # the index's size as saved
    index.save_index(os.path.join(tmp, "index"))
    size = os.path.getsize(os.path.join(tmp, "index"))
  runs = []
  for ef in efs:
    index.set_ef(max(ef, k + 1))
    (labels, _), seconds = _timed(lambda: index.knn_query(queries, k + 1))
    ids = _drop_self(np.asarray(labels, np.int64), query_ids, k)
    runs.append(Run("hnswlib", f"M=32 ef={max(ef, k + 1)}", ids, build, seconds, size, True))
  return runs


# name -> (python module it needs or None, runner(gallery, ids, queries, qids, k, options))
METHODS: dict[str, tuple[str | None, Callable]] = {
    "approx_max_k": (None, lambda g, gi, q, qi, k, o: [
        run_approx_max_k(g, gi, q, qi, k, r) for r in o["recall_targets"]]),
    "bucketed": (None, lambda g, gi, q, qi, k, o: [
        run_bucketed(g, gi, q, qi, k, r) for r in o["recall_targets"]]),
    "faiss_ivf": ("faiss", lambda g, gi, q, qi, k, o: run_faiss_ivf(g, gi, q, qi, k, o["nprobe"])),
    "faiss_hnsw": ("faiss", lambda g, gi, q, qi, k, o: run_faiss_hnsw(g, gi, q, qi, k, o["ef"])),
    "usearch": ("usearch", lambda g, gi, q, qi, k, o: run_usearch(g, gi, q, qi, k, o["ef"])),
    "hnswlib": ("hnswlib", lambda g, gi, q, qi, k, o: run_hnswlib(g, gi, q, qi, k, o["ef"])),
}


def available(names) -> tuple[list[str], list[str]]:
  """(methods whose libraries import, methods skipped for want of one)."""
  import importlib
  ok, missing = [], []
  for name in names:
    if name not in METHODS:
      raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    module = METHODS[name][0]
    try:
      if module:
        importlib.import_module(module)
      ok.append(name)
    except ImportError:
      missing.append(name)
  return ok, missing


def recall(approx_ids, exact_ids) -> np.ndarray:
  """Per query |A ∩ E| (ids, -1 never matching)."""
  return np.array([len(np.intersect1d(a[a >= 0], e)) for a, e in zip(approx_ids, exact_ids)])


def tie_aware_hits(approx_ids, gallery, rows_of, kth_exact, epsilon) -> np.ndarray:
  """Per query (row q of `gallery`, queries first): approximate neighbours whose exact
  score, in float64, reaches the exact k-th score − ε. Ids < 0 (missing) never count."""
  found = approx_ids >= 0
  rows = rows_of(np.where(found, approx_ids, rows_of.ids[0]))
  queries = gallery[:len(approx_ids)].astype(np.float64)
  scores = np.einsum("qkd,qd->qk", gallery[rows].astype(np.float64), queries)
  return ((scores >= kth_exact[:, None] - epsilon) & found).sum(axis=1)


def compare(store_a, store_b, *, queries=1024, sizes=("1024", "10k", "50k"), k: int = 10,
            methods=("approx_max_k", "bucketed", "faiss_ivf", "faiss_hnsw", "usearch",
                     "hnswlib"),
            recall_targets=(0.8, 0.9, 0.95, 0.99), nprobe=(1, 4, 16, 64), ef=(16, 32, 64, 128),
            layer_a="auto", layer_b="auto", seed: int = 0, progress: bool = False,
            keep_ids: bool = False) -> dict:
  """Every available method at every setting and gallery size, against the exact engine.
  Galleries are the scaling protocol's nested prefixes (queries first, excluded as self);
  the layers are fixed on the queries. Returns {"layer_a", "layer_b", "skipped", "rows",
  "epsilon"}; with `keep_ids` each row also holds both models' neighbour ids and the
  gallery's ids (for checking the numbers)."""
  plan = plan_galleries(store_a, store_b, queries, sizes, [str(k)], seed)
  num_q = len(plan.query_rows)
  q_a = store_a.gather(plan.query_rows).astype(np.float32)
  q_b = store_b.gather(plan.on(store_b).query_rows).astype(np.float32)
  la, lb, _ = choose_layers(store_a, store_b, q_a, q_b, layer_a, layer_b)
  ok, skipped = available(methods)
  options = dict(recall_targets=recall_targets, nprobe=nprobe, ef=ef)
  ids_all = plan.ids[plan.order]
  feats = {}
  for name, store, layer in (("a", store_a, la), ("b", store_b, lb)):
    x = store.read_layer(layer).astype(np.float32)[plan.order]  # gallery order, queries first
    feats[name] = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  epsilon = tie_epsilon(feats["a"].shape[1])
  rows = []
  for n in plan.sizes:
    gallery_ids, query_ids = ids_all[:n], ids_all[:num_q]
    rows_of = IdRows(gallery_ids)
    exact, runs, kth = {}, {}, {}
    for name, x in feats.items():
      g, q = np.ascontiguousarray(x[:n]), np.ascontiguousarray(x[:num_q])
      exact[name] = run_exact(g, gallery_ids, q, query_ids, k)
      kth[name] = np.einsum("qd,qd->q", q.astype(np.float64),
                            g[rows_of(exact[name].ids[:, -1])].astype(np.float64))
      runs[name] = {"exact": [exact[name]]}
      for method in ok:
        if progress:
          print(f"n={n:,} model {name}: {method}", flush=True)
        runs[name][method] = METHODS[method][1](g, gallery_ids, q, query_ids, k, options)
    mnn_exact = metrics.mutual_knn_from_neighbours(exact["a"].ids, exact["b"].ids)
    for method in ["exact", *ok]:
      for ra, rb in zip(runs["a"][method], runs["b"][method]):
        per_model = {}
        for name, run in (("a", ra), ("b", rb)):
          per_model[name] = (recall(run.ids, exact[name].ids),
                             tie_aware_hits(run.ids, feats[name][:n], rows_of, kth[name],
                                            epsilon))
        valid_a = np.where(ra.ids >= 0, ra.ids, -1 - np.arange(k))  # -1 pads never match
        valid_b = np.where(rb.ids >= 0, rb.ids, -1 - k - np.arange(k))
        mnn = metrics.mutual_knn_from_neighbours(valid_a, valid_b)
        searched = ra.search_s + rb.search_s
        rows.append(dict(
            size=n, method=method, setting=ra.setting, approximate=ra.approximate,
            recall=float(np.mean([per_model[m][0].mean() for m in "ab"]) / k),
            tie_recall=float(np.mean([per_model[m][1].mean() for m in "ab"]) / k),
            recall_a=float(per_model["a"][0].mean() / k),
            recall_b=float(per_model["b"][0].mean() / k),
            mnn_exact=mnn_exact, mnn_approx=mnn, delta_mnn=mnn - mnn_exact,
            queries_per_s=2 * num_q / searched if searched > 0 else float("inf"),
            build_s=ra.build_s + rb.build_s, index_bytes=ra.index_bytes,
            intersections_a=np.bincount(per_model["a"][0], minlength=k + 1).tolist(),
            **(dict(ids_a=ra.ids, ids_b=rb.ids, gallery_ids=gallery_ids) if keep_ids else {})))
  return dict(layer_a=la, layer_b=lb, skipped=skipped, rows=rows, epsilon=epsilon)
