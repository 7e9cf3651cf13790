r"""Alignment against language-model capability (PRH Fig. 4, Koepke Fig. 3b/12/14, Table 5):
does a base-model trend predict newer models?

    python -m experiments.llm_trend                   # synthetic: 12 language x 2 vision models
    python -m experiments.llm_trend --models_a=dinov2-b.store,dinov2-g.store \
        --models_b=llama-7b.store,...,qwen2-7b.store --benchmarks=scores.csv
    python -m experiments.llm_trend ... --at_size=1m --k=n/100     # the trend at scale

--benchmarks is a CSV with columns `model`, `group` (base or new) and one column per
benchmark (e.g. hellaswag, gsm8k, one_minus_bpb). Alignment of each (vision, language) pair
is mutual k-NN at the best layer pair on the queries (PRH protocol, `plato_jax.grid`), or
with --at_size, at that gallery size (layers fixed on the queries, the scaling protocol).
Per vision model and benchmark: OLS of alignment on the benchmark over the base models,
R²(base), and R²(new) of the new models around that line (Koepke et al. App. D); both averaged
over the vision models. Writes llm_trend.json/.csv/.png (a scatter per benchmark with the
base line of each vision model).

The synthetic default: language models of graded quality; their "benchmark" is a logistic
function of quality plus noise, and the new models (every other one) score 0.15 higher for
the same quality — benchmark gains that do not come with better representations, the
situation in which a base-model trend fails to transfer. The CSV is written beside the
results; alignment is measured as for real stores.
"""
from __future__ import annotations

import csv
import os

import numpy as np
from absl import app, flags

from . import common

FLAGS = flags.FLAGS
flags.DEFINE_list("models_a", None, "stores of the vision models; default: synthetic")
flags.DEFINE_list("models_b", None, "stores of the language models")
flags.DEFINE_string("benchmarks", None, "CSV: model, group (base/new), one column per benchmark")
flags.DEFINE_string("k", "10", "k of mutual k-NN (an integer, or n/100 with --at_size)")
flags.DEFINE_string("at_size", None, "measure alignment at this gallery size (scaling protocol, "
                    "layers fixed on the queries) instead of on the queries alone")

SYNTHETIC_ROWS = "10k"
SYNTHETIC_A = ((0, 1.0), (1, 0.4))
SYNTHETIC_QUALITIES = np.geomspace(0.08, 2.0, 12)


def synthetic_stores(setup):
  """The family and its benchmark CSV (written under --out)."""
  from plato_jax.grid import model_name
  vision = [common.synthetic_model(setup, 0, j, q) for j, q in SYNTHETIC_A]
  language = [common.synthetic_model(setup, 1, j + 1, float(round(q, 4)))
              for j, q in enumerate(SYNTHETIC_QUALITIES)]
  rng = np.random.default_rng(FLAGS.seed)
  os.makedirs(setup.out, exist_ok=True)
  path = os.path.join(setup.out, "synthetic_benchmarks.csv")
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["model", "group", "benchmark"])
    for j, s in enumerate(language):
      new = j % 2 == 1
      score = 1 / (1 + np.exp(-2 * np.log(s.meta["quality"]))) + 0.03 * rng.standard_normal()
      w.writerow([model_name(s), "new" if new else "base", f"{score + 0.15 * new:.4f}"])
  return vision, language, path


def read_benchmarks(path: str):
  """{model: (group, {benchmark: score})}; errors name the file, line and field."""
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    fields = reader.fieldnames or []
    if not {"model", "group"} <= set(fields) or len(fields) < 3:
      raise app.UsageError(f"{path}: needs columns model, group and at least one benchmark; "
                           f"has {fields}")
    names = [c for c in fields if c not in ("model", "group")]
    out = {}
    for line, row in enumerate(reader, start=2):
      if row["group"] not in ("base", "new"):
        raise app.UsageError(f"{path}, line {line}: group must be base or new, got "
                             f"{row['group']!r}")
      try:
        out[row["model"]] = (row["group"], {b: float(row[b]) for b in names})
      except ValueError as e:
        raise app.UsageError(f"{path}, line {line}: {e}") from None
  return names, out


def alignments(setup, vision, language):
  """{(vision name, language name): (alignment, its 95% interval's low, high)}: on the
  queries alone, or at --at_size."""
  from plato_jax.grid import alignment_grid, metric_specs, model_name
  from plato_jax.gallery import parse_count
  if FLAGS.at_size is None:
    rows = alignment_grid(vision, language, metric_specs(["mutual_knn"], int(FLAGS.k), []),
                          queries=setup.queries, seed=FLAGS.seed, progress=FLAGS.progress)
    return {(r["model_a"], r["model_b"]): (r["score"], r["score_low"], r["score_high"])
            for r in rows}
  out = {}
  sizes = sorted({setup.num_queries, parse_count(FLAGS.at_size)})
  for va in vision:
    for lb in language:
      result, _ = common.run(setup, sizes, [FLAGS.k], store_a=va, store_b=lb)
      last = result.rows[-1]
      out[(model_name(va), model_name(lb))] = (last["mutual_knn"], last["mutual_knn_low"],
                                               last["mutual_knn_high"])
  return out


