"""The public exact top-k search: tiles, ids, self-exclusion, prefixes, multi-k.

Exactness contract. The result is the top-k under real arithmetic of the values the matmul
takes (the stored values, cast to the compute dtype): scores are the float64 dot products
(cosines with `normalize`), ties go to the lower id. For every kernel, tile size, device
count and ring or stream, the neighbour set at every requested k and every prefix is that
of a float64 brute force, and so is the order of the first 128 neighbours
(`plato_jax.knn.exact.EXACT_ORDER`); further down, the order is the kernel's float32
scores'. The kernels score in float32 (f32 inputs through a true-f32 matmul, bf16/f16
inputs in their dtype with f32 accumulation); the engine keeps a few more candidates than
asked (`exact.margin`), and `exact.certify` rescores in float64, from their rows, the
candidates whose float32 scores lie within the rigorous rounding bound of a cut that
matters. A query whose certificate needs rows it dropped is searched again with more
candidates. Results count both (`Neighbours.rescored`, `.searched_again`).

Ids are any distinct int64 values; on the devices a row is its position in the stream.

`search` is three steps: `plan_search` (every check and default, before any pass: a
`SearchPlan`), the stream (`plato_jax.knn.stream`: the block × tile loop over the devices,
resumable) and `_certified_results` (the certificate, the few queries searched again,
`Neighbours`).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from plato_jax.kernels.primitives import NO_ID
from plato_jax.knn import exact, sharding
from plato_jax.knn.bands import check_ranks
from plato_jax.knn.checks import check_unique, ids_array, k_list
from plato_jax.knn.kernel_choice import bf16_products, matmul_types, pick_kernel, row_unit
from plato_jax.knn.sources import MAX_POSITION, IdRows, as_source
from plato_jax.knn.stream import Stream

# Scores of one device's tile, and its rows, stay under this many bytes.
SCORE_TILE_BYTES = 128 * 2**20
# On accelerators the per-tile host work (slicing, transfer, dispatch: about 2 ms per tile on
# the H100, 2026-11-23, inferred from a 17 ms call of 8 tiles) outweighs a tile's compute at
# the CPU budget, so tiles are 8x larger.
ACCELERATOR_SCORE_TILE_BYTES = 1024 * 2**20


@dataclasses.dataclass(frozen=True)
class Neighbours:
  """Top-k of each query: `ids` int64 [Q, k], `scores` float32 [Q, k]."""
  ids: np.ndarray
  scores: np.ndarray
  gallery_size: int
  kernel: str = "xla"   # the tile kernel that ran (see `search`'s `kernel`)
  fallbacks: int = 0    # fused kernel: query blocks × tiles that took the exact path
  rescored: int = 0     # candidates rescored in float64 (`plato_jax.knn.exact`)
  searched_again: int = 0  # queries searched again with more candidates for the certificate

  @property
  def k(self) -> int:
    return self.ids.shape[1]

  def top(self, k: int) -> "Neighbours":
    """The k best (a prefix of the sorted lists); raises if some query has fewer than k."""
    if not 1 <= k <= self.k:
      raise ValueError(f"k={k} outside [1, {self.k}] for a gallery of {self.gallery_size} rows")
    short = np.flatnonzero(~np.isfinite(self.scores[:, k - 1]))
    if short.size:
      raise ValueError(
          f"k={k} exceeds the neighbours available in a gallery of {self.gallery_size} rows "
          f"(after self-exclusion) for query rows {short[:10].tolist()}")
    return dataclasses.replace(self, ids=self.ids[:, :k], scores=self.scores[:, :k])


def _own_rows(q_ids, gallery: IdRows, exclude_self: bool):
  """Each query's own row in the stream (the gallery row with its id), or None when no
  query can meet its own row."""
  if not exclude_self or q_ids is None or not q_ids.size:
    return None
  if q_ids is gallery.ids:  # a self-join's default ids: query i is row i
    return np.arange(q_ids.size)
  rows, found = gallery.lookup(q_ids)
  return np.where(found, rows, np.iinfo(np.int64).max) if found.any() else None


def _neighbours_kept(sizes, wanted, own) -> dict:
  """Columns of each prefix's result: min(its k, n_j), or min(its k, n_j - 1) where some
  query's own row lies in the prefix (`own`: each query's own row's rank, >= n_m for none). ValueError naming the query
  rows: where the largest prefix (the gallery, without prefixes) cannot give its k to every
  query, or a prefix holds nothing but the queries' own rows."""
  if own is None:
    return {s: min(kk, s) for s, kk in zip(sizes, wanted)}
  keep = {s: min(kk, s - int(own.min() < s)) for s, kk in zip(sizes, wanted)}
  last, k_last = sizes[-1], wanted[-1]
  short = np.flatnonzero(k_last > last - (own < last))
  if short.size:
    raise ValueError(f"k={k_last} exceeds the neighbours available in a gallery of {last} rows "
                     f"(after self-exclusion) for query rows {short[:10].tolist()}")
  empty = [s for s in sizes if keep[s] == 0]
  if empty:
    raise ValueError(f"prefix of {empty[0]} rows holds no neighbour for query rows "
                     f"{np.flatnonzero(own < empty[0])[:10].tolist()}, only their own rows "
                     f"(self-exclusion): drop it from prefix_sizes")
  return keep


