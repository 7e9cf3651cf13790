"""Which kernel and selector a search runs, and in which dtype: the choices `plan_search`
and `ring_self_join` share.

Kernels: "xla" (matmul, then `plato_jax.kernels.topk.bucket_topk`, or the threshold selector
for k >= 128, on the score tile), "cpu" (`plato_jax.kernels.cpu_topk`, a C++ kernel for CPU
devices that selects inside its matmul) and "fused:<backend>" (`plato_jax.kernels.fused_topk`,
the Pallas kernel that never writes the score tile). `pick_kernel` resolves a requested name,
`selector_for` makes its selector, and `selector_that_compiles` compiles it ahead, falling
back to XLA's with a warning where an unrequested kernel does not compile.
"""
from __future__ import annotations

import functools
import math
import warnings

import jax
import numpy as np
from jax import lax

from plato_jax.kernels.cpu_topk import (ROW_DTYPES, default_isa, default_threads,
                                        unavailable_reason)
from plato_jax.kernels.fused_contract import BACKENDS, FusedConfig
from plato_jax.kernels.primitives import RowWindow
from plato_jax.knn import sharding
from plato_jax.knn.large_k import LARGE_K_THRESHOLD, choose_selector
from plato_jax.knn.selectors import CpuTopKSelector, FusedTopKSelector
from plato_jax.knn.sources import window_length

# Platforms where kernel="auto" picks the fused kernel. None yet: on the H100 (2026-11-23)
# it was exact on every check but one — the bf16 case of the engine test
# test_fused_kernel_in_the_engine_equals_brute_force failed there, its details cut off —
# so it stays opt-in until that is explained ("gpu" belongs here then).
FUSED_BY_DEFAULT_ON: frozenset[str] = frozenset()
# kernel="fused" picks this lowering of the fused kernel per platform
# (plato_jax.kernels.fused_contract.BACKENDS); "fused:<backend>" names one.
FUSED_BACKEND_ON = {"tpu": "tpu"}
DEFAULT_FUSED_BACKEND = "triton"
# Platforms where kernel="auto" picks `plato_jax.kernels.cpu_topk` (f32 and bf16 matmuls, where it
# builds and the CPU has AVX2/FMA). On the 2-core reference machine (2026-11-23), one 1024 ×
# 32,768 × 768 tile: 300–370 ms at k = 10, against 430–460 ms for the XLA step.
CPU_KERNEL_ON: frozenset[str] = frozenset({"cpu"})
# Compute dtypes the CPU kernel multiplies (bf16: its inputs rounded to bf16, on AMX tiles
# where the CPU has them).
BF16 = np.dtype(jax.numpy.bfloat16)
CPU_KERNEL_DTYPES = (np.dtype(np.float32), BF16)


def matmul_types(q_dtype, g_dtype, compute_dtype, precision, platform: str):
  """(input dtype, `lax.Precision`) of the matmul, `search`'s and `ring_self_join`'s
  defaults: bf16/f16 when both sides are (not on CPU), else f32; HIGHEST for f32 (a true
  f32 product), DEFAULT otherwise."""
  half = {BF16, np.dtype(np.float16)}
  if compute_dtype is not None:
    dtype = np.dtype(compute_dtype)
  elif np.dtype(q_dtype) == np.dtype(g_dtype) and np.dtype(q_dtype) in half \
      and platform != "cpu":
    dtype = np.dtype(q_dtype)
  else:  # XLA:CPU runs half-precision matmuls as f32 ones after a slow on-device
    # conversion; the same exact products and f32 accumulation come cheaper from the CPU
    # kernel, which reads narrow rows as they are (or from tiles widened on the host).
    dtype = np.dtype(np.float32)
  if precision is None:
    precision = lax.Precision.HIGHEST if dtype == np.float32 else lax.Precision.DEFAULT
  return dtype, precision


