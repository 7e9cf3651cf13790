r"""Mutual k-NN against gallery size (Koepke et al. Fig. 4): does alignment survive scale?

    python -m experiments.scaling                        # built-in synthetic world, ~1 min on CPU
    python -m experiments.scaling --gallery=15m          # synthetic world of 15M rows
    python -m experiments.scaling --features_a=dinov2.store --features_b=openllama.store \
        --layer_a=auto --layer_b=auto --gallery=15m
    python -m experiments.scaling --clamp=exact --concat   # PRH's clamp and concatenation

Writes scaling.json, scaling.csv, scaling.png and scaling.pdf as one result set,
<out>/scaling/ (default results/scaling/), and prints the table.
"""
from __future__ import annotations

import dataclasses

from absl import app, flags

from . import common

FLAGS = flags.FLAGS
flags.DEFINE_list("k", ["1", "10", "n/100"], "k values: integers or n/100")


def plot(result, setup):
  return common.alignment_curves(result, "size", "k_spec", lambda spec: f"k = {spec}",
                                 "gallery size n", common.model_names(setup))


def main(argv):
  del argv
  from plato_jax import report
  setup = common.start("scaling", gallery_ids=True)
  from plato_jax.gallery import DEFAULT_SIZES
  sizes = common.gallery_sizes(setup, DEFAULT_SIZES)
  result, config = common.run(setup, sizes, FLAGS.k)
  if not common.is_writer():
    return
  files = common.write(setup, "scaling", {"config": config, **dataclasses.asdict(result)},
                       result.rows, plot(result, setup))
  print(f"\nlayers: a={result.layer_a} b={result.layer_b}; {result.num_queries} queries"
        + ("" if result.clamp == "none" else
           f"; clamp ({result.clamp}) thresholds a={result.thresholds['a']:.4g} "
           f"b={result.thresholds['b']:.4g}"))
  print(report.format_table(result.rows, ["size", "k_spec", "k", "mutual_knn", "mutual_knn_low",
                                           "mutual_knn_high", "chance", "chance_corrected"]))
  print()
  print(report.format_table(result.ranking, ["size", "depth", "p", "rbo", "rbo_low", "rbo_high"]))
  print()
  print(report.format_table(result.change, ["k_spec", "from_size", "to_size", "difference",
                                            "low", "high", "p_value"]))
  print()
  print(report.format_table(result.quality, ["size", "model", "top1_cosine", "top10_cosine"]))
  print(f"\nwrote {', '.join(files)}")


if __name__ == "__main__":
  app.run(main)
