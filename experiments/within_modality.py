r"""The within-modality control (Koepke et al. App. A.1, Fig. 13): mutual
k-NN between two models of the SAME modality as the gallery grows, beside the cross-modal
pair.

    python -m experiments.within_modality          # synthetic world: a vs a', b vs b', a vs b
    python -m experiments.within_modality --features_a=dinov2-b.store --same_a=dinov2-g.store \
        --features_b=openllama-3b.store --same_b=openllama-13b.store --gallery=1m

If alignment between two vision models (or two language models) holds as n grows while the
cross-modal one collapses, the collapse is about the modalities, not about the metric at
scale. Each pair runs the scaling protocol (same queries, same nested galleries, layers
`auto` per pair unless --layer_a/--layer_b are given). Writes within_modality.json/.csv/.png.
"""
from __future__ import annotations

import dataclasses

from absl import app, flags

from . import common

FLAGS = flags.FLAGS
flags.DEFINE_string("same_a", None, "a second store of model a's modality (pairs with "
                    "--features_a); synthetic default: another model of modality a")
flags.DEFINE_string("same_b", None, "a second store of model b's modality (pairs with "
                    "--features_b); synthetic default: another model of modality b")
flags.DEFINE_list("k", ["1", "10", "n/100"], "k values: integers or n/100")
flags.DEFINE_bool("cross", True, "also run the cross-modal pair (a, b) for reference")


def pairs(setup):
  """[(label, store x, store y)]: the within-modality pairs, then the cross-modal one."""
  from plato_jax.store import FeatureStore
  if common.synthetic(setup):
    same_a, same_b = common.synthetic_model(setup, 0, 1), common.synthetic_model(setup, 1, 1)
  else:
    if FLAGS.same_a is None and FLAGS.same_b is None:
      raise app.UsageError("give --same_a and/or --same_b: a second model of a modality")
    same_a = FeatureStore.open(FLAGS.same_a) if FLAGS.same_a else None
    same_b = FeatureStore.open(FLAGS.same_b) if FLAGS.same_b else None
  out = [("a vs a'", setup.store_a, same_a), ("b vs b'", setup.store_b, same_b)]
  if FLAGS.cross:
    out.append(("a vs b", setup.store_a, setup.store_b))
  return [(label, x, y) for label, x, y in out if y is not None]


def plot(rows):
  fig, ax = common.figure(7, 4.5)
  styles = ["o-", "s--", "^:", "d-."]
  colours = {}
  for i, spec in enumerate(dict.fromkeys(r["k_spec"] for r in rows)):
    for pair in dict.fromkeys(r["pair"] for r in rows):
      pts = [r for r in rows if r["pair"] == pair and r["k_spec"] == spec]
      line, = ax.plot([r["size"] for r in pts], [r["mutual_knn"] for r in pts],
                      styles[i % len(styles)], color=colours.get(pair), ms=3,
                      label=f"{pair}, k = {spec}")
      colours[pair] = line.get_color()
      common.band(ax, line, [r["size"] for r in pts], pts, "mutual_knn")
  ax.set_xscale("log")
  ax.set_xlabel("gallery size n")
  ax.set_ylabel("mutual k-NN alignment")
  ax.set_title("within-modality control (bands: 95% over queries)")
  common.legend_outside(ax, fontsize=7)
  return fig


def main(argv):
  del argv
  from plato_jax import report
  setup = common.start("within_modality", gallery_ids=True)
  from plato_jax.gallery import DEFAULT_SIZES
  sizes = common.gallery_sizes(setup, DEFAULT_SIZES)
  rows, runs = [], []
  for label, x, y in pairs(setup):
    if FLAGS.progress:
      print(f"pair {label}: {x.root} vs {y.root}", flush=True)
    result, config = common.run(setup, sizes, FLAGS.k, store_a=x, store_b=y, pair=label)
    runs.append({"pair": label, "config": config, **dataclasses.asdict(result)})
    rows += [dict(pair=label, layer_x=result.layer_a, layer_y=result.layer_b, **r)
             for r in result.rows]
  if not common.is_writer():
    return
  files = common.write(setup, "within_modality", {"runs": runs}, rows, plot(rows))
  print(report.format_table(rows, ["pair", "layer_x", "layer_y", "size", "k_spec", "k",
                                   "mutual_knn", "mutual_knn_low", "mutual_knn_high", "chance",
                                   "chance_corrected"]))
  print(f"\nwrote {', '.join(files)}")


if __name__ == "__main__":
  app.run(main)
