r"""Build a deduplicated gallery as Koepke et al. do (App. E.1, Tables 6–7): the pool's
images within pHash distance 2 of a query image, or of an earlier kept pool image, go; then
captions equal to a query's, or to an earlier kept row's.

    python -m experiments.build_gallery                       # a synthetic pool, seconds
    python -m experiments.build_gallery --data=/data/wit_pool --query_set=/data/wit_1024 \
        --caption_column=original_caption --out=results
    python -m experiments.build_gallery --data=/data/laion_20m --query_ids=wit1024_ids.txt

Writes build_gallery.json (Table 6 counts, Table 7 caption multiplicities, the most
repeated captions, skipped ids), build_gallery.csv (Table 6), a plot of the multiplicities,
and gallery_ids.txt — what `experiments.scaling --gallery_ids=` measures. Hashes are saved
in parts under <out>/cache/build_gallery-hashes-*/: a crashed run resumes, and a rerun with
another --max_distance reuses them.
"""
from __future__ import annotations

import os

import numpy as np
from absl import app, flags

from . import common

FLAGS = flags.FLAGS
flags.DEFINE_string("data", None, "the pool: parquet file(s)/dir, tar shard(s) or an image "
                    "folder (default: a synthetic pool)")
flags.DEFINE_string("query_set", None, "the query set as a dataset (e.g. WIT-1024)")
flags.DEFINE_string("query_ids", None, "or: a file of ids (one per line) of the pool's rows "
                    "that are the queries (left out of the gallery)")
flags.DEFINE_integer("max_distance", 2, "pHash Hamming distance that makes a duplicate")
flags.DEFINE_integer("workers", 2, "image-decoding threads")
flags.DEFINE_integer("top", 10, "most repeated captions to report")
flags.DEFINE_string("image_column", "image", "image field / column")
flags.DEFINE_string("caption_column", "caption", "caption field / column")
flags.DEFINE_string("id_column", "id", "integer row id field (default: the row's position)")
flags.DEFINE_integer("synthetic_rows", 3000, "rows of the synthetic pool")


def plot(multiplicity):
  fig, ax = common.figure(6, 3.5)
  labels = [m["copies"] for m in multiplicity]
  x = np.arange(len(labels))
  ax.bar(x - 0.2, [m["captions"] for m in multiplicity], 0.4, label="distinct captions")
  ax.bar(x + 0.2, [m["rows"] for m in multiplicity], 0.4, label="rows")
  ax.set_yscale("symlog")
  ax.set_xticks(x, labels)
  ax.set_xlabel("copies of a caption (after image dedup)")
  ax.set_title("caption multiplicity (Koepke et al. Table 7)")
  ax.legend(fontsize=8)
  return fig


def main(argv):
  del argv
  from absl import logging
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from plato_jax import data, dedup, report
  if FLAGS.data is None and (FLAGS.query_set or FLAGS.query_ids):
    raise app.UsageError("--query_set/--query_ids need --data")
  if FLAGS.data is None:
    from plato_jax.synthetic import build_image_pool
    pool_path, queries_path = build_image_pool(os.path.join(FLAGS.world_dir, "synthetic"),
                                               FLAGS.synthetic_rows)
    pool, queries, query_ids = data.open_dataset(pool_path), data.open_dataset(queries_path), None
  else:
    if bool(FLAGS.query_set) == bool(FLAGS.query_ids):
      raise app.UsageError("give the query set: --query_set (a dataset) or --query_ids (a "
                           "file)")
    fields = dict(image=FLAGS.image_column, caption=FLAGS.caption_column, id=FLAGS.id_column)
    try:
      pool = data.open_dataset(FLAGS.data, **fields)
      queries = data.open_dataset(FLAGS.query_set, **fields) if FLAGS.query_set else None
    except (ValueError, FileNotFoundError) as e:
      raise app.UsageError(str(e)) from None
    query_ids = common.read_ids(FLAGS.query_ids, "--query_ids") if FLAGS.query_ids else None
  out = common.out_dir("build_gallery")
  config = {name: FLAGS[name].value for name in (
      "data", "query_set", "query_ids", "max_distance", "image_column", "caption_column",
      "id_column")}
  # The pool's hashes depend on the pool alone: a rerun with other queries or another
  # --max_distance reuses them.
  dataset = {k: config[k] for k in ("data", "image_column", "caption_column", "id_column")}
  if FLAGS.data is None:
    dataset["synthetic_rows"] = FLAGS.synthetic_rows
  hashes = os.path.join(out, "cache", f"build_gallery-hashes-{common.run_id(dataset)}")
  try:
    gallery = dedup.build_gallery(pool, hashes, queries=queries, query_ids=query_ids,
                                  max_distance=FLAGS.max_distance, workers=FLAGS.workers,
                                  top=FLAGS.top, progress=FLAGS.progress)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  ids = "".join(f"{i}\n" for i in gallery.ids.tolist()).encode()
  payload = {"config": config, "counts": gallery.counts, "multiplicity": gallery.multiplicity,
             "top_captions": gallery.top_captions, "skipped": gallery.skipped,
             "gallery_rows": len(gallery.ids)}
  files = common.write_to(out, "build_gallery", payload, gallery.counts,
                          plot(gallery.multiplicity), {"gallery_ids.txt": ids})
  print(report.format_table(gallery.counts, ["step", "rows"]))
  print()
  print(report.format_table(gallery.multiplicity, ["copies", "captions", "rows"]))
  print(f"\nwrote {', '.join(files)}")


if __name__ == "__main__":
  app.run(main)
