r"""Best-layer alignment for every (model A, model B) pair on one query set (PRH Fig.
3/4/10): the grid, and the scatter of alignment against a per-model value (e.g. 1 −
bits-per-byte of each language model).

    python -m experiments.alignment_grid        # synthetic: 3 "vision" x 5 "language" models
    python -m experiments.alignment_grid --models_a=dinov2-s.store,dinov2-b.store,dinov2-g.store \
        --models_b=bloom-560m.store,open_llama-3b.store,llama-65b.store --queries=1024 \
        --values=bpb.csv --value_name="1 - bits per byte" --metrics=all --concat

Per pair and metric: the maximum over all layer pairs (PRH's compute_score after the 0.95
outlier clamp and per-layer L2 norm), and the layers that reach it (-1: the concatenation,
with --concat). --metrics=all runs the eight metrics; CKNNA runs at every --cknna_k (PRH
Fig. 10). --values is a CSV with columns `model` and `value` (model names as in the stores'
metadata, else their directory names); the scatter puts each model b at its value, with its
score averaged over the models a. On the synthetic world the value is each model's quality
(its layer noise divided by it). Writes alignment_grid.json/.csv/.png.
"""
from __future__ import annotations


import numpy as np
from absl import app, flags

from . import common

FLAGS = flags.FLAGS
flags.DEFINE_list("models_a", None, "stores of the models of modality a (vision); default: "
                  "a synthetic family")
flags.DEFINE_list("models_b", None, "stores of the models of modality b (language)")
flags.DEFINE_list("metrics", ["mutual_knn"], "metrics, or 'all' (the eight of PRH)")
flags.DEFINE_integer("topk", 10, "k of the kNN metrics")
flags.DEFINE_list("cknna_k", ["100", "200", "500", "800", "1000"], "k values of CKNNA")
# --clamp and --concat (experiments.common): PRH's grid clamps by default.
FLAGS.set_default("clamp", "exact")
flags.DEFINE_string("values", None, "CSV of per-model values (columns: model, value) for the "
                    "scatter; synthetic default: each model's quality")
flags.DEFINE_string("value_name", None, "x-axis label of the scatter")

SYNTHETIC_ROWS = "10k"  # only the queries are read
SYNTHETIC_A = ((0, 1.0), (1, 0.15), (2, 0.4))                       # (model, quality)
SYNTHETIC_B = ((0, 1.0), (1, 0.1), (2, 0.2), (3, 0.4), (4, 2.0))


def stores(setup):
  """(models a, models b, {model name: value} or None, value name)."""
  from plato_jax.grid import model_name
  from plato_jax.store import FeatureStore
  if FLAGS.features_a or FLAGS.features_b:
    raise app.UsageError("alignment_grid takes --models_a/--models_b (lists of stores)")
  if (FLAGS.models_a is None) != (FLAGS.models_b is None):
    raise app.UsageError("give both --models_a and --models_b, or neither (synthetic world)")
  if FLAGS.models_a is None:
    family = [[common.synthetic_model(setup, m, j, q) for j, q in grid]
              for m, grid in ((0, SYNTHETIC_A), (1, SYNTHETIC_B))]
    values = {model_name(s): float(s.meta["quality"]) for s in family[0] + family[1]}
    return family[0], family[1], values, FLAGS.value_name or "model quality (synthetic)"
  models_a = [FeatureStore.open(p) for p in FLAGS.models_a]
  models_b = [FeatureStore.open(p) for p in FLAGS.models_b]
  values = common.read_values(FLAGS.values) if FLAGS.values else None
  return models_a, models_b, values, FLAGS.value_name or "value"


def plot(rows, names_a, names_b, values, value_name):
  fig, (left, right) = common.figure(11, 4.5, ncols=2)
  first = rows[0]["metric"]
  grid = np.array([[next(r["score"] for r in rows if r["model_a"] == a and r["model_b"] == b
                         and r["metric"] == first) for b in names_b] for a in names_a])
  image = left.imshow(grid, cmap="viridis")
  left.set_xticks(range(len(names_b)), names_b, rotation=60, ha="right", fontsize=7)
  left.set_yticks(range(len(names_a)), names_a, fontsize=7)
  for (i, j), v in np.ndenumerate(grid):
    # Dark text on the colour map's light end, light text on its dark end.
    shade = image.cmap(image.norm(v))
    light = 0.299 * shade[0] + 0.587 * shade[1] + 0.114 * shade[2] > 0.5
    left.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=6,
              color="black" if light else "white")
  left.set_title(f"best-layer {first}")
  fig.colorbar(image, ax=left, shrink=0.8)
  if values:
    for metric in dict.fromkeys(r["metric"] for r in rows):
      pts = [(values[b], np.mean([r["score"] for r in rows if r["model_b"] == b
                                  and r["metric"] == metric])) for b in names_b if b in values]
      pts.sort()
      right.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=metric)
    right.set_xlabel(value_name)
    right.set_ylabel("alignment (mean over models a)")
    common.legend_outside(right, fontsize=7)
  else:
    right.axis("off")
    right.text(0.5, 0.5, "no --values: no scatter", ha="center")
  fig.tight_layout()
  return fig


def main(argv):
  del argv
  from plato_jax import report
  from plato_jax.grid import alignment_grid, metric_specs, model_name
  setup = common.start("alignment_grid", synthetic_rows=SYNTHETIC_ROWS) \
      if FLAGS.models_a is None else None
  if setup is None:  # the lists name the stores; only the shared settings are needed
    setup = common.store_list_setup("alignment_grid")
  models_a, models_b, values, value_name = stores(setup)
  specs = metric_specs(FLAGS.metrics, FLAGS.topk, [int(k) for k in FLAGS.cknna_k])
  queries = common.read_queries()
  rows = alignment_grid(models_a, models_b, specs, queries=queries, seed=FLAGS.seed,
                        clamp=FLAGS.clamp, concat=FLAGS.concat, progress=FLAGS.progress)
  if values is not None:
    missing = sorted({model_name(s) for s in models_b} - set(values))
    if missing:
      raise app.UsageError(f"--values has no value for models {missing}")
    for r in rows:
      r["value_b"] = values.get(r["model_b"])
  names_a, names_b = [model_name(s) for s in models_a], [model_name(s) for s in models_b]
  config = dict(models_a=[s.root for s in models_a], models_b=[s.root for s in models_b],
                metrics=[s.label for s in specs], clamp=FLAGS.clamp, concat=FLAGS.concat,
                queries=FLAGS.queries, seed=FLAGS.seed, values=values, value_name=value_name)
  files = common.write(setup, "alignment_grid", {"config": config, "rows": rows}, rows,
                       plot(rows, names_a, names_b, values, value_name))
  print(report.format_table(rows, ["model_a", "model_b", "metric", "score", "layer_a",
                                   "layer_b"]))
  print(f"\nwrote {', '.join(files)}")


if __name__ == "__main__":
  app.run(main)
