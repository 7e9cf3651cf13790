"""The gallery protocol both papers' experiments share: counts and k's, the query draw, the
gallery order, the layer choice, and one engine pass per layer.

The gallery order is one seeded permutation of the stores' rows: the queries come first,
then every other row in random order. Gallery sizes are prefixes of that order: random
nested subsets, whatever order the store was written in, and the smallest size (= the
number of queries) is the queries' all-vs-all gallery, as WIT-1024 is in the papers. The
engine still reads the store front to back, once: a row's place in the order is its rank,
and each row counts for the galleries its rank falls in (`plato_jax.knn.bands`). Queries
sit inside every gallery and are excluded as self. Each model's layer is fixed once (`auto`: the best mutual-kNN
pair on the queries, k = 10, as both papers do). Similarity is cosine (rows L2-normalised;
no outlier clamp, which Koepke et al. do not state at scale).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from plato_jax import metrics
from plato_jax.clamp import CONCAT, ClampedLayer, ConcatenatedLayers, clamp_rows, concatenated
from plato_jax.knn import IdRows, search_prefixes
from plato_jax.store import FeatureStore

DEFAULT_SIZES = ("1024", "10k", "50k", "100k", "500k", "1m", "5m", "10m", "15m")
DEFAULT_KS = ("1", "10", "n/100")


def parse_count(text: str | int) -> int:
  """'1024', '10k', '1.5m', '15M' → int."""
  if isinstance(text, (int, np.integer)):
    return int(text)
  t = str(text).strip().lower().replace("_", "")
  scale = {"k": 10**3, "m": 10**6, "b": 10**9}.get(t[-1:], 1)
  try:
    value = float(t[:-1] if scale > 1 else t) * scale
  except ValueError:
    raise ValueError(f"not a count: {text!r} (use e.g. 1024, 10k, 1.5m)") from None
  if value != int(value) or value < 1:
    raise ValueError(f"not a positive whole count: {text!r}")
  return int(value)


def resolve_k(spec: str, n: int) -> int:
  """'10' → 10; 'n/100' → n // 100 (at least 1)."""
  s = str(spec).strip().lower()
  if s.startswith("n/"):
    return max(1, n // parse_count(s[2:]))
  return parse_count(s)


def expand_k(spec: str, n: int) -> list[int]:
  """The k values a spec names at gallery size n: one for '10' or 'n/100'; for 'log:M' or
  'log:M:CAP', M log-spaced values from 1 to n-1 (or CAP, if smaller), rounded and
  deduplicated (a k sweep, Koepke Fig. 3a)."""
  s = str(spec).strip().lower()
  if not s.startswith("log:"):
    return [resolve_k(s, n)]
  parts = s.split(":")
  if len(parts) not in (2, 3):
    raise ValueError(f"not a k sweep: {spec!r} (use log:M or log:M:CAP)")
  count = parse_count(parts[1])
  top = min(n - 1, parse_count(parts[2])) if len(parts) == 3 else n - 1
  if top < 1:
    return []
  return sorted({int(round(k)) for k in np.geomspace(1, top, count)})


def gallery_order(num_rows: int, query_rows: np.ndarray, seed: int) -> np.ndarray:
  """Queries first, then the other rows in seeded random order."""
  rest = np.random.default_rng(seed).permutation(num_rows)
  rest = rest[~np.isin(rest, query_rows)]
  return np.concatenate([np.asarray(query_rows, np.int64), rest])


def choose_queries(num_rows: int, count: int, seed: int) -> np.ndarray:
  """`count` distinct store rows drawn with the run's seed (sorted for cheap gathers)."""
  if not 1 <= count <= num_rows:
    raise ValueError(f"--queries={count} must lie in [1, {num_rows}] (the stores' rows)")
  rng = np.random.default_rng([seed, 1])
  return np.sort(rng.choice(num_rows, count, replace=False))


def resolve_queries(ids, queries, seed: int, where: str = "the stores") -> np.ndarray:
  """Store rows of the queries: `queries` is a count (drawn with the seed) or explicit ids,
  which must be present in `ids` and distinct."""
  if isinstance(queries, (int, np.integer)):
    return choose_queries(len(ids), int(queries), seed)
  wanted = np.asarray(queries, dtype=np.int64)
  rows = IdRows(ids)(wanted, f"query ids not in {where}")
  if len(np.unique(wanted)) != len(wanted):
    raise ValueError("query ids repeat")
  return rows.astype(np.int64)


@dataclasses.dataclass
class GalleryPlan:
  ids: np.ndarray             # the store's row ids
  query_rows: np.ndarray      # store rows of the queries
  sizes: list[int]            # gallery sizes, ascending (prefixes of `order`)
  order: np.ndarray           # store rows in gallery order, queries first
  k_by_size: dict             # size -> [(k spec, k)]

  def ranks(self) -> np.ndarray:
    """Each store row's place in the gallery order; rows in no gallery come after (in
    storage order)."""
    ranks = np.empty(len(self.ids), np.int64)
    outside = np.ones(len(self.ids), bool)
    outside[self.order] = False
    ranks[self.order] = np.arange(len(self.order))
    ranks[outside] = np.arange(len(self.order), len(self.ids))
    return ranks

  def on(self, store: FeatureStore) -> "GalleryPlan":
    """The same queries and galleries (by id) as rows of `store`, which holds every id of
    the plan: itself when the store's ids are the plan's."""
    ids = store.ids()
    if ids is self.ids or np.array_equal(ids, self.ids):
      return self
    rows = IdRows(ids)
    where = f"ids missing from {store.root}"
    return dataclasses.replace(self, ids=ids, query_rows=rows(self.ids[self.query_rows], where),
                               order=rows(self.ids[self.order], where))


def plan_galleries(store_a: FeatureStore, store_b: FeatureStore, queries, sizes, ks,
                   seed: int, gallery_seed: int | None = None,
                   common_rows: bool = False, gallery_ids=None) -> GalleryPlan:
  """Checks that the stores hold the same rows (or, with `common_rows`, which they share) and
  resolves queries, sizes, ks and the gallery order (see the module docstring); errors name
  what is wrong. `seed` draws the
  queries and, unless `gallery_seed` is given, the gallery order. With `common_rows`, stores
  whose rows differ (some items failed in one model) are measured on the ids both hold;
  the plan is in store a's rows (`GalleryPlan.on` gives store b's). `gallery_ids` (e.g. a
  deduplicated pool, `plato_jax.dedup`): the only rows galleries draw from besides the
  queries (a query count is drawn from them too); every one must be in the stores."""
  ids = store_a.ids()
  ids_b = store_b.ids()
  shared = np.ones(len(ids), bool)
  if ids.shape != ids_b.shape or not np.array_equal(ids, ids_b):
    shared = np.isin(ids, ids_b)
    if not common_rows:
      diff = (np.flatnonzero(ids[:len(ids_b)] != ids_b[:len(ids)])[:1].tolist()
              if len(ids) and len(ids_b) else [])
      where = (f"first differing row {diff[0]}: id {ids[diff[0]]} vs {ids_b[diff[0]]}" if diff
               else f"{len(ids)} vs {len(ids_b)} rows")
      raise ValueError(f"the two stores do not hold the same rows ({store_a.root} vs "
                       f"{store_b.root}): {where}; {len(ids) - shared.sum():,} ids of a are not "
                       f"in b, {len(ids_b) - shared.sum():,} of b not in a (common_rows / "
                       f"--common_rows measures the {shared.sum():,} both hold)")
  if gallery_ids is not None:
    gallery_ids = np.unique(np.asarray(gallery_ids, np.int64))
    absent = gallery_ids[~np.isin(gallery_ids, ids[shared])]
    if len(absent):
      raise ValueError(f"{len(absent):,} of the {len(gallery_ids):,} gallery ids are not in "
                       f"both stores, e.g. {absent[:5].tolist()}")
    shared = shared & np.isin(ids, gallery_ids)
  common = np.flatnonzero(shared)
  if isinstance(queries, (int, np.integer)):
    query_rows = common[resolve_queries(common, queries, seed)]
  else:
    query_rows = resolve_queries(ids, queries, seed, where=store_a.root)
    IdRows(ids_b)(ids[query_rows], f"query ids not in {store_b.root}")
    shared[query_rows] = True
  n_total = int(shared.sum())
  num_q = len(query_rows)
  size_list = sorted({parse_count(s) for s in sizes})
  if size_list[0] < num_q:
    raise ValueError(f"gallery size {size_list[0]} is smaller than the {num_q} queries it "
                     f"must contain")
  if size_list[-1] > n_total:
    where = "the gallery ids and queries" if gallery_ids is not None else "the stores"
    raise ValueError(f"gallery size {size_list[-1]:,} exceeds the {n_total:,} rows of {where}")
  k_by_size = {n: list(dict.fromkeys((spec, k) for spec in ks for k in expand_k(spec, n)))
               for n in size_list}
  for n, pairs in k_by_size.items():
    for spec, k in pairs:
      if k > n - 1:
        raise ValueError(f"k={spec} gives {k} > {n - 1} neighbours available at gallery "
                         f"size {n}")
  order = gallery_order(len(ids), query_rows, seed if gallery_seed is None else gallery_seed)
  order = order[shared[order]][:size_list[-1]]
  return GalleryPlan(ids, query_rows, size_list, order, k_by_size)


def choose_layers(store_a, store_b, q_a, q_b, layer_a="auto", layer_b="auto",
                  thresholds=(None, None), concat: bool = False):
  """(layer a, layer b, score table or None): the given layers, or for `auto` the best
  mutual k-NN pair (k = 10) on the queries' features q_* [Q, L, D], as both papers choose.
  `thresholds`: each model's clamp (`plato_jax.clamp`), applied first; `concat`: the
  concatenation of all layers is a candidate too (PRH's compute_score), chosen as
  `clamp.CONCAT`. A layer is an index, a name, or `clamp.CONCAT`."""
  def fixed(store, layer):
    return CONCAT if layer == CONCAT else store.layer_index(layer)

  if layer_a != "auto" and layer_b != "auto":
    return fixed(store_a, layer_a), fixed(store_b, layer_b), None

  def candidates(store, q, layer, threshold):
    # Clamped, then each layer unit-normalised (PRH's prepare_features after its own clamp).
    x = metrics.prepare_features(clamp_rows(np.asarray(q, np.float32), threshold), q=1)
    if layer == "auto":
      return x, concat
    chosen = fixed(store, layer)
    return (x.reshape(len(x), 1, -1) if chosen == CONCAT else x[:, [chosen]]), False

  (xa, cat_a), (xb, cat_b) = (candidates(store_a, q_a, layer_a, thresholds[0]),
                              candidates(store_b, q_b, layer_b, thresholds[1]))
  pair = metrics.compute_score(xa, xb, "mutual_knn", topk=min(10, len(q_a) - 1),
                               concat=cat_a or cat_b)
  if pair.indices is None:
    raise ValueError("no layer pair has positive mutual kNN on the queries")

  def picked(store, layer, index, offers_concat):
    if layer != "auto":
      return fixed(store, layer)
    return CONCAT if offers_concat and index == -1 else int(index)

  return (picked(store_a, layer_a, pair.indices[0], cat_a),
          picked(store_b, layer_b, pair.indices[1], cat_b), np.asarray(pair.table).tolist())


def query_features(q, layer, threshold=None) -> np.ndarray:
  """The queries' rows [Q, D] a search of `layer` takes, from their features [Q, L, D]: the
  layer clamped, or the concatenation (`plato_jax.clamp`)."""
  if layer == CONCAT:
    return concatenated(q, threshold)
  return clamp_rows(q[:, layer], threshold)


def layer_source(store: FeatureStore, layer, threshold=None):
  """The gallery source of a layer (clamped when a threshold is given), or of the
  concatenation."""
  if layer == CONCAT:
    return ConcatenatedLayers(store, threshold)
  return store.layer(layer) if threshold is None else ClampedLayer(store, layer, threshold)


def layer_neighbours(store: FeatureStore, layer, queries, plan: GalleryPlan, keep,
                     threshold=None, **search_options):
  """One engine pass over one layer (`layer_source`), in storage order: the queries' cosine
  neighbours at every gallery size (`keep[i]` of them at size i), queries excluded as self.
  `queries` as `query_features` gives them."""
  plan = plan.on(store)
  return search_prefixes(queries, layer_source(store, layer, threshold), max(keep),
                         query_ids=plan.ids[plan.query_rows], prefix_sizes=plan.sizes,
                         prefix_k=keep, prefix_ranks=plan.ranks(), normalize=True,
                         **search_options)
