"""Exact top-k benchmark: plato_jax.knn.search against its peers, in the same run.

    python -m plato_jax.experiments.bench.engine                      # 1,024 x 262,144 x 768, k = 10 and n/100
    python -m plato_jax.experiments.bench.engine --gallery=65536 --k=10
    python -m plato_jax.experiments.bench.engine --self_join --gallery=100000 --dim=256 --k=10
    python -m plato_jax.experiments.bench.engine --baseline=../old-checkout   # before vs after a change

Peers: faiss-cpu IndexFlatIP, numpy matmul + argpartition and torch matmul + topk on CPU
(same thread count; with --dtype=bfloat16 torch multiplies in bf16 — oneDNN, on AMX where the
CPU has it — and its matmul rate alone is printed); torch matmul + topk on a GPU. The methods run interleaved (each round runs every method
once), so the machine's drift falls on all of them. Prints best and median seconds,
effective GFLOP/s (2·Q·N·d / best time) and the ratios peer_time / our_time of bests and of
medians (> 1 means we are faster), and how many candidates per query the certificate
rescored in float64.

`--baseline=DIR` times another checkout's engine (e.g. the commit before a change) on the
same data in the same rounds: a worker process with DIR first on its path runs the same
search whenever its turn comes.
"""
from __future__ import annotations

import functools
import os
import statistics

from absl import app, flags

from .timing import best_time, interleaved_times

FLAGS = flags.FLAGS
flags.DEFINE_integer("queries", 1024, "query rows")
flags.DEFINE_integer("gallery", 262_144, "gallery rows")
flags.DEFINE_integer("dim", 768, "feature dimension")
flags.DEFINE_list("k", ["10", "n/100"], "k values; 'n/100' means gallery // 100")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "storage dtype of both sides")
flags.DEFINE_integer("repeats", 3, "timed rounds; each runs every method once, in rotating "
                     "order (best and median are reported)")
flags.DEFINE_integer("tile_rows", None, "engine tile rows (default: engine's choice)")
flags.DEFINE_list("peers", ["faiss", "numpy", "torch"], "peers to run when available")
flags.DEFINE_integer("seed", 0, "data seed")
flags.DEFINE_bool("self_join", False, "queries = the whole gallery, each excluding itself "
                  "(--queries is ignored)")
flags.DEFINE_string("baseline", None, "another checkout whose engine is timed beside ours")
flags.DEFINE_list("kernel", ["auto"], "the engine's tile kernels to time: auto, xla, cpu, "
                  "fused, fused:<backend> (see plato_jax.knn.search); ratios are against the "
                  "first")


_WORKER = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
import ml_dtypes
import numpy as np
from plato_jax.knn import search
data, self_join, dtype = sys.argv[2], sys.argv[3] == "1", np.dtype(getattr(ml_dtypes, sys.argv[4], sys.argv[4]))
g = np.load(os.path.join(data, "g.npy")).view(dtype)  # (numpy saves bf16 as raw 2-byte items)
q = g if self_join else np.load(os.path.join(data, "q.npy")).view(dtype)
for line in sys.stdin:
  k, kernel, tile_rows = json.loads(line)
  res = search(q, g, k, exclude_self=self_join, kernel=kernel, tile_rows=tile_rows)
  np.save(os.path.join(data, "ids.npy"), res.ids)
  print("done", flush=True)
