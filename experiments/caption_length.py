r"""Alignment against caption length (PRH Fig. 9: DCI captions summarised to several
lengths; Koepke Fig. 25: ImageNet captions from one_sentence to extreme_long): the same
images, captions of each length through the same language models.

    python -m experiments.caption_length          # synthetic: 5 lengths x 2 language models
    python -m experiments.caption_length --models_a=dinov2.store \
        --captions=one_sentence=llama/one.store,one_sentence=bloom/one.store,\
short=llama/short.store,... \
        --words=one_sentence=11,short=31,100w=98 --queries=1000

--captions lists `length=store` entries, lengths in the order to plot, each length once per
language model (stores extracted from that caption column, e.g. `experiments.extract
--caption_column=short`); every store holds the same row ids as --models_a. Per vision
model and length: best-layer mutual k-NN (PRH's compute_score after the 0.95 clamp) with
each language model, their mean, a 95% bootstrap interval over the queries, and the sd over
language models. --words gives each length's mean caption words (the x axis; else the
lengths' order). Writes caption_length.json/.csv/.png.
"""
from __future__ import annotations

from absl import app, flags

from . import common

FLAGS = flags.FLAGS
flags.DEFINE_list("models_a", None, "stores of the vision models (default: the synthetic "
                  "world's)")
flags.DEFINE_list("captions", None, "length=store entries: each caption length's language "
                  "model stores, lengths in order")
flags.DEFINE_list("words", None, "length=mean words entries (the x axis)")
flags.DEFINE_integer("topk", 10, "k of mutual k-NN")
FLAGS.set_default("clamp", "exact")  # PRH clamps its features

SYNTHETIC_ROWS = "5k"
# Synthetic: longer captions carry more of the shared detail — a better model of b.
SYNTHETIC_LENGTHS = (("one_sentence", 12, 0.12), ("short", 30, 0.2), ("100w", 100, 0.35),
                     ("250w", 250, 0.6), ("500w", 500, 1.0))
SYNTHETIC_LLMS = (1.0, 0.6)


def pairs(entries, flag: str) -> list[tuple[str, str]]:
  out = []
  for entry in entries:
    name, sep, value = entry.partition("=")
    if not sep or not name or not value:
      raise app.UsageError(f"--{flag}: {entry!r} is not name=value")
    out.append((name, value))
  return out


def inputs(setup):
  """(vision stores, {length: [stores]}, {length: words} or None)."""
  from plato_jax.store import FeatureStore
  if FLAGS.captions is None:
    if FLAGS.models_a:
      raise app.UsageError("--models_a needs --captions")
    texts, model = {}, 0
    for name, _, quality in SYNTHETIC_LENGTHS:
      texts[name] = []
      for llm in SYNTHETIC_LLMS:
        model += 1
        texts[name].append(common.synthetic_model(setup, 1, model,
                                                  round(quality * llm, 3)))
    return [setup.store_a], texts, {n: w for n, w, _ in SYNTHETIC_LENGTHS}
  if not FLAGS.models_a:
    raise app.UsageError("--captions needs --models_a")
  texts: dict = {}
  for name, path in pairs(FLAGS.captions, "captions"):
    texts.setdefault(name, []).append(FeatureStore.open(path))
  words = None
  if FLAGS.words:
    try:
      words = {n: float(v) for n, v in pairs(FLAGS.words, "words")}
    except ValueError as e:
      raise app.UsageError(f"--words: {e}") from None
    missing = [n for n in texts if n not in words]
    if missing:
      raise app.UsageError(f"--words has no value for lengths {missing}")
  return [FeatureStore.open(p) for p in FLAGS.models_a], texts, words


def plot(rows):
  fig, ax = common.figure(6.5, 4)
  use_words = all(r["words"] is not None for r in rows)
  for name in dict.fromkeys(r["model_a"] for r in rows):
    pts = [r for r in rows if r["model_a"] == name]
    x = [r["words"] if use_words else r["position"] for r in pts]
    line, = ax.plot(x, [r["alignment"] for r in pts], "o-", label=name)
    ax.fill_between(x, [r["alignment_low"] for r in pts], [r["alignment_high"] for r in pts],
                    color=line.get_color(), alpha=0.15, linewidth=0)
  if use_words:
    ax.set_xscale("log")
    ax.set_xlabel("mean caption words")
  else:
    ax.set_xticks(range(len(pts)), [r["length"] for r in pts])
    ax.set_xlabel("caption length")
  ax.set_ylabel(f"mutual k-NN (k = {FLAGS.topk}), mean over language models")
  ax.set_title("alignment against caption length (bands: 95% over queries)")
  common.legend_outside(ax, fontsize=7)
  return fig


def main(argv):
  del argv
  from plato_jax import report
  from plato_jax.grid import caption_length_alignment
  if FLAGS.features_a or FLAGS.features_b:
    raise app.UsageError("caption_length takes --models_a and --captions")
  if FLAGS.captions is None:
    setup = common.start("caption_length", synthetic_rows=SYNTHETIC_ROWS)
  else:
    setup = common.store_list_setup("caption_length")
  models_a, texts, words = inputs(setup)
  try:
    rows = caption_length_alignment(models_a, texts, topk=FLAGS.topk,
                                    queries=common.read_queries(), seed=FLAGS.seed,
                                    clamp=FLAGS.clamp, concat=FLAGS.concat, words=words)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  config = dict(models_a=[s.root for s in models_a],
                captions={n: [s.root for s in v] for n, v in texts.items()}, words=words,
                topk=FLAGS.topk, queries=FLAGS.queries, seed=FLAGS.seed, clamp=FLAGS.clamp,
                concat=FLAGS.concat)
  files = common.write(setup, "caption_length", {"config": config, "rows": rows}, rows,
                       plot(rows))
  print(report.format_table(rows, ["model_a", "length", "words", "alignment", "alignment_low",
                                   "alignment_high", "sd_over_models_b"]))
  print(f"\nwrote {', '.join(files)}")


if __name__ == "__main__":
  app.run(main)
