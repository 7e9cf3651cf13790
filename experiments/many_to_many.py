r"""Relaxed mutual k-NN as one modality gets several items per source (Koepke et al. Fig.
9/22): T2I (several images per prompt) and I2T (several captions per image).

    python -m experiments.many_to_many            # synthetic: 12 "images" / 11 "captions" per source
    python -m experiments.many_to_many --features_a=images.store --features_b=captions.store \
        --dense_a=generated-images.store --multiplicities=1,4,7,12 --k=1,10

--dense_a is a store of modality a with several items per source and a "group" column (the
source id, which is the row id in --features_b); it pairs with --features_b (T2I).
--dense_b likewise pairs with --features_a (I2T). Both counting rules of
`plato_jax.many_to_many` are reported (group_set, matched_slots), and how often the dense
neighbours are the query's own source's other items. Layers: auto (best pair on the
queries) unless --layer_a/--layer_b. Writes many_to_many.json/.csv/.png.
"""
from __future__ import annotations

from absl import app, flags

from . import common

FLAGS = flags.FLAGS
flags.DEFINE_string("dense_a", None, "modality a, several items per source (T2I); synthetic "
                    "default: 12 items per source")
flags.DEFINE_string("dense_b", None, "modality b, several items per source (I2T); synthetic "
                    "default: 11 items per source")
flags.DEFINE_list("multiplicities", None, "items per source in the dense gallery (default "
                  "T2I 1,4,7,12; I2T 1,4,7,11)")
flags.DEFINE_list("k", ["1", "10"], "neighbours")

SYNTHETIC_ROWS = "20k"
DEFAULT_M = {"T2I": (1, 4, 7, 12), "I2T": (1, 4, 7, 11)}


def directions(setup):
  """[(name, dense store, sparse store, layer flag of dense, of sparse)]."""
  from plato_jax.store import FeatureStore
  if common.synthetic(setup):
    from plato_jax.synthetic import WorldConfig, build_items
    import os
    where = os.path.join(FLAGS.world_dir, "synthetic")
    n = setup.store_a.num_rows
    dense_a = build_items(where, n, 0, 12, WorldConfig(), progress=FLAGS.progress)
    dense_b = build_items(where, n, 1, 11, WorldConfig(), progress=FLAGS.progress)
  else:
    if FLAGS.dense_a is None and FLAGS.dense_b is None:
      raise app.UsageError("give --dense_a and/or --dense_b: a store with several items per "
                           "source and a 'group' column")
    dense_a = FeatureStore.open(FLAGS.dense_a) if FLAGS.dense_a else None
    dense_b = FeatureStore.open(FLAGS.dense_b) if FLAGS.dense_b else None
  out = []
  if dense_a is not None:
    out.append(("T2I", dense_a, setup.store_b, FLAGS.layer_a, FLAGS.layer_b))
  if dense_b is not None:
    out.append(("I2T", dense_b, setup.store_a, FLAGS.layer_b, FLAGS.layer_a))
  return out


def plot(rows):
  fig, ax = common.figure(7, 4.5)
  for i, name in enumerate(dict.fromkeys(r["direction"] for r in rows)):
    for k in sorted({r["k"] for r in rows}):
      pts = [r for r in rows if r["direction"] == name and r["k"] == k]
      m = [r["multiplicity"] for r in pts]
      line, = ax.plot(m, [r["group_set"] for r in pts], "o-", ms=3,
                      label=f"{name}, k = {k}, distinct sources")
      ax.plot(m, [r["matched_slots"] for r in pts], "s--", ms=3, color=line.get_color(),
              alpha=0.6, label=f"{name}, k = {k}, matched slots")
  ax.set_xlabel("items per source in the dense modality")
  ax.set_ylabel("relaxed mutual k-NN")
  ax.set_yscale("log")
  common.legend_outside(ax, fontsize=7)
  return fig


def main(argv):
  del argv
  from plato_jax import report
  from plato_jax.many_to_many import run_many_to_many
  setup = common.start("many_to_many", synthetic_rows=SYNTHETIC_ROWS, clamps=False)
  rows, runs = [], []
  for name, dense, sparse, layer_dense, layer_sparse in directions(setup):
    ms = [int(m) for m in FLAGS.multiplicities] if FLAGS.multiplicities else DEFAULT_M[name]
    run = run_many_to_many(dense, sparse, layer_dense=layer_dense, layer_sparse=layer_sparse,
                           queries=setup.queries, multiplicities=ms,
                           ks=[int(k) for k in FLAGS.k], seed=FLAGS.seed,
                           progress=FLAGS.progress, tile_rows=FLAGS.tile_rows)
    runs.append(dict(direction=name, dense=dense.root, sparse=sparse.root, **run))
    rows += [dict(direction=name, layer_dense=run["layer_dense"],
                  layer_sparse=run["layer_sparse"], **r) for r in run["rows"]]
  if not common.is_writer():
    return
  files = common.write(setup, "many_to_many", {"runs": runs}, rows, plot(rows))
  print(report.format_table(rows, ["direction", "multiplicity", "k", "dense_gallery",
                                   "group_set", "matched_slots", "own_source_in_dense"]))
  print(f"\nwrote {', '.join(files)}")


if __name__ == "__main__":
  app.run(main)
