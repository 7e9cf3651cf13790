"""Check and time the fused kernel's configurations against the XLA path and torch, one run,
and project a full self-join from a measured stream.

    python -m plato_jax.experiments.bench.tune_fused --shape=8192,65536,1024 --shape=8192,65536,384 --k=10
    python -m plato_jax.experiments.bench.tune_fused --shape=8192,65536,1024 --stream_rows=15000000

For each shape (Q queries × T gallery rows × d, bf16 in, f32 accumulate), in the same run:
  * `jnp.dot` alone (the rate everything is measured against) and torch matmul + topk (GPU);
  * the XLA path: the same dot, then `plato_jax.kernels.topk.bucket_topk`;
  * every `--config` of `plato_jax.kernels.fused_topk`: first checked (on integer-valued data, where
    every summation order gives the same f32 scores, its ids and values must equal the XLA
    path's), then timed on random data as a stream's first tile (every program selects),
    and with every program skipping its selection (thresholds +inf: the kernel's floor, a
    matmul plus one max per row); fallback counts are printed.
With `--stream_rows=N`, the fastest certified configuration (and the one with the lowest
skipping floor, when another) and the XLA path each run a real stream of N random rows (fresh tiles, the running top-k carried along, as the engine
does) for one query block; per-tile time along the stream gives the projected time of an
N × N self-join on this device (N/Q such streams), beside its FLOP floor at spec peak.
On CPU the kernel runs interpreted: use small shapes there (the check still means
something; the times do not).
"""
from __future__ import annotations

import dataclasses
import time

from absl import app, flags

from .timing import device_time

FLAGS = flags.FLAGS


def define_flags():
  """The command's flags, defined only when it runs as one (tests import `tune` and `stream`
  beside other tools that define flags of the same names)."""
  flags.DEFINE_multi_string("shape", ["8192,65536,1024", "8192,65536,384"], "Q,T,d")
  flags.DEFINE_integer("k", 10, "neighbours")
  flags.DEFINE_multi_string("config", ["128,128,4,64,8,3", "128,128,4,32,8,4", "128,128,4,64,8,4",
                                       "128,128,4,128,8,3", "128,64,4,64,4,3", "256,128,4,64,8,3",
                                       "64,128,4,64,4,4", "128,128,4,64,8,3,mosaic_gpu",
                                       "128,128,4,64,8,4,mosaic_gpu", "64,128,4,64,8,4,mosaic_gpu",
                                       "128,128,4,64,8,4,mosaic_gpu,1"],
                            "block_q,block_t,keep,block_k,num_warps,num_stages"
                            "[,backend[,warpgroups]] (mosaic_gpu ignores num_warps)")
  flags.DEFINE_integer("iters", 10, "calls per timing sample")
  flags.DEFINE_bool("torch", True, "time torch matmul + topk (GPU only)")
  flags.DEFINE_integer("stream_rows", 0, "rows of the measured stream (0: none)")
  flags.DEFINE_float("peak_tflops", 989.0, "spec peak for the FLOP floor (H100/H200 dense bf16)")


def parse_config(text: str):
  from plato_jax.kernels.fused_topk import FusedConfig
  fields = text.split(",")
  bq, bt, keep, bk, warps, stages = (int(x) for x in fields[:6])
  return FusedConfig(block_q=bq, block_t=bt, keep=keep, block_k=bk, num_warps=warps,
                     num_stages=stages, backend=fields[6] if len(fields) > 6 else "triton",
                     warpgroups=int(fields[7]) if len(fields) > 7 else 2)


def config_name(config) -> str:
  return ",".join(str(getattr(config, f.name)) for f in dataclasses.fields(config))


