"""Feature extraction with the papers' protocol, into a feature store.

Vision (PRH §C.2, Koepke §3): the CLS token after every block, before the final norm —
[N, L, D]; images preprocessed as the checkpoint says (timm `pretrained_cfg`: resize the
short side to size/crop_pct, centre crop; or HF preprocessor_config.json), bicubic. A
ResNet: its last stage averaged over space [N, 1, C]. Video (VideoMAE): config.json's
`num_frames` frames sampled uniformly (as transformers' video processors), each
preprocessed as an image, every block's tokens averaged [N, L, D]. Audio (Dasheng): mono
at the model's rate (16 kHz; resampled as torchaudio does), at most `max_audio_seconds`
(default: one 10.08 s chunk of the model), every block's real tokens averaged [N, L, D].
Language: every hidden state including the embedding output, mean-pooled over the real
tokens — [N, L+1, D]; left padding, pad = eos when the tokenizer has none, no prompt; and
each caption's mean token loss and bits per byte as store columns (`loss`,
`bits_per_byte`). Pooling and losses are computed in f32 from the compute dtype's hidden
states.

Batches run data-parallel over all devices (the batch axis sharded over the mesh's "data"
axis); parameters are replicated, or, with `model_parallel` > 1, split tensor-parallel over
a "model" axis of that many devices (a model too big for one device); text batches are
sorted by length within a window of batches and padded to a few bucket lengths, then
written back in dataset order, so store rows follow the dataset order whatever the
bucketing. Bad records (unreadable images, videos or audio, empty captions, over-long
texts) fail the run or are skipped by option, and skipped ids are logged and
kept in the store's metadata — rows never shift silently. Writes are asynchronous; a
rerun with `resume=True` continues from the last durable row.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from plato_jax import data as datasets
from plato_jax import models
from plato_jax.models import dasheng, resnet
from plato_jax.progress import Progress
from plato_jax.store import StoreWriter, exists as store_exists

# ---- images -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageSpec:
  """Eval preprocessing: resize (short side to `resize`, the long side scaled and truncated
  as torchvision and transformers do; or to exactly `resize_hw`), centre crop to `crop`
  [H, W] (offsets rounded as torchvision, timm's pipeline, or floored as transformers),
  scale to [0, 1], normalise by mean/std. PIL resampling, as both use on PIL images."""
  crop: tuple[int, int]
  resize: int | None = None
  resize_hw: tuple[int, int] | None = None
  mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
  std: tuple[float, float, float] = (0.229, 0.224, 0.225)
  resample: str = "bicubic"
  crop_offset: str = "round"       # "round" (torchvision / timm) or "floor" (transformers)

  @classmethod
  def from_checkpoint(cls, checkpoint_dir: str) -> "ImageSpec":
    """From timm's `pretrained_cfg` (config.json) or HF's preprocessor_config.json."""
    config = models.hf.read_config(checkpoint_dir)
    timm = config.get("pretrained_cfg")
    if timm:
      # As timm's resolve_data_config does by default: the train-time input size and crop
      # (not test_input_size / test_crop_pct).
      _, h, w = timm["input_size"]
      pct = float(timm.get("crop_pct") or 0.875)
      if timm.get("crop_mode", "center") != "center":
        raise models.CheckpointError(f"{checkpoint_dir}: pretrained_cfg crop_mode "
                                     f"{timm['crop_mode']!r} is not supported (center)")
      return cls(crop=(h, w), resize=int(math.floor(h / pct)),
                 mean=tuple(timm.get("mean", cls.mean)), std=tuple(timm.get("std", cls.std)),
                 resample=timm.get("interpolation", "bicubic"))
    path = os.path.join(checkpoint_dir, "preprocessor_config.json")
    if not os.path.isfile(path):
      raise models.CheckpointError(f"{checkpoint_dir}: no preprocessor_config.json and no "
                                   f"timm pretrained_cfg: image preprocessing is unknown")
    with open(path) as f:
      p = json.load(f)
    size, crop = p.get("size") or {}, p.get("crop_size") or {}
    if isinstance(size, int):
      size = {"shortest_edge": size}
    if isinstance(crop, int):
      crop = {"height": crop, "width": crop}
    resample = {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(p.get("resample", 3), "bicubic")
    hw = (size["height"], size["width"]) if "height" in size else None
    if p.get("do_center_crop", True) and crop:
      crop_hw = (crop["height"], crop["width"])
    else:
      crop_hw = hw or (size["shortest_edge"],) * 2
    return cls(crop=crop_hw, resize=size.get("shortest_edge") if not hw else None, resize_hw=hw,
               mean=tuple(p.get("image_mean", cls.mean)), std=tuple(p.get("image_std", cls.std)),
               resample=resample, crop_offset="floor")

  def __call__(self, image) -> np.ndarray:
    """A PIL RGB image → float32 [3, H, W]."""
    from PIL import Image
    method = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR,
              "nearest": Image.NEAREST}[self.resample]
    if self.resize_hw is not None:
      image = image.resize((self.resize_hw[1], self.resize_hw[0]), method)
    elif self.resize is not None:
      w, h = image.size
      if w <= h:
        size = (self.resize, int(self.resize * h / w))
      else:
        size = (int(self.resize * w / h), self.resize)
      image = image.resize(size, method)
    w, h = image.size
    ch, cw = self.crop
    if self.crop_offset == "floor":
      left, top = (w - cw) // 2, (h - ch) // 2
    else:
      left, top = int(round((w - cw) / 2.0)), int(round((h - ch) / 2.0))
    image = image.crop((left, top, left + cw, top + ch))
    x = np.asarray(image, np.float32) / 255.0
    x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


# ---- pooling and losses (the protocol, as functions of hidden states) -------------------------

def vision_protocol(model):
  """(features [B, L, D] f32 from the hidden states, layer names, pooling) of a vision
  model: a ViT's CLS token after every block; a ResNet's last stage averaged over space; a
  video model's tokens (it has no class token) averaged after every block."""
  if isinstance(model, resnet.ResNet):
    return resnet.pooled, [str(model.config.num_layers)], "mean_over_space_last_stage"
  blocks = [str(i + 1) for i in range(model.config.num_layers)]
  if getattr(model.config, "tubelet_size", 0):
    return mean_per_block, blocks, "mean_over_tokens_per_block"
  return cls_per_block, blocks, "cls_per_block"


def mean_per_block(states) -> jax.Array:
  """Every block's output averaged over its tokens: [B, L, D] f32."""
  return jnp.stack([s.astype(jnp.float32).mean(axis=1) for s in states[1:]], axis=1)


def cls_per_block(states) -> jax.Array:
  """The CLS token (position 0) of every block's output (states[1:]): [B, L, D] f32."""
  return jnp.stack([s[:, 0] for s in states[1:]], axis=1).astype(jnp.float32)


def mean_pool(states, mask) -> jax.Array:
  """Each hidden state averaged over the real tokens (mask 1): [B, len(states), D] f32."""
  m = mask.astype(jnp.float32)[:, :, None]
  pooled = [jnp.sum(s.astype(jnp.float32) * m, axis=1) for s in states]
  return jnp.stack(pooled, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)[:, None, :]


def token_losses(logits, ids, mask):
  """Per caption: the summed next-token cross-entropy (nats) over predicted real tokens,
  and how many tokens were predicted."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  target = ids[:, 1:]
  nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
  counted = (mask[:, :-1] * mask[:, 1:]).astype(jnp.float32)
  return jnp.sum(nll * counted, axis=1), jnp.sum(counted, axis=1)


# ---- the extraction loop ---------------------------------------------------------------------

@dataclasses.dataclass
class Options:
  batch_size: int = 32
  dtype: str = "bfloat16"          # compute dtype
  store_dtype: str | None = None   # default: the compute dtype
  on_bad_image: str = "fail"       # "fail" | "skip" (any bad image, video or audio)
  on_empty_caption: str = "fail"   # "fail" | "skip" | "keep" (an empty string: BOS/EOS only)
  max_length: int | None = None    # tokens; None: no limit
  on_long_text: str = "fail"       # "fail" | "truncate" | "skip" (beyond max_length)
  bucket_window: int = 16          # batches sorted by length together
  chunk_rows: int | None = None    # store inner chunk rows (default: ~256 KB chunks)
  shard_rows: int | None = None    # store shard (default: from a 256 MB buffer budget)
  resume: bool = False
  overwrite: bool = False          # replace an existing store at `out` (else: an error)
  progress: bool = True
  model_parallel: int = 1          # devices each model is split across (tensor parallel)
  max_audio_seconds: float | None = None  # audio kept per clip (default: one model chunk)

  def identity(self) -> dict:
    """The options a store's rows depend on: a resumed run must use the same."""
    out = {k: getattr(self, k) for k in ("dtype", "on_bad_image", "on_empty_caption",
                                         "max_length", "on_long_text")}
    if self.max_audio_seconds is not None:  # (absent by default: earlier stores resume)
      out["max_audio_seconds"] = self.max_audio_seconds
    return out


def _mesh(model_parallel: int = 1):
  devices = jax.devices()
  if model_parallel < 1 or len(devices) % model_parallel:
    raise ValueError(f"model_parallel={model_parallel} must be a positive divisor of the "
                     f"{len(devices)} devices")
  return Mesh(np.array(devices).reshape(-1, model_parallel), ("data", "model"))


def _dtype(name: str):
  return {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}[name]


class _Skips:
  """Skipped row ids; `bad` raises instead when the policy is "fail"."""

  def __init__(self):
    self.ids = []

  def bad(self, record: datasets.Record, what: str, policy: str):
    if policy == "fail":
      raise ValueError(f"row id {record.row_id} ({record.source}): {what}")
    logging.warning("skipping row id %d (%s): %s", record.row_id, record.source, what)
    self.ids.append(int(record.row_id))


def _fingerprint(paths) -> str:
  """Names, sizes and modification times of files: what identifies a checkpoint's or a
  dataset's contents without reading them."""
  h = hashlib.sha256()
  for path in sorted(paths):
    st = os.stat(path)
    h.update(f"{os.path.basename(path)}:{st.st_size}:{st.st_mtime_ns};".encode())
  return h.hexdigest()[:16]


def _run_identity(checkpoint_dir: str, reader, dataset_name: str, opts: Options,
                  tower: str | None) -> dict:
  """What a store's rows depend on, recorded at creation and checked on resume."""
  if os.path.isfile(checkpoint_dir):
    files = [checkpoint_dir]
  else:
    names = os.listdir(checkpoint_dir)
    # torch.save weights count only where they are what loads (no safetensors beside them).
    weights = (".safetensors",) if any(n.endswith(".safetensors") for n in names) else \
        (".bin", ".pt", ".pth")
    files = [os.path.join(checkpoint_dir, f) for f in names
             if f.endswith((".json", ".model", ".txt", *weights))]
  data_files = getattr(reader, "files", None) or [getattr(reader, "path", None)]
  data_files = [f for f in data_files if f and os.path.isfile(f)]
  return {"model": os.path.abspath(checkpoint_dir), "model_files": _fingerprint(files),
          "dataset": dataset_name or str(getattr(reader, "path", getattr(reader, "files", ""))),
          "dataset_files": _fingerprint(data_files), "dataset_records": len(reader),
          "tower": tower, "store_dtype": opts.store_dtype or opts.dtype,
          "group_field": getattr(reader, "group_field", None),
          "protocol": "plato_jax.extract v1", "options": opts.identity()}


def _check_same_run(root: str, recorded: dict | None, now: dict) -> None:
  """ValueError naming every field where a resumed run differs from the store's."""
  if recorded is None:
    raise ValueError(f"store {root} records no extraction run (made by another writer): "
                     f"it cannot be resumed by extract")
  diff = [f"{k}: store has {recorded.get(k)!r}, this run {v!r}" for k, v in now.items()
          if recorded.get(k) != v]
  if diff:
    raise ValueError(f"store {root} was extracted by another run; resuming would mix "
                     f"features ({'; '.join(diff)})")


def extract(checkpoint_dir: str, dataset, out: str, opts: Options = Options(), *,
            tower: str | None = None, modality: str | None = None, dataset_name: str = ""):
  """Extracts `dataset` (a reader of `plato_jax.data`, or a path) with the checkpoint into
  the store at `out`; returns the opened FeatureStore.

  An existing store at `out` is an error unless `opts.resume` (continue it: the same model
  files, dataset, dtype and options, else an error naming what differs) or
  `opts.overwrite` (replace it) — checked before the model loads."""
  reader = datasets.open_dataset(dataset) if isinstance(dataset, str) else dataset
  identity = _run_identity(checkpoint_dir, reader, dataset_name, opts, tower)
  resuming = opts.resume and store_exists(out)
  if resuming:
    writer = StoreWriter.resume(out, from_note=True)
    try:
      _check_same_run(writer.root, writer.meta.get("run"), identity)
    except ValueError:
      writer.release()
      raise
  elif store_exists(out) and not opts.overwrite:
    raise ValueError(f"a feature store exists at {out}: pass resume to continue it (the same "
                     f"run) or overwrite to replace it")
  dtype = _dtype(opts.dtype)
  mesh = _mesh(opts.model_parallel)
  model = models.from_pretrained(checkpoint_dir, dtype=dtype, tower=tower, mesh=mesh)
  if modality is None:
    modality = "vision" if type(model).__name__ in ("Vit", "ResNet") else "text"
    if getattr(model.config, "tubelet_size", 0):
      modality = "video"
    if isinstance(model, dasheng.Dasheng):
      modality = "audio"
  if modality != "text" and hasattr(reader, "prefer"):  # (a sample's clip, not its thumbnail)
    reader.prefer({"vision": "image"}.get(modality, modality))
  ndev = mesh.shape["data"]
  batch = -(-opts.batch_size // ndev) * ndev
  graphdef, params = nnx.split(model)
  split = NamedSharding(mesh, P("data"))
  skips = _Skips()
  total = len(reader)

  if modality in ("vision", "video"):
    spec = ImageSpec.from_checkpoint(checkpoint_dir)
    features, layer_names, pooling = vision_protocol(model)
    frames = model.config.num_frames if modality == "video" else 0

    @jax.jit
    def run(params, pixels):
      return features(nnx.merge(graphdef, params)(pixels.astype(dtype)))

    layers, columns = len(layer_names), {}
    batches = _pixel_batches(reader, spec, frames, batch, skips, opts)
  elif modality == "audio":

    @jax.jit
    def run(params, audio, lengths):
      states, real = nnx.merge(graphdef, params)(audio, lengths)
      return mean_pool(states[1:], real)

    layers, columns = model.config.num_layers, {}
    layer_names = [str(i + 1) for i in range(layers)]
    pooling = "mean_over_tokens_per_block"
    batches = _audio_batches(reader, model, batch, skips, opts)
  else:
    tokenizer = load_tokenizer(checkpoint_dir)
    has_head = getattr(model.config, "head", "none") != "none"

    @jax.jit
    def run(params, ids, mask):
      m = nnx.merge(graphdef, params)
      states = m(ids, mask)
      pooled = mean_pool(states, mask)
      if not has_head:
        return pooled, jnp.zeros(ids.shape[:1]), jnp.zeros(ids.shape[:1])
      return (pooled, *token_losses(m.logits(states[-1]), ids, mask))

    layers = model.config.num_layers + 1
    layer_names, pooling = [str(i) for i in range(layers)], "mean_over_tokens"
    columns = {"loss": "float32", "bits_per_byte": "float32"} if has_head else {}
    batches = _text_batches(reader, tokenizer, batch, skips, opts)
  if getattr(reader, "group_field", None) is not None:
    columns["group"] = "int64"  # each row's source, for many-to-many alignment
  dim = model.config.hidden_size if hasattr(model.config, "hidden_size") else \
      model.config.block.hidden_size

  if resuming:
    note = writer.meta.get("note") or {"consumed": 0, "skipped": []}
    skips.ids = list(note["skipped"])
  else:
    writer = StoreWriter.create(
        out, num_rows=total, num_layers=layers, dim=dim,
        dtype=opts.store_dtype or opts.dtype, model=identity["model"],
        dataset=identity["dataset"],
        pooling=pooling, layers=layer_names,
        columns=columns, overwrite=True, chunk_rows=opts.chunk_rows,
        shard_rows=opts.shard_rows,
        extra={"modality": modality, "protocol": identity["protocol"], "run": identity})
    note = {"consumed": 0, "skipped": []}
  meter = Progress(total, initial=note["consumed"], label=f"extract {modality}",
                   enabled=opts.progress)
  pending = None
  for chunk in batches(note["consumed"]):
    # Dispatched asynchronously; the previous chunk is written while these run.
    results = [run(params, *(jax.device_put(v, split) for v in arrays.values()))
               for arrays in chunk.batches]
    if pending is not None:
      _write(writer, *pending, skips)
    pending = (chunk, results)
    meter.update(chunk.consumed_now)
  if pending is not None:
    _write(writer, *pending, skips)
  meter.close()
  writer.meta["skipped_ids"] = skips.ids
  return writer.close(allow_fewer=True)


@dataclasses.dataclass
class _Chunk:
  """Device batches whose real rows, put back in dataset order, are appended together."""
  batches: list           # per batch: {name: host array}, batch axis padded to full size
  slots: list             # per batch: each real slot's index in the chunk's dataset order
  ids: np.ndarray         # row ids, dataset order
  groups: list            # each row's group (None without a group field), dataset order
  nbytes: np.ndarray      # caption bytes (text), dataset order
  consumed: int           # records consumed once this chunk is written (resume point)
  consumed_now: int


def _write(writer, chunk: _Chunk, results, skips: _Skips):
  if not results:  # only skipped records: nothing to append (a rerun skips them again)
    return
  if not isinstance(results[0], tuple):
    results = [(r,) for r in results]
  parts = [[np.asarray(x)[:len(slots)] for x in r] for r, slots in zip(results, chunk.slots)]
  where = np.argsort(np.concatenate(chunk.slots))
  pooled = np.concatenate([p[0] for p in parts])[where]
  columns = {}
  if "group" in writer.meta.get("columns", []):
    columns["group"] = np.asarray(chunk.groups, np.int64)
  if "loss" in writer.meta.get("columns", []):
    loss_sum = np.concatenate([p[1] for p in parts])[where]
    count = np.maximum(np.concatenate([p[2] for p in parts])[where], 1)
    columns.update(loss=loss_sum / count,
                   bits_per_byte=loss_sum / math.log(2) / np.maximum(chunk.nbytes, 1))
  writer.append(pooled, chunk.ids, columns,
                note={"consumed": chunk.consumed, "skipped": list(skips.ids)})
  writer.commit(wait_all=False)  # durable progress chunk by chunk (one write left in flight)


def _media_batches(reader, load, stack, what: str, batch: int, skips: _Skips, opts: Options):
  """Chunks of one batch of decoded media: `load(record)` → an array, or None for a bad
  record (its reason from `load.why`); `stack(arrays)` → the batch's {name: host array},
  padded to `batch` rows."""

  def chunk(items, kept, consumed, start):
    return _Chunk([stack(items)], [np.arange(len(kept))],
                  np.asarray([r.row_id for r in kept], np.int64), [r.group for r in kept],
                  np.zeros(len(kept)), consumed, consumed - start)

  def gen(start: int) -> Iterator[_Chunk]:
    items, kept, consumed = [], [], start
    for record in reader.records(start):
      consumed += 1
      x = load(record) if record.media is not None else None
      if x is None:
        skips.bad(record, f"missing or unreadable {what}{load.why}", opts.on_bad_image)
      else:
        items.append(x)
        kept.append(record)
      if len(items) == batch:
        yield chunk(items, kept, consumed, start)
        start, items, kept = consumed, [], []
    if consumed > start:
      yield chunk(items, kept, consumed, start)
  return gen


def _pixel_batches(reader, spec: ImageSpec, frames: int, batch: int, skips: _Skips,
                   opts: Options):
  """Batches {"pixels": [B, 3, H, W]}, or with `frames` > 0 of videos [B, frames, 3, H, W]
  (frames sampled as `datasets.video_frame_indices`, each preprocessed as an image)."""
  shape = (frames, 3, *spec.crop) if frames else (3, *spec.crop)

  def load(record):
    if frames:
      clip = datasets.decode_video(record.media, frames)
      return None if clip is None else np.stack([spec(f) for f in clip])
    image = datasets.decode_image(record.media)
    return None if image is None else spec(image)
  load.why = f" (or fewer than {frames} frames)" if frames else ""

  def stack(pixels):
    x = np.zeros((batch, *shape), np.float32)
    if pixels:
      x[:len(pixels)] = np.stack(pixels)
    return {"pixels": x}
  return _media_batches(reader, load, stack, "video" if frames else "image", batch, skips,
                        opts)


def audio_seconds(model, opts: Options) -> float:
  """The longest audio an extraction keeps: `opts.max_audio_seconds`, by default one chunk
  of the model (Dasheng: target_length frames, 10.08 s)."""
  c = model.config
  if opts.max_audio_seconds is not None and not opts.max_audio_seconds > 0:
    raise ValueError(f"max_audio_seconds={opts.max_audio_seconds} must be positive")
  return opts.max_audio_seconds or c.target_length * c.hop_size / c.sample_rate


def _audio_batches(reader, model, batch: int, skips: _Skips, opts: Options):
  """Batches {"audio": [B, S], "lengths": [B]}: clips at the model's rate, each cut to
  `audio_seconds`, padded to one of eight lengths up to that (few shapes to compile)."""
  c = model.config
  seconds = audio_seconds(model, opts)
  longest = math.ceil(seconds * c.sample_rate)
  step, shortest = -(-longest // 8), dasheng.min_samples(c)
  cut = [0]

  def load(record):
    decoded = datasets.decode_audio(record.media, c.sample_rate, seconds)
    if decoded is None or len(decoded[0]) < shortest:
      return None
    cut[0] += decoded[1] > seconds
    return decoded[0]
  load.why = f" (or shorter than {1000 * shortest / c.sample_rate:g} ms)"

  def stack(clips):
    size = min(longest, -(-max([len(a) for a in clips] or [1]) // step) * step)
    x = np.zeros((batch, size), np.float32)
    lengths = np.full((batch,), size, np.int32)  # (empty slots: any valid length)
    for i, a in enumerate(clips):
      x[i, :len(a)], lengths[i] = a, len(a)
    return {"audio": x, "lengths": lengths}

  gen = _media_batches(reader, load, stack, "audio", batch, skips, opts)

  def counted(start: int) -> Iterator[_Chunk]:
    yield from gen(start)
    if cut[0]:
      logging.info("%d clips longer than %g s: their first %g s extracted", cut[0], seconds,
                   seconds)
  return counted


def load_tokenizer(checkpoint_dir: str):
  """The checkpoint's tokenizer, left padding, pad = eos when it has no pad token."""
  from transformers import AutoTokenizer
  try:
    tok = AutoTokenizer.from_pretrained(checkpoint_dir)
  except (OSError, ValueError) as e:
    raise models.CheckpointError(f"{checkpoint_dir}: cannot load a tokenizer ({e})") from None
  tok.padding_side = "left"
  if tok.pad_token is None:
    if tok.eos_token is None:
      raise models.CheckpointError(f"{checkpoint_dir}: the tokenizer has neither a pad nor "
                                   f"an eos token")
    tok.pad_token = tok.eos_token
  return tok


def _bucket(length: int) -> int:
  """Padded length: a multiple of 16 up to 128, then of 64 (few shapes to compile)."""
  step = 16 if length <= 128 else 64
  return max(step, -(-length // step) * step)


def _text_batches(reader, tokenizer, batch: int, skips: _Skips, opts: Options):
  pad = tokenizer.pad_token_id

  def encode(record):
    caption = record.caption
    if caption is None or not str(caption).strip():
      if opts.on_empty_caption != "keep":
        skips.bad(record, "empty caption", opts.on_empty_caption)
        return None
      caption = "" if caption is None else str(caption)
    ids = tokenizer(str(caption))["input_ids"]
    if opts.max_length is not None and len(ids) > opts.max_length:
      if opts.on_long_text == "truncate":
        ids = ids[:opts.max_length]
      else:
        skips.bad(record, f"{len(ids)} tokens > max_length {opts.max_length}", opts.on_long_text)
        return None
    if not ids:
      skips.bad(record, "the caption encodes to no tokens", "fail")
    return record.row_id, ids, len(str(caption).encode("utf-8")), record.group

  def window_chunk(window, consumed, start):
    """The window's rows sorted by length into batches (padded to a bucket length)."""
    order = sorted(range(len(window)), key=lambda i: len(window[i][1]))
    batches, slots = [], []
    for g in range(0, len(order), batch):
      group = order[g:g + batch]
      t = _bucket(max(len(window[i][1]) for i in group))
      ids = np.full((batch, t), pad, np.int32)
      mask = np.zeros((batch, t), np.int32)
      for slot, i in enumerate(group):
        toks = window[i][1]
        ids[slot, t - len(toks):] = toks
        mask[slot, t - len(toks):] = 1
      batches.append({"ids": ids, "mask": mask})
      slots.append(np.asarray(group))
    return _Chunk(batches, slots, np.asarray([w[0] for w in window], np.int64),
                  [w[3] for w in window], np.asarray([w[2] for w in window], np.float64),
                  consumed, consumed - start)

  def gen(start: int) -> Iterator[_Chunk]:
    window, consumed = [], start
    for record in reader.records(start):
      consumed += 1
      item = encode(record)
      if item is not None:
        window.append(item)
      if len(window) == batch * opts.bucket_window:
        yield window_chunk(window, consumed, start)
        window, start = [], consumed
    if window or consumed > start:
      if window:
        yield window_chunk(window, consumed, start)
      else:  # only skipped records: record the resume point anyway
        yield _Chunk([], [], np.zeros(0, np.int64), [], np.zeros(0), consumed, consumed - start)
  return gen
