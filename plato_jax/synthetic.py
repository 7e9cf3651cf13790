"""The built-in synthetic world: two "modalities" that share coarse concepts, not fine detail.

Generative model (every row i independent; all draws standard normal unless stated):

    concept   c_i ~ Uniform{0..num_concepts-1},  centre mu_c in R^16       (shared)
    detail    u_i in R^shared_dims                                          (shared)
    own       e_i^m in R^own_dims, one per modality m in {a, b}             (not shared)
    latent    z_i^m = [concept_scale * mu_c, shared_scale * u_i, own_scale * e_i^m]
    layer l   x_i^{m,l} = W^{m,l} z_i^m + noise_l * n_i^{m,l},   n ~ N(0, I_D)

W^{m,l} are fixed random maps to D_m dims. The layer noise is smallest at one "best" layer
per modality (the last of a, the second-to-last of b) and grows linearly away from it, so a
layer search has something to find.

Why this reproduces the papers' picture: nearest neighbours in each modality are first
decided by the shared concept, then, among the ~n/num_concepts rows of that concept, by a
distance that mixes the shared detail u with the modality's own e. With few rows (n ≈ 1K)
the handful of same-concept rows are told apart mostly by u, so the two modalities agree on
many neighbours; as n grows the nearest rows are decided by ever finer differences where e
dominates, and fixed-k agreement collapses towards chance — while k = n/100 (about one
concept's worth of rows) keeps agreeing on the coarse structure. Nothing about the curve is
prescribed; it follows from these parameters.

Rows are generated in blocks from per-block random streams, so any block can be rebuilt
alone and a world of any size streams into a store without being held in memory.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import itertools
import json
import multiprocessing
import os

import numpy as np

from plato_jax.progress import Progress
from plato_jax.store import FeatureStore, StoreWriter

BLOCK_ROWS = 8192
DEFAULT_ROWS = 200_000  # the experiments' default world (experiments.scaling's gallery)
MODALITIES = "abcd"     # vision, language; video and audio (experiments.other_modalities)


@dataclasses.dataclass(frozen=True)
class WorldConfig:
  num_concepts: int = 100
  concept_dims: int = 16
  shared_dims: int = 16
  own_dims: int = 32
  concept_scale: float = 1.25
  shared_scale: float = 0.8
  own_scale: float = 1.0
  # Per modality: a ("vision"), b ("language"), and the optional c ("video"), d ("audio").
  dims: tuple[int, ...] = (64, 96, 48, 40)
  layers: tuple[int, ...] = (6, 8, 4, 6)
  best_layer: tuple[int, ...] = (-1, -2, -1, -1)
  noise_min: float = 0.15
  noise_max: float = 1.2
  seed: int = 0

  def fingerprint(self) -> str:
    return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
                          ).hexdigest()[:12]


class World:
  """The fixed parts of a world (concept centres, layer maps) and its row generator."""

  def __init__(self, config: WorldConfig = WorldConfig()):
    self.config = c = config
    rng = np.random.default_rng([c.seed, 0])
    self.centres = rng.standard_normal((c.num_concepts, c.concept_dims))
    latent = c.concept_dims + c.shared_dims + c.own_dims
    self.maps, self.noise = [], []
    for m in range(len(c.dims)):  # (a and b first: their maps do not depend on c and d)
      maps = rng.standard_normal((c.layers[m], latent, c.dims[m])) / np.sqrt(latent)
      best = c.best_layer[m] % c.layers[m]
      spread = np.abs(np.arange(c.layers[m]) - best) / max(1, c.layers[m] - 1)
      self.maps.append(maps.astype(np.float32))
      self.noise.append((c.noise_min + (c.noise_max - c.noise_min) * spread).astype(np.float32))

  def model(self, modality: int, model: int):
    """(maps [L, latent, D], per-layer noise [L]) of one model of a modality: model 0 is the
    world's own; others draw their maps from their own stream, with the same noise profile
    (the same best layer)."""
    if model == 0:
      return self.maps[modality], self.noise[modality]
    c = self.config
    latent = c.concept_dims + c.shared_dims + c.own_dims
    rng = np.random.default_rng([c.seed, 10 + modality, model])
    maps = rng.standard_normal((c.layers[modality], latent, c.dims[modality])) / np.sqrt(latent)
    return maps.astype(np.float32), self.noise[modality]

  def block(self, index: int, rows: int = BLOCK_ROWS, models=((0, 0, 1.0), (1, 0, 1.0)),
            item: int = 0):
    """Rows [index*BLOCK_ROWS, +rows): (concepts [r], one feature array [r, L, D] per entry
    (modality, model, quality) of `models`). A model's layer noise is its modality's
    profile divided by its quality (model 0 has quality 1: the world's own stores).
    `item` > 0: another item of the same sources (another image of the same prompt): the
    same concept and shared detail, its own modality-specific latent and noise."""
    c = self.config
    shared = np.random.default_rng([c.seed, 1, index])
    concepts = shared.integers(0, c.num_concepts, rows)
    detail = shared.standard_normal((rows, c.shared_dims))
    latents, streams = {}, {}
    for m in sorted({m for m, _, _ in models}):
      streams[m] = own = np.random.default_rng(
          [c.seed, 2 + m, index] if item == 0 else [c.seed, 30 + m, item, index])
      latents[m] = np.concatenate([
          c.concept_scale * self.centres[concepts], c.shared_scale * detail,
          c.own_scale * own.standard_normal((rows, c.own_dims))], axis=1).astype(np.float32)
    out = []
    for m, j, quality in models:
      if j == 0 and quality != 1.0:
        raise ValueError("model 0 is the world's own model: its quality is 1")
      maps, noise = self.model(m, j)
      x = np.einsum("rz,lzd->rld", latents[m], maps)
      draws = streams[m] if j == 0 else np.random.default_rng([c.seed, 20 + m, j, index])
      x += (noise / np.float32(quality))[None, :, None] * draws.standard_normal(
          x.shape, dtype=np.float32)
      out.append(x)
    return (concepts, *out)


def build_world(directory: str, num_rows: int, config: WorldConfig = WorldConfig(), *,
                dtype: str = "bfloat16", progress: bool = True, workers: int | None = None
                ) -> tuple[FeatureStore, FeatureStore]:
  """Writes (once; later calls reuse it) the two modalities' stores under `directory`;
  `workers` processes generate the rows (default: see `_blocks`). Each store has a "label"
  column: the row's concept (its class).

  Store paths depend on the config and size, so a changed world never reuses a stale one.
  An interrupted build resumes where its stores' durable rows end.
  """
  root = world_root(directory, num_rows, config, dtype)
  return _build([os.path.join(root, name) for name in ("a", "b")],
                ((0, 0, 1.0), (1, 0, 1.0)), num_rows, config, dtype, progress, workers)


def build_model(directory: str, num_rows: int, modality: int, model: int, quality: float = 1.0,
                config: WorldConfig = WorldConfig(), *, dtype: str = "bfloat16",
                progress: bool = True, workers: int | None = None) -> FeatureStore:
  """Another model of one modality of the same world (same rows and ids): its own random
  maps, its layer noise divided by `quality` — a family of models of graded quality.
  Model 0 with quality 1 is the world's own store."""
  if model < 0 or quality <= 0:
    raise ValueError(f"model must be >= 0 and quality > 0, got {model}, {quality}")
  root = world_root(directory, num_rows, config, dtype)
  if not 0 <= modality < len(config.dims):
    raise ValueError(f"modality {modality}: this world has {MODALITIES[:len(config.dims)]}")
  name = MODALITIES[modality] if model == 0 else f"{MODALITIES[modality]}{model}-q{quality:g}"
  return _build([os.path.join(root, name)], ((modality, model, float(quality)),), num_rows,
                config, dtype, progress, workers)[0]


def build_items(directory: str, num_rows: int, modality: int, items: int,
                config: WorldConfig = WorldConfig(), *, dtype: str = "bfloat16",
                progress: bool = True, workers: int | None = None) -> FeatureStore:
  """`items` items per source of one modality (the world's rows are the sources): several
  images of one prompt, or several captions of one image (the many-to-many experiments).
  Rows are item-major — every source's item 0 (the world's own row, same id), then every
  source's item 1, … — with id = item · num_rows + source and a "group" column holding the
  source id, so the first m · num_rows rows hold m items of every source."""
  if items < 1:
    raise ValueError(f"items must be >= 1, got {items}")
  root = world_root(directory, num_rows, config, dtype)
  return _build([os.path.join(root, f"{MODALITIES[modality]}-items{items}")],
                ((modality, 0, 1.0),), num_rows, config, dtype, progress, workers, items)[0]


def world_root(directory: str, num_rows: int, config: WorldConfig, dtype: str) -> str:
  return os.path.join(directory, f"world-v4-{config.fingerprint()}-{num_rows}-{dtype}")


def _build(paths, models, num_rows, config, dtype, progress, workers, items: int = 1):
  try:
    return tuple(FeatureStore.open(p) for p in paths)
  except ValueError:
    pass
  writers = []
  columns = {"label": "int64", **({"group": "int64"} if items > 1 else {})}
  for path, (m, j, quality) in zip(paths, models):
    try:
      writers.append(StoreWriter.resume(path))
    except ValueError:
      writers.append(StoreWriter.create(
          path, num_rows=num_rows * items, num_layers=config.layers[m], dim=config.dims[m],
          dtype=dtype, model=f"synthetic-{MODALITIES[m]}" + (f"{j}-q{quality:g}" if j else ""),
          dataset=f"synthetic-world-{config.fingerprint()}", pooling="none", overwrite=True,
          shard_rows=BLOCK_ROWS * 4, columns=columns,
          extra={"world": dataclasses.asdict(config), "modality": MODALITIES[m], "model_index": j,
                 "quality": quality, "items_per_source": items}))
  # Work units, item-major: (item, block index, first row); the stores restart at the
  # last unit boundary their durable rows reach.
  blocks = -(-num_rows // BLOCK_ROWS)
  units = [(item, index, item * num_rows + index * BLOCK_ROWS)
           for item in range(items) for index in range(blocks)]
  durable = min(w.rows_written for w in writers)
  first = max(u for u, (_, _, row) in enumerate(units) if row <= durable)
  for w in writers:
    w.position = w.rows_written = units[first][2]
  meter = Progress(num_rows * items, initial=units[first][2], label="synthetic world",
                   enabled=progress)
  todo = units[first:]
  made = _blocks(config, models, [(item, index) for item, index, _ in todo], num_rows, workers)
  for (item, index, row), (concepts, *features) in zip(todo, made):
    rows = concepts.shape[0]
    sources = np.arange(index * BLOCK_ROWS, index * BLOCK_ROWS + rows)
    cols = {"label": concepts, **({"group": sources} if items > 1 else {})}
    for w, x in zip(writers, features):
      w.append(x, item * num_rows + sources, columns=cols)
    meter.update(rows, sum(x.nbytes for x in features))
  meter.close()
  return tuple(w.close() for w in writers)


@functools.lru_cache(maxsize=4)
def _world(config: WorldConfig) -> "World":
  return World(config)


def _block(config: WorldConfig, models, unit, num_rows: int):
  item, index = unit
  return _world(config).block(index, min(BLOCK_ROWS, num_rows - index * BLOCK_ROWS), models,
                              item)


def _blocks(config: WorldConfig, models, units, num_rows: int, workers: int | None):
  """The blocks in order, made by `workers` processes (default: one per core, up to 16,
  for worlds of 64+ blocks); a block is ~0.3 s of one core's numpy work, which one process
  could not keep up with on a large host (22k rows/s measured)."""
  if workers is None:
    workers = min(16, os.cpu_count() or 1) if len(units) >= 64 else 1
  if workers <= 1:
    yield from (_block(config, models, u, num_rows) for u in units)
    return
  # Spawned, not forked: the parent may hold JAX's and BLAS's threads.
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
    pending = collections.deque()
    todo = iter(units)
    for i in itertools.islice(todo, 2 * workers):
      pending.append(pool.submit(_block, config, models, i, num_rows))
    while pending:
      block = pending.popleft().result()
      for i in itertools.islice(todo, 1):
        pending.append(pool.submit(_block, config, models, i, num_rows))
      yield block


# ---- a synthetic image–caption pool (gallery construction) --------------------------------------

def build_image_pool(directory: str, rows: int = 3000, queries: int = 128,
                     seed: int = 0) -> tuple[str, str]:
  """(pool, queries): two parquet datasets (`image` PNG bytes, `caption`, `id`) for
  `experiments.build_gallery` without data. Images are smooth random patterns (distinct
  pHashes); the pool plants what deduplication must find — copies of query images, copies
  and lightly noised copies of earlier pool images, repeated captions (some the queries'),
  and a few unreadable images. Written once per (rows, queries, seed)."""
  import io

  import pyarrow as pa
  import pyarrow.parquet as pq
  from PIL import Image
  root = os.path.join(directory, f"image_pool-{rows}-{queries}-{seed}")
  paths = os.path.join(root, "pool.parquet"), os.path.join(root, "queries.parquet")
  if all(os.path.isfile(p) for p in paths):
    return paths
  rng = np.random.default_rng(seed)

  def pattern():
    small = rng.integers(0, 256, (6, 6, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((48, 48), Image.Resampling.BICUBIC))

  def png(pixels):
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()

  words = [f"w{i}" for i in range(400)]

  def caption():
    return " ".join(rng.choice(words, int(rng.integers(3, 9))))

  q_pixels = [pattern() for _ in range(queries)]
  q_captions = [caption() for _ in range(queries)]
  pixels, captions = [], []
  for i in range(rows):
    kind = rng.random()
    if kind < 0.02:                                   # a query's image
      p = q_pixels[int(rng.integers(queries))]
    elif kind < 0.15 and pixels:                       # an earlier pool image
      p = pixels[int(rng.integers(len(pixels)))]
    elif kind < 0.22 and pixels:                       # ... lightly noised
      base = pixels[int(rng.integers(len(pixels)))].astype(np.int16)
      p = np.clip(base + rng.integers(-2, 3, base.shape), 0, 255).astype(np.uint8)
    else:
      p = pattern()
    pixels.append(p)
    c = rng.random()
    captions.append(q_captions[int(rng.integers(queries))] if c < 0.01 else
                    captions[int(rng.integers(len(captions)))] if c < 0.08 and captions else
                    caption())
  images = [png(p) for p in pixels]
  for i in rng.choice(rows, max(1, rows // 500), replace=False):
    images[i] = b"not an image"
  os.makedirs(root, exist_ok=True)
  for path, imgs, caps, first_id in ((paths[0], images, captions, 0),
                                     (paths[1], [png(p) for p in q_pixels], q_captions,
                                      10**9)):
    table = pa.table({"image": imgs, "caption": caps,
                      "id": np.arange(first_id, first_id + len(imgs), dtype=np.int64)})
    pq.write_table(table, path + ".tmp", row_group_size=1024)
    os.replace(path + ".tmp", path)
  return paths