def tune(q_rows: int, t_rows: int, dim: int, k: int, configs, iters: int = 10,
         with_torch: bool = True, log=print) -> list[dict]:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax import lax

  from plato_jax.kernels.fused_topk import block_topk, fused_topk
  from plato_jax.kernels.topk import BucketConfig, bucket_topk

  interpret = jax.default_backend() == "cpu"
  rng = np.random.default_rng(0)
  flop = 2.0 * q_rows * t_rows * dim
  ids = jnp.arange(t_rows, dtype=jnp.int32)

  def put(shape, integers):
    x = rng.integers(-3, 4, shape) if integers else rng.standard_normal(shape)
    return jnp.asarray(x, jnp.bfloat16)

  qi, gi = put((q_rows, dim), True), put((t_rows, dim), True)
  qr, gr = put((q_rows, dim), False), put((t_rows, dim), False)
  dot = jax.jit(lambda a, b: lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                                             preferred_element_type=jnp.float32))
  xla = jax.jit(lambda a, b: bucket_topk(dot(a, b), k, BucketConfig()))
  rows = []

  def record(name, seconds, **extra):
    row = dict(name=name, seconds=seconds, tflops=flop / seconds / 1e12, **extra)
    rows.append(row)
    log(f"  {name:44s} {seconds * 1e3:9.3f} ms {row['tflops']:8.1f} TFLOP/s "
        + " ".join(f"{k}={v}" for k, v in extra.items() if k != "config"))
    return row

  log(f"shape Q={q_rows} T={t_rows} d={dim} k={k} bf16 on {jax.devices()[0].device_kind}")
  t_dot = record("jnp.dot", device_time(lambda: dot(qr, gr), iters))["seconds"]
  if with_torch and jax.default_backend() == "gpu":
    import torch
    tq = torch.from_numpy(np.asarray(qr, np.float32)).cuda().bfloat16()
    tg = torch.from_numpy(np.asarray(gr, np.float32)).cuda().bfloat16()

    def torch_step():
      return torch.topk((tq @ tg.T).float(), k, dim=1)

    seconds = device_time(torch_step, iters, torch.cuda.synchronize)
    record("torch matmul+topk", seconds, pct_of_dot=f"{t_dot / seconds:.0%}")
  want_v, want_c = xla(qi, gi)
  xla_random = xla(qr, gr)
  t_xla = device_time(lambda: xla(qr, gr), iters)
  record("xla dot+bucket_topk", t_xla, pct_of_dot=f"{t_dot / t_xla:.0%}")
  never = jnp.full((q_rows,), jnp.inf, jnp.float32)
  for config in configs:
    name = "fused " + config_name(config)
    try:
      run = jax.jit(lambda a, b, c=config: fused_topk(a, b, ids, k, c, interpret=interpret))
      floor = jax.jit(lambda a, b, c=config: block_topk(a, b, ids, c, thresholds=never,
                                                        interpret=interpret))
      v, i, fallbacks = run(qi, gi)
      exact = bool(np.array_equal(np.asarray(v), np.asarray(want_v))
                   and np.array_equal(np.asarray(i), np.asarray(want_c)))
      seconds = device_time(lambda: run(qr, gr), iters)
      skipping = device_time(lambda: floor(qr, gr), iters)
      rv, ri, fell = run(qr, gr)
      # Random data: the two sum in different orders, so near-equal scores may swap.
      agree = float(np.mean(np.asarray(ri) == np.asarray(xla_random[1])))
      record(name, seconds, pct_of_dot=f"{t_dot / seconds:.0%}", vs_xla=f"{t_xla / seconds:.2f}x",
             skipping_ms=f"{skipping * 1e3:.3f}", skipping_pct_of_dot=f"{t_dot / skipping:.0%}",
             exact_on_integers=exact, fallbacks_integers=int(fallbacks),
             fallbacks_random=int(fell), ids_agree_random=f"{agree:.5f}", config=config)
    except Exception as e:  # a configuration the compiler rejects is reported, not fatal
      log(f"  {name:44s} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
  return rows


def stream(q_rows: int, t_rows: int, dim: int, k: int, config, num_rows: int,
           peak_tflops: float, log=print) -> dict:
  """Per-tile seconds of the fused kernel and of the XLA path along a stream of `num_rows`
  fresh random rows, and the projected N × N self-join time."""
  import jax
  import jax.numpy as jnp
  from jax import lax

  from plato_jax.kernels.fused_topk import fused_update
  from plato_jax.kernels.topk import BucketConfig, bucket_topk
  from plato_jax.kernels.primitives import merge_topk

  interpret = jax.default_backend() == "cpu"
  key = jax.random.PRNGKey(1)
  queries = jax.random.normal(key, (q_rows, dim), jnp.bfloat16)
  tile_of = jax.jit(lambda t: jax.random.normal(jax.random.fold_in(key, t + 1), (t_rows, dim),
                                                jnp.bfloat16))

  def xla_update(state, tile, ids):
    s = lax.dot_general(queries, tile, (((1,), (1,)), ((), ())),
                        preferred_element_type=jnp.float32)
    v, c = bucket_topk(s, k, BucketConfig())
    return (*merge_topk(*state[:2], v, ids[c], k), state[2])

  fused = jax.jit(lambda state, tile, ids: fused_update(
      state[:2], queries, tile, ids, k, config, interpret=interpret))
  xla = jax.jit(xla_update)
  out = {}
  tiles = -(-num_rows // t_rows)
  for name, update in (("fused " + config_name(config), fused), ("xla", xla)):
    state = (jnp.full((q_rows, k), -jnp.inf, jnp.float32), jnp.full((q_rows, k), -1, jnp.int32),
             jnp.zeros((), jnp.int32))
    jax.block_until_ready(update(state, tile_of(0), jnp.arange(t_rows, dtype=jnp.int32)))
    spent, fallbacks, marks = 0.0, 0, {}
    for t in range(tiles):
      tile = jax.block_until_ready(tile_of(t))
      ids = jnp.arange(t * t_rows, (t + 1) * t_rows, dtype=jnp.int32)
      start = time.perf_counter()
      v, i, fell = jax.block_until_ready(update(state, tile, ids))
      spent += time.perf_counter() - start
      fallbacks += int(fell)
      state = (v, i, state[2])
      if t + 1 in (1, 16, tiles):
        marks[t + 1] = spent / (t + 1)
    per_tile = spent / tiles
    projected = per_tile * tiles * (num_rows / q_rows)
    floor = 2.0 * num_rows * num_rows * dim / (peak_tflops * 1e12)
    out[name] = dict(per_tile=per_tile, projected=projected, floor=floor, fallbacks=fallbacks)
    log(f"  stream {name:30s} {tiles} tiles of {t_rows}: {per_tile * 1e3:.3f} ms/tile "
        f"(mean over the first 1 / 16 / all tiles: "
        + " / ".join(f"{s * 1e3:.3f}" for s in marks.values())
        + f" ms); fallbacks {fallbacks}; projected {num_rows:,} x {num_rows:,} self-join "
        f"{projected:,.0f} s (FLOP floor at {peak_tflops:.0f} TFLOP/s: {floor:,.0f} s)")
  return out


def main(argv):
  del argv
  configs = [parse_config(c) for c in FLAGS.config]
  for shape in FLAGS.shape:
    q, t, d = (int(x) for x in shape.split(","))
    rows = tune(q, t, d, FLAGS.k, configs, FLAGS.iters, FLAGS.torch)
    good = [r for r in rows if r["name"].startswith("fused") and r.get("exact_on_integers")
            and r.get("fallbacks_random") == 0]
    if not good:
      continue
    best = min(good, key=lambda r: r["seconds"])
    print(f"best: {best['name']} {best['seconds'] * 1e3:.3f} ms, {best['pct_of_dot']} of "
          f"jnp.dot (all programs selecting), {best['skipping_pct_of_dot']} (all skipping)")
    if FLAGS.stream_rows:
      # A long stream mostly skips selection: the configuration with the lowest skipping
      # floor may beat the fastest first tile there, so both run when they differ.
      floor = min(good, key=lambda r: float(r["skipping_ms"]))
      for candidate in dict.fromkeys([best["name"], floor["name"]]):
        config = next(r["config"] for r in good if r["name"] == candidate)
        stream(q, t, d, FLAGS.k, config, FLAGS.stream_rows, FLAGS.peak_tflops)


if __name__ == "__main__":
  define_flags()
  app.run(main)
