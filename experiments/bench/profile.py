"""Where the engine's time goes on this machine, for one tile shape.

    python -m plato_jax.experiments.bench.profile --queries=1024 --tile_rows=32768 --dim=768 --k=10
    python -m plato_jax.experiments.bench.profile --dtype=bfloat16 --trace_dir=/tmp/trace      # + a profiler trace

For one device and one tile (Q queries × T gallery rows × d), in the same run:
  * the bare matmul (`jnp.dot`, f32 accumulation) — the rate the engine is measured against;
  * the engine's step (score + selection, the kernel `--kernel` picks) on the same tile, in
    steady state (the running state has seen a tile already);
  * the selection alone, on precomputed scores;
and prints achieved TFLOP/s, % of the measured dot rate, % of the chip's spec peak (when
known or given by --peak_tflops), the matmul / selection split, fallbacks (kernels with an
exact fallback report how many tiles took it), and the bytes the step moves (the tile, and
the score tile written and read back: an unfused kernel's traffic).
"""
from __future__ import annotations

import time

from absl import app, flags

from .timing import best_time

FLAGS = flags.FLAGS
flags.DEFINE_integer("queries", 1024, "queries per tile (Q)")
flags.DEFINE_integer("tile_rows", 32768, "gallery rows per tile (T)")
flags.DEFINE_integer("dim", 768, "feature dimension (d)")
flags.DEFINE_integer("k", 10, "neighbours")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "storage and matmul dtype")
flags.DEFINE_enum("kernel", "auto", ["auto", "xla", "cpu", "fused", "fused:triton",
                                      "fused:mosaic_gpu", "fused:tpu"],
                  "auto: the engine's choice for this backend (cpu on CPU, else xla); cpu: "
                  "plato_jax.kernels.cpu_topk (CPU devices, f32); fused: plato_jax.kernels.fused_topk "
                  "in this platform's lowering (interpreted on CPU, so keep CPU shapes small); "
                  "fused:<backend>: that lowering (mosaic_gpu: bf16)")
flags.DEFINE_integer("fused_keep", 4, "fused kernel: K', candidates kept per row and block")
flags.DEFINE_integer("repeats", 5, "timed runs (best is reported)")
flags.DEFINE_float("peak_tflops", None, "the chip's spec peak for --dtype (default: known "
                   "GPUs/TPUs; none on CPU)")
flags.DEFINE_string("trace_dir", None, "write a jax.profiler trace of a few steps here")

# Dense spec peaks (TFLOP/s) by device kind substring and dtype.
SPEC_PEAK = {("H100", "bfloat16"): 989.0, ("H100", "float32"): 67.0,
             ("H200", "bfloat16"): 989.0, ("H200", "float32"): 67.0,
             ("A100", "bfloat16"): 312.0, ("A100", "float32"): 19.5,
             ("TPU v5", "bfloat16"): 197.0, ("TPU v4", "bfloat16"): 275.0}


