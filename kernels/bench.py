"""Exact top-k benchmark: plato_jax.knn.search against its peers, in the same run.

    python -m kernels.bench                      # 1,024 x 262,144 x 768, k = 10 and n/100
    python -m kernels.bench --gallery=65536 --k=10

Peers: faiss-cpu IndexFlatIP and numpy matmul + argpartition on CPU (same thread count);
torch matmul + topk on a GPU. Prints seconds, effective GFLOP/s (2·Q·N·d / time) and the
ratio peer_time / our_time (> 1 means we are faster).
"""
from __future__ import annotations

import os

from absl import app, flags

from kernels.timing import best_time

FLAGS = flags.FLAGS
flags.DEFINE_integer("queries", 1024, "query rows")
flags.DEFINE_integer("gallery", 262_144, "gallery rows")
flags.DEFINE_integer("dim", 768, "feature dimension")
flags.DEFINE_list("k", ["10", "n/100"], "k values; 'n/100' means gallery // 100")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "storage dtype of both sides")
flags.DEFINE_integer("repeats", 3, "timed runs per method (best is reported)")
flags.DEFINE_integer("tile_rows", None, "engine tile rows (default: engine's choice)")
flags.DEFINE_list("peers", ["faiss", "numpy", "torch"], "peers to run when available")
flags.DEFINE_integer("seed", 0, "data seed")
flags.DEFINE_list("kernel", ["auto"], "the engine's tile kernels to time: auto, xla, cpu, "
                  "fused, fused:<backend> (see plato_jax.knn.search); ratios are against the "
                  "first")


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


def main(argv):
  del argv
  import jax
  import numpy as np

  from plato_jax.knn import search

  rng = np.random.default_rng(FLAGS.seed)
  g = rng.standard_normal((FLAGS.gallery, FLAGS.dim), dtype=np.float32)
  g /= np.linalg.norm(g, axis=1, keepdims=True)
  q = g[rng.choice(FLAGS.gallery, FLAGS.queries, replace=False)]
  if FLAGS.dtype == "bfloat16":
    import ml_dtypes
    g, q = g.astype(ml_dtypes.bfloat16), q.astype(ml_dtypes.bfloat16)
  backend = jax.default_backend()
  threads = os.cpu_count()
  print(f"backend={backend} devices={len(jax.devices())} cpu_threads={threads} "
        f"Q={FLAGS.queries} N={FLAGS.gallery} d={FLAGS.dim} dtype={FLAGS.dtype}")
  flop = 2.0 * FLAGS.queries * FLAGS.gallery * FLAGS.dim
  dot_t = _dot_time(q, g, FLAGS.repeats)
  print(f"jnp.dot alone (the whole [Q, N] score matrix, f32 accumulation): {dot_t:.3f} s, "
        f"{flop / dot_t / 1e9:.1f} GFLOP/s")
  for k_spec in FLAGS.k:
    k = FLAGS.gallery // 100 if k_spec == "n/100" else int(k_spec)
    rows = []
    first, *others = FLAGS.kernel
    ours_t, ours = best_time(lambda: search(q, g, k, exclude_self=False, tile_rows=FLAGS.tile_rows,
                                            kernel=first), FLAGS.repeats)
    rows.append((f"plato_jax ({ours.kernel})", ours_t, None))
    for kernel in others:
      t, other = best_time(lambda: search(q, g, k, exclude_self=False, kernel=kernel,
                                          tile_rows=FLAGS.tile_rows), FLAGS.repeats)
      rows.append((f"plato_jax, kernel {other.kernel}", t, (other.ids == ours.ids).mean()))
    if backend != "cpu":  # the gallery already in device memory, as the torch peer's is
      gd = jax.device_put(g)
      t, resident = best_time(lambda: search(q, gd, k, exclude_self=False, kernel=first,
                                             tile_rows=FLAGS.tile_rows), FLAGS.repeats)
      rows.append(("plato_jax, gallery on device", t, (resident.ids == ours.ids).mean()))
    if "faiss" in FLAGS.peers and backend == "cpu":
      try:
        import faiss
        faiss.omp_set_num_threads(threads)
        g32 = np.asarray(g, np.float32)
        index = faiss.IndexFlatIP(FLAGS.dim)
        index.add(g32)
        t, (_, f_ids) = best_time(lambda: index.search(np.asarray(q, np.float32), k), FLAGS.repeats)
        rows.append(("faiss-cpu IndexFlatIP", t, (f_ids == ours.ids).mean()))
      except ImportError:
        print("faiss not installed: skipped")
    if "numpy" in FLAGS.peers and backend == "cpu":
      g32, q32 = np.asarray(g, np.float32), np.asarray(q, np.float32)
      t, n_ids = best_time(lambda: numpy_topk(q32, g32, k), FLAGS.repeats)
      rows.append(("numpy matmul+argpartition", t, (n_ids == ours.ids).mean()))
    if "torch" in FLAGS.peers and backend == "gpu":
      import torch
      tq = torch.from_numpy(np.asarray(q, np.float32)).cuda()
      tg = torch.from_numpy(np.asarray(g, np.float32)).cuda()
      if FLAGS.dtype == "bfloat16":
        tq, tg = tq.bfloat16(), tg.bfloat16()

      def torch_topk():
        out = torch.topk((tq @ tg.T).float(), k, dim=1)
        torch.cuda.synchronize()
        return out.indices.cpu().numpy()
      t, t_ids = best_time(torch_topk, FLAGS.repeats)
      rows.append(("torch matmul+topk", t, (t_ids == ours.ids).mean()))
    print(f"\nk={k}: plato_jax at {dot_t / ours_t:.0%} of the jnp.dot rate")
    print(f"{'method':30s} {'seconds':>9s} {'GFLOP/s':>9s} {'peer/ours':>10s} {'id agreement':>13s}")
    for name, t, agree in rows:
      ratio = "" if name.startswith("plato_jax (") else f"{t / ours_t:10.2f}"
      ag = "" if agree is None else f"{agree:13.4f}"
      print(f"{name:30s} {t:9.3f} {flop / t / 1e9:9.1f} {ratio:>10s} {ag}")


if __name__ == "__main__":
  app.run(main)
