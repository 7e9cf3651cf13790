r"""Mutual k-NN against k at fixed gallery sizes (Koepke et al. Fig. 3a).

    python -m experiments.k_sweep                         # synthetic world: 1,024 and 200k rows
    python -m experiments.k_sweep --features_a=dinov2.store --features_b=openllama.store \
        --sizes=1024,1m --num_k=24 --max_k=100k

One engine pass per model gives every size and every k (nested prefixes, multi-k). Per size
the k grid is --num_k log-spaced values from 1 to n-1 (capped at --max_k: the engine keeps
Q × max k neighbours per size). The figure is log-log with one line per size and chance
k/(n-1) dashed; m_NN → 1 as k → n. Per size, `lift` gives the mean of m_NN / chance over
log(k/n), on the k/n range every size's sweep covers (`plato_jax.metrics.lift_area`): one
number per gallery size that compares sizes at the same fractions of the gallery.
"""
from __future__ import annotations

import dataclasses

from absl import app, flags

from . import common

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_k", 24, "k values per gallery size (log-spaced)")
flags.DEFINE_string("max_k", "10k", "largest k (the sweep stops at min(n-1, max_k))")


def plot(result, setup):
  return common.alignment_curves(result, "k", "size", lambda n: f"n = {n:,}", "k",
                                 common.model_names(setup))


def main(argv):
  del argv
  from plato_jax import report
  from plato_jax.gallery import parse_count
  setup = common.start("k_sweep", gallery_ids=True)
  sizes = common.gallery_sizes(setup, ())  # the queries alone and the largest gallery
  spec = f"log:{FLAGS.num_k}:{parse_count(FLAGS.max_k)}"
  result, config = common.run(setup, sizes, [spec])
  if not common.is_writer():
    return
  files = common.write(setup, "k_sweep", {"config": config, **dataclasses.asdict(result)},
                       result.rows, plot(result, setup))
  print(f"\nlayers: a={result.layer_a} b={result.layer_b}; {result.num_queries} queries")
  print(report.format_table(result.rows, ["size", "k", "mutual_knn", "mutual_knn_low",
                                           "mutual_knn_high", "chance", "chance_corrected"]))
  print()
  if result.lift:
    print(report.format_table(result.lift, ["size", "from_k_over_n", "to_k_over_n",
                                             "lift_area", "lift_area_low", "lift_area_high"]))
  else:
    print("no lift: the sizes' k sweeps share no range of k/n (each covers 1/n to "
          "min(n - 1, --max_k)/n): raise --max_k")
  print(f"\nwrote {', '.join(files)}")


if __name__ == "__main__":
  app.run(main)
