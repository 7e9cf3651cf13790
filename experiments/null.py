r"""The permutation null of the layer search (Koepke et al. App. A.2 / Fig. 15 after Gröger
et al.): raw best-layer mutual k-NN against gallery size, beside what the
search finds when the pairing is shuffled, and the calibrated scores.

    python -m experiments.null                        # synthetic world, 50k rows
    python -m experiments.null --features_a=dinov2.store --features_b=openllama.store \
        --sizes=1024,10k,100k,1m --permutations=200

Every layer of both models is searched once (one engine pass each gives all sizes); each
permutation then costs only set intersections (see `plato_jax.null`). Reported per size and
k: raw with the pair fixed on the queries, raw re-selected per size, the null of the fixed
pair and of the maximum over pairs, the null quantile τ, raw − E_π[max] and
(raw − τ)/(1 − τ). Writes null.json/.csv/.png.
"""
from __future__ import annotations

import dataclasses

from absl import app, flags

from . import common

FLAGS = flags.FLAGS
flags.DEFINE_list("k", ["1", "10"], "k values: integers or n/100")
flags.DEFINE_integer("permutations", 100, "shuffled pairings")
flags.DEFINE_float("quantile", 0.95, "null quantile τ of the calibrated_tau score")

DEFAULT_SIZES = ("1024", "10k", "50k", "100k", "1m")
SYNTHETIC_GALLERY = "50k"  # every layer is searched: a smaller default world than scaling's


def plot(result):
  fig, ax = common.figure(7, 4.5)
  for spec in dict.fromkeys(r["k_spec"] for r in result.rows):
    pts = [r for r in result.rows if r["k_spec"] == spec]
    n = [r["size"] for r in pts]
    line, = ax.plot(n, [r["raw_reselected"] for r in pts], "o-", label=f"raw, k = {spec}")
    c = line.get_color()
    ax.plot(n, [r["raw_fixed"] for r in pts], "o:", color=c, label=f"raw, fixed pair, k = {spec}")
    ax.plot(n, [r["null_max"] for r in pts], "--", color=c, alpha=0.6,
            label=f"null E[max], k = {spec}")
    ax.plot(n, [r["calibrated"] for r in pts], "s-", color=c, alpha=0.6, ms=3,
            label=f"raw − null, k = {spec}")
  ax.set_xscale("log")
  ax.set_xlabel("gallery size n")
  ax.set_ylabel("mutual k-NN alignment")
  ax.set_title(f"layer-search null ({result.permutations} permutations)")
  common.legend_outside(ax, fontsize=6)
  return fig


def main(argv):
  del argv
  from plato_jax import report
  from plato_jax.null import run_null
  setup = common.start("null", synthetic_rows=SYNTHETIC_GALLERY, clamps=False)
  sizes = common.gallery_sizes(setup, DEFAULT_SIZES)
  config = dict(sizes=sizes, k=FLAGS.k, permutations=FLAGS.permutations,
                quantile=FLAGS.quantile, seed=FLAGS.seed, queries=FLAGS.queries,
                store_a=setup.store_a.root, store_b=setup.store_b.root)
  result = run_null(setup.store_a, setup.store_b, queries=setup.queries, sizes=sizes,
                    ks=FLAGS.k, permutations=FLAGS.permutations, quantile=FLAGS.quantile,
                    seed=FLAGS.seed, progress=FLAGS.progress, tile_rows=FLAGS.tile_rows,
                    resume_dir=common.resume_folder(setup, config))
  if not common.is_writer():
    return
  files = common.write(setup, "null", {"config": config, **dataclasses.asdict(result)},
                       result.rows, plot(result))
  print(f"\nfixed pair (on the queries): a={result.layer_a} b={result.layer_b}")
  print(report.format_table(result.rows, ["size", "k", "raw_fixed", "raw_reselected",
                                          "null_fixed", "null_max", "tau", "calibrated",
                                          "calibrated_tau"]))
  print(f"\nwrote {', '.join(files)}")


if __name__ == "__main__":
  app.run(main)
