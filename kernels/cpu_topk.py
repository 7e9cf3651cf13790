"""Exact top-k for CPU devices: a matmul whose scores go from registers straight into
per-query candidate pools (`cpu_topk.cc`, an XLA FFI handler), so no score tile is ever
written.

Why a kernel outside XLA on CPU: an XLA step writes its [Q, T] score tile to memory and
reads it back to select, and XLA:CPU's f32 dot (YNNPACK) runs at 142–148 GFLOP/s on the
2-core reference machine. Here a 6 × 16 register-blocked AVX2/FMA micro-tile is scored
(blocked for the caches as BLIS does), and each finished micro-tile is compared with its six
queries' thresholds; a score is touched again only if it reaches its query's threshold.

The state per query is an unordered pool holding every (score, id) that ranked before the
query's threshold — (score descending, id ascending) — when it came; the threshold is the
k-th best entry as of the pool's last compaction, so the pool always holds the true top-k.
A full pool is compacted to its k best (nth_element): amortised O(1) per entry for any k,
and in a long stream almost no score enters. The state is updated in place (the FFI call
aliases it).

Each score is one chain of fused multiply-adds in feature order, whatever the tile, thread
or position of its row (host BLAS kernels do not promise that: OpenBLAS's sgemm moves
values by ulps with a row's position in the call), so duplicate rows tie exactly and
results do not depend on tiling.

Same semantics as the engine's other kernels: padding columns (id < 0) and each query's own
id are never selected, with `normalize` each column is multiplied by the inverse of its
row's norm (computed while the rows are packed: the same f32 product the XLA path forms,
from a norm summed in another order), and -0.0 is kept as +0.0. The rows' squared norms
come back for the engine's bad-row check. Padding at the end of a tile is skipped, not
multiplied (its norms read 0): a partial tile costs its real rows only.

The rows are read from a flat buffer at an offset, so the engine passes host rows that are
not 64-byte aligned (numpy's allocations are 16-byte aligned) as an aligned window around
them (`primitives.RowWindow`), which the CPU client takes without a copy. Rows may be f32,
bf16 or f16: narrow rows are widened (exactly) while a strip is packed, never on the host.

bf16 products (`bf16_inputs`: a bf16 compute dtype, or bf16 stores, whose values are bf16
already): queries and rows are rounded to bf16 as numpy rounds them, and on CPUs with
AMX-BF16 multiplied on tiles (`TDPBF16PS`: 16 × 32 by 32 × 16 bf16 into 16 × 16 f32, a 2 × 2
block of tiles over all features, then the same finish into the pools). The products of
bf16 values are exact in f32; AMX adds them in its own order (and flushes subnormals), so
its scores may differ from the FMA paths' by rounding — within the bound the engine's
float64 certificate allows for any order — while a row's score still does not depend on
where it sits.

The handler is compiled on first use with the host C++ compiler against the XLA FFI
headers jaxlib ships, and cached (`PLATO_JAX_CACHE`, default ~/.cache/plato_jax). It runs
the fastest instruction set the CPU has (`default_isa`; `PLATO_CPU_ISA` forces one, read
when a search chooses its kernel): AMX tiles for bf16 products, AVX-512F micro-tiles over
two strips, AVX2/FMA, or a portable fmaf loop — the last three giving the same numbers. `unavailable_reason()` says why it cannot run (no compiler, no AVX2), and the
engine then keeps its XLA kernel.

`reference_update` is the plain-numpy reference the tests compare to.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

TARGET = "plato_tile_topk"
SOURCE = pathlib.Path(__file__).with_name("cpu_topk.cc")


class Unavailable(RuntimeError):
  """The CPU kernel cannot run in this process (no C++ compiler, a failed build)."""


def _cache_dir() -> pathlib.Path:
  root = os.environ.get("PLATO_JAX_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "plato_jax")
  return pathlib.Path(root)


def _build() -> pathlib.Path:
  """The compiled handler, built once per source, jaxlib and compiler."""
  import jaxlib
  compiler = os.environ.get("CXX", "c++")
  include = jax.ffi.include_dir()
  key = hashlib.sha256(SOURCE.read_bytes() + jaxlib.__version__.encode() +
                       compiler.encode() + sys.platform.encode()).hexdigest()[:16]
  target = _cache_dir() / f"cpu_topk-{key}.so"
  digest = target.with_name(target.name + ".sha256")  # a truncated or foreign file: rebuilt
  if target.exists() and digest.exists() and \
      hashlib.sha256(target.read_bytes()).hexdigest() == digest.read_text().strip():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    out = pathlib.Path(tmp) / target.name
    cmd = [compiler, "-O3", "-std=c++17", "-shared", "-fPIC", f"-I{include}", str(SOURCE),
           "-o", str(out), "-pthread"]
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
      raise Unavailable(f"could not run the C++ compiler {compiler!r}: {e}") from e
    if proc.returncode:
      raise Unavailable(f"compiling {SOURCE.name} failed ({' '.join(cmd)}):\n"
                        f"{proc.stderr[-2000:]}")
    (pathlib.Path(tmp) / digest.name).write_text(hashlib.sha256(out.read_bytes()).hexdigest())
    os.replace(out, target)  # atomic: concurrent builders leave one complete file
    os.replace(pathlib.Path(tmp) / digest.name, digest)
  return target


@functools.cache
def _load() -> None:
  """Builds, loads and registers the handler."""
  path = _build()
  try:
    lib = ctypes.CDLL(str(path))
  except OSError as e:
    raise Unavailable(f"the compiled handler {path} does not load ({e}); delete it to "
                      f"rebuild") from e
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.PlatoTileTopK), platform="cpu")


@functools.cache
def _cpu_flags() -> frozenset[str]:
  try:
    with open("/proc/cpuinfo") as f:
      return frozenset(next((line for line in f if line.startswith("flags")), "").split())
  except OSError:
    return frozenset()


def has_avx2() -> bool:
  return "avx2" in available_isas()


# The kernel's instruction sets, slowest first, each including the one before: f32
# products give the same bits on every one; "amx" multiplies bf16 products on AMX tiles
# (f32 products there take the AVX-512 path), adding in the tiles' own order.
ISAS = ("portable", "avx2", "avx512", "amx")
ISA_ENV = "PLATO_CPU_ISA"  # forces one (e.g. to time or test a path)


@functools.cache
def _amx_granted() -> bool:
  """Linux lets a process use AMX's tile state once it asks (arch_prctl(ARCH_REQ_XCOMP_PERM,
  XFEATURE_XTILEDATA)); a kernel or VM may refuse."""
  if sys.platform != "linux" or platform.machine() != "x86_64":
    return False
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc.syscall(*map(ctypes.c_long, (158, 0x1023, 18))) == 0  # SYS_arch_prctl
  except (OSError, AttributeError):
    return False


def available_isas() -> tuple[str, ...]:
  """The instruction sets this CPU runs the kernel with."""
  flags = _cpu_flags()
  out = ["portable"]
  if {"avx2", "fma", "f16c"} <= flags:
    out.append("avx2")
    if "avx512f" in flags:
      out.append("avx512")
      if {"amx_tile", "amx_bf16"} <= flags and _amx_granted():
        out.append("amx")
  return tuple(out)


def default_isa() -> str:
  """$PLATO_CPU_ISA when set (an error if this CPU lacks it), else the fastest available."""
  forced = os.environ.get(ISA_ENV)
  if forced:
    if forced not in ISAS:
      raise ValueError(f"{ISA_ENV}={forced!r}: not one of {ISAS}")
    if forced not in available_isas():
      raise ValueError(f"{ISA_ENV}={forced!r}: this CPU has only {available_isas()}")
    return forced
  return available_isas()[-1]


def unavailable_reason() -> str | None:
  """None when the kernel can run here at speed; otherwise why not."""
  if not has_avx2():
    return "the CPU lacks AVX2/FMA (the portable path is exact but slow)"
  try:
    _load()
    return None
  except Unavailable as e:
    return str(e)


def default_threads() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def pool_capacity(k: int) -> int:
  """Pool slots per query: compaction (O(capacity)) then comes once per capacity - k
  entries at most."""
  return k + max(k // 2, 256)


def empty_pools(num_queries: int, k: int):
  """(values, ids, counts, threshold values, threshold ids) of pools holding nothing."""
  c = pool_capacity(k)
  return (np.full((num_queries, c), -np.inf, np.float32), np.full((num_queries, c), -1, np.int32),
          np.zeros(num_queries, np.int32), np.full(num_queries, -np.inf, np.float32),
          np.full(num_queries, -1, np.int32))


# Row dtypes the kernel reads as they are (others are converted to f32 first).
ROW_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))


def cpu_update(pools, queries, query_ids, rows, tile_ids, *, k: int, row_offset=0,
               normalize: bool = False, bf16_inputs: bool = False, block_cols: int = 128,
               group_panels: int = 24, depth_chunk: int = 256, threads: int | None = None,
               isa: str | None = None):
  """(`pools` (as `empty_pools`) with the tile's rows folded in, the rows' f32 squared
  norms [T], 0 for the padding after the last real row). queries [Q, D] (taken as f32);
  query_ids int32 [Q]; tile_ids int32 [T] (< 0: padding); rows [T, D] f32, bf16 or f16 (read
  as they are; other dtypes are converted to f32), or any flat buffer of them holding row r
  at `row_offset` + r·D (a scalar, traced or not). normalize: each column is scaled by 1 /
  its row's norm (0 for a zero row). bf16_inputs: the products take queries and rows
  rounded to bf16 (to nearest even, as numpy's astype; the norms too), and run on AMX tiles
  where `isa` is "amx". Blocking (speed only; f32 products give bit-identical results for
  any values): `block_cols` gallery rows packed at a time, `group_panels` panels of 6
  queries per pass over them, features in chunks of `depth_chunk`. `isa` (`ISAS`; default
  `default_isa()`): the instruction set, speed only. Call inside jit on a CPU device."""
  isa = default_isa() if isa is None else isa
  if isa not in available_isas():
    raise ValueError(f"isa={isa!r}: this CPU runs {available_isas()}")
  _load()
  pools = tuple(jnp.asarray(x) for x in pools)
  outputs = (*pools, jnp.zeros(tile_ids.shape, jnp.float32))
  call = jax.ffi.ffi_call(TARGET, tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in outputs),
                          input_output_aliases={i: i for i in range(len(pools))},
                          vmap_method="sequential")
  *pools, row_sumsq = call(
      *pools, queries.astype(jnp.float32), query_ids.astype(jnp.int32),
      (rows if rows.dtype in ROW_DTYPES else rows.astype(jnp.float32)).reshape(-1),
      jnp.asarray(row_offset, jnp.int32).reshape(1),
      tile_ids.astype(jnp.int32), k=np.int64(k), block_cols=np.int64(block_cols),
      group_panels=np.int64(group_panels), depth_chunk=np.int64(depth_chunk),
      threads=np.int64(default_threads() if threads is None else threads),
      normalize=bool(normalize), bf16_inputs=bool(bf16_inputs),
      isa=np.int64(ISAS.index(isa)))
  return tuple(pools), row_sumsq


def reference_update(values, ids, queries, query_ids, tile, tile_ids, k: int,
                     normalize: bool = False, bf16_inputs: bool = False):
  """Plain numpy: the sorted top-k of the entries `values`/`ids` [Q, m] and the tile's
  finished scores."""
  tile, queries = np.asarray(tile, np.float32), np.asarray(queries, np.float32)
  if bf16_inputs:
    tile, queries = (x.astype(jnp.bfloat16).astype(np.float32) for x in (tile, queries))
  scores = queries @ tile.T
  if normalize:
    with np.errstate(over="ignore", divide="ignore"):
      sumsq = np.square(tile.astype(np.float64)).sum(1).astype(np.float32)  # exact on integers
      scale = np.where(sumsq > 0, np.float32(1) / np.sqrt(sumsq), np.float32(0))
    scores = scores * scale.astype(np.float32)
  scores = np.where(scores == 0, np.float32(0), scores)
  masked = (tile_ids[None, :] < 0) | (tile_ids[None, :] == np.asarray(query_ids)[:, None])
  scores = np.where(masked, -np.inf, scores).astype(np.float32)
  all_v = np.concatenate([values, scores], axis=1)
  all_i = np.concatenate([ids, np.broadcast_to(tile_ids, scores.shape)], axis=1)
  order = np.lexsort((all_i, -all_v.astype(np.float64)), axis=-1)[:, :k]
  return np.take_along_axis(all_v, order, 1), np.take_along_axis(all_i, order, 1)
