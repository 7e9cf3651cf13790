r"""Text–video and text–audio alignment (Koepke et al. Fig. 11): against gallery size, and
against the language models' capability.

    python -m experiments.other_modalities       # synthetic: video and audio modalities
    python -m experiments.other_modalities --video=videomae.store \
        --video_texts=gemma2-9b_pvd.store,llama3-8b_pvd.store --audio=dasheng.store \
        --audio_texts=gemma2-9b_audio.store,llama3-8b_audio.store --benchmarks=llms.csv

Each media store (extracted by `experiments.extract` from a video or audio dataset, e.g.
PVD-100k or LAION-Audio-100k) is paired with the language models' stores of the same rows'
captions; every pair runs the scaling protocol (same queries, nested galleries, layers
`auto` per pair). --benchmarks is a CSV with columns `model` and `value` (the capability,
e.g. a benchmark score; model names as the stores' metadata say): the alignment at
--at_size (default: the largest gallery) against it, with its least-squares line, per
modality and --trend_k. Writes other_modalities.json/.csv/.png.

The synthetic default: the world's modalities c ("video") and d ("audio") beside language
models of graded quality (their capability is their quality).
"""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
from absl import app, flags

from . import common

FLAGS = flags.FLAGS
flags.DEFINE_string("video", None, "store of a video model")
flags.DEFINE_list("video_texts", None, "stores of language models on the video set's captions")
flags.DEFINE_string("audio", None, "store of an audio model")
flags.DEFINE_list("audio_texts", None, "stores of language models on the audio set's captions")
flags.DEFINE_string("benchmarks", None, "CSV of the language models' capability (columns: "
                    "model, value)")
flags.DEFINE_list("k", ["1", "10", "n/100"], "k values: integers or n/100")
flags.DEFINE_string("trend_k", "10", "the k of the capability trend")
flags.DEFINE_string("at_size", None, "the gallery size of the capability trend (default: "
                    "the largest)")

SYNTHETIC_ROWS = "20k"
SYNTHETIC_QUALITIES = (0.25, 0.5, 1.0, 2.0)  # the language models' (their capability)


def inputs(setup):
  """({modality: (media store, [text stores])}, {language model: capability})."""
  from plato_jax.grid import model_name
  from plato_jax.store import FeatureStore
  if FLAGS.video is None and FLAGS.audio is None:
    texts = [common.synthetic_model(setup, 1, j + 1, q) for j, q in enumerate(SYNTHETIC_QUALITIES)]
    return ({"video": (common.synthetic_model(setup, 2, 0), texts),
             "audio": (common.synthetic_model(setup, 3, 0), texts)},
            {model_name(s): float(s.meta["quality"]) for s in texts})
  pairs = {}
  for name, media, texts in (("video", FLAGS.video, FLAGS.video_texts),
                             ("audio", FLAGS.audio, FLAGS.audio_texts)):
    if (media is None) != (not texts):
      raise app.UsageError(f"give --{name} and --{name}_texts together")
    if media is not None:
      pairs[name] = (FeatureStore.open(media), [FeatureStore.open(p) for p in texts])
  return pairs, common.read_values(FLAGS.benchmarks) if FLAGS.benchmarks else {}


def plot(rows, trend, modalities):
  fig, _ = common.figure(6 * len(modalities), 8)
  fig.clf()
  grid = fig.subplots(2, len(modalities), squeeze=False)
  for col, modality in enumerate(modalities):
    ax = grid[0, col]
    for llm in dict.fromkeys(r["model_b"] for r in rows if r["modality"] == modality):
      colour = None  # one colour per language model, one line style per k
      for style, spec in zip(itertools.cycle(("o-", "s--", "^:", "d-.")),
                             dict.fromkeys(r["k_spec"] for r in rows)):
        pts = [r for r in rows if r["modality"] == modality and r["model_b"] == llm
               and r["k_spec"] == spec]
        line, = ax.plot([r["size"] for r in pts], [r["mutual_knn"] for r in pts], style, ms=3,
                        color=colour, label=f"{llm}, k = {spec}")
        colour = line.get_color()
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("gallery size n")
    ax.set_ylabel("mutual k-NN alignment")
    ax.set_title(f"text–{modality}")
    common.legend_outside(ax, fontsize=6)
    ax = grid[1, col]
    t = trend.get(modality)
    if t and t["points"]:
      x = [p["capability"] for p in t["points"]]
      ax.errorbar(x, [p["alignment"] for p in t["points"]],
                  yerr=[[p["alignment"] - p["alignment_low"] for p in t["points"]],
                        [p["alignment_high"] - p["alignment"] for p in t["points"]]], fmt="o")
      if t.get("slope") is not None:
        xs = np.linspace(min(x), max(x), 20)
        ax.plot(xs, t["intercept"] + t["slope"] * xs, "k--", lw=1,
                label=f"OLS, R² = {t['r2']:.2f}")
        ax.legend(fontsize=7)
      ax.set_xlabel("language-model capability")
      ax.set_ylabel(f"alignment at n = {t['size']:,} (k = {t['k_spec']})")
    else:
      ax.axis("off")
      ax.text(0.5, 0.5, "no --benchmarks: no trend", ha="center")
  fig.tight_layout()
  return fig


