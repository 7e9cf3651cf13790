"""Gallery-pass benchmark: random nested galleries at row level (ranks, read in storage
order) against storage-order prefixes and, with --baseline, another checkout's gallery pass,
in the same run.

    python -m experiments.bench.galleries                          # the default synthetic world
    python -m experiments.bench.galleries --rows=2000000 --baseline=../old-checkout

Each method is one layer's pass of the scaling protocol (`plato_jax.gallery.layer_neighbours`:
every gallery size and k from one pass) over the same store, queries and sizes:
- "random rows": ours, the galleries random subsets of rows (`plato_jax.knn.bands`);
- "storage-order prefixes": the same pass with prefix j = the store's first n_j rows (the
  same compute, no bands: what sequential reads cost without random galleries);
- "--baseline": DIR's `layer_neighbours` in a worker process (e.g. the commit before a
  change), whatever its galleries were.
The methods run interleaved, round by round; the ratios are to "random rows".
"""
from __future__ import annotations

import os
import statistics
import warnings

from absl import app, flags

from .timing import interleaved_times

FLAGS = flags.FLAGS
flags.DEFINE_integer("rows", None, "a one-layer bf16 store of this many random rows (cached "
                     "under --dir); default: the synthetic world of experiments.scaling")
flags.DEFINE_integer("dim", 768, "feature dimension of the --rows store")
flags.DEFINE_string("dir", os.path.join(os.path.expanduser("~"), ".cache", "plato_jax", "bench"),
                    "where the --rows store is cached")
flags.DEFINE_integer("queries", 1024, "queries")
flags.DEFINE_integer("prefixes", 9, "gallery sizes, log-spaced from the queries to all rows")
flags.DEFINE_list("k", ["1", "10", "n/100"], "k values: integers or n/100")
flags.DEFINE_integer("repeats", 3, "timed rounds (each runs every method once)")
flags.DEFINE_string("baseline", None, "another checkout whose gallery pass is timed beside ours")

_WORKER = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
from plato_jax.gallery import layer_neighbours, plan_galleries
from plato_jax.store import FeatureStore
store = FeatureStore.open(sys.argv[2])
for line in sys.stdin:
  queries, sizes, ks, keep, layer = json.loads(line)
  plan = plan_galleries(store, store, queries, sizes, ks, 0)
  q = store.gather(plan.query_rows, layer).astype(np.float32)
  layer_neighbours(store, layer, q, plan, keep, progress=False)
  print("done", flush=True)
"""


def _bench_store(path: str, rows: int, dim: int):
  import numpy as np

  from plato_jax.store import FeatureStore, StoreWriter
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      return FeatureStore.open(path)
  except ValueError:
    pass
  w = StoreWriter.create(path, num_rows=rows, num_layers=1, dim=dim, dtype="bfloat16",
                         overwrite=True)
  rng = np.random.default_rng(0)
  for s in range(0, rows, 65536):
    n = min(65536, rows - s)
    w.append(rng.standard_normal((n, 1, dim), dtype=np.float32), np.arange(s, s + n))
  return w.close()


def main(argv):
  del argv
  import json
  import subprocess
  import sys

  import numpy as np

  from plato_jax.gallery import layer_neighbours, plan_galleries
  from plato_jax.knn import search_prefixes

  if FLAGS.rows:
    store = _bench_store(os.path.join(FLAGS.dir, f"stream-{FLAGS.rows}x{FLAGS.dim}"),
                         FLAGS.rows, FLAGS.dim)
    layer = 0
  else:
    from plato_jax.synthetic import DEFAULT_ROWS, WorldConfig, build_world
    store, _ = build_world(os.path.join(os.path.expanduser("~"), ".cache", "plato_jax",
                                        "synthetic"), DEFAULT_ROWS, WorldConfig(), progress=False)
    layer = store.num_layers - 1
  n = store.num_rows
  sizes = sorted({int(round(s)) for s in np.geomspace(FLAGS.queries, n, FLAGS.prefixes)})
  plan = plan_galleries(store, store, FLAGS.queries, sizes, FLAGS.k, 0)
  keep = [max(k for _, k in plan.k_by_size[s]) for s in plan.sizes]
  q = store.gather(plan.query_rows, layer).astype(np.float32)

  def random_rows():
    return layer_neighbours(store, layer, q, plan, keep)

  def storage_prefixes():
    return search_prefixes(q, store.layer(layer), max(keep),
                           query_ids=plan.ids[plan.query_rows], prefix_sizes=plan.sizes,
                           prefix_k=keep, normalize=True)

  methods = {"random rows (ranks, storage-order reads)": random_rows,
             "storage-order prefixes": storage_prefixes}
  worker = None
  if FLAGS.baseline:
    worker = subprocess.Popen([sys.executable, "-c", _WORKER, os.path.abspath(FLAGS.baseline),
                               store.root], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd=os.path.abspath(FLAGS.baseline))

    def baseline():
      worker.stdin.write(json.dumps([FLAGS.queries, sizes, FLAGS.k, keep, layer]) + "\n")
      worker.stdin.flush()
      if worker.stdout.readline().strip() != "done":
        raise RuntimeError(f"the baseline worker stopped (exit {worker.poll()})")

    methods[f"--baseline {FLAGS.baseline}"] = baseline
  timed = interleaved_times(methods, FLAGS.repeats)
  if worker is not None:
    worker.stdin.close()
    worker.wait()
  print(f"store {store.root}: {n:,} rows x {store.dim} {store.dtype}; {FLAGS.queries} queries; "
        f"{len(sizes)} sizes {sizes}; k {FLAGS.k}")
  ours = timed["random rows (ranks, storage-order reads)"][0]
  for name, (times, _) in timed.items():
    print(f"{name:45s} best {min(times):8.3f} s median {statistics.median(times):8.3f} s   "
          f"ratio to random rows: best {min(times) / min(ours):5.2f} median "
          f"{statistics.median(times) / statistics.median(ours):5.2f}")


if __name__ == "__main__":
  app.run(main)
