"""The outlier clamp at scale: PRH's `remove_outliers` (q = 0.95) with one threshold per model
over the whole gallery, found by streaming the store, and the gallery sources that apply it.

PRH clamps each model's features to ±t before the row norms, t from the whole [N, L, D]
tensor of the model (all layers together):
- exact: t = sort(|x|.ravel())[int(q·numel)], no interpolation;
- approx: the mean over rows of each row's linearly interpolated q-quantile of its L·D
  values (torch.quantile; the reference's CLI default).
`metrics.prepare_features` does this for arrays in memory. At scale the tensor is the
largest gallery's rows, every layer (`gallery_threshold`): no sort of n × L × D values. A
non-negative float's order is its bits' order, so the exact quantile is found by counting
bit patterns: bf16/f16 in one pass of 2^15 bins; f32 in two, the upper 16 bits first, then
the lower 16 of the values in the chosen bin. The approximate one is a sum of per-row
quantiles, one pass. Koepke et al. do not say whether they clamp at scale (and the smallest
gallery's threshold is then the largest's, not one from its own 1,024 rows): it is an
option, `none` by default.

`ClampedLayer` is one layer clamped; `ConcatenatedLayers` is PRH's concatenation candidate:
every layer clamped, each row unit-normalised per layer, side by side.
"""
from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np

from plato_jax.knn.sources import digest
from plato_jax.progress import Progress

CLAMPS = ("none", "exact", "approx")
CONCAT = "concat"  # the layer name of the concatenation candidate
QUANTILE = 0.95
_BLOCK_BYTES = 64 * 2**20
# Bits of |x| of each float dtype, and how many histogram passes find a quantile.
_ABS_BITS = {np.dtype(ml_dtypes.bfloat16): (np.uint16, 0x7FFF),
             np.dtype(np.float16): (np.uint16, 0x7FFF),
             np.dtype(np.float32): (np.uint32, 0x7FFFFFFF)}


def gallery_threshold(store, rows, how: str, q: float = QUANTILE,
                      progress: bool = False) -> float | None:
  """The clamp threshold t of `store` over the values of its `rows` (every layer), `how` =
  "exact" or "approx" (module docstring); None for "none"."""
  if how not in CLAMPS:
    raise ValueError(f"clamp must be one of {CLAMPS}, got {how!r}")
  if how == "none":
    return None
  if not 0 < q < 1:
    raise ValueError(f"the clamp's quantile must lie in (0, 1), got {q}")
  rows = np.unique(np.asarray(rows, np.int64))
  dtype = np.dtype(store.dtype)
  if dtype not in _ABS_BITS:
    raise ValueError(f"store {store.root}: no clamp for dtype {dtype}")
  blocks = _blocks(store, rows)
  if how == "approx":
    total = 0.0
    for x in _values(store, rows, blocks, progress, "clamp (approx)"):
      total += np.quantile(np.abs(x.astype(np.float32)), q, axis=1).sum(dtype=np.float64)
    return float(np.float32(total / len(rows)))
  uint, mask = _ABS_BITS[dtype]
  numel = len(rows) * store.num_layers * store.dim
  at = min(int(q * numel), numel - 1)  # the reference's index into the sorted values
  bits = lambda x: x.view(uint).ravel() & uint(mask)  # noqa: E731
  if uint == np.uint16:
    counts = _histogram((bits(x) for x in _values(store, rows, blocks, progress, "clamp")),
                        2**15)
    return float(np.array(_bin_holding(counts, at), np.uint16).view(dtype))
  high = _histogram((bits(x) >> 16 for x in _values(store, rows, blocks, progress,
                                                     "clamp (1/2)")), 2**15)
  top = _bin_holding(high, at)
  before = int(high[:top].sum())

  def low_of_top():
    for x in _values(store, rows, blocks, progress, "clamp (2/2)"):
      b = bits(x)
      yield b[(b >> 16) == top] & 0xFFFF

  low = _bin_holding(_histogram(low_of_top(), 2**16), at - before)
  return float(np.array((top << 16) | low, np.uint32).view(np.float32))


