r"""Alignment among many vision models (PRH Fig. 2 and 12): the model-by-model mutual k-NN
matrix on one image set, its means within bins of a per-model score, a UMAP embedding of
−log(alignment), and the rank correlation of the eight metrics over the model pairs.

    python -m experiments.vision_vision           # 20 synthetic models of graded quality
    python -m experiments.vision_vision --models=resnet18-*.store,vit-*.store \
        --scores=vtab_solved.csv --bins=0,4,8,12,16,20 --queries=1000

--models are stores of the same rows (e.g. 1,000 Places-365 images); each model is one
layer (--layer: an index or a name, default the last) clamped and L2-normalised as PRH
prepares features. --scores is a CSV with columns `model` and `value` (PRH: the number of
VTAB tasks the model solves); --bins is a bin count (equal-count bins) or the bin edges.
--rank_metrics=all adds the eight metrics' matrices and their Spearman correlations
(--rank_metrics=none skips them). Writes vision_vision.json, .csv (one row per model pair)
and .png/.pdf: the clustered matrix, the bins, the embedding, the metric correlations.
"""
from __future__ import annotations

import glob

import numpy as np
from absl import app, flags

from . import common

FLAGS = flags.FLAGS
flags.DEFINE_list("models", None, "stores of the models (globs allowed); default: a synthetic "
                  "family of --synthetic_models models")
flags.DEFINE_string("layer", "-1", "each model's layer: an index or a layer name")
flags.DEFINE_integer("topk", 10, "k of mutual k-NN (and of the other kNN metrics)")
flags.DEFINE_string("scores", None, "CSV of per-model scores (columns: model, value); "
                    "synthetic default: each model's quality")
flags.DEFINE_list("bins", ["4"], "a number of equal-count bins, or the bin edges")
flags.DEFINE_list("rank_metrics", ["all"], "metrics whose rank correlations over the pairs "
                  "are reported ('all': the eight of PRH; 'none': skip)")
flags.DEFINE_bool("umap", True, "the UMAP embedding of -log(alignment) (umap-learn)")
flags.DEFINE_integer("synthetic_models", 20, "models of the synthetic family")
FLAGS.set_default("clamp", "exact")   # PRH clamps its features
FLAGS.set_default("queries", "1000")  # PRH: 1,000 Places-365 images

SYNTHETIC_ROWS = "2k"


def stores(setup):
  """(stores, {model name: score})."""
  from plato_jax.grid import model_name
  from plato_jax.store import FeatureStore
  if FLAGS.models is None:
    qualities = np.geomspace(0.08, 2.0, FLAGS.synthetic_models)
    family = [common.synthetic_model(setup, 0, j + 1, round(float(q), 3))
              for j, q in enumerate(qualities)]
    return family, {model_name(s): float(s.meta["quality"]) for s in family}
  paths = [p for pattern in FLAGS.models for p in (sorted(glob.glob(pattern)) or [pattern])]
  models = [FeatureStore.open(p) for p in paths]
  scores = common.read_values(FLAGS.scores) if FLAGS.scores else {}
  return models, scores


def bins_flag():
  values = [float(v) for v in FLAGS.bins]
  if len(values) == 1:
    if values[0] < 1 or values[0] != int(values[0]):
      raise app.UsageError(f"--bins={FLAGS.bins[0]}: a bin count must be a positive integer")
    return int(values[0])
  return values


def plot(names, matrix, order, scores, bins, emb, ranks, metric_names):
  fig, axes = common.figure(20, 4.8, ncols=4)
  m = matrix[np.ix_(order, order)].copy()
  np.fill_diagonal(m, np.nan)  # (self-alignment 1 would wash out the pairs' colour scale)
  image = axes[0].imshow(m, cmap="viridis")
  if len(names) <= 30:
    axes[0].set_xticks(range(len(names)), [names[i] for i in order], rotation=90, fontsize=5)
    axes[0].set_yticks(range(len(names)), [names[i] for i in order], fontsize=5)
  axes[0].set_title(f"mutual k-NN (k = {FLAGS.topk}), clustered")
  fig.colorbar(image, ax=axes[0], shrink=0.8)
  if bins:
    labels = [f"{b['low']:.3g}–{b['high']:.3g}" for b in bins]
    axes[1].bar(range(len(bins)), [b["alignment"] for b in bins],
                yerr=[b["alignment_sd"] if b["pairs"] > 1 else 0 for b in bins], capsize=3)
    axes[1].set_xticks(range(len(bins)), labels, rotation=30, fontsize=7)
    axes[1].set_xlabel("score bin")
    axes[1].set_ylabel("mean alignment within the bin (± sd over pairs)")
  else:
    axes[1].axis("off")
    axes[1].text(0.5, 0.5, "no --scores: no bins", ha="center")
  if emb is not None:
    values = [scores.get(n, np.nan) for n in names]
    points = axes[2].scatter(emb[:, 0], emb[:, 1], c=values, cmap="plasma", s=18)
    fig.colorbar(points, ax=axes[2], shrink=0.8, label="score")
    axes[2].set_title("UMAP of -log(alignment)")
  else:
    axes[2].axis("off")
  if ranks:
    k = len(metric_names)
    rho = np.array([[r["spearman"] for r in ranks[i * k:(i + 1) * k]] for i in range(k)])
    image = axes[3].imshow(rho, cmap="magma", vmin=min(0.0, rho.min()), vmax=1)
    axes[3].set_xticks(range(k), metric_names, rotation=60, ha="right", fontsize=7)
    axes[3].set_yticks(range(k), metric_names, fontsize=7)
    axes[3].set_title("Spearman ρ over model pairs")
    fig.colorbar(image, ax=axes[3], shrink=0.8)
  else:
    axes[3].axis("off")
  fig.tight_layout()
  return fig