def plot(fits, points, names):
  fig, axes = common.figure(5 * len(names), 4, ncols=len(names))
  axes = np.atleast_1d(axes)
  for ax, bench in zip(axes, names):
    for i, vision in enumerate(dict.fromkeys(p["model_a"] for p in points)):
      colour = f"C{i}"
      pts = [p for p in points if p["model_a"] == vision and p["benchmark"] == bench]
      for group, marker in (("base", "o"), ("new", "x")):
        sel = [p for p in pts if p["group"] == group]
        ax.errorbar([p["score"] for p in sel], [p["alignment"] for p in sel],
                    yerr=[[p["alignment"] - p["alignment_low"] for p in sel],
                          [p["alignment_high"] - p["alignment"] for p in sel]],
                    fmt=marker, color=colour, ms=4, elinewidth=0.8,
                    label=f"{vision} ({group})")
      fit = next(f for f in fits if f["model_a"] == vision and f["benchmark"] == bench)
      xs = np.linspace(min(p["score"] for p in pts), max(p["score"] for p in pts), 2)
      ax.plot(xs, fit["intercept"] + fit["slope"] * xs, "-", color=colour, alpha=0.6,
              label=f"{vision}: base-model OLS")
    ax.set_xlabel(bench)
    ax.set_ylabel("mutual k-NN alignment (bars: 95% over queries)")
    common.legend_outside(ax, fontsize=6)
  return fig


def main(argv):
  del argv
  from plato_jax import report
  from plato_jax.grid import model_name, trend_fit
  from plato_jax.store import FeatureStore
  if (FLAGS.models_a is None) != (FLAGS.models_b is None):
    raise app.UsageError("give both --models_a and --models_b, or neither (synthetic world)")
  if FLAGS.models_a is None:
    setup = common.start("llm_trend", synthetic_rows=SYNTHETIC_ROWS, gallery_ids=True)
    vision, language, bench_path = synthetic_stores(setup)
    if FLAGS.benchmarks:
      bench_path = FLAGS.benchmarks
  else:
    if FLAGS.benchmarks is None:
      raise app.UsageError("--benchmarks is required with --models_a/--models_b")
    vision = [FeatureStore.open(p) for p in FLAGS.models_a]
    language = [FeatureStore.open(p) for p in FLAGS.models_b]
    queries = common.read_queries()
    if FLAGS.coordinator:
      raise app.UsageError("experiments.llm_trend on --models_a/--models_b runs on one host; "
                           "run it without --coordinator")
    gallery_ids = (np.unique(common.read_ids(FLAGS.gallery_ids, "--gallery_ids"))
                   if FLAGS.gallery_ids else None)
    setup = common.Setup("llm_trend", vision[0], language[0], queries,
                         queries if isinstance(queries, int) else len(queries),
                         language[0].num_rows, common.out_dir("llm_trend"), gallery_ids)
    bench_path = FLAGS.benchmarks
  names, table = read_benchmarks(bench_path)
  missing = [model_name(s) for s in language if model_name(s) not in table]
  if missing:
    raise app.UsageError(f"{bench_path} has no row for models {missing}")
  scores = alignments(setup, vision, language)
  points, fits = [], []
  for va in map(model_name, vision):
    for bench in names:
      pts = [dict(model_a=va, model_b=model_name(lb), group=table[model_name(lb)][0],
                  benchmark=bench, score=table[model_name(lb)][1][bench],
                  **dict(zip(("alignment", "alignment_low", "alignment_high"),
                             scores[(va, model_name(lb))])))
             for lb in language]
      points += pts
      base = [p for p in pts if p["group"] == "base"]
      new = [p for p in pts if p["group"] == "new"]
      fits.append(dict(model_a=va, benchmark=bench, **trend_fit(
          [p["score"] for p in base], [p["alignment"] for p in base],
          [p["score"] for p in new], [p["alignment"] for p in new])))
  summary = [dict(benchmark=b, r2_base_avg=float(np.mean([f["r2_base"] for f in fits
                                                          if f["benchmark"] == b])),
                  r2_new_avg=float(np.mean([f["r2_new"] for f in fits if f["benchmark"] == b])))
             for b in names]
  if not common.is_writer():
    return
  config = dict(models_a=[s.root for s in vision], models_b=[s.root for s in language],
                benchmarks=bench_path, k=FLAGS.k, gallery=FLAGS.gallery, queries=FLAGS.queries,
                seed=FLAGS.seed)
  files = common.write(setup, "llm_trend", {"config": config, "fits": fits, "summary": summary,
                                            "points": points}, fits, plot(fits, points, names))
  print(report.format_table(fits, ["model_a", "benchmark", "slope", "intercept", "r2_base",
                                   "r2_new"]))
  print()
  print(report.format_table(summary, ["benchmark", "r2_base_avg", "r2_new_avg"]))
  print(f"\nwrote {', '.join(files)}")


if __name__ == "__main__":
  app.run(main)
