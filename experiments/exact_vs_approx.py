r"""What approximate k-NN costs in alignment terms: recall, and the error it puts into mutual
k-NN, against the exact engine, as the gallery grows.

    python -m experiments.exact_vs_approx                 # synthetic world, 50k rows
    python -m experiments.exact_vs_approx --features_a=A.store --features_b=B.store \
        --sizes=1024,100k,1m --methods=faiss_ivf,faiss_hnsw,bucketed --nprobe=1,8,64

Same data, layers and nested galleries as experiments.scaling (queries first, excluded as
self). Methods and measures are in `plato_jax.approx`: jax.lax.approx_max_k (approximate
only on TPU: the `approximate` column says so), a TPU-KNN bucketed reduce with a recall
target (any backend), faiss IVF-Flat and HNSW, usearch and hnswlib when installed (others
are listed as skipped). Per size, method and setting: recall@k, tie-aware recall, the
|A ∩ E| histogram, m_NN exact and approximate and their difference, queries/s, build
seconds, index bytes. The approximate methods hold the gallery in memory. Writes
exact_vs_approx.json/.csv and a PNG with recall against speed (largest gallery) and
|Δ m_NN| against gallery size.
"""
from __future__ import annotations

from absl import app, flags

from . import common

FLAGS = flags.FLAGS
flags.DEFINE_integer("k", 10, "neighbours")
flags.DEFINE_list("methods", ["approx_max_k", "bucketed", "faiss_ivf", "faiss_hnsw", "usearch",
                              "hnswlib"], "approximate methods (unavailable ones are skipped)")
flags.DEFINE_list("recall_targets", ["0.8", "0.9", "0.95", "0.99"],
                  "recall targets of approx_max_k and bucketed")
flags.DEFINE_list("nprobe", ["1", "4", "16", "64"], "faiss IVF nprobe values")
flags.DEFINE_list("ef", ["16", "32", "64", "128"], "HNSW search breadths (efSearch / "
                  "expansion_search / ef)")

DEFAULT_SIZES = ("1024", "10k", "50k", "100k", "1m")
SYNTHETIC_GALLERY = "50k"


def plot(rows):
  fig, (left, right) = common.figure(12, 4.5, ncols=2)
  largest = max(r["size"] for r in rows)
  methods = list(dict.fromkeys(r["method"] for r in rows))
  for i, method in enumerate(methods):
    colour = f"C{i}"
    pts = [r for r in rows if r["method"] == method and r["size"] == largest]
    pts.sort(key=lambda r: r["queries_per_s"])
    left.plot([r["queries_per_s"] for r in pts], [r["recall"] for r in pts], "o-",
              color=colour, label=method)
    settings = list(dict.fromkeys(r["setting"] for r in rows if r["method"] == method))
    for j, setting in enumerate(settings):
      line = [r for r in rows if r["method"] == method and r["setting"] == setting]
      right.plot([r["size"] for r in line], [abs(r["delta_mnn"]) + 1e-5 for r in line], "o-",
                 color=colour, alpha=0.5, ms=3, label=method if j == 0 else None)
  left.set_xscale("log")
  left.set_xlabel("queries / s (both models)")
  left.set_ylabel(f"recall@k (n = {largest:,})")
  common.legend_outside(left, fontsize=7)
  right.set_xscale("log")
  right.set_yscale("log")
  right.set_xlabel("gallery size n")
  right.set_ylabel("|m_NN approx − m_NN exact| (+1e-5)")
  common.legend_outside(right, fontsize=7)
  fig.tight_layout()
  return fig


def main(argv):
  del argv
  from plato_jax import report
  from plato_jax.approx import compare
  setup = common.start("exact_vs_approx", synthetic_rows=SYNTHETIC_GALLERY, clamps=False)
  sizes = common.gallery_sizes(setup, DEFAULT_SIZES)
  result = compare(setup.store_a, setup.store_b, queries=setup.queries, sizes=sizes, k=FLAGS.k,
                   methods=FLAGS.methods,
                   recall_targets=[float(r) for r in FLAGS.recall_targets],
                   nprobe=[int(n) for n in FLAGS.nprobe], ef=[int(e) for e in FLAGS.ef],
                   layer_a=FLAGS.layer_a, layer_b=FLAGS.layer_b, seed=FLAGS.seed,
                   progress=FLAGS.progress)
  if not common.is_writer():
    return
  config = dict(store_a=setup.store_a.root, store_b=setup.store_b.root, sizes=sizes, k=FLAGS.k,
                methods=FLAGS.methods, recall_targets=FLAGS.recall_targets, nprobe=FLAGS.nprobe,
                ef=FLAGS.ef, queries=FLAGS.queries, seed=FLAGS.seed)
  rows = result["rows"]
  csv_rows = [{k: v for k, v in r.items() if k != "intersections_a"} for r in rows]
  files = common.write(setup, "exact_vs_approx", {"config": config, **result}, csv_rows,
                       plot(rows))
  print(f"layers a={result['layer_a']} b={result['layer_b']}; skipped (not installed): "
        f"{result['skipped'] or 'none'}; tie epsilon {result['epsilon']:.2e}")
  print(report.format_table(rows, ["size", "method", "setting", "approximate", "recall",
                                   "tie_recall", "delta_mnn", "queries_per_s", "build_s"]))
  print(f"\nwrote {', '.join(files)}")


if __name__ == "__main__":
  app.run(main)