def profile(queries: int, tile_rows: int, dim: int, k: int, dtype: str, repeats: int,
            peak_tflops: float | None = None, trace_dir: str | None = None,
            kernel: str = "auto", fused_keep: int = 4) -> dict:
  """The measurements as a dict (also used by tests)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax import lax

  from plato_jax.knn import sharding

  dev = jax.devices()[0]
  mesh = sharding.default_mesh([dev])
  rng = np.random.default_rng(0)
  jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
  precision = lax.Precision.HIGHEST if dtype == "float32" else lax.Precision.DEFAULT
  q = rng.standard_normal((queries, dim)).astype(np.float32)
  g = rng.standard_normal((tile_rows, dim)).astype(np.float32)
  qd = jax.device_put(jnp.asarray(q, jdtype), dev)
  gd = jax.device_put(jnp.asarray(g, jdtype), dev)

  dot = jax.jit(lambda a, b: lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                                             precision=precision,
                                             preferred_element_type=jnp.float32))
  t_dot, scores = best_time(lambda: dot(qd, gd), repeats)

  if kernel.startswith("fused"):  # the Pallas kernel on the same tile, not the engine's step
    from plato_jax.kernels.fused_topk import FusedConfig, fused_topk
    from plato_jax.knn.kernel_choice import check_kernel_runs_on, pick_kernel
    resolved = pick_kernel(kernel, k, dev.platform)
    check_kernel_runs_on(resolved, mesh)
    backend = resolved.split(":")[1]
    config = FusedConfig(block_q=64 if backend == "mosaic_gpu" else min(64, queries),
                         block_t=min(128 if backend == "mosaic_gpu" else 256, tile_rows),
                         keep=fused_keep, backend=backend)
    interpret = dev.platform == "cpu"
    gids = jnp.arange(tile_rows, dtype=jnp.int32)

    def run_once():
      t = time.perf_counter()
      out = jax.block_until_ready(fused_topk(qd, gd, gids, k, config, precision=precision,
                                             interpret=interpret))
      return time.perf_counter() - t, int(out[2])

    t_select, name = None, f"fused (Pallas{', interpreted' if interpret else ''}; {config})"
  else:
    from plato_jax.knn.kernel_choice import pick_kernel, selector_for
    resolved = pick_kernel(kernel, k, dev.platform, jdtype)
    selector = selector_for(resolved, k, tile_rows, None, mesh,
                            bf16_inputs=np.dtype(jdtype) == np.dtype(jnp.bfloat16))
    name = f"{resolved} ({type(selector).__name__})"
    step = sharding.sharded_step(mesh, selector, True, precision, False)
    qids = sharding.put_whole(mesh, np.full(queries, -2, np.int32))
    qw = sharding.put_whole(mesh, np.asarray(q).astype(jdtype))
    tile = sharding.put_split(mesh, np.asarray(g).astype(jdtype)[None])
    tile_ids = sharding.put_split(mesh, np.arange(tile_rows, dtype=np.int32)[None])
    # Steady state: the running state has already seen one tile (other rows), as on every
    # tile but a query block's first (which, for large k, sets the first threshold).
    first = sharding.put_split(mesh, rng.standard_normal((1, tile_rows, dim)).astype(jdtype))
    warm = step(sharding.empty_state(mesh, selector, queries),
                jax.tree.map(lambda a: sharding.put_split(mesh, a), sharding.empty_row_stats(1)),
                qw, qids, first, tile_ids)

    def run_once():
      state, stats = jax.tree.map(jnp.copy, warm)  # the step donates its state
      jax.block_until_ready(state)
      t = time.perf_counter()
      jax.block_until_ready(step(state, stats, qw, qids, tile, tile_ids))
      return time.perf_counter() - t, 0  # exact on every tile: no certificate, no fallback

    t_select = None  # a fused kernel's selection has no score tile to run on alone
    if not selector.fused:
      ids = jnp.arange(tile_rows, dtype=jnp.int32)
      select = jax.jit(lambda st, s: selector.update(st, sharding.ScoreTile(s, ids)))
      local = jax.tree.map(lambda a: a[0], warm[0])
      t_select, _ = best_time(lambda: select(local, scores), repeats)

  run_once()
  runs = [run_once() for _ in range(max(1, repeats))]
  t_step, fallbacks = min(t for t, _ in runs), runs[-1][1]
  if trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(3):
        run_once()

  flop = 2.0 * queries * tile_rows * dim
  item = np.dtype(jdtype).itemsize
  peak = peak_tflops
  if peak is None:
    peak = next((v for (kind, dt), v in SPEC_PEAK.items()
                 if kind in dev.device_kind and dt == dtype), None)
  return dict(
      device=f"{dev.platform} {dev.device_kind}", kernel=name,
      shape=(queries, tile_rows, dim), k=k, dtype=dtype,
      dot_s=t_dot, step_s=t_step, select_s=t_select,
      dot_tflops=flop / t_dot / 1e12, step_tflops=flop / t_step / 1e12,
      pct_of_dot=t_dot / t_step, pct_of_peak=None if peak is None else flop / t_step / 1e12 / peak,
      fallbacks=fallbacks,  # query blocks the fused kernel could not certify (XLA: none)
      bytes_tile=tile_rows * dim * item,
      bytes_scores=0 if t_select is None else 2 * queries * tile_rows * 4)


def main(argv):
  del argv
  r = profile(FLAGS.queries, FLAGS.tile_rows, FLAGS.dim, FLAGS.k, FLAGS.dtype, FLAGS.repeats,
              FLAGS.peak_tflops, FLAGS.trace_dir, FLAGS.kernel, FLAGS.fused_keep)
  q, t, d = r["shape"]
  print(f"device {r['device']}; kernel {r['kernel']}; tile Q={q} T={t} d={d} k={r['k']} "
        f"{r['dtype']}")
  print(f"  jnp.dot alone     {r['dot_s'] * 1e3:9.2f} ms  {r['dot_tflops']:8.3f} TFLOP/s")
  print(f"  engine step       {r['step_s'] * 1e3:9.2f} ms  {r['step_tflops']:8.3f} TFLOP/s  "
        f"= {r['pct_of_dot']:.0%} of the dot rate"
        + (f", {r['pct_of_peak']:.1%} of spec peak" if r["pct_of_peak"] is not None else
           " (spec peak unknown: --peak_tflops)"))
  other = max(r["step_s"] - r["dot_s"], 0.0)
  alone = "" if r["select_s"] is None else \
      f" (selection alone on precomputed scores: {r['select_s'] * 1e3:.2f} ms)"
  if r["step_s"] < r["dot_s"]:
    print("  split             none: the step beats the bare jnp.dot (it selects inside its own "
          "matmul and writes no score tile)")
  else:
    print(f"  split             matmul {r['dot_s'] / r['step_s']:.0%}, selection and the rest "
          f"{other / r['step_s']:.0%}{alone}")
  print(f"  fallbacks         {r['fallbacks']} query blocks took the exact path")
  scores = (f"score tile written and read {r['bytes_scores'] / 1e6:.1f} MB (unfused)"
            if r["bytes_scores"] else "no score tile (fused)")
  print(f"  bytes per step    tile {r['bytes_tile'] / 1e6:.1f} MB, {scores}")
  if FLAGS.trace_dir:
    print(f"  trace             {FLAGS.trace_dir}")


if __name__ == "__main__":
  app.run(main)
