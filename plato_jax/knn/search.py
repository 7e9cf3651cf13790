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
`SearchPlan`), the stream (`_Stream.run`: the block × tile loop over the devices, resumable)
and `_certified_results` (the certificate, the few queries searched again, `Neighbours`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Sequence

import jax
import numpy as np
from jax import lax

from plato_jax.kernels.cpu_topk import default_threads, unavailable_reason
from plato_jax.kernels.fused_contract import BACKENDS, FusedConfig
from plato_jax.kernels.primitives import NO_ID, RowWindow
from plato_jax.knn import exact, sharding
from plato_jax.knn.checks import check_unique, ids_array, k_list
from plato_jax.knn.large_k import LARGE_K_THRESHOLD, choose_selector
from plato_jax.knn.selectors import CpuTopKSelector, FusedTopKSelector
from plato_jax.knn.sources import (MAX_POSITION, IdRows, TileBuffers, aligned_empty,
                                   as_source, digest, fingerprint, on_accelerator, plan_tiles,
                                   raise_for_bad_rows, stream_tiles, window_length)
from plato_jax.progress import Progress
from plato_jax.resume import ResumePoint

# Scores of one device's tile stay under this many bytes.
SCORE_TILE_BYTES = 128 * 2**20
# On accelerators the per-tile host work (slicing, transfer, dispatch: about 2 ms per tile on
# the H100, 2026-11-23, inferred from a 17 ms call of 8 tiles) outweighs a tile's compute at
# the CPU budget, so tiles are 8x larger.
ACCELERATOR_SCORE_TILE_BYTES = 1024 * 2**20
# Platforms where kernel="auto" picks the fused kernel. None yet: on the H100 (2026-11-23)
# it was exact on every check but one — the bf16 case of the engine test
# test_fused_kernel_in_the_engine_equals_brute_force failed there, its details cut off —
# so it stays opt-in until that is explained ("gpu" belongs here then).
FUSED_BY_DEFAULT_ON: frozenset[str] = frozenset()
# Platforms whose devices hand their candidates to numpy for the final sort
# (`sharding.host_topk`): the host's own CPU, where XLA sorts ~10x slower than numpy
# (the merge for k = 2,621 of ~8.9k candidates per row, 1,024 rows, 2026-11-23: 528–594 ms
# on the device, 121–139 ms so).
FINISH_ON_HOST: frozenset[str] = frozenset({"cpu"})
# kernel="fused" picks this lowering of the fused kernel (plato_jax.kernels.fused_topk.BACKENDS) per
# platform; "fused:<backend>" names one.
FUSED_BACKEND_ON = {"tpu": "tpu"}
DEFAULT_FUSED_BACKEND = "triton"
# Platforms where kernel="auto" picks `plato_jax.kernels.cpu_topk` (f32 matmuls, where it builds and
# the CPU has AVX2/FMA). On the 2-core reference machine (2026-11-23), one 1024 × 32,768 ×
# 768 tile: 300–370 ms at k = 10, against 430–460 ms for the XLA step.
CPU_KERNEL_ON: frozenset[str] = frozenset({"cpu"})


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
  query's own row (`own`, from `_own_rows`) lies in the prefix. ValueError naming the query
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


def matmul_types(q_dtype, g_dtype, compute_dtype, precision, platform: str):
  """(input dtype, `lax.Precision`) of the matmul, `search`'s and `ring_self_join`'s
  defaults: bf16/f16 when both sides are (not on CPU), else f32; HIGHEST for f32 (a true
  f32 product), DEFAULT otherwise."""
  half = {np.dtype(jax.numpy.bfloat16), np.dtype(np.float16)}
  if compute_dtype is not None:
    dtype = np.dtype(compute_dtype)
  elif np.dtype(q_dtype) == np.dtype(g_dtype) and np.dtype(q_dtype) in half \
      and platform != "cpu":
    dtype = np.dtype(q_dtype)
  else:  # XLA:CPU runs half-precision matmuls as f32 ones after a slow on-device
    # conversion; the same exact products and f32 accumulation come cheaper from tiles
    # converted on the host.
    dtype = np.dtype(np.float32)
  if precision is None:
    precision = lax.Precision.HIGHEST if dtype == np.float32 else lax.Precision.DEFAULT
  return dtype, precision


def search(queries, gallery, k, *, query_ids=None, gallery_ids=None, exclude_self: bool = True,
           prefix_sizes: Sequence[int] | None = None, prefix_k: Sequence[int] | None = None,
           mesh=None, tile_rows: int | None = None,
           query_block: int = 2048, compute_dtype=None, precision=None,
           bucket_width: int | None = None, normalize: bool = False, kernel: str = "auto",
           resume_dir: str | None = None, checkpoint_every: int = 16,
           progress: bool = False):
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
    prefix_sizes: increasing gallery sizes n_1 < ... < n_m; every prefix of the stream
      order gets its own result, all from one pass.
    prefix_k: neighbours kept per prefix (each <= max k; default max k), e.g. n_j/100:
      the results of small prefixes then stay small.
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
      kernel (XLA FFI) for CPU devices that selects inside its matmul (f32 only; built with
      the host compiler on first use). "fused": `plato_jax.kernels.fused_topk`,
      the Pallas kernel that selects inside the matmul (small k), in the platform's
      lowering: Triton on GPUs, Pallas TPU on TPUs (interpreted on CPU — slow, for tests).
      "fused:<backend>" names one of `plato_jax.kernels.fused_topk.BACKENDS`: "fused:mosaic_gpu" is
      Mosaic GPU (warp-specialized TMA + wgmma; Hopper and later, bf16/f16 only: pass
      compute_dtype=bfloat16 for f32 inputs you accept to round). "auto": "cpu" for f32 on
      CPU devices where it builds; fused for k < 128 on the platforms in
      `FUSED_BY_DEFAULT_ON` (none yet); else xla. If the chosen kernel does not compile,
      xla, with a warning (a kernel named explicitly must compile).
      They accumulate in different float32 orders; the certificate (module docstring) makes
      every kernel's result the float64 one. The result's `kernel` says which ran
      ("xla", "cpu" or "fused:<backend>"), and `fallbacks` how often the fused kernel took its
      exact path.
    resume_dir: checkpoint the running state there every `checkpoint_every` steps; a rerun
      with the same inputs and options continues from the last checkpoint.
    progress: print rows/s and ETA on stderr.

  Returns:
    `Neighbours` (ids int64 [Q, max k], scores f32) sorted by (score desc, id asc): the set
    exact at every k asked for, the order exact in the first 128 (module docstring); with
    `prefix_sizes`, a list of them, one per prefix, each holding min(prefix k, n_j) columns
    (min(prefix k, n_j - 1) where self-exclusion takes some query's own row out of the
    prefix). The gallery (the largest prefix) must hold k neighbours for every query, else
    ValueError.
  """
  plan = plan_search(queries, gallery, k, query_ids=query_ids, gallery_ids=gallery_ids,
                     exclude_self=exclude_self, prefix_sizes=prefix_sizes, prefix_k=prefix_k,
                     mesh=mesh, tile_rows=tile_rows, query_block=query_block,
                     compute_dtype=compute_dtype, precision=precision,
                     bucket_width=bucket_width, normalize=normalize, kernel=kernel)
  stream = plan.stream()
  found = stream.run(plan.queries, plan.own, plan.kept, resume_dir, checkpoint_every, progress)
  out = _certified_results(plan, stream, found, progress)
  return out[0] if prefix_sizes is None else out


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

  def stream(self) -> "_Stream":
    return _Stream(self.source, self.gallery_ids, tuple(self.sizes), self.mesh, self.kernel,
                   self.kernel_named, self.tile_rows, self.bucket_width, self.query_block,
                   self.dtype, self.exclude_self, self.precision, self.normalize)


def plan_search(queries, gallery, k, *, query_ids=None, gallery_ids=None,
                exclude_self: bool = True, prefix_sizes=None, prefix_k=None, mesh=None,
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
  own = _own_rows(q_ids, gallery_rows, bool(exclude_self))
  keep = _neighbours_kept(sizes, wanted, own)
  # On the devices a query's id is its own row's position (NO_ID: none).
  own = np.full(num_q, NO_ID, np.int64) if own is None else np.where(own < n, own, NO_ID)

  mesh = sharding.default_mesh() if mesh is None else mesh
  platform = mesh.devices.flat[0].platform
  dtype, precision = matmul_types(q_host.dtype, source.dtype, compute_dtype, precision, platform)
  block = max(1, min(query_block, num_q))
  requested = kernel
  kernel = pick_kernel(kernel, k_max, platform, dtype)
  if tile_rows is None:
    align = row_unit(kernel)
    budget = SCORE_TILE_BYTES if platform == "cpu" else ACCELERATOR_SCORE_TILE_BYTES
    tile_rows = max(align, budget // (4 * block) // align * align)
    per_device = -(-n // mesh.devices.size)
    tile_rows = min(tile_rows, -(-per_device // align) * align)
  kept = {s: min(keep[s] + exact.margin(keep[s], s, source.dim), s) for s in sizes}
  q_exact = q_host.astype(dtype).astype(np.float64)  # the values the matmul takes
  q_norms = np.linalg.norm(q_exact, axis=1)
  if normalize and not q_norms.all():
    raise ValueError(f"query rows with zero norm (cannot be normalised): "
                     f"{np.flatnonzero(q_norms == 0)[:10].tolist()}")
  return SearchPlan(source, q_host, g_ids, own, ks, sizes, keep, kept, mesh, platform,
                    np.dtype(dtype), precision, kernel, requested != "auto", tile_rows, block,
                    bucket_width, bool(exclude_self), bool(normalize), q_exact, q_norms)


def _certified_results(plan: SearchPlan, stream: "_Stream", found: dict, progress: bool):
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
      mine = own[subset]
      available = s - ((mine >= 0) & (mine < s))
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


@dataclasses.dataclass
class _Stream:
  """One streaming pass's plan: `run` streams the gallery's prefixes past some queries and
  returns each prefix's candidates (the kernel's top `kept[size]` by float32 score, ids =
  gallery positions) and row norm range."""
  source: object
  ids: np.ndarray  # the gallery's ids, by position
  sizes: tuple
  mesh: object
  kernel: str
  required: bool  # the kernel was asked for by name: it must compile
  tile_rows: int
  bucket_width: int | None
  block: int
  dtype: np.dtype
  exclude_self: bool
  precision: object
  normalize: bool
  fallbacks: int = 0

  def run(self, q_host, own, kept: dict, resume_dir, checkpoint_every: int, progress: bool):
    source, sizes, mesh = self.source, list(self.sizes), self.mesh
    n, num_dev, num_q = source.num_rows, mesh.devices.size, q_host.shape[0]
    dtype, block = self.dtype, min(self.block, num_q)
    # Tiles travel in the storage dtype, unless the matmul runs wider anyway (CPU).
    tile_dtype = dtype if dtype.itemsize > np.dtype(source.dtype).itemsize else \
        np.dtype(source.dtype)
    k_state = max(kept.values())
    selector, self.kernel = _selector_that_compiles(
        self.kernel, self.required, k_state, self.tile_rows, self.bucket_width, mesh, block,
        source.dim, dtype, tile_dtype, self.exclude_self, self.precision, self.normalize)
    step = sharding.sharded_step(mesh, selector, self.exclude_self, self.precision,
                                 self.normalize)
    # Host rows go to the CPU kernel where they lie (no copy of unaligned numpy rows).
    window = window_length(self.tile_rows, source.dim) if selector.reads_windows \
        else None
    on_host = mesh.devices.flat[0].platform in FINISH_ON_HOST
    positions = np.arange(n, dtype=np.int64)
    ranges = plan_tiles(sizes[-1], self.tile_rows, sizes)  # rows past the last prefix: unread
    groups = _group_ranges(ranges, num_dev, set(sizes))
    mine = sharding.local_slots(mesh)
    num_blocks = -(-num_q // block)
    found = {"values": {str(s): np.full((num_q, kept[s]), -np.inf, np.float32) for s in sizes},
             "ids": {str(s): np.full((num_q, kept[s]), -1, np.int32) for s in sizes},
             "norms": {str(s): np.zeros(2, np.float32) for s in sizes}}
    start, restored, point = 0, None, None
    if resume_dir is not None:
      identity = dict(
          n=n, dim=source.dim, dtype=str(source.dtype), queries=digest(q_host, own),
          gallery_ids=digest(self.ids), gallery=fingerprint(source),
          kept=list(kept.values()), sizes=sizes,
          tile_rows=self.tile_rows, block=block, devices=num_dev,
          exclude_self=self.exclude_self, normalize=self.normalize, compute_dtype=str(dtype),
          precision=str(self.precision), selector=repr(selector),
          state=str(jax.tree.structure(selector.init(1))))
      point = ResumePoint(resume_dir, identity, every=checkpoint_every)
      try:
        loaded = point.load({"state": sharding.empty_state(mesh, selector, block),
                             "stats": self._empty_stats(), **found})
      except BaseException:  # another run's checkpoint: the folder stays free
        point.abandon()
        raise
      if loaded is not None:
        start, tree = loaded
        found = {key: tree[key] for key in found}
        restored = tree["state"], tree["stats"]

    try:
      done = sizes[-1] * (start // len(groups)) + (groups[start % len(groups) - 1][-1][1]
                                                   if start % len(groups) else 0)
      # The CPU backend aliases aligned host tiles (no copy), so a copied tile's buffer is free
      # again only when its step is done; accelerators copy tiles to their own memory.
      buffers = TileBuffers() if mesh.devices.flat[0].platform == "cpu" else None
      meter = Progress(sizes[-1] * num_blocks, initial=done, label=f"knn ({self.kernel})",
                       enabled=progress)
      for b in range(start // len(groups), num_blocks):
        q0 = b * block
        rows = min(block, num_q - q0)
        qb = np.zeros((block, source.dim), dtype)
        qb[:rows] = q_host[q0:q0 + rows]
        qb_ids = np.full(block, NO_ID, np.int32)
        qb_ids[:rows] = own[q0:q0 + rows]
        qd, qd_ids = sharding.put_whole(mesh, qb), sharding.put_whole(mesh, qb_ids)
        first = start % len(groups) if b == start // len(groups) else 0
        state, stats = restored if first else (sharding.empty_state(mesh, selector, block),
                                               self._empty_stats())
        tiles = stream_tiles(source, positions, [g[slot] for g in groups[first:] for slot in mine
                                                 if slot < len(g)],
                             dtype=tile_dtype, buffers=buffers, window=window)
        for gi in range(first, len(groups)):
          group = groups[gi]
          rows_by_slot, ids_by_slot, read = {}, {}, []
          for slot in mine:
            tile = next(tiles) if slot < len(group) else None
            read.append(tile)
            rows_by_slot[slot], ids_by_slot[slot] = _padded(tile, self.tile_rows, source.dim,
                                                            tile_dtype, window)
          state, stats = step(state, stats, qd, qd_ids,
                              sharding.put_local_slots(mesh, rows_by_slot),
                              sharding.put_local_slots(mesh, ids_by_slot))
          if buffers is not None:  # the step has read its tiles once it is done: reuse them
            jax.block_until_ready(state)
            for tile in read:
              if tile is not None:
                buffers.give_back(tile.rows.window if window else tile.rows)
          stop = group[-1][1]
          if stop in sizes:
            num_bad, largest, smallest = sharding.row_stats_total(mesh)(stats)
            if int(num_bad):
              raise_for_bad_rows(source, self.ids, ranges, nonzero=self.normalize)
              raise ValueError(f"{int(num_bad)} gallery rows have non-finite or overflowing norms "
                               f"on the device, but a host scan could not name them")
            v, i = sharding.device_merger(mesh, selector, kept[stop], on_host)(state)
            if self.kernel != "xla" and stop == sizes[-1]:
              self.fallbacks += int(sharding.replicated_sum(mesh)(selector.fallbacks(state)))
            found["values"][str(stop)][q0:q0 + rows] = np.asarray(v)[:rows]
            found["ids"][str(stop)][q0:q0 + rows] = np.asarray(i)[:rows]
            found["norms"][str(stop)][:] = [float(largest), float(smallest)]
          if point is not None:
            last = b == num_blocks - 1 and gi == len(groups) - 1
            point.maybe_save(b * len(groups) + gi + 1, {"state": state, "stats": stats, **found},
                             force=last)
          meter.update(stop - group[0][0],
                       (stop - group[0][0]) * source.dim * tile_dtype.itemsize)
      meter.close()
    except BaseException:  # a failed run gives its resume folder back (its checkpoint stays)
      if point is not None:
        point.abandon()
      raise
    if point is not None:
      point.close()
    return found

  def _empty_stats(self):
    return jax.tree.map(lambda a: sharding.put_split(self.mesh, a),
                        sharding.empty_row_stats(self.mesh.devices.size))


def selector_for(kernel: str, k: int, tile_rows: int, bucket_width, mesh):
  """The selector of a kernel `pick_kernel` resolved: XLA's, the CPU kernel's or the fused
  kernel's."""
  if kernel == "xla":
    return choose_selector(k, tile_rows, bucket_width)
  check_kernel_runs_on(kernel, mesh)
  if kernel == "cpu":
    # The host's cores are shared by the mesh's CPU devices, which run concurrently.
    return CpuTopKSelector(k, threads=max(1, default_threads() // mesh.local_mesh.size))
  return FusedTopKSelector(k, _fused_config(kernel),
                           interpret=mesh.devices.flat[0].platform == "cpu")


def _fused_config(kernel: str):
  return FusedConfig(backend=kernel.split(":")[1])


def row_unit(kernel: str) -> int:
  """Tile rows are a multiple of this: the XLA selection's buckets, the CPU kernel's
  micro-tiles, the fused kernel's gallery rows per program."""
  if kernel in ("xla", "cpu"):
    return 64
  return math.lcm(128, _fused_config(kernel).program_rows)


def check_kernel_runs_on(kernel: str, mesh) -> None:
  if kernel == "xla":
    return
  if kernel == "cpu":
    if mesh.devices.flat[0].platform != "cpu":
      raise ValueError(f"kernel='cpu' runs on CPU devices, not on "
                       f"{mesh.devices.flat[0].platform}")
    return
  platform, home = mesh.devices.flat[0].platform, BACKENDS[kernel.split(":")[1]]
  if platform not in ("cpu", home):
    raise ValueError(f"kernel={kernel!r} runs on {home} devices (or interpreted on CPU), not "
                     f"on {platform}")
  if kernel == "fused:mosaic_gpu" and platform == "cpu" and mesh.devices.size > 1:
    raise ValueError("kernel='fused:mosaic_gpu' runs interpreted on CPU, and Mosaic GPU's "
                     "interpreter runs one device's kernels at a time: pass a one-device mesh")


def pick_kernel(kernel: str, k: int, platform: str, dtype=np.float32) -> str:
  """The kernel a requested name resolves to: "xla", "cpu" or "fused:<backend>" (`dtype`:
  the matmul's input dtype)."""
  names = ("auto", "xla", "cpu", "fused", *(f"fused:{b}" for b in BACKENDS))
  if kernel not in names:
    raise ValueError(f"kernel must be one of {names}, got {kernel!r}")
  f32 = np.dtype(dtype) == np.float32
  if kernel == "cpu" and not f32:
    raise ValueError(f"kernel='cpu' multiplies f32 only, got compute dtype {np.dtype(dtype)}")
  if kernel == "auto" and platform in CPU_KERNEL_ON and f32:
    reason = unavailable_reason()
    if reason is None:
      return "cpu"
    _warn_once(f"the CPU kernel is unavailable ({reason}); using the XLA kernel")
  if kernel == "auto":
    kernel = "fused" if platform in FUSED_BY_DEFAULT_ON and k < LARGE_K_THRESHOLD else "xla"
  if kernel == "fused":
    kernel = f"fused:{FUSED_BACKEND_ON.get(platform, DEFAULT_FUSED_BACKEND)}"
  return kernel


@functools.cache
def _warn_once(message: str) -> None:
  warnings.warn(message)


@functools.lru_cache(maxsize=32)
def _selector_that_compiles(kernel, required, k, tile_rows, bucket_width, mesh, block, dim, dtype,
                            tile_dtype, exclude_self, precision, normalize):
  """(selector, kernel name). The fused kernel is compiled ahead here; if that fails, the
  XLA selector takes over with a warning (requested explicitly, the error is raised)."""
  xla = choose_selector(k, tile_rows, bucket_width)
  if kernel == "xla":
    return xla, "xla"
  platform = mesh.devices.flat[0].platform
  selector = selector_for(kernel, k, tile_rows, bucket_width, mesh)
  try:
    p = mesh.devices.size
    split = sharding.NamedSharding(mesh, sharding.P(sharding.mesh_axis(mesh)))
    whole = sharding.NamedSharding(mesh, sharding.P())
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct((p, *x.shape), x.dtype, sharding=split),
                         selector.init(block))
    stats = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=split),
                         sharding.empty_row_stats(p))
    if selector.reads_windows:
      tiles = RowWindow(
          jax.ShapeDtypeStruct((p, window_length(tile_rows, dim)), tile_dtype, sharding=split),
          jax.ShapeDtypeStruct((p,), np.int32, sharding=split))
    else:
      tiles = jax.ShapeDtypeStruct((p, tile_rows, dim), tile_dtype, sharding=split)
    sharding.sharded_step(mesh, selector, exclude_self, precision, normalize).lower(
        state, stats, jax.ShapeDtypeStruct((block, dim), dtype, sharding=whole),
        jax.ShapeDtypeStruct((block,), np.int32, sharding=whole), tiles,
        jax.ShapeDtypeStruct((p, tile_rows), np.int32, sharding=split)).compile()
    return selector, kernel
  except Exception as e:  # noqa: BLE001 — any compiler failure means: use the XLA kernel
    if required:
      raise
    warnings.warn(f"the {kernel} top-k kernel did not compile on {platform} ({type(e).__name__}: "
                  f"{str(e).splitlines()[0][:200]}); using the XLA kernel")
    return xla, "xla"