def bf16_products(dtype, queries, gallery_dtype, chunk: int = 65_536) -> bool:
  """Whether every product the matmul takes is of two bf16 values: a bf16 compute dtype, or
  an f32 one on a bf16 gallery and queries whose values are bf16 (a bf16 store's rows). The
  CPU kernel then multiplies on AMX tiles where the CPU has them: the same exact products,
  added in another order."""
  if np.dtype(dtype) == BF16:
    return True
  if np.dtype(dtype) != np.float32 or np.dtype(gallery_dtype) != BF16:
    return False
  queries = np.asarray(queries)
  if queries.dtype == BF16:
    return True
  for start in range(0, len(queries), chunk):  # (no temporary as large as the queries)
    taken = queries[start:start + chunk].astype(np.float32)  # what an f32 matmul takes
    if not np.array_equal(taken.astype(BF16).astype(np.float32), taken):
      return False
  return True


def travelling_dtype(kernel: str, dtype, storage_dtype) -> np.dtype:
  """The dtype tiles travel in: the CPU kernel reads f32, bf16 and f16 rows as they are
  (others widened to f32); other kernels take the storage dtype, unless the matmul's is
  wider (XLA:CPU converts tiles slowly on the device: the host widens them)."""
  dtype, storage_dtype = np.dtype(dtype), np.dtype(storage_dtype)
  if kernel == "cpu":
    if storage_dtype in ROW_DTYPES:
      return storage_dtype
    # Others once, on the host: to bf16 when the products round to it (through f32 it
    # would round twice, unlike the certificate's values), else to f32.
    return dtype if dtype == BF16 else np.dtype(np.float32)
  return dtype if dtype.itemsize > storage_dtype.itemsize else storage_dtype


def selector_for(kernel: str, k: int, tile_rows: int, bucket_width, mesh,
                 bf16_inputs: bool = False, cpu_isa: str | None = None):
  """The selector of a kernel `pick_kernel` resolved: XLA's, the CPU kernel's or the fused
  kernel's. `bf16_inputs`: the CPU kernel rounds its inputs to bf16 (`bf16_products`);
  `cpu_isa`: its instruction set (default `cpu_topk.default_isa()`)."""
  if kernel == "xla":
    return choose_selector(k, tile_rows, bucket_width)
  check_kernel_runs_on(kernel, mesh)
  if kernel == "cpu":
    # The host's cores are shared by the mesh's CPU devices, which run concurrently.
    return CpuTopKSelector(k, threads=max(1, default_threads() // mesh.local_mesh.size),
                           bf16_inputs=bf16_inputs, isa=cpu_isa or default_isa())
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
  cpu_dtype = np.dtype(dtype) in CPU_KERNEL_DTYPES
  if kernel == "cpu" and not cpu_dtype:
    raise ValueError(f"kernel='cpu' multiplies f32 or bf16, got compute dtype {np.dtype(dtype)}")
  if kernel == "auto" and platform in CPU_KERNEL_ON and cpu_dtype:
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


def selector_that_compiles(*args):
  """(selector, kernel name) for `_selector_that_compiles`'s arguments, compiled once per
  arguments and CPU kernel path (`PLATO_CPU_ISA` is read on each call)."""
  return _selector_that_compiles(*args, cpu_isa=default_isa())


@functools.lru_cache(maxsize=32)
def _selector_that_compiles(kernel, required, k, tile_rows, bucket_width, mesh, block, dim,
                            dtype, tile_dtype, exclude_self, precision, normalize,
                            bf16_inputs=False, *, cpu_isa):
  """(selector, kernel name). The fused kernel is compiled ahead here; if that fails, the
  XLA selector takes over with a warning (requested explicitly, the error is raised)."""
  xla = choose_selector(k, tile_rows, bucket_width)
  if kernel == "xla":
    return xla, "xla"
  platform = mesh.devices.flat[0].platform
  selector = selector_for(kernel, k, tile_rows, bucket_width, mesh, bf16_inputs, cpu_isa)
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
          jax.ShapeDtypeStruct((p, window_length(tile_rows, dim, np.dtype(tile_dtype).itemsize)),
                               tile_dtype, sharding=split),
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
