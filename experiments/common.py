"""What the gallery experiments share: their store/query/gallery flags, the synthetic default,
multi-host start-up, the engine runs through `plato_jax.scaling.run_scaling` (one per
gallery draw), and the writing
of results (JSON + CSV + PNG + PDF) as one result set, `<out>/<experiment>/` (`plato_jax.report`).
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import os
import shutil

import numpy as np
from absl import app, flags, logging

FLAGS = flags.FLAGS
FIGURE_FORMATS = ("png", "pdf")
flags.DEFINE_string("features_a", None, "feature store of model a (path or kvstore URL); "
                    "default: the built-in synthetic world")
flags.DEFINE_string("features_b", None, "feature store of model b (same rows as a)")
flags.DEFINE_string("layer_a", "auto", "layer of a (index or name), or 'auto': best pair on the "
                    "queries")
flags.DEFINE_string("layer_b", "auto", "layer of b (index or name), or 'auto'")
flags.DEFINE_string("queries", "1024", "number of queries (drawn with --seed), or a file of "
                    "query ids (one per line)")
flags.DEFINE_string("gallery_ids", None, "a file of row ids (one per line), the only rows "
                    "galleries draw from besides the queries: e.g. experiments.build_gallery's "
                    "deduplicated pool")
flags.DEFINE_string("gallery", None, "largest gallery size, e.g. 100k, 15m (default: all rows "
                    "of the stores; synthetic: 200k)")
flags.DEFINE_list("sizes", None, "gallery sizes (default: the experiment's, up to --gallery, "
                  "plus --gallery)")
flags.DEFINE_integer("seed", 0, "seed of the query draw and of the gallery order")
flags.DEFINE_string("out", "results", "output directory: the result set goes to "
                    "<out>/<experiment>/, a link swapped to each new run's set in one step")
flags.DEFINE_bool("resume", True, "checkpoint the searches under --out/resume/<experiment>-<run> "
                  "and continue "
                  "from there after a crash")
flags.DEFINE_string("world_dir", os.path.join(os.path.expanduser("~"), ".cache", "plato_jax"),
                    "cache directory of the synthetic world")
flags.DEFINE_integer("checkpoint_every", 16, "engine steps between checkpoints")
flags.DEFINE_bool("common_rows", False, "stores whose rows differ (items that failed in one "
                  "model): measure the ids both hold, and say how many were left out")
flags.DEFINE_integer("gallery_seeds", 1, "draw the gallery order this many times (seeds --seed, "
                     "--seed+1, ...; the same queries) and report the spread of m_NN it adds",
                     lower_bound=1)
flags.DEFINE_enum("clamp", "none", ["none", "exact", "approx"], "PRH's 95-percentile outlier "
                  "clamp: each model's threshold over its largest gallery, every layer "
                  "(exact: the sorted values' quantile; approx: the mean of per-row quantiles)")
flags.DEFINE_bool("concat", False, "'auto' layers may choose the concatenation of all layers "
                  "(PRH's paper-era candidate), searched as one [N, L·D] gallery")
flags.DEFINE_integer("tile_rows", None, "engine tile rows per device (default: engine's choice)")
flags.DEFINE_bool("progress", True, "show progress bars")
flags.DEFINE_string("coordinator", None, "multi-host: coordinator host:port for "
                    "jax.distributed.initialize (every process runs the same command)")
flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
flags.DEFINE_integer("process_id", None, "multi-host: this process's index")



@dataclasses.dataclass
class Setup:
  experiment: str
  store_a: object
  store_b: object
  queries: int | list[int]
  num_queries: int
  largest: int
  out: str
  gallery_ids: np.ndarray | None = None


def out_dir(experiment: str) -> str:
  """--out, checked: a folder (or nothing yet) whose `experiment` entry is a result set; says
  so when it already shows another run's results, which this run's will replace."""
  from plato_jax import report
  out = FLAGS.out
  if os.path.exists(out) and not os.path.isdir(out):
    raise app.UsageError(f"--out={out} is a file; results go into a folder")
  try:
    previous = report.current_set(out, experiment)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if previous is not None:
    print(report.notice_of_earlier_run(out, experiment, previous))
  _seen_at_start[experiment] = None if previous is None else previous["folder"]
  return out


_seen_at_start: dict = {}  # experiment -> the set `<out>/<experiment>` showed at the start


def start(experiment: str, synthetic_rows: str | None = None, clamps: bool = True,
          gallery_ids: bool = False) -> Setup:
  """Logging, multi-host start-up, the two stores (given or synthetic) and the query set.
  `synthetic_rows`: the synthetic world's size when neither --features nor --gallery is
  given (default `plato_jax.synthetic.DEFAULT_ROWS`). `clamps`: the experiment applies
  --clamp and --concat; `gallery_ids`: it applies --gallery_ids (what it does not apply is
  refused, not ignored)."""
  if not clamps and (FLAGS.clamp != "none" or FLAGS.concat):
    raise app.UsageError(f"experiments.{experiment} does not apply --clamp or --concat; run "
                         f"it without them")
  if not gallery_ids and FLAGS.gallery_ids:
    raise app.UsageError(f"experiments.{experiment} does not apply --gallery_ids; run it "
                         f"without")
  if FLAGS.features_a is None and FLAGS.gallery is None and synthetic_rows is not None:
    FLAGS.gallery = synthetic_rows
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # checkpointing logs a dozen INFO lines per save
  import jax
  if FLAGS.coordinator:
    if FLAGS.features_a is None:
      raise app.UsageError("multi-host runs read --features_a/--features_b stores that every "
                           "process can reach")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts; GPUs use NCCL
    jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
  from plato_jax.gallery import parse_count
  from plato_jax.store import FeatureStore

  if (FLAGS.features_a is None) != (FLAGS.features_b is None):
    raise app.UsageError("give both --features_a and --features_b, or neither (synthetic world)")
  out = out_dir(experiment)
  if FLAGS.features_a is None:
    from plato_jax.synthetic import DEFAULT_ROWS, WorldConfig, build_world
    rows = parse_count(FLAGS.gallery) if FLAGS.gallery else DEFAULT_ROWS
    store_a, store_b = build_world(os.path.join(FLAGS.world_dir, "synthetic"), rows,
                                   WorldConfig(), progress=FLAGS.progress)
  else:
    store_a, store_b = FeatureStore.open(FLAGS.features_a), FeatureStore.open(FLAGS.features_b)
  rows = store_a.num_rows
  if FLAGS.common_rows:
    rows = int(np.isin(store_a.ids(), store_b.ids()).sum())
    left_out = store_a.num_rows + store_b.num_rows - 2 * rows
    if left_out:
      print(f"--common_rows: {rows:,} rows in both stores; {store_a.num_rows - rows:,} of "
            f"{store_a.root} and {store_b.num_rows - rows:,} of {store_b.root} left out",
            flush=True)
  queries = read_queries()
  num_queries = queries if isinstance(queries, int) else len(queries)
  gallery_ids = None
  if FLAGS.gallery_ids:
    gallery_ids = np.unique(read_ids(FLAGS.gallery_ids, "--gallery_ids"))
    rows = len(gallery_ids) + (0 if isinstance(queries, int) else
                               int((~np.isin(queries, gallery_ids)).sum()))
  largest = parse_count(FLAGS.gallery) if FLAGS.gallery else rows
  if gallery_ids is not None and FLAGS.features_a is None:
    largest = min(largest, rows)  # (--gallery sized the synthetic world)
  if largest > rows:
    where = "--gallery_ids and the queries" if gallery_ids is not None else "the stores"
    raise app.UsageError(f"--gallery={FLAGS.gallery} exceeds the {rows:,} rows of {where}")
  return Setup(experiment, store_a, store_b, queries, num_queries, largest, out, gallery_ids)


def refuse_unapplied(experiment: str) -> None:
  """For an experiment on lists of stores (no `start`): the flags it does not apply are
  refused, not ignored."""
  for flag in ("gallery_ids", "coordinator"):
    if FLAGS[flag].value:
      raise app.UsageError(f"experiments.{experiment} does not apply --{flag}; run it "
                           f"without")


def store_list_setup(experiment: str) -> Setup:
  """The setup of an experiment whose stores its own flags list (no `start`): only the
  shared settings and the output folder; unapplied flags refused."""
  refuse_unapplied(experiment)
  return Setup(experiment, None, None, None, 0, 0, out_dir(experiment))


def read_queries() -> int | list[int]:
  """--queries: a count, or a file of query ids (one per line; errors name the line)."""
  from plato_jax.gallery import parse_count
  if not os.path.exists(FLAGS.queries):
    return parse_count(FLAGS.queries)
  return read_ids(FLAGS.queries, "--queries")


def read_ids(path: str, flag: str) -> list[int]:
  """Integer ids, one per line (errors name the file and line)."""
  if not os.path.isfile(path):
    raise app.UsageError(f"{flag}={path}: no such file")
  ids = []
  with open(path) as f:
    for number, line in enumerate(f, start=1):
      if line.strip():
        try:
          ids.append(int(line))
        except ValueError:
          raise app.UsageError(f"{path}, line {number}: {line.strip()!r} is not an "
                               f"integer id") from None
  return ids


def read_values(path: str) -> dict[str, float]:
  """{model: value} of a CSV with columns `model` and `value` (errors name the line)."""
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    if reader.fieldnames is None or not {"model", "value"} <= set(reader.fieldnames):
      raise app.UsageError(f"{path}: needs columns 'model' and 'value', has {reader.fieldnames}")
    out = {}
    for line, row in enumerate(reader, start=2):
      try:
        out[row["model"]] = float(row["value"])
      except ValueError:
        raise app.UsageError(f"{path}, line {line}: value {row['value']!r} is not a number")
  return out


def synthetic(setup: Setup) -> bool:
  """The run is on the built-in synthetic world (no --features flags)."""
  return FLAGS.features_a is None


def synthetic_model(setup: Setup, modality: int, model: int, quality: float = 1.0):
  """Another model of the synthetic world's modality (0: a, 1: b), built once and cached
  beside the world (`plato_jax.synthetic.build_model`)."""
  from plato_jax.synthetic import WorldConfig, build_model
  return build_model(os.path.join(FLAGS.world_dir, "synthetic"), setup.store_a.num_rows,
                     modality, model, quality, WorldConfig(), progress=FLAGS.progress)


def gallery_sizes(setup: Setup, defaults) -> list[int]:
  """--sizes, or the `defaults` up to the largest gallery, plus it and the query count (the
  smallest gallery is the queries alone, WIT-1024 in the paper)."""
  from plato_jax.gallery import parse_count
  if FLAGS.sizes:
    sizes = {parse_count(s) for s in FLAGS.sizes}
    over = sorted(s for s in sizes if s > setup.largest)
    if over:
      raise app.UsageError(f"--sizes {over} exceed the gallery ({setup.largest:,} rows: "
                           f"--gallery or the stores' rows)")
  else:
    sizes = {s for s in map(parse_count, defaults) if s <= setup.largest} | {setup.largest}
  return sorted(sizes | {setup.num_queries})


def run(setup: Setup, sizes, ks, store_a=None, store_b=None, **config):
  """`run_scaling` on the setup's stores (or the two given), resumable under --out: one
  resume directory per configuration, so a rerun with other flags starts afresh beside it.
  Returns (result, the run's config for the result file)."""

  from plato_jax.scaling import run_scaling
  store_a = setup.store_a if store_a is None else store_a
  store_b = setup.store_b if store_b is None else store_b
  config = dict({name: FLAGS[name].value for name in (
      "features_a", "features_b", "layer_a", "layer_b", "queries", "gallery", "seed",
      "common_rows", "clamp", "concat")},
      store_a=store_a.root, store_b=store_b.root, sizes=list(sizes), k=list(ks), **config)
  # The stores' contents too: a rewritten store starts its searches afresh.
  contents = dict(store_a=store_a.fingerprint(), store_b=store_b.fingerprint())
  if setup.gallery_ids is not None:
    config["gallery_ids"] = FLAGS.gallery_ids
    contents["gallery_ids"] = hashlib.sha256(setup.gallery_ids.tobytes()).hexdigest()[:16]
  results = []
  for draw in range(FLAGS.gallery_seeds):
    # Draw d's searches do not depend on how many draws there are: its checkpoints stay.
    resume_dir = resume_folder(setup, {**config, **contents, "draw": draw})
    layers = (FLAGS.layer_a, FLAGS.layer_b) if not results else \
        (results[0].layer_a, results[0].layer_b)  # chosen on the same queries: the same
    results.append(run_scaling(
        store_a, store_b, layer_a=layers[0], layer_b=layers[1], queries=setup.queries,
        sizes=sizes, ks=ks, seed=FLAGS.seed, gallery_seed=FLAGS.seed + draw,
        common_rows=FLAGS.common_rows, clamp=FLAGS.clamp, concat=FLAGS.concat,
        gallery_ids=setup.gallery_ids, resume_dir=resume_dir,
        checkpoint_every=FLAGS.checkpoint_every,
        tile_rows=FLAGS.tile_rows, progress=FLAGS.progress))
    import jax
    if resume_dir is not None and jax.process_count() == 1:
      shutil.rmtree(resume_dir, ignore_errors=True)  # done: its checkpoints are spent
      with contextlib.suppress(OSError):  # and <out>/resume/ too, unless another run's is there
        os.rmdir(os.path.dirname(resume_dir))
  result = results[0]
  if len(results) > 1:  # each row: how far m_NN moves when only the gallery is drawn again
    for i, row in enumerate(result.rows):
      values = [r.rows[i]["mutual_knn"] for r in results]
      row.update(mutual_knn_gallery_sd=float(np.std(values, ddof=1)),
                 mutual_knn_gallery_min=float(min(values)),
                 mutual_knn_gallery_max=float(max(values)))
  return result, dict(config, gallery_seeds=FLAGS.gallery_seeds)


def resume_folder(setup: Setup, config: dict) -> str | None:
  """Where a run of this configuration checkpoints (None without --resume)."""
  if not FLAGS.resume:
    return None
  return os.path.join(setup.out, "resume", f"{setup.experiment}-{run_id(config)}")


def run_id(config: dict) -> str:
  """One resume directory per configuration (and device layout): a rerun with other flags
  starts afresh beside it."""
  import jax
  layout = dict(config, tile_rows=FLAGS.tile_rows, devices=jax.device_count())
  return hashlib.sha256(json.dumps(layout, sort_keys=True, default=str).encode()).hexdigest()[:12]


def is_writer() -> bool:
  """Every process holds the same results; process 0 writes them."""
  import jax
  return jax.process_index() == 0


def write(setup: Setup, name: str, payload: dict, rows, figure,
          extra: dict[str, bytes] | None = None) -> list[str]:
  """<name>.json (payload), <name>.csv (rows), <name>.png and <name>.pdf (a matplotlib
  figure, for the screen and for print), and any `extra` files: one result set, published
  as `<out>/<name>/` in one step. Returns the files' paths."""
  return write_to(setup.out, name, payload, rows, figure, extra)


def write_to(out: str, name: str, payload: dict, rows, figure,
             extra: dict[str, bytes] | None = None) -> list[str]:
  """`write` into the folder `out` (an experiment without stores)."""
  import matplotlib.pyplot as plt

  from plato_jax import report
  config = payload.get("config", {})
  result = report.ResultSet(out, name, run_id(dict(config, experiment=name)), config)
  result.write_json(f"{name}.json", payload)
  result.write_csv(f"{name}.csv", rows)
  for ext in FIGURE_FORMATS:
    result.write_plot(f"{name}.{ext}", figure)
  plt.close(figure)
  for file, data in (extra or {}).items():
    result.write_bytes(file, data)
  replaced = result.publish()
  if replaced is not None and replaced.get("folder") != _seen_at_start.get(name):
    print(f"note: another run published at {os.path.join(out, name)} while this one "
          f"ran ({report.describe(replaced)}); its results stay in {replaced['folder']}")
  return [os.path.join(out, name, f) for f in
          (f"{name}.json", f"{name}.csv", *(f"{name}.{e}" for e in FIGURE_FORMATS),
           *(extra or {}))]


def band(ax, line, xs, rows, key: str) -> None:
  """The 95% interval over queries of `key` (columns key_low, key_high of `rows`), shaded in
  the colour of its `line`."""
  ax.fill_between(xs, [r[f"{key}_low"] for r in rows], [r[f"{key}_high"] for r in rows],
                  color=line.get_color(), alpha=0.15, linewidth=0)


def legend_outside(ax, fontsize: int = 8) -> None:
  """The axes' legend below them, where it covers no curve nor a neighbouring panel (the
  figures are one row of panels; the saved figure grows to hold it)."""
  entries = len(ax.get_legend_handles_labels()[1])
  ax.legend(fontsize=fontsize, loc="upper center", bbox_to_anchor=(0.5, -0.16),
            ncol=max(1, min(3, entries)), frameon=False)


def figure(width: float = 6, height: float = 4, ncols: int = 1):
  """(figure, axes) on the file-only backend."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt.subplots(1, ncols, figsize=(width, height))


def model_names(setup: Setup) -> tuple[str, str]:
  """The two models' names (their stores' metadata, else the stores' folder names)."""
  from plato_jax.grid import model_name
  return model_name(setup.store_a), model_name(setup.store_b)


def alignment_curves(result, x: str, by: str, label, x_label: str, names=("a", "b")):
  """Log-log m_NN curves of a scaling result: x = `x` ("size" or "k"), one line per value of
  `by`, each with its chance level k/(n−1) dashed; `names` of the two models in the title.
  Against gallery size, a second panel shows each model's mean top-1 / top-10 cosine
  (Koepke Table 1)."""
  if x != "size":
    fig, ax = figure()
  else:
    fig, (ax, near) = figure(11, 4, ncols=2)
    for i, (model, name) in enumerate(zip("ab", names)):
      pts = [q for q in result.quality if q["model"] == model]
      for what, style in (("top1_cosine", "o-"), ("top10_cosine", "s--")):
        near.plot([q["size"] for q in pts], [q[what] for q in pts], style, ms=3, color=f"C{i}",
                  label=f"{name}: {what.split('_')[0]}")
    near.set_xscale("log")
    near.set_xlabel(x_label)
    near.set_ylabel("mean cosine of the neighbours")
    near.set_title("how close the nearest rows are", fontsize=9)
    legend_outside(near, fontsize=7)
  for value in dict.fromkeys(r[by] for r in result.rows):
    pts = [r for r in result.rows if r[by] == value]
    line, = ax.plot([r[x] for r in pts], [r["mutual_knn"] for r in pts], "o-", ms=3,
                    label=label(value))
    band(ax, line, [r[x] for r in pts], pts, "mutual_knn")
    ax.plot([r[x] for r in pts], [r["chance"] for r in pts], "--", color=line.get_color(),
            alpha=0.5)
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel(x_label)
  ax.set_ylabel("mutual k-NN alignment")
  clamped = "" if result.clamp == "none" else (
      f"; clamp ({result.clamp}) at {result.thresholds['a']:.3g} / {result.thresholds['b']:.3g}")
  ax.set_title(f"{names[0]} (layer {result.layer_a}) vs {names[1]} (layer {result.layer_b})\n"
               f"dashed: chance k/(n-1); bands: 95% over queries{clamped}", fontsize=9)
  legend_outside(ax)
  return fig
