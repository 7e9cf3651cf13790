"""Check and time the fused kernel's configurations against the XLA path and torch, one run.

    python -m kernels.tune_fused --shape=8192,65536,1024 --shape=8192,65536,384 --k=10

For each shape (Q queries × T gallery rows × d, bf16 in, f32 accumulate), in the same run:
  * `jnp.dot` alone (the rate everything is measured against) and torch matmul + topk (GPU);
  * the XLA path: the same dot, then `kernels.topk.bucket_topk`;
  * every `--configs` entry of `kernels.fused_topk`: first checked (on integer-valued data,
    where every summation order gives the same f32 scores, its ids and values must equal the
    XLA path's), then timed on random data; fallback counts are printed.
The fastest certified configuration per shape is printed last. On CPU the kernel runs
interpreted: use small shapes there (the check still means something; the times do not).
"""
from __future__ import annotations

import dataclasses

from absl import app, flags

from kernels.timing import device_time

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("shape", ["8192,65536,1024", "8192,65536,384"], "Q,T,d")
flags.DEFINE_integer("k", 10, "neighbours")
flags.DEFINE_multi_string("config", ["64,128,4,64,4,3", "128,128,4,64,8,3", "64,256,4,64,8,3",
                                     "128,128,4,32,8,4", "64,128,2,64,4,3", "128,64,2,64,4,3",
                                     "128,256,8,64,8,3"],
                          "block_q,block_t,keep,block_k,num_warps,num_stages")
flags.DEFINE_integer("iters", 10, "calls per timing sample")
flags.DEFINE_bool("torch", True, "time torch matmul + topk (GPU only)")


def parse_config(text: str):
  from kernels.fused_topk import FusedConfig
  bq, bt, keep, bk, warps, stages = (int(x) for x in text.split(","))
  return FusedConfig(block_q=bq, block_t=bt, keep=keep, block_k=bk, num_warps=warps,
                     num_stages=stages)


def tune(q_rows: int, t_rows: int, dim: int, k: int, configs, iters: int = 10,
         with_torch: bool = True, log=print) -> list[dict]:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax import lax

  from kernels.fused_topk import fused_topk
  from kernels.topk import BucketConfig, bucket_topk

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
        + " ".join(f"{k}={v}" for k, v in extra.items()))
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
  for config in configs:
    name = "fused " + ",".join(str(getattr(config, f.name)) for f in dataclasses.fields(config))
    try:
      run = jax.jit(lambda a, b, c=config: fused_topk(a, b, ids, k, c, interpret=interpret))
      v, i, fallbacks = run(qi, gi)
      exact = bool(np.array_equal(np.asarray(v), np.asarray(want_v))
                   and np.array_equal(np.asarray(i), np.asarray(want_c)))
      seconds = device_time(lambda: run(qr, gr), iters)
      rv, ri, fell = run(qr, gr)
      # Random data: the two sum in different orders, so near-equal scores may swap.
      agree = float(np.mean(np.asarray(ri) == np.asarray(xla_random[1])))
      record(name, seconds, pct_of_dot=f"{t_dot / seconds:.0%}", vs_xla=f"{t_xla / seconds:.2f}x",
             exact_on_integers=exact, fallbacks_integers=int(fallbacks),
             fallbacks_random=int(fell), ids_agree_random=f"{agree:.5f}")
    except Exception as e:  # a configuration the compiler rejects is reported, not fatal
      log(f"  {name:44s} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
  return rows


def main(argv):
  del argv
  configs = [parse_config(c) for c in FLAGS.config]
  for shape in FLAGS.shape:
    q, t, d = (int(x) for x in shape.split(","))
    rows = tune(q, t, d, FLAGS.k, configs, FLAGS.iters, FLAGS.torch)
    good = [r for r in rows if r["name"].startswith("fused") and r.get("exact_on_integers")]
    if good:
      best = min(good, key=lambda r: r["seconds"])
      print(f"best: {best['name']} {best['seconds'] * 1e3:.3f} ms, {best['pct_of_dot']} of "
            f"jnp.dot")


if __name__ == "__main__":
  app.run(main)