def _check_queries(q_host, chunk: int = 65536) -> None:
  """Query rows with NaN/Inf values, or an f32 squared norm that overflows (as the gallery's
  check: a score is at most ‖q‖·‖g‖), are a ValueError naming them. In chunks: no
  temporary as large as the queries."""
  nonfinite, overflow = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
  for a in range(0, len(q_host), chunk):
    x = q_host[a:a + chunk].astype(np.float32)
    finite = np.isfinite(x).all(axis=1)
    nonfinite.append(a + np.flatnonzero(~finite))
    with np.errstate(over="ignore", invalid="ignore"):
      overflow.append(a + np.flatnonzero(finite & ~np.isfinite(np.einsum("ij,ij->i", x, x))))
  bad = np.concatenate(nonfinite)
  if bad.size:
    raise ValueError(f"query rows with NaN/Inf values: {bad[:10].tolist()}")
  bad = np.concatenate(overflow)
  if bad.size:
    raise ValueError(f"query rows with a squared norm that overflows float32: "
                     f"{bad[:10].tolist()}")


def search(queries, gallery, k, *, resume_dir: str | None = None, checkpoint_every: int = 16,
           progress: bool = False, **options) -> Neighbours:
  """Exact k nearest neighbours (largest dot product) of `queries` in `gallery`.

  Args:
    queries: [Q, D] numpy or jax array.
    gallery: [N, D] array, TensorStore array, list of shards, or a gallery source
      (see `plato_jax.knn.sources`). Streamed tile by tile; never held whole.
    k: an int, or a list of ints (multi-k: the result holds max(k); `.top(k)` slices the rest).
    query_ids, gallery_ids: ids, any distinct int64 values (negative, hashed 63-bit keys).
      Gallery ids default to row numbers.
      Query ids default to the gallery ids when `queries is gallery` (a self-join), and
      to "no id" otherwise.
    exclude_self: a query never gets back a gallery row with its own id.
    mesh: a one-axis `jax.sharding.Mesh`; gallery tiles are spread over its devices.
      Default: all devices.
    tile_rows: gallery rows per device tile (default from a score-tile memory budget).
    query_block: queries per pass over the gallery.
    compute_dtype: matmul input dtype (default: bf16/f16 if both sides are, else f32).
    precision: `lax.Precision` of the matmul (default HIGHEST for f32, DEFAULT otherwise).
    bucket_width: columns per bucket of the tile selection (default: chosen from k).
    normalize: cosine similarity. The devices divide each score by its gallery row's f32
      norm (the query's norm does not change its order); the result divides by the query's
      norm, and the certificate rescores as float64 cosines. All-zero rows are an error.
    kernel: the tile kernel. "xla": matmul, then `plato_jax.kernels.topk.bucket_topk` (or the
      threshold selector for k >= 128) on the score tile. "cpu": `plato_jax.kernels.cpu_topk`, a C++
      kernel (XLA FFI) for CPU devices that selects inside its matmul (f32 or bf16; built
      with the host compiler on first use; bf16 products — a bf16 compute dtype, or bf16
      stores — on AMX tiles where the CPU has them). "fused": `plato_jax.kernels.fused_topk`,
      the Pallas kernel that selects inside the matmul (small k), in the platform's
      lowering: Triton on GPUs, Pallas TPU on TPUs (interpreted on CPU — slow, for tests).
      "fused:<backend>" names one of `plato_jax.kernels.fused_contract.BACKENDS`:
      "fused:mosaic_gpu" is Mosaic GPU (warp-specialized TMA + wgmma; Hopper and later,
      bf16/f16 only: pass compute_dtype=bfloat16 for f32 inputs you accept to round).
      "auto": "cpu" for f32 on CPU devices where it builds; fused for k < 128 on the
      platforms in `kernel_choice.FUSED_BY_DEFAULT_ON` (none yet); else xla. If the chosen
      kernel does not compile, xla, with a warning (a kernel named explicitly must compile).
      They accumulate in different float32 orders; the certificate (module docstring) makes
      every kernel's result the float64 one. The result's `kernel` says which ran
      ("xla", "cpu" or "fused:<backend>"), and `fallbacks` how often the fused kernel took its
      exact path.
    resume_dir: checkpoint the running state there every `checkpoint_every` steps; a rerun
      with the same inputs and options continues from the last checkpoint.
    progress: print rows/s and ETA on stderr.

  Options (`plan_search` checks them; all but queries, gallery and k are keywords):
  query_ids, gallery_ids, exclude_self, mesh, tile_rows, query_block, compute_dtype,
  precision, bucket_width, normalize, kernel — as above.

  Returns:
    `Neighbours` (ids int64 [Q, max k], scores f32) sorted by (score desc, id asc): the set
    exact at every k asked for, the order exact in the first 128 (module docstring). The
    gallery must hold k neighbours for every query, else ValueError.
  """
  if {"prefix_sizes", "prefix_k", "prefix_ranks"} & options.keys():
    raise TypeError("search() gives the whole gallery's neighbours; search_prefixes() gives "
                    "one result per prefix (prefix_sizes, prefix_k)")
  return _searched(plan_search(queries, gallery, k, **options), resume_dir, checkpoint_every,
                   progress)[-1]


