"""Streaming benchmark: the engine's pass over a feature store against a raw read of its bytes.

    python -m plato_jax.experiments.bench.stream --rows=1000000 --dim=768

Writes (once, cached under --dir) a one-layer bf16 store, then in the same run times
(a) a raw read of the layer, tile by tile, with TensorStore reads kept in flight,
(b) the store's own read of those tiles (`FeatureStore.read_layer`: straight from the shard
files where it can, `plato_jax.shardfile`), four in flight, and
(c) `plato_jax.knn.search` over the same layer with few queries (so compute is light),
and prints each one's rate in bytes/s and its ratio to (a) (goal for (c): >= 80%).

`--baseline_store=PATH` streams another store of the same shape in the same rounds (e.g.
one written before chunk checksums and shard seals: the cost of verifying them). Each
engine pass opens its store afresh, as a run does. The passes run interleaved, round by
round.
"""
from __future__ import annotations

import concurrent.futures
import functools
import os
import time
import warnings

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("rows", 1_000_000, "store rows")
flags.DEFINE_integer("dim", 768, "feature dimension")
flags.DEFINE_integer("queries", 16, "queries of the engine pass")
flags.DEFINE_integer("tile_rows", 32_768, "rows per tile in both passes")
flags.DEFINE_string("dir", os.path.join(os.path.expanduser("~"), ".cache", "plato_jax", "bench"),
                    "where the store is cached")
flags.DEFINE_integer("repeats", 2, "timed passes of each (best is reported)")
flags.DEFINE_bool("verbose", False, "print every round's time")
flags.DEFINE_string("baseline_store", None, "another store of the same shape, read and "
                    "streamed in the same rounds")


def _store(path):
  import numpy as np

  from plato_jax.store import FeatureStore, StoreWriter
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      store = FeatureStore.open(path)
    if store.meta.get("sealed"):
      return store
  except ValueError:
    pass
  w = StoreWriter.create(path, num_rows=FLAGS.rows, num_layers=1, dim=FLAGS.dim,
                         dtype="bfloat16", overwrite=True)
  rng = np.random.default_rng(0)
  for s in range(0, FLAGS.rows, 65536):
    n = min(65536, FLAGS.rows - s)
    w.append(rng.standard_normal((n, 1, FLAGS.dim), dtype=np.float32), np.arange(s, s + n))
  return w.close()


def main(argv):
  del argv
  import jax
  import numpy as np

  from plato_jax.knn import search
  from plato_jax.store import FeatureStore

  store = _store(os.path.join(FLAGS.dir, f"stream-{FLAGS.rows}x{FLAGS.dim}"))
  nbytes = store.num_rows * store.dim * store.dtype.itemsize
  tiles = [(s, min(s + FLAGS.tile_rows, store.num_rows))
           for s in range(0, store.num_rows, FLAGS.tile_rows)]

  queries = store.gather(np.arange(FLAGS.queries), layer=0)

  def raw_read(store):
    futures = [store._features[a:b, 0].read() for a, b in tiles[:4]]
    for i in range(len(tiles)):
      futures[i].result()
      if i + 4 < len(tiles):
        a, b = tiles[i + 4]
        futures.append(store._features[a:b, 0].read())

  def store_read(store):
    """The store's own read (direct from its shard files where it can), reads in flight."""
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
      for _ in pool.map(lambda t: store.read_layer(0, *t), tiles):
        pass

  def engine_pass(store):
    """Opened afresh, as a run would: its shards' seals are checked again."""
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # a baseline store from before seals says so
      layer = FeatureStore.open(store.root).layer(0)
    search(queries, layer, 10, query_ids=np.arange(FLAGS.queries), normalize=True,
           tile_rows=FLAGS.tile_rows // max(1, len(jax.devices())))

  stores = {"": store}
  if FLAGS.baseline_store:
    stores[" (baseline store)"] = FeatureStore.open(FLAGS.baseline_store)
  passes = {f"{what}{tag}": functools.partial(fn, s) for tag, s in stores.items()
            for what, fn in (("raw TensorStore read", raw_read), ("FeatureStore read", store_read),
                             ("plato_jax.knn.search pass", engine_pass))}
  timed = {name: [] for name in passes}
  for fn in passes.values():
    fn()  # warm-up
  for _ in range(FLAGS.repeats):
    for name, fn in passes.items():
      t, cpu = time.perf_counter(), time.process_time()
      fn()
      timed[name].append((time.perf_counter() - t, time.process_time() - cpu))
  print(f"store {store.num_rows:,} x {store.dim} bf16 = {nbytes / 1e9:.2f} GB; "
        f"tile {FLAGS.tile_rows:,} rows; {FLAGS.queries} queries; devices {len(jax.devices())}")
  raw = min(timed["raw TensorStore read"])[0]
  # CPU seconds (all threads): on a CPU backend the engine's device work and the reads share
  # the same cores, so wall time there is roughly CPU time / cores.
  for name, runs in timed.items():
    t, cpu = min(runs)
    if FLAGS.verbose:
      print("  ".join(f"{r:.3f}" for r, _ in runs))
    print(f"{name:45s} best {t:8.3f} s median {sorted(runs)[len(runs) // 2][0]:8.3f} s "
          f"{nbytes / t / 1e9:8.2f} GB/s {raw / t:8.1%} of raw   cpu {cpu:6.2f} s")


if __name__ == "__main__":
  app.run(main)