"""


class Baseline:
  """Another checkout's engine in a worker process (`_WORKER`) over the same rows (saved
  once to a temporary folder), called round by round."""

  def __init__(self, checkout: str, q, g, self_join: bool):
    import subprocess
    import sys
    import tempfile

    import numpy as np
    self._data = tempfile.mkdtemp()
    np.save(f"{self._data}/g.npy", g)
    np.save(f"{self._data}/q.npy", q)
    self._proc = subprocess.Popen(
        [sys.executable, "-c", _WORKER, checkout, self._data, "1" if self_join else "0",
         str(g.dtype)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=checkout)

  def __call__(self, k: int, kernel: str, tile_rows):
    import json

    import numpy as np
    self._proc.stdin.write(json.dumps([k, kernel, tile_rows]) + "\n")
    self._proc.stdin.flush()
    if self._proc.stdout.readline().strip() != "done":
      raise RuntimeError(f"the baseline worker stopped (exit {self._proc.poll()})")
    return np.load(f"{self._data}/ids.npy")

  def close(self):
    import shutil
    self._proc.stdin.close()
    self._proc.wait()
    shutil.rmtree(self._data, ignore_errors=True)


def bench_data(seed: int, gallery: int, dim: int, queries: int, dtype: str, self_join: bool):
  """The benchmark's unit rows: (queries drawn from the gallery, or the gallery itself for a
  self-join; gallery)."""
  import numpy as np
  rng = np.random.default_rng(seed)
  g = rng.standard_normal((gallery, dim), dtype=np.float32)
  g /= np.linalg.norm(g, axis=1, keepdims=True)
  q = g if self_join else g[rng.choice(gallery, queries, replace=False)]
  if dtype == "bfloat16":
    import ml_dtypes
    g, q = g.astype(ml_dtypes.bfloat16), q.astype(ml_dtypes.bfloat16)
  return q, g


def numpy_topk(q, g, k, block=32_768):
  import numpy as np
  vals, ids = [], []
  for s in range(0, g.shape[0], block):
    sc = q @ g[s:s + block].T
    kk = min(k, sc.shape[1])
    part = np.argpartition(-sc, kk - 1, axis=1)[:, :kk]
    vals.append(np.take_along_axis(sc, part, 1))
    ids.append(part + s)
  v, i = np.concatenate(vals, 1), np.concatenate(ids, 1)
  order = np.argsort(-v, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(i, order, 1)


def _dot_time(q, g, repeats):
  import jax
  import jax.numpy as jnp
  from jax import lax
  precision = lax.Precision.HIGHEST if q.dtype == "float32" else lax.Precision.DEFAULT
  qd, gd = jax.device_put(q), jax.device_put(g)
  dot = jax.jit(lambda a, b: lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                                             preferred_element_type=jnp.float32))
  return best_time(lambda: dot(qd, gd), repeats)[0]


def _torch_topk(q32, g32, k, backend: str, threads: int, block: int = 65_536):
  """torch's matmul (+ topk per block of gallery rows, merged) in the benchmark's dtype, or
  None without torch. On CPU its bf16 matmul is oneDNN's (AMX where the CPU has it)."""
  try:
    import torch
  except ImportError:
    print("torch not installed: skipped")
    return None
  dtype = torch.bfloat16 if FLAGS.dtype == "bfloat16" else torch.float32
  device = "cuda" if backend == "gpu" else "cpu"
  torch.set_num_threads(threads)
  tq = torch.from_numpy(q32).to(device, dtype)
  tg = torch.from_numpy(g32).to(device, dtype)
  if backend == "gpu":
    block = tg.shape[0]

  def run():
    values, ids = [], []
    for s in range(0, tg.shape[0], block):
      out = torch.topk((tq @ tg[s:s + block].T).float(), min(k, tg.shape[0] - s), dim=1)
      values.append(out.values)
      ids.append(out.indices + s)
    v, i = torch.cat(values, 1), torch.cat(ids, 1)
    best = torch.topk(v, k, dim=1).indices
    out = torch.gather(i, 1, best)
    if backend == "gpu":
      torch.cuda.synchronize()
    return out.cpu().numpy()

  # The matmul alone at the benchmark's shape, in blocks as `run` multiplies.
  t = best_time(lambda: [tq @ tg[s:s + block].T for s in range(0, tg.shape[0], block)],
                FLAGS.repeats)[0]
  print(f"torch {FLAGS.dtype} matmul alone ({device}, blocks of {block} rows): "
        f"{2.0 * tq.shape[0] * tg.shape[0] * tq.shape[1] / t / 1e9:.1f} GFLOP/s")
  return run