def search_prefixes(queries, gallery, k, *, prefix_sizes: Sequence[int],
                    prefix_k: Sequence[int] | None = None, prefix_ranks=None,
                    resume_dir: str | None = None, checkpoint_every: int = 16,
                    progress: bool = False, **options) -> list[Neighbours]:
  """`search` in nested prefixes of the gallery at once, from one pass over its rows.

  Args:
    prefix_sizes: increasing gallery sizes n_1 < ... < n_m (n_m at most the gallery's rows).
    prefix_k: neighbours kept per prefix (each <= max k; default max k), e.g. n_j/100:
      the results of small prefixes then stay small.
    prefix_ranks: int [N], a permutation of [0, N): prefix j holds the gallery rows of rank
      < n_j (a seeded random permutation: random nested galleries). Default: each row's
      position (prefix j: the first n_j rows). The rows are read in storage order either
      way (`plato_jax.knn.bands`).
    the rest: as `search`.

  Returns:
    One `Neighbours` per prefix, each holding min(prefix k, n_j) columns (min(prefix k,
    n_j - 1) where self-exclusion takes some query's own row out of the prefix). The largest
    prefix must hold its k neighbours for every query, else ValueError.
  """
  return _searched(plan_search(queries, gallery, k, prefix_sizes=prefix_sizes,
                               prefix_k=prefix_k, prefix_ranks=prefix_ranks, **options),
                   resume_dir, checkpoint_every, progress)


def _searched(plan: "SearchPlan", resume_dir, checkpoint_every: int,
              progress: bool) -> list[Neighbours]:
  """The plan's stream, then its certificate: one `Neighbours` per prefix."""
  stream = plan.stream()
  found = stream.run(plan.queries, plan.own, plan.kept, resume_dir, checkpoint_every, progress)
  return _certified_results(plan, stream, found, progress)


