r"""Run a recipe — several scaling runs listed in a TOML file — and collect their curves
into one plot (Koepke et al. Figs. 16-19: `experiments/recipes/koepke_e12.toml`).

    python -m experiments.recipe                                  # recipes/synthetic.toml
    python -m experiments.recipe --recipe=experiments/recipes/koepke_e12.toml \
        --var=STORES=/data/stores --out=results

A recipe has a `title`, `[defaults]` and `[[run]]` tables; each run's settings (its own over
the defaults) are `experiments.scaling`'s: name, features_a, features_b, k, queries (a
count or a file of ids), gallery, sizes, layer_a, layer_b, seed, clamp, concat,
common_rows, gallery_ids. `${NAME}` in a value is replaced by --var NAME=value.
`synthetic:<store>` is a store of the built-in synthetic world (a, b, or
b<model>-q<quality>). Each run is the scaling protocol, resumable under
<out>/resume/; the result set is <out>/<recipe file name>/ (json, csv, png, pdf).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tomllib

import numpy as np
from absl import app, flags

from . import common

FLAGS = flags.FLAGS
flags.DEFINE_string("recipe", os.path.join(os.path.dirname(__file__), "recipes",
                                           "synthetic.toml"), "the recipe (TOML)")
flags.DEFINE_multi_string("var", [], "NAME=value substituted for ${NAME} in the recipe")
flags.DEFINE_bool("dry_run", False, "check the recipe and print its runs; run nothing")

SETTINGS = {"name", "features_a", "features_b", "k", "queries", "gallery", "sizes", "layer_a",
            "layer_b", "seed", "clamp", "concat", "common_rows", "gallery_ids"}


def load(path: str, variables: dict[str, str]) -> tuple[str, list[dict]]:
  """(title, runs with the defaults applied and ${NAME}s substituted); errors name the run
  and the setting."""
  try:
    with open(path, "rb") as f:
      recipe = tomllib.load(f)
  except (OSError, tomllib.TOMLDecodeError) as e:
    raise app.UsageError(f"{path}: {e}") from None
  defaults = recipe.get("defaults", {})
  runs = recipe.get("run", [])
  if not runs:
    raise app.UsageError(f"{path}: no [[run]] tables")

  def substitute(value, where):
    if isinstance(value, list):
      return [substitute(v, where) for v in value]
    if not isinstance(value, str):
      return value

    def var(m):
      if m.group(1) not in variables:
        raise app.UsageError(f"{path}: {where} uses ${{{m.group(1)}}}: give --var="
                             f"{m.group(1)}=...")
      return variables[m.group(1)]
    return re.sub(r"\$\{(\w+)\}", var, value)

  out = []
  for i, run in enumerate(runs):
    merged = {**defaults, **run}
    where = f"run {i + 1} ({run.get('name', 'unnamed')})"
    unknown = sorted(set(merged) - SETTINGS)
    if unknown:
      raise app.UsageError(f"{path}: {where}: unknown settings {unknown} (known: "
                           f"{sorted(SETTINGS)})")
    for key in ("name", "features_a", "features_b"):
      if key not in merged:
        raise app.UsageError(f"{path}: {where} has no {key}")
    out.append({k: substitute(v, f"{where} {k}") for k, v in merged.items()})
  names = [r["name"] for r in out]
  if len(set(names)) != len(names):
    raise app.UsageError(f"{path}: run names repeat: {names}")
  return recipe.get("title", os.path.basename(path)), out


def open_store(spec: str, rows: int):
  """A store path, or `synthetic:a|b|b<model>-q<quality>` of a world of `rows` rows."""
  from plato_jax.store import FeatureStore
  if not spec.startswith("synthetic:"):
    return FeatureStore.open(spec)
  from plato_jax.synthetic import MODALITIES, WorldConfig, build_model
  m = re.fullmatch(r"([a-d])(?:(\d+)-q([\d.]+))?", spec.split(":", 1)[1])
  if m is None:
    raise app.UsageError(f"{spec!r}: a synthetic store is synthetic:a, synthetic:b, or "
                         f"synthetic:b<model>-q<quality>")
  model, quality = (int(m.group(2)), float(m.group(3))) if m.group(2) else (0, 1.0)
  return build_model(os.path.join(FLAGS.world_dir, "synthetic"), rows,
                     MODALITIES.index(m.group(1)), model, quality, WorldConfig(),
                     progress=FLAGS.progress)


def run_one(run: dict, out: str):
  """The scaling protocol of one run: (result, store roots)."""
  from plato_jax.gallery import DEFAULT_SIZES, parse_count
  from plato_jax.scaling import run_scaling
  rows = parse_count(run.get("gallery", "200k"))
  a, b = open_store(run["features_a"], rows), open_store(run["features_b"], rows)
  queries = run.get("queries", "1024")
  queries = common.read_ids(queries, "queries") if os.path.exists(str(queries)) else \
      parse_count(queries)
  gallery_ids = (np.unique(common.read_ids(run["gallery_ids"], "gallery_ids"))
                 if run.get("gallery_ids") else None)
  ids = a.ids()
  usable = np.isin(ids, b.ids()) if run.get("common_rows") else np.ones(len(ids), bool)
  if gallery_ids is not None:
    usable &= np.isin(ids, gallery_ids) | (False if isinstance(queries, int) else
                                           np.isin(ids, queries))
  available = int(usable.sum())
  largest = min(rows, available) if "gallery" in run else available
  num_q = queries if isinstance(queries, int) else len(queries)
  sizes = sorted({parse_count(s) for s in run.get("sizes", DEFAULT_SIZES)
                  if parse_count(s) <= largest} | {largest, num_q})
  key = dict(run, store_a=a.fingerprint(), store_b=b.fingerprint(),  # and files' contents
             **{f"{k}_content": hashlib.sha256(open(run[k], "rb").read()).hexdigest()
                for k in ("gallery_ids", "queries") if os.path.isfile(str(run.get(k, "")))})
  resume = os.path.join(out, "resume", "recipe-" + hashlib.sha256(
      json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12])
  result = run_scaling(a, b, layer_a=run.get("layer_a", "auto"),
                       layer_b=run.get("layer_b", "auto"), queries=queries, sizes=sizes,
                       ks=[str(k) for k in run.get("k", ["1", "10", "n/100"])],
                       seed=int(run.get("seed", 0)), common_rows=bool(run.get("common_rows")),
                       clamp=run.get("clamp", "none"), concat=bool(run.get("concat")),
                       gallery_ids=gallery_ids, resume_dir=resume, progress=FLAGS.progress)
  shutil.rmtree(resume, ignore_errors=True)  # done: its checkpoints are spent
  return result, (a.root, b.root)


def plot(title, rows):
  specs = list(dict.fromkeys(r["k_spec"] for r in rows))
  fig, axes = common.figure(5 * len(specs), 4.5, ncols=len(specs))
  for ax, spec in zip(np.atleast_1d(axes), specs):
    for name in dict.fromkeys(r["run"] for r in rows):
      pts = [r for r in rows if r["run"] == name and r["k_spec"] == spec]
      line, = ax.plot([r["size"] for r in pts], [r["mutual_knn"] for r in pts], "o-", ms=3,
                      label=name)
      common.band(ax, line, [r["size"] for r in pts], pts, "mutual_knn")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("gallery size n")
    ax.set_ylabel("mutual k-NN alignment")
    ax.set_title(f"k = {spec}")
  common.legend_outside(np.atleast_1d(axes)[0], fontsize=7)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return fig


def main(argv):
  del argv
  from absl import logging
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from plato_jax import report
  variables = {}
  for entry in FLAGS.var:
    name, sep, value = entry.partition("=")
    if not sep or not name:
      raise app.UsageError(f"--var={entry!r} is not NAME=value")
    variables[name] = value
  title, runs = load(FLAGS.recipe, variables)
  if FLAGS.dry_run:
    print(f"{title}: {len(runs)} runs")
    for run in runs:
      print(json.dumps(run, sort_keys=True))
    return
  name = os.path.splitext(os.path.basename(FLAGS.recipe))[0]
  out = common.out_dir(name)
  rows, results = [], []
  for run in runs:
    if FLAGS.progress:
      print(f"run: {run['name']}", flush=True)
    try:
      result, roots = run_one(run, out)
    except (ValueError, FileNotFoundError) as e:
      raise app.UsageError(f"{FLAGS.recipe}: run {run['name']!r}: {e}") from None
    results.append({"run": run, "stores": roots, **dataclasses.asdict(result)})
    rows += [dict(run=run["name"], layer_a=result.layer_a, layer_b=result.layer_b, **r)
             for r in result.rows]
  config = {"recipe": os.path.abspath(FLAGS.recipe), "vars": variables, "title": title}
  files = common.write_to(out, name, {"config": config, "runs": results}, rows,
                          plot(title, rows))
  print(report.format_table(rows, ["run", "size", "k_spec", "mutual_knn", "mutual_knn_low",
                                   "mutual_knn_high", "chance"]))
  print(f"\nwrote {', '.join(files)}")


if __name__ == "__main__":
  app.run(main)
