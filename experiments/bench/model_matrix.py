"""The model-by-model mutual k-NN matrix (PRH Fig. 2's 78 vision models × 1,000 images): one
batched pass against a loop of per-pair `metrics.mutual_knn` calls, in the same run.

    python -m plato_jax.experiments.bench.model_matrix             # 78 models × 1,000 rows
"""
from __future__ import annotations

import time

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("models", 78, "models")
flags.DEFINE_integer("rows", 1000, "rows (images) per model")
flags.DEFINE_integer("dim", 768, "feature width")
flags.DEFINE_integer("topk", 10, "k")


def main(argv):
  del argv
  from plato_jax import metrics, model_matrix
  from plato_jax.grid import MetricSpec
  rng = np.random.default_rng(0)
  shared = rng.standard_normal((FLAGS.rows, 64)).astype(np.float32)
  feats = []
  for m in range(FLAGS.models):  # graded mixtures of a shared and an own signal
    w = rng.standard_normal((64, FLAGS.dim)).astype(np.float32)
    own = rng.standard_normal((FLAGS.rows, FLAGS.dim)).astype(np.float32)
    x = shared @ w * (m + 1) / FLAGS.models + own
    feats.append(x / np.linalg.norm(x, axis=1, keepdims=True))
  spec = MetricSpec("mutual_knn", FLAGS.topk)
  model_matrix.pairwise_matrix(feats[:3], spec)  # compile
  t = time.perf_counter()
  matrix = model_matrix.pairwise_matrix(feats, spec)
  batched = time.perf_counter() - t
  i, j = np.triu_indices(FLAGS.models, 1)
  sample = rng.choice(len(i), min(200, len(i)), replace=False)  # the loop, timed on a sample
  t = time.perf_counter()
  loop = [metrics.mutual_knn(feats[i[s]], feats[j[s]], FLAGS.topk) for s in sample]
  per_pair = (time.perf_counter() - t) / len(sample)
  same = np.allclose(loop, matrix[i[sample], j[sample]], atol=1e-12)
  print(f"{FLAGS.models} models × {FLAGS.rows} rows, k = {FLAGS.topk}: all "
        f"{len(i):,} pairs batched in {batched:.2f} s; per-pair calls {per_pair * 1e3:.1f} ms "
        f"each → {per_pair * len(i):.1f} s for all (ratio {per_pair * len(i) / batched:.1f}×); "
        f"equal on the {len(sample)} sampled pairs: {same}")


if __name__ == "__main__":
  app.run(main)