@dataclasses.dataclass
class SearchPlan:
  """What `search` decided before streaming (`plan_search`): the inputs checked, the ids,
  each query's own row (its device id), the prefixes with the neighbours kept (`keep`) and
  the candidates streamed (`kept`, with the certificate's margin), the matmul's dtype and
  precision, the kernel and the tiles."""
  source: object
  queries: np.ndarray        # host queries [Q, D]
  gallery_ids: np.ndarray    # int64 [N], by position
  own: np.ndarray            # int64 [Q]: the query's own row's position, or NO_ID
  own_rank: np.ndarray       # int64 [Q]: its rank (prefix j holds it if < n_j), or N
  ranks: np.ndarray | None   # each position's rank; None: its position
  ks: list                   # the ks asked for
  sizes: list                # prefix sizes, ascending (the whole gallery: one size)
  keep: dict                 # size -> neighbours returned
  kept: dict                 # size -> candidates streamed
  mesh: object
  platform: str
  dtype: np.dtype
  precision: object
  kernel: str
  kernel_named: bool         # the caller named the kernel (it must compile)
  tile_rows: int
  query_block: int
  bucket_width: int | None
  exclude_self: bool
  normalize: bool
  exact_queries: np.ndarray  # float64 [Q, D]: the values the matmul takes
  query_norms: np.ndarray    # float64 [Q]
  bf16_products: bool        # every product is of two bf16 values (`kernel_choice.bf16_products`)

  def stream(self) -> Stream:
    return Stream(self.source, self.gallery_ids, tuple(self.sizes), self.mesh, self.kernel,
                   self.kernel_named, self.tile_rows, self.bucket_width, self.query_block,
                   self.dtype, self.exclude_self, self.precision, self.normalize, self.ranks,
                   bf16_products=self.bf16_products)