def _padded(tile, tile_rows: int, dim: int, dtype, window: int | None = None):
  """A device slot's rows and int32 ids, padded to `tile_rows` (id -1: never selected).
  With `window`, the rows are a `RowWindow` of that many elements (already sized)."""
  ids = np.full(tile_rows, -1, np.int32)
  if tile is None:
    rows = aligned_empty((tile_rows, dim) if window is None else (window,), dtype)
    rows[...] = 0
    return (rows if window is None else RowWindow(rows, np.int32(0))), ids
  ids[:tile.ids.shape[0]] = tile.ids
  if window is not None or tile.rows.shape[0] == tile_rows:
    return tile.rows, ids
  if on_accelerator(tile.rows):
    return jax.numpy.pad(tile.rows, ((0, tile_rows - tile.rows.shape[0]), (0, 0))), ids
  rows = aligned_empty((tile_rows, dim), dtype)
  rows[...] = 0
  rows[:tile.rows.shape[0]] = tile.rows
  return rows, ids


def _group_ranges(ranges, num_dev: int, boundaries: set[int]):
  """Consecutive tile ranges, one per device, cut after each prefix boundary."""
  groups, current = [], []
  for r in ranges:
    current.append(r)
    if len(current) == num_dev or r[1] in boundaries:
      groups.append(current)
      current = []
  if current:
    groups.append(current)
  return groups
