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
prescribed; it follows from these parameters (PAPERS.md §2.6 for the real numbers).

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


@dataclasses.dataclass(frozen=True)
class WorldConfig:
  num_concepts: int = 100
  concept_dims: int = 16
  shared_dims: int = 16
  own_dims: int = 32
  concept_scale: float = 1.25
  shared_scale: float = 0.8
  own_scale: float = 1.0
  dims: tuple[int, int] = (64, 96)      # D of modality a ("vision"), b ("language")
  layers: tuple[int, int] = (6, 8)
  best_layer: tuple[int, int] = (-1, -2)
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
    for m in range(2):
      maps = rng.standard_normal((c.layers[m], latent, c.dims[m])) / np.sqrt(latent)
      best = c.best_layer[m] % c.layers[m]
      spread = np.abs(np.arange(c.layers[m]) - best) / max(1, c.layers[m] - 1)
      self.maps.append(maps.astype(np.float32))
      self.noise.append((c.noise_min + (c.noise_max - c.noise_min) * spread).astype(np.float32))

  def block(self, index: int, rows: int = BLOCK_ROWS):
    """Rows [index*BLOCK_ROWS, +rows): (concepts [r], features a [r, La, Da], b [r, Lb, Db])."""
    c = self.config
    shared = np.random.default_rng([c.seed, 1, index])
    concepts = shared.integers(0, c.num_concepts, rows)
    detail = shared.standard_normal((rows, c.shared_dims))
    out = []
    for m in range(2):
      own = np.random.default_rng([c.seed, 2 + m, index])
      z = np.concatenate([c.concept_scale * self.centres[concepts], c.shared_scale * detail,
                          c.own_scale * own.standard_normal((rows, c.own_dims))], axis=1)
      x = np.einsum("rz,lzd->rld", z.astype(np.float32), self.maps[m])
      x += self.noise[m][None, :, None] * own.standard_normal(x.shape, dtype=np.float32)
      out.append(x)
    return concepts, out[0], out[1]


def build_world(directory: str, num_rows: int, config: WorldConfig = WorldConfig(), *,
                dtype: str = "bfloat16", progress: bool = True, workers: int | None = None
                ) -> tuple[FeatureStore, FeatureStore]:
  """Writes (once; later calls reuse it) the two modalities' stores under `directory`;
  `workers` processes generate the rows (default: see `_blocks`).

  Store paths depend on the config and size, so a changed world never reuses a stale one.
  An interrupted build resumes where its stores' durable rows end.
  """
  root = os.path.join(directory, f"world-{config.fingerprint()}-{num_rows}-{dtype}")
  paths = [os.path.join(root, name) for name in ("a", "b")]
  try:
    return tuple(FeatureStore.open(p) for p in paths)  # type: ignore[return-value]
  except ValueError:
    pass
  writers = []
  for m, path in enumerate(paths):
    try:
      writers.append(StoreWriter.resume(path))
    except ValueError:
      writers.append(StoreWriter.create(
          path, num_rows=num_rows, num_layers=config.layers[m], dim=config.dims[m], dtype=dtype,
          model=f"synthetic-{'ab'[m]}", dataset=f"synthetic-world-{config.fingerprint()}",
          pooling="none", overwrite=True, chunk_rows=4096, shard_rows=BLOCK_ROWS * 4,
          extra={"world": dataclasses.asdict(config)}))
  # Both stores restart from the smaller durable count, on a block boundary.
  start = min(w.rows_written for w in writers) // BLOCK_ROWS * BLOCK_ROWS
  for w in writers:
    w.position = w.rows_written = start
  meter = Progress(num_rows, initial=start, label="synthetic world", enabled=progress)
  indices = range(start // BLOCK_ROWS, -(-num_rows // BLOCK_ROWS))
  for index, (_, a, b) in zip(indices, _blocks(config, indices, num_rows, workers)):
    rows = a.shape[0]
    ids = np.arange(index * BLOCK_ROWS, index * BLOCK_ROWS + rows)
    for w, x in zip(writers, (a, b)):
      w.append(x, ids)
    meter.update(rows, a.nbytes + b.nbytes)
  meter.close()
  return tuple(w.close() for w in writers)  # type: ignore[return-value]


@functools.lru_cache(maxsize=4)
def _world(config: WorldConfig) -> "World":
  return World(config)


def _block(config: WorldConfig, index: int, num_rows: int):
  return _world(config).block(index, min(BLOCK_ROWS, num_rows - index * BLOCK_ROWS))


def _blocks(config: WorldConfig, indices, num_rows: int, workers: int | None):
  """The blocks in order, made by `workers` processes (default: one per core, up to 16,
  for worlds of 64+ blocks); a block is ~0.3 s of one core's numpy work, which one process
  could not keep up with on a large host (22k rows/s measured)."""
  if workers is None:
    workers = min(16, os.cpu_count() or 1) if len(indices) >= 64 else 1
  if workers <= 1:
    yield from (_block(config, i, num_rows) for i in indices)
    return
  # Spawned, not forked: the parent may hold JAX's and BLAS's threads.
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
    pending = collections.deque()
    todo = iter(indices)
    for i in itertools.islice(todo, 2 * workers):
      pending.append(pool.submit(_block, config, i, num_rows))
    while pending:
      block = pending.popleft().result()
      for i in itertools.islice(todo, 1):
        pending.append(pool.submit(_block, config, i, num_rows))
      yield block