def capability_trend(rows, capability, size, k_spec):
  """The alignment of each language model at (size, k) against its capability, and the
  least-squares line through them (with R²) when at least two distinct capabilities."""
  from plato_jax.grid import trend_fit
  points = [dict(model_b=r["model_b"], capability=capability[r["model_b"]],
                 alignment=r["mutual_knn"], alignment_low=r["mutual_knn_low"],
                 alignment_high=r["mutual_knn_high"])
            for r in rows if r["size"] == size and r["k_spec"] == k_spec
            and r["model_b"] in capability]
  out = dict(size=size, k_spec=k_spec, points=points)
  if len({p["capability"] for p in points}) >= 2:
    fit = trend_fit([p["capability"] for p in points], [p["alignment"] for p in points])
    out.update(intercept=fit["intercept"], slope=fit["slope"], r2=fit["r2_base"])
  return out


def main(argv):
  del argv
  from plato_jax import report
  from plato_jax.gallery import DEFAULT_SIZES, parse_count
  from plato_jax.grid import model_name
  synthetic = FLAGS.video is None and FLAGS.audio is None
  if FLAGS.features_a or FLAGS.features_b:
    raise app.UsageError("other_modalities takes --video/--audio and their --*_texts")
  if FLAGS.trend_k not in FLAGS.k:
    raise app.UsageError(f"--trend_k={FLAGS.trend_k} is not one of --k {FLAGS.k}")
  if synthetic:
    setup = common.start("other_modalities", synthetic_rows=SYNTHETIC_ROWS)
  else:
    common.refuse_unapplied("other_modalities")
    setup = None
  pairs, capability = inputs(setup)
  if not synthetic:
    first = next(iter(pairs.values()))
    queries = common.read_queries()
    rows_available = min(s.num_rows for media, texts in pairs.values() for s in (media, *texts))
    largest = parse_count(FLAGS.gallery) if FLAGS.gallery else rows_available
    setup = common.Setup("other_modalities", first[0], first[1][0], queries,
                         queries if isinstance(queries, int) else len(queries), largest,
                         common.out_dir("other_modalities"))
  missing = sorted({model_name(t) for _, texts in pairs.values() for t in texts}
                   - set(capability)) if capability else []
  if missing:
    raise app.UsageError(f"--benchmarks has no value for models {missing}")
  rows, runs, trend = [], [], {}
  for modality, (media, texts) in pairs.items():
    sub = dataclasses.replace(setup, largest=min(setup.largest, media.num_rows))
    sizes = common.gallery_sizes(sub, DEFAULT_SIZES)
    found = []
    for text in texts:
      label = f"{modality}: {model_name(media)} vs {model_name(text)}"
      if FLAGS.progress:
        print(label, flush=True)
      result, config = common.run(sub, sizes, FLAGS.k, store_a=media, store_b=text, pair=label)
      runs.append({"modality": modality, "config": config, **dataclasses.asdict(result)})
      found += [dict(modality=modality, model_a=model_name(media), model_b=model_name(text),
                     layer_a=result.layer_a, layer_b=result.layer_b, **r) for r in result.rows]
    rows += found
    if capability:
      at = parse_count(FLAGS.at_size) if FLAGS.at_size else max(sizes)
      if at not in sizes:
        raise app.UsageError(f"--at_size={FLAGS.at_size} is not one of the sizes {sizes}")
      trend[modality] = capability_trend(found, capability, at, FLAGS.trend_k)
  config = dict(video=FLAGS.video, video_texts=FLAGS.video_texts, audio=FLAGS.audio,
                audio_texts=FLAGS.audio_texts, benchmarks=FLAGS.benchmarks, k=FLAGS.k,
                trend_k=FLAGS.trend_k, at_size=FLAGS.at_size, queries=FLAGS.queries,
                seed=FLAGS.seed, gallery=FLAGS.gallery)
  files = common.write(setup, "other_modalities",
                       {"config": config, "runs": runs, "trend": trend, "capability": capability},
                       rows, plot(rows, trend, list(pairs)))
  print(report.format_table(rows, ["modality", "model_b", "size", "k_spec", "mutual_knn",
                                   "mutual_knn_low", "mutual_knn_high", "chance"]))
  for modality, t in trend.items():
    if "slope" in t:
      print(f"{modality}: alignment at n = {t['size']:,}, k = {t['k_spec']} against capability: "
            f"slope {t['slope']:.4g}, R² {t['r2']:.3f}")
  print(f"\nwrote {', '.join(files)}")


if __name__ == "__main__":
  app.run(main)