def plan_search(queries, gallery, k, *, query_ids=None, gallery_ids=None,
                exclude_self: bool = True, prefix_sizes=None, prefix_k=None,
                prefix_ranks=None, mesh=None,
                tile_rows=None, query_block: int = 2048, compute_dtype=None, precision=None,
                bucket_width=None, normalize: bool = False, kernel: str = "auto") -> SearchPlan:
  """`search`'s checks and defaults (its arguments, same meaning): every bad input is a
  ValueError naming it, before any pass."""
  ks = k_list(k)
  k_max = max(ks)
  is_self_join = queries is gallery
  source = as_source(gallery, ids=gallery_ids)
  n = source.num_rows
  if n == 0:
    raise ValueError("empty gallery")
  q_host = np.asarray(queries)
  for what, value in (("tile_rows", tile_rows), ("query_block", query_block)):
    if value is not None and (int(value) != value or value < 1):
      raise ValueError(f"{what} must be a positive integer, got {value!r}")
  for what, dtype in (("queries", q_host.dtype), ("gallery", np.dtype(source.dtype))):
    if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)
            or dtype == np.dtype(jax.numpy.bfloat16)):
      raise ValueError(f"{what} must be real numbers, got dtype {dtype}")
  if q_host.ndim != 2:
    raise ValueError(f"queries must be a 2-D [Q, D] array, got shape {q_host.shape}")
  if q_host.shape[1] != source.dim:
    raise ValueError(f"dimension mismatch: queries have D={q_host.shape[1]}, "
                     f"gallery has D={source.dim}")
  _check_queries(q_host)
  if n > MAX_POSITION:
    raise ValueError(f"gallery of {n} rows: the devices number rows with int32, at most "
                     f"{MAX_POSITION}")
  g_ids = ids_array(source.ids(), n, "gallery ids")
  gallery_rows = IdRows(g_ids)
  check_unique(g_ids, "gallery ids", gallery_rows.sorter)
  num_q = q_host.shape[0]
  if query_ids is None:
    q_ids = g_ids if is_self_join else None
  else:
    q_ids = ids_array(query_ids, num_q, "query ids")

  sizes = [n] if prefix_sizes is None else [int(s) for s in prefix_sizes]
  if (not sizes or any(b <= a for a, b in zip(sizes[:-1], sizes[1:])) or sizes[0] < 1
      or sizes[-1] > n):
    raise ValueError(f"prefix_sizes must increase strictly within [1, {n}], got {sizes}")
  if k_max > sizes[-1]:
    raise ValueError(f"k={k_max} is larger than the gallery ({sizes[-1]} rows)")
  wanted = [k_max] * len(sizes) if prefix_k is None else k_list(prefix_k)
  if len(wanted) != len(sizes) or max(wanted) > k_max:
    raise ValueError(f"prefix_k must give one k <= {k_max} per prefix size, got {prefix_k}")
  ranks = None if prefix_ranks is None else check_ranks(prefix_ranks, n)
  own = _own_rows(q_ids, gallery_rows, bool(exclude_self))
  # On the devices a query's id is its own row's position (NO_ID: none).
  own = np.full(num_q, NO_ID, np.int64) if own is None else np.where(own < n, own, NO_ID)
  own_rank = np.where(own >= 0, own if ranks is None else ranks[np.maximum(own, 0)], n)
  keep = _neighbours_kept(sizes, wanted, None if (own < 0).all() else own_rank)

  mesh = sharding.default_mesh() if mesh is None else mesh
  platform = mesh.devices.flat[0].platform
  dtype, precision = matmul_types(q_host.dtype, source.dtype, compute_dtype, precision, platform)
  block = max(1, min(query_block, num_q))
  requested = kernel
  kernel = pick_kernel(kernel, k_max, platform, dtype)
  if tile_rows is None:
    align = row_unit(kernel)
    budget = SCORE_TILE_BYTES if platform == "cpu" else ACCELERATOR_SCORE_TILE_BYTES
    # The score tile [block, rows] and the tile's own rows [rows, D] (f32 at most) each
    # stay under the budget: wide rows (a concatenation of layers) make short tiles.
    tile_rows = max(align, budget // (4 * max(block, source.dim)) // align * align)
    per_device = -(-n // mesh.devices.size)
    tile_rows = min(tile_rows, -(-per_device // align) * align)
  kept = {s: min(keep[s] + exact.margin(keep[s], s, source.dim), s) for s in sizes}
  q_exact = q_host.astype(dtype).astype(np.float64)  # the values the matmul takes
  q_norms = np.linalg.norm(q_exact, axis=1)
  if normalize and not q_norms.all():
    raise ValueError(f"query rows with zero norm (cannot be normalised): "
                     f"{np.flatnonzero(q_norms == 0)[:10].tolist()}")
  return SearchPlan(source, q_host, g_ids, own, own_rank, ranks, ks, sizes, keep, kept, mesh,
                    platform, np.dtype(dtype), precision, kernel, requested != "auto", tile_rows, block,
                    bucket_width, bool(exclude_self), bool(normalize), q_exact, q_norms,
                    bf16_products(dtype, q_host, source.dtype))


def _certified_results(plan: SearchPlan, stream: Stream, found: dict, progress: bool):
  """The certificate of every prefix (`plato_jax.knn.exact`) on the stream's candidates,
  queries whose certificate needs more candidates searched again: one `Neighbours` per
  prefix."""
  source, sizes, keep, kept, own = plan.source, plan.sizes, plan.keep, plan.kept, plan.own
  dtype, precision, normalize, ks = plan.dtype, plan.precision, plan.normalize, plan.ks
  q_exact, q_norms, g_ids = plan.exact_queries, plan.query_norms, plan.gallery_ids

  def certify(subset, found):
    """The certificate of each prefix for queries `subset` (their candidates `found`)."""
    largest_row = max(exact.norm_bound(found["norms"][str(s)][0], source.dim, up=True)
                      for s in sizes)
    rescore = exact.rescorer(source, q_exact[subset], q_norms[subset], dtype, bool(normalize),
                             largest_row)
    out = {}
    for s in sizes:
      largest, smallest = found["norms"][str(s)]
      bound = exact.error_bound(
          source.dim, q_norms[subset], exact.norm_bound(largest, source.dim, up=True),
          exact.norm_bound(smallest, source.dim, up=False), normalize=bool(normalize),
          rounds_inputs=exact.rounds_inputs(dtype, precision),
          slack=exact.bound_slack(plan.platform))
      available = s - (plan.own_rank[subset] < s)
      out[s] = exact.certify(found["values"][str(s)], found["ids"][str(s)], bound, available,
                             keep[s], [min(kk, keep[s]) for kk in ks], g_ids, rescore,
                             scale=q_norms[subset] if normalize else None)
    return out

  everyone = np.arange(len(own))
  certified = certify(everyone, found)
  rescored = sum(c.rescored for c in certified.values())
  again = np.flatnonzero(np.any([c.failed for c in certified.values()], axis=0))
  searched_again = again.size
  while again.size:  # more candidates for the few queries whose certificate needs them
    kept = {s: min(8 * kept[s], s) for s in sizes}
    more = certify(again, stream.run(plan.queries[again], own[again], kept, None, 0,
                                     progress))
    for s in sizes:
      certified[s].positions[again] = more[s].positions
      certified[s].scores[again] = more[s].scores
    rescored += sum(c.rescored for c in more.values())
    again = again[np.any([c.failed for c in more.values()], axis=0)]

  out = [Neighbours(g_ids[certified[s].positions], certified[s].scores, s, stream.kernel,
                    stream.fallbacks, rescored, searched_again) for s in sizes]
  for r in out:  # every column a real neighbour: `_neighbours_kept` makes this hold
    r.top(r.k)
  return out


