r"""Mutual k-NN against gallery size (Koepke et al. Fig. 4): does alignment survive scale?

    python -m experiments.scaling                        # built-in synthetic world, ~1 min on CPU
    python -m experiments.scaling --gallery=15m          # synthetic world of 15M rows
    python -m experiments.scaling --features_a=dinov2.store --features_b=openllama.store \
        --layer_a=auto --layer_b=auto --gallery=15m --out=results/scaling

Writes scaling.json, scaling.csv and scaling.png under --out and prints the table.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("features_a", None, "feature store of model a (path or kvstore URL); "
                    "default: the built-in synthetic world")
flags.DEFINE_string("features_b", None, "feature store of model b (same rows as a)")
flags.DEFINE_string("layer_a", "auto", "layer of a (index or name), or 'auto': best pair on the queries")
flags.DEFINE_string("layer_b", "auto", "layer of b (index or name), or 'auto'")
flags.DEFINE_string("queries", "1024", "number of queries (drawn with --seed), or a file of "
                    "query ids (one per line)")
flags.DEFINE_string("gallery", None, "largest gallery size, e.g. 100k, 15m (default: all rows "
                    "of the stores; synthetic: 200k)")
flags.DEFINE_list("sizes", None, "gallery sizes (default 1024,10k,50k,100k,500k,1m,5m,10m,15m "
                  "up to --gallery, plus --gallery)")
flags.DEFINE_list("k", ["1", "10", "n/100"], "k values: integers or n/100")
flags.DEFINE_integer("seed", 0, "seed of the query draw and of the gallery order")
flags.DEFINE_string("out", "results/scaling", "output directory")
flags.DEFINE_bool("resume", True, "checkpoint the searches under --out/resume/<run> and continue "
                  "from there after a crash")
flags.DEFINE_string("world_dir", os.path.join(os.path.expanduser("~"), ".cache", "plato_jax"),
                    "cache directory of the synthetic world")
flags.DEFINE_integer("checkpoint_every", 16, "engine steps between checkpoints")
flags.DEFINE_integer("tile_rows", None, "engine tile rows per device (default: engine's choice)")
flags.DEFINE_bool("progress", True, "show progress bars")
flags.DEFINE_string("coordinator", None, "multi-host: coordinator host:port for "
                    "jax.distributed.initialize (every process runs the same command)")
flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
flags.DEFINE_integer("process_id", None, "multi-host: this process's index")

SYNTHETIC_ROWS = 200_000


def _gallery_sizes(largest: int):
  from plato_jax.scaling import DEFAULT_SIZES, parse_count
  if FLAGS.sizes:
    return sorted({parse_count(s) for s in FLAGS.sizes})
  return sorted({s for s in map(parse_count, DEFAULT_SIZES) if s <= largest} | {largest})


def _plot(result, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from plato_jax.report import write_plot
  fig, ax = plt.subplots(figsize=(6, 4))
  for spec in dict.fromkeys(r["k_spec"] for r in result.rows):
    pts = [r for r in result.rows if r["k_spec"] == spec]
    line, = ax.plot([r["size"] for r in pts], [r["mutual_knn"] for r in pts], "o-",
                    label=f"k = {spec}")
    ax.plot([r["size"] for r in pts], [r["chance"] for r in pts], "--", color=line.get_color(),
            alpha=0.5)
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("gallery size n")
  ax.set_ylabel("mutual k-NN alignment")
  ax.set_title(f"layers a={result.layer_a}, b={result.layer_b} (dashed: chance k/(n-1))")
  ax.legend()
  write_plot(path, fig)
  plt.close(fig)


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # checkpointing logs a dozen INFO lines per save
  import jax
  if FLAGS.coordinator:
    if FLAGS.features_a is None:
      raise app.UsageError("multi-host runs read --features_a/--features_b stores that every "
                           "process can reach")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts; GPUs use NCCL
    jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
  from plato_jax import report
  from plato_jax.scaling import parse_count, run_scaling
  from plato_jax.store import FeatureStore

  if (FLAGS.features_a is None) != (FLAGS.features_b is None):
    raise app.UsageError("give both --features_a and --features_b, or neither (synthetic world)")
  if FLAGS.features_a is None:
    from plato_jax.synthetic import WorldConfig, build_world
    rows = parse_count(FLAGS.gallery) if FLAGS.gallery else SYNTHETIC_ROWS
    store_a, store_b = build_world(os.path.join(FLAGS.world_dir, "synthetic"), rows,
                                   WorldConfig(), progress=FLAGS.progress)
  else:
    store_a, store_b = FeatureStore.open(FLAGS.features_a), FeatureStore.open(FLAGS.features_b)
  largest = parse_count(FLAGS.gallery) if FLAGS.gallery else store_a.num_rows
  if largest > store_a.num_rows:
    raise app.UsageError(f"--gallery={FLAGS.gallery} exceeds the stores' {store_a.num_rows:,} rows")
  if os.path.exists(FLAGS.queries):
    with open(FLAGS.queries) as f:
      queries = [int(line) for line in f if line.strip()]
  else:
    queries = parse_count(FLAGS.queries)
  num_queries = queries if isinstance(queries, int) else len(queries)
  # The smallest gallery is the queries alone (WIT-1024 in the paper).
  sizes = sorted(set(_gallery_sizes(largest)) | {num_queries})
  config = {name: FLAGS[name].value for name in ("features_a", "features_b", "layer_a", "layer_b",
                                                 "queries", "gallery", "k", "seed")}
  config.update(store_a=store_a.root, store_b=store_b.root, sizes=sizes)
  # One resume directory per configuration: a rerun with other flags starts afresh beside it.
  layout = dict(config, tile_rows=FLAGS.tile_rows, devices=jax.device_count())
  run_id = hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()[:12]
  result = run_scaling(store_a, store_b, layer_a=FLAGS.layer_a, layer_b=FLAGS.layer_b,
                       queries=queries, sizes=sizes, ks=FLAGS.k, seed=FLAGS.seed,
                       resume_dir=(os.path.join(FLAGS.out, "resume", run_id) if FLAGS.resume
                                   else None),
                       checkpoint_every=FLAGS.checkpoint_every, tile_rows=FLAGS.tile_rows,
                       progress=FLAGS.progress)
  if jax.process_index() != 0:
    return  # every process holds the same results; one writes them
  report.write_json(os.path.join(FLAGS.out, "scaling.json"),
                    {"config": config, **dataclasses.asdict(result)})
  report.write_csv(os.path.join(FLAGS.out, "scaling.csv"), result.rows)
  _plot(result, os.path.join(FLAGS.out, "scaling.png"))
  print(f"\nlayers: a={result.layer_a} b={result.layer_b}; {result.num_queries} queries")
  print(report.format_table(result.rows, ["size", "k_spec", "k", "mutual_knn", "chance"]))
  print()
  print(report.format_table(result.quality, ["size", "model", "top1_cosine", "top10_cosine"]))
  print(f"\nwrote {FLAGS.out}/scaling.json, scaling.csv, scaling.png")


if __name__ == "__main__":
  app.run(main)