def _blocks(store, rows):
  """Runs of store rows, about `_BLOCK_BYTES` of all layers each, holding wanted rows."""
  span = max(1, _BLOCK_BYTES // (store.num_layers * store.dim * np.dtype(store.dtype).itemsize))
  edges = np.unique(rows // span)
  return [(int(e * span), int(min((e + 1) * span, store.num_rows))) for e in edges]


def _values(store, rows, blocks, progress, label):
  """[rows, L·D] values of the wanted rows, block by block (every layer of a row together)."""
  meter = Progress(len(rows), label=label, enabled=progress)
  for lo, hi in blocks:
    wanted = rows[np.searchsorted(rows, lo):np.searchsorted(rows, hi)] - lo
    meter.update(len(wanted))  # (stores hold finite values only: `append` refuses others)
    yield np.concatenate([store.read_layer(layer, lo, hi)[wanted]
                          for layer in range(store.num_layers)], axis=1)
  meter.close()


def _histogram(parts, bins: int) -> np.ndarray:
  counts = np.zeros(bins, np.int64)
  for part in parts:
    counts += np.bincount(part.astype(np.int64), minlength=bins)
  return counts


def _bin_holding(counts: np.ndarray, at: int) -> int:
  """The bin that holds the `at`-th value (from 0) in ascending order."""
  return int(np.searchsorted(np.cumsum(counts), at, side="right"))


def clamp_rows(x: np.ndarray, threshold: float | None) -> np.ndarray:
  """`x` clamped to ±threshold: in its own dtype where the threshold is one of its values
  (an exact threshold always is), else in float32 (an approx one need not be: rounding it
  to bf16 would clamp the gallery elsewhere than the queries)."""
  if threshold is None:
    return x
  dtype = clamped_dtype(x.dtype, threshold)
  x, t = x.astype(dtype, copy=False), np.asarray(threshold, np.float32).astype(dtype)
  return np.minimum(np.maximum(x, -t), t)


def clamped_dtype(dtype, threshold: float) -> np.dtype:
  """The dtype of rows of `dtype` clamped at `threshold` (`clamp_rows`)."""
  t = np.float32(threshold)
  return np.dtype(dtype) if np.asarray(t).astype(dtype).astype(np.float32) == t else \
      np.dtype(np.float32)


def concatenated(x: np.ndarray, threshold: float | None) -> np.ndarray:
  """[N, L, D] → [N, L·D] float32: clamped, each layer's rows unit-normalised (PRH's
  concatenation candidate; the norm in float64, so a row's values do not depend on the rows
  read with it)."""
  x = clamp_rows(x, threshold).astype(np.float32)
  norms = np.sqrt(np.einsum("nld,nld->nl", x.astype(np.float64), x.astype(np.float64)))
  if not norms.all():
    rows, layers = np.nonzero(norms == 0)
    raise ValueError(f"rows {rows[:10].tolist()} have all-zero layers {np.unique(layers)[:10].tolist()}"
                     f" after clamping: the concatenation normalises every layer")
  return (x / norms[..., None]).astype(np.float32).reshape(len(x), -1)


@dataclasses.dataclass
class ClampedLayer:
  """One layer of a store, clamped to ±threshold (a gallery source, `plato_jax.knn`)."""
  store: object
  layer: int
  threshold: float

  def __post_init__(self):
    self.num_rows, self.dim = self.store.num_rows, self.store.dim
    self.dtype = clamped_dtype(self.store.dtype, self.threshold)

  def ids(self):
    return self.store.ids()

  def read(self, start, stop):
    return clamp_rows(self.store.read_layer(self.layer, start, stop), self.threshold)

  def take(self, positions):
    return clamp_rows(self.store.gather(positions, self.layer), self.threshold)

  def fingerprint(self):
    return f"{self.store.fingerprint()}:{self.layer}:clamp {self.threshold!r}"


@dataclasses.dataclass
class ConcatenatedLayers:
  """Every layer of a store side by side, as `concatenated` makes them (a gallery source)."""
  store: object
  threshold: float | None

  def __post_init__(self):
    self.num_rows = self.store.num_rows
    self.dim = self.store.num_layers * self.store.dim
    self.dtype = np.dtype(np.float32)

  def ids(self):
    return self.store.ids()

  def read(self, start, stop):
    x = np.stack([self.store.read_layer(layer, start, stop)
                  for layer in range(self.store.num_layers)], axis=1)
    return concatenated(x, self.threshold)

  def take(self, positions):
    return concatenated(self.store.gather(positions), self.threshold)

  def fingerprint(self):
    return digest(np.array([self.store.fingerprint(), CONCAT, repr(self.threshold)]))
