r"""Extract per-layer features of one model over an image–caption dataset into a store.

    python -m experiments.extract --model=/ckpt/dinov2-base --data=/data/wit_1m --out=dinov2.store
    python -m experiments.extract --model=/ckpt/open_llama_3b --data=/data/wit_1m \
        --out=openllama.store --dtype=bfloat16 --resume

    python -m experiments.extract --model=/ckpt/dasheng_base.pt --data=/data/audiocaps \
        --image_column=audio --out=dasheng.store

--model is a local Hugging Face (or timm) checkpoint directory, or Dasheng's .pt file;
--data a media folder with captions.jsonl/csv, parquet file(s) in the WIT / HF-datasets
layout, or webdataset tar shards. Vision models store the CLS token of every block, video
and audio models every block's tokens averaged, language models every hidden state
mean-pooled over the caption's tokens, plus its loss and bits per byte;
--group_column adds each row's group (its source) for many-to-many alignment.
`python -m experiments.scaling --features_a=... --features_b=...` reads the stores.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "checkpoint directory (config.json + safetensors), or "
                    "Dasheng's own .pt file", required=True)
flags.DEFINE_string("data", None, "dataset: image folder, parquet file(s)/dir, tar shard(s)",
                    required=True)
flags.DEFINE_string("out", None, "output store (path or kvstore URL)", required=True)
flags.DEFINE_enum("tower", None, ["vision", "text"], "tower of a two-tower (CLIP) checkpoint")
flags.DEFINE_integer("batch_size", 32, "rows per step (rounded up to a multiple of the devices)")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"], "compute dtype")
flags.DEFINE_enum("store_dtype", None, ["bfloat16", "float16", "float32"],
                  "stored dtype (default: the compute dtype)")
flags.DEFINE_enum("on_bad_image", "fail", ["fail", "skip"],
                  "an unreadable image, video or audio clip (or one too short): stop naming its "
                  "row id, or skip it (ids logged and kept in the store's metadata as "
                  "skipped_ids)")
flags.DEFINE_enum("on_empty_caption", "fail", ["fail", "skip", "keep"],
                  "an empty caption: stop, skip, or keep (the tokenizer's special tokens only)")
flags.DEFINE_integer("max_length", None, "longest caption in tokens (default: no limit)")
flags.DEFINE_enum("on_long_text", "fail", ["fail", "truncate", "skip"],
                  "a caption over --max_length")
flags.DEFINE_string("image_column", "image", "image (or video, audio) field / column "
                    "(parquet: bytes or {bytes, path}; a folder: a path relative to it), e.g. "
                    "audio")
flags.DEFINE_string("caption_column", "caption", "caption field / column, e.g. "
                    "original_caption or gemini_caption for WIT")
flags.DEFINE_string("id_column", "id", "integer row id field (default: the row's position)")
flags.DEFINE_string("group_column", None, "integer group field (e.g. the image of each of "
                    "several captions): stored as the int64 column 'group', what "
                    "experiments.many_to_many reads; every record needs one")
flags.DEFINE_integer("chunk_rows", None, "store inner chunk rows (default: ~256 KB chunks; "
                     "a randomly read row costs its whole chunk)")
flags.DEFINE_bool("resume", False, "continue an interrupted extraction into --out (the same "
                  "model files, dataset, dtype and options, else an error naming what differs)")
flags.DEFINE_bool("overwrite", False, "replace a store that exists at --out (without this or "
                  "--resume, an existing store is an error and is left as it is)")
flags.DEFINE_bool("progress", True, "show a progress bar")
flags.DEFINE_integer("model_parallel", 1, "devices each model is split across, tensor-"
                     "parallel (for a model too big for one device; a divisor of the devices)")
flags.DEFINE_float("max_audio_seconds", None, "audio kept per clip, from its start (default: "
                   "one chunk of the model, Dasheng's 10.08 s; longer runs more chunks)")


def main(argv):
  del argv
  if FLAGS.verbosity < 0 or not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from plato_jax import data
  from plato_jax.extract import Options, extract
  from plato_jax.store import StoreBusy

  try:
    reader = data.open_dataset(FLAGS.data, image=FLAGS.image_column,
                               caption=FLAGS.caption_column, id=FLAGS.id_column,
                               group=FLAGS.group_column)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"experiments.extract: {e}")
  opts = Options(batch_size=FLAGS.batch_size, dtype=FLAGS.dtype, store_dtype=FLAGS.store_dtype,
                 on_bad_image=FLAGS.on_bad_image, on_empty_caption=FLAGS.on_empty_caption,
                 max_length=FLAGS.max_length, on_long_text=FLAGS.on_long_text,
                 chunk_rows=FLAGS.chunk_rows, resume=FLAGS.resume, overwrite=FLAGS.overwrite,
                 progress=FLAGS.progress, model_parallel=FLAGS.model_parallel,
                 max_audio_seconds=FLAGS.max_audio_seconds)
  try:
    store = extract(FLAGS.model, reader, FLAGS.out, opts, tower=FLAGS.tower,
                    dataset_name=FLAGS.data)
  except (ValueError, FileNotFoundError, StoreBusy) as e:  # bad checkpoint, data, rows, store
    sys.exit(f"experiments.extract: {e}")
  skipped = store.meta.get("skipped_ids", [])
  print(f"{store.root}: {store.num_rows} rows x {store.num_layers} layers x {store.dim} "
        f"({store.meta['pooling']}, {store.meta['dtype']})"
        + (f"; skipped {len(skipped)} rows (ids in the metadata)" if skipped else ""))


if __name__ == "__main__":
  app.run(main)
