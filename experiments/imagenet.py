r"""Class versus instance alignment against images per class (Koepke et al. Fig.
7b/20/21): accuracy of each model's nearest neighbour's class, both correct, and the strict
(same instance) agreement, as each class gets more gallery items.

    python -m experiments.imagenet                        # synthetic world: 100 classes
    python -m experiments.imagenet --features_a=dinov2-imagenet.store \
        --features_b=openllama-captions.store --classname_features=openllama-classnames.store \
        --ipc=1,9,19,29,39,49 --k=1,10

Labels come from the stores' "label" column (or --labels: a file with one integer label per
store row). See `plato_jax.decomposition` for the protocol and the definitions. Layers:
--layer_a/--layer_b, or `auto` — the best mutual k-NN pair (k = 10) on the queries (one item
per class). --classname_features is a store of model b's features for captions that name
only the class (same rows); on the synthetic world each class's mean text feature stands
in for it. Writes imagenet.json/.csv/.png.
"""
from __future__ import annotations


import numpy as np
from absl import app, flags

from . import common

FLAGS = flags.FLAGS
flags.DEFINE_list("ipc", ["1", "9", "19", "29", "39", "49"], "gallery items per class")
flags.DEFINE_list("k", ["1", "10"], "neighbours")
flags.DEFINE_string("labels", None, "file of per-row integer labels (default: the stores' "
                    "'label' column)")
flags.DEFINE_string("classname_features", None, "store of model b's class-name-caption "
                    "features (same rows); synthetic default: class means")

SYNTHETIC_ROWS = "10k"


def labels_of(store) -> np.ndarray:
  if FLAGS.labels:
    labels = np.loadtxt(FLAGS.labels, dtype=np.int64, ndmin=1)
    if labels.shape != (store.num_rows,):
      raise app.UsageError(f"--labels has {labels.shape[0]} labels, the stores {store.num_rows} "
                           f"rows")
    return labels
  if "label" not in store.meta.get("columns", []):
    raise app.UsageError(f"{store.root} has no 'label' column: give --labels")
  labels = store.column("label")
  if not np.all(labels == np.round(labels)):
    bad = np.flatnonzero(labels != np.round(labels))[:10]
    raise app.UsageError(f"{store.root}: labels of rows {bad.tolist()} are not integers")
  return labels.astype(np.int64)


def layers(setup, labels):
  """The layer pair: given, or the best mutual k-NN pair on the queries (one per class)."""
  from plato_jax.decomposition import class_order
  from plato_jax.gallery import choose_layers
  queries = np.sort(class_order(labels, FLAGS.seed)[0])
  a, b = setup.store_a, setup.store_b
  try:
    la, lb, _ = choose_layers(a, b, a.gather(queries).astype(np.float32),
                              b.gather(queries).astype(np.float32), FLAGS.layer_a, FLAGS.layer_b)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  return la, lb


def plot(rows):
  fig, axes = common.figure(11, 4, ncols=2)
  for ax, k in zip(axes, sorted({r["k"] for r in rows})[:2]):
    pts = [r for r in rows if r["k"] == k]
    ipc = [r["ipc"] for r in pts]
    for key, label in (("acc_img", "model a acc."), ("acc_txt", "model b acc."),
                       ("both", "both acc."), ("strict", "mutual kNN (instance)"),
                       ("strict_names", "mutual kNN (class-name captions)")):
      if key in pts[0]:
        line, = ax.plot(ipc, [r[key] for r in pts], "o-", ms=3, label=label)
        if f"{key}_low" in pts[0]:  # the class-name stand-in has no interval
          common.band(ax, line, ipc, pts, key)
    ax.set_xlabel("gallery items per class (ipc)")
    ax.set_ylabel("score")
    ax.set_title(f"k = {k}")
    common.legend_outside(ax, fontsize=7)
  return fig


def main(argv):
  del argv
  from plato_jax import report
  from plato_jax.decomposition import class_decomposition, class_name_features
  from plato_jax.store import FeatureStore
  setup = common.start("imagenet", synthetic_rows=SYNTHETIC_ROWS, clamps=False)
  labels = labels_of(setup.store_a)
  la, lb = layers(setup, labels)
  xa = setup.store_a.read_layer(la).astype(np.float32)
  xb = setup.store_b.read_layer(lb).astype(np.float32)
  names = None
  if FLAGS.classname_features:
    names = FeatureStore.open(FLAGS.classname_features)
    if not np.array_equal(names.ids(), setup.store_b.ids()):
      raise app.UsageError(f"{names.root} does not hold the same rows as {setup.store_b.root}")
    names = names.read_layer(lb).astype(np.float32)
  elif common.synthetic(setup):
    names = class_name_features(xb, labels)
  rows = class_decomposition(xa, xb, labels, [int(i) for i in FLAGS.ipc],
                             [int(k) for k in FLAGS.k], seed=FLAGS.seed,
                             ids=setup.store_a.ids(), features_b_names=names,
                             tile_rows=FLAGS.tile_rows)
  config = dict(store_a=setup.store_a.root, store_b=setup.store_b.root, layer_a=la, layer_b=lb,
                ipc=FLAGS.ipc, k=FLAGS.k, seed=FLAGS.seed, labels=FLAGS.labels,
                classname_features=FLAGS.classname_features or
                ("class means" if names is not None else None))
  files = common.write(setup, "imagenet", {"config": config, "rows": rows}, rows, plot(rows))
  columns = ["ipc", "k", "acc_img", "acc_txt", "both", "strict", "strict_low", "strict_high",
             "hit_img", "hit_txt"]
  if names is not None:
    columns += ["strict_names"]
  print(f"layers a={la} b={lb}; {len(np.unique(labels))} classes")
  print(report.format_table(rows, columns))
  print(f"\nwrote {', '.join(files)}")


if __name__ == "__main__":
  app.run(main)