def main(argv):
  del argv
  import dataclasses

  from plato_jax import model_matrix, report
  from plato_jax.grid import MetricSpec, metric_specs
  setup = common.start("vision_vision", synthetic_rows=SYNTHETIC_ROWS) \
      if FLAGS.models is None else None
  if setup is None:
    if FLAGS.features_a or FLAGS.features_b:
      raise app.UsageError("vision_vision takes --models (a list of stores)")
    setup = common.store_list_setup("vision_vision")
  if FLAGS.concat:
    raise app.UsageError("vision_vision compares one layer per model: run it without --concat")
  models, scores = stores(setup)
  if len(models) < 3:
    raise app.UsageError(f"vision_vision needs at least 3 models, got {len(models)}")
  try:
    names, feats = model_matrix.model_features(models, FLAGS.layer,
                                               queries=common.read_queries(), seed=FLAGS.seed,
                                               clamp=FLAGS.clamp)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if len(set(names)) != len(names):
    raise app.UsageError(f"model names repeat: {names} (name the stores' folders apart)")
  matrix = model_matrix.pairwise_matrix(feats, MetricSpec("mutual_knn", FLAGS.topk))
  floor = 1.0 / (2 * len(feats[0]) * FLAGS.topk)  # under one shared neighbour in all rows
  order = model_matrix.cluster_order(matrix, floor)
  bins = []
  if scores:
    missing = [n for n in names if n not in scores]
    if missing:
      raise app.UsageError(f"--scores has no value for models {missing}")
    bins = model_matrix.bin_alignment(matrix, [scores[n] for n in names], bins_flag())
    for b in bins:
      b["models"] = [names[i] for i in b["models"]]
  emb = model_matrix.embedding(matrix, floor, FLAGS.seed) if FLAGS.umap else None
  ranks, metric_names = [], []
  if FLAGS.rank_metrics != ["none"]:
    specs = metric_specs(FLAGS.rank_metrics, FLAGS.topk, [FLAGS.topk])
    matrices = {s.label: (matrix if s == MetricSpec("mutual_knn", FLAGS.topk) else
                          model_matrix.pairwise_matrix(feats, s)) for s in specs}
    metric_names = list(matrices)
    ranks = [dataclasses.asdict(r) for r in model_matrix.metric_rank_correlations(matrices)]
  i, j = np.triu_indices(len(names), 1)
  pairs = [dict(model_a=names[a], model_b=names[b], alignment=float(matrix[a, b]))
           for a, b in zip(i, j)]
  config = dict(models=[s.root for s in models], layer=FLAGS.layer, topk=FLAGS.topk,
                queries=FLAGS.queries, seed=FLAGS.seed, clamp=FLAGS.clamp, scores=FLAGS.scores,
                bins=FLAGS.bins, rank_metrics=FLAGS.rank_metrics, umap=FLAGS.umap)
  payload = dict(config=config, models=names, scores=scores, matrix=matrix.tolist(),
                 cluster_order=order.tolist(), bins=bins,
                 embedding=None if emb is None else emb.tolist(), rank_correlations=ranks)
  files = common.write(setup, "vision_vision", payload, pairs,
                       plot(names, matrix, order, scores, bins, emb, ranks, metric_names))
  print(f"{len(names)} models, {len(pairs)} pairs, {len(feats[0])} rows; mean alignment "
        f"{np.mean([p['alignment'] for p in pairs]):.4f}")
  if bins:
    print(report.format_table(bins, ["bin", "low", "high", "pairs", "alignment",
                                     "alignment_sd"]))
  if ranks:
    print(report.format_table([r for r in ranks if r["metric_a"] < r["metric_b"]],
                              ["metric_a", "metric_b", "spearman", "p_value"]))
  print(f"\nwrote {', '.join(files)}")


if __name__ == "__main__":
  app.run(main)