def main(argv):
  del argv
  import jax
  import numpy as np

  from plato_jax.knn import search

  q, g = bench_data(FLAGS.seed, FLAGS.gallery, FLAGS.dim, FLAGS.queries, FLAGS.dtype,
                    FLAGS.self_join)
  num_q = q.shape[0]
  backend = jax.default_backend()
  threads = os.cpu_count()
  print(f"backend={backend} devices={len(jax.devices())} cpu_threads={threads} "
        f"Q={num_q} N={FLAGS.gallery} d={FLAGS.dim} dtype={FLAGS.dtype}")
  flop = 2.0 * num_q * FLAGS.gallery * FLAGS.dim
  # The dot rate from at most 1,024 queries: a self-join's whole score matrix would not fit.
  sample = q[:1024]
  dot_t = _dot_time(sample, g, FLAGS.repeats) * num_q / sample.shape[0]
  print(f"jnp.dot alone ([{sample.shape[0]}, N] scores, f32 accumulation): "
        f"{flop / dot_t / 1e9:.1f} GFLOP/s")
  index = None
  g32, q32 = np.asarray(g, np.float32), np.asarray(q, np.float32)
  if "faiss" in FLAGS.peers and backend == "cpu":
    try:
      import faiss
      faiss.omp_set_num_threads(threads)
      index = faiss.IndexFlatIP(FLAGS.dim)
      index.add(g32)  # faiss's copy of the gallery, made untimed
    except ImportError:
      print("faiss not installed: skipped")
  gd = jax.device_put(g) if backend != "cpu" else None
  baseline = Baseline(os.path.abspath(FLAGS.baseline), q, g, FLAGS.self_join) \
      if FLAGS.baseline else None
  exclude = FLAGS.self_join
  q_arg = g if FLAGS.self_join else q  # `queries is gallery`: a self-join
  for k_spec in FLAGS.k:
    k = FLAGS.gallery // 100 if k_spec == "n/100" else int(k_spec)
    # name -> (callable, its output's [Q, k] ids); the first is ours, the reference of ratios
    methods = {}
    for kernel in FLAGS.kernel:
      methods[f"plato_jax, kernel {kernel}"] = (
          functools.partial(search, q_arg, g, k, exclude_self=exclude, kernel=kernel,
                            tile_rows=FLAGS.tile_rows), lambda r: r.ids)
    if baseline is not None:
      methods["plato_jax at --baseline"] = (
          functools.partial(baseline, k, FLAGS.kernel[0], FLAGS.tile_rows), lambda r: r)
    if gd is not None:  # the gallery already in device memory, as the torch peer's is
      methods["plato_jax, gallery on device"] = (
          functools.partial(search, q_arg if not FLAGS.self_join else gd, gd, k,
                            exclude_self=exclude, kernel=FLAGS.kernel[0],
                            tile_rows=FLAGS.tile_rows), lambda r: r.ids)
    if index is not None and not FLAGS.self_join:
      methods["faiss-cpu IndexFlatIP"] = (lambda: index.search(q32, k), lambda r: r[1])
    if "numpy" in FLAGS.peers and backend == "cpu" and not FLAGS.self_join:
      methods["numpy matmul+argpartition"] = (lambda: numpy_topk(q32, g32, k), lambda r: r)
    if "torch" in FLAGS.peers and backend in ("gpu", "cpu") and not FLAGS.self_join:
      torch_peer = _torch_topk(q32, g32, k, backend, threads)
      if torch_peer is not None:
        methods["torch matmul+topk"] = (torch_peer, lambda r: r)
    timed = interleaved_times({name: fn for name, (fn, _) in methods.items()}, FLAGS.repeats)
    ours_name = next(iter(methods))
    ours_times, ours = timed[ours_name]
    ours_ids = np.asarray(ours.ids)
    best, median = min(ours_times), statistics.median(ours_times)
    print(f"\nk={k}: {ours_name} ({ours.kernel}) at {dot_t / best:.0%} of the jnp.dot rate; "
          f"{FLAGS.repeats} interleaved rounds; certificate: {ours.rescored / num_q:.2f} rows "
          f"rescored per query, {ours.searched_again} queries searched again")
    print(f"{'method':32s} {'best s':>8s} {'median s':>9s} {'GFLOP/s':>8s} "
          f"{'peer/ours best':>15s} {'median':>7s} {'id agreement':>13s}")
    for name, (times, out) in timed.items():
      t, m = min(times), statistics.median(times)
      ratio = "" if name == ours_name else f"{t / best:15.2f} {m / median:7.2f}"
      ids = None if name == ours_name else np.asarray(methods[name][1](out))
      agree = "" if ids is None else f"{(ids == ours_ids).mean():13.4f}"
      print(f"{name:32s} {t:8.3f} {m:9.3f} {flop / t / 1e9:8.1f} {ratio:>23s} {agree}")
  if baseline is not None:
    baseline.close()


if __name__ == "__main__":
  app.run(main)
