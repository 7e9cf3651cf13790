"""Gallery construction as Koepke et al. build theirs (App. E.1, Tables 6–7): a pool of
image–caption rows deduplicated against the query set and within itself.

- **Images**: pHash as the paper (and the `imagehash` package) defines it — grayscale,
  32×32 Lanczos, 2-D DCT-II, the top-left 8×8 against its median, 64 bits — bit for bit
  `imagehash.phash`. The DCT runs batched in JAX (f32); an image whose coefficients lie
  within f32's error bound of the median is recomputed on the host in f64 exactly as
  imagehash does, so no bit depends on the precision.
- **Near duplicates**: Hamming distance ≤ 2, found exactly by multi-index hashing: the 64
  bits split into d + 2 blocks, so two hashes within distance d agree on at least two whole
  blocks; every pair of blocks is a sort key, rows sharing a key are candidates, and each
  candidate is verified by popcount. Identical hashes are grouped first.
- **Captions**: exact string equality (by a 128-bit BLAKE2 digest of the UTF-8 text).
- **Order**: the pool's rows that duplicate a query (image, then caption) are removed;
  within the pool the first row is kept — a row goes when it is within the distance of an
  earlier row that was kept (so kept rows are pairwise apart, and every removed row has a
  kept one within reach). Images first, then captions among the image-deduplicated rows.

`build_gallery` hashes a dataset (any reader of `plato_jax.data`) in resumable parts,
counts what each step removes (Table 6), the captions' multiplicities after the image step
(Table 7), and returns the kept row ids: the gallery `experiments.scaling --gallery_ids`
measures.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import itertools
import json
import os
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

HASH_SIZE = 8           # bits per side of the hash
IMAGE_SIZE = 32         # HASH_SIZE · imagehash's highfreq_factor 4
MAX_DISTANCE = 2        # the paper's duplicate threshold (Hamming)

# ---- pHash ----------------------------------------------------------------------------------


def phash_pixels(image) -> np.ndarray:
  """An image's pHash input, as imagehash prepares it: 8-bit grayscale (PIL "L"), resized
  to 32×32 by PIL's Lanczos filter. [32, 32] uint8."""
  from PIL import Image
  small = image.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
  return np.asarray(small, np.uint8)


def _dct_rows() -> np.ndarray:
  """The first HASH_SIZE rows of scipy's unnormalised DCT-II of length 32:
  2 cos(π k (2n + 1) / 64)."""
  k = np.arange(HASH_SIZE)[:, None]
  n = np.arange(IMAGE_SIZE)[None, :]
  return (2.0 * np.cos(np.pi * k * (2 * n + 1) / (2 * IMAGE_SIZE))).astype(np.float32)


# |f32 result − exact| ≤ 2·γ₃₂·|C||X||Cᵀ| ≤ 2 · 32 · 2⁻²⁴ · 4 · Σx (γₙ ≈ n·u for the two
# 32-term sums; |C| ≤ 2); bits whose coefficient is nearer the median than twice that are
# recomputed in f64.
_F32_BOUND = 2 * 2 * 32 * 2.0 ** -24 * 4


@jax.jit
def _hash_bits(pixels):
  """pixels [B, 32, 32] f32 → (bits [B, 64] row-major as imagehash flattens them, whether
  a bit is nearer the median than f32's error bound [B])."""
  c = jnp.asarray(_dct_rows())
  low = jnp.einsum("kn,bnm,lm->bkl", c, pixels, c, precision=jax.lax.Precision.HIGHEST)
  flat = low.reshape(low.shape[0], -1)
  ordered = jnp.sort(flat, axis=1)
  half = flat.shape[1] // 2
  median = (ordered[:, half - 1] + ordered[:, half]) / 2
  gap = jnp.min(jnp.abs(flat - median[:, None]), axis=1)
  return flat > median[:, None], gap <= _F32_BOUND * jnp.sum(pixels, axis=(1, 2)) + 1e-3


def _hash_bits_f64(pixels: np.ndarray) -> np.ndarray:
  """imagehash's own arithmetic: scipy.fftpack's DCT-II along rows then columns, in f64."""
  import scipy.fftpack
  dct = scipy.fftpack.dct(scipy.fftpack.dct(pixels, axis=0), axis=1)
  low = dct[:HASH_SIZE, :HASH_SIZE]
  return (low > np.median(low)).reshape(-1)


def pack_bits(bits: np.ndarray) -> np.ndarray:
  """[B, 64] bools, first bit most significant (imagehash's hex order) → uint64 [B]."""
  return np.packbits(np.asarray(bits, bool), axis=1).view(">u8")[:, 0].astype(np.uint64)


def phash_batch(pixels: np.ndarray) -> tuple[np.ndarray, int]:
  """(pHashes uint64 [B], how many were recomputed in f64) of `phash_pixels` outputs
  [B, 32, 32]."""
  pixels = np.asarray(pixels, np.uint8)
  if not len(pixels):
    return np.zeros(0, np.uint64), 0
  bits, near = (np.asarray(a) for a in _hash_bits(jnp.asarray(pixels, jnp.float32)))
  bits = bits.copy()
  for i in np.flatnonzero(near):
    bits[i] = _hash_bits_f64(pixels[i])
  return pack_bits(bits), int(near.sum())


def phash(image) -> int:
  """The pHash of one PIL image, as an int (imagehash: int(str(phash(image)), 16))."""
  return int(phash_batch(phash_pixels(image)[None])[0][0])


# ---- near duplicates ------------------------------------------------------------------------


def hamming(a, b) -> np.ndarray:
  return np.bitwise_count(np.bitwise_xor(np.asarray(a, np.uint64), np.asarray(b, np.uint64)))


def _block_keys(max_distance: int) -> list[tuple[int, int, int, int]]:
  """(shift₁, width₁, shift₂, width₂) of every pair of the d + 2 blocks of 64 bits."""
  m = max_distance + 2
  edges = np.linspace(0, 64, m + 1).round().astype(int)
  blocks = [(int(edges[i]), int(edges[i + 1] - edges[i])) for i in range(m)]
  return [(*a, *b) for a, b in itertools.combinations(blocks, 2)]


def _key(values: np.ndarray, spec) -> np.ndarray:
  s1, w1, s2, w2 = spec
  one = np.uint64(1)
  lo = (values >> np.uint64(s1)) & ((one << np.uint64(w1)) - one)
  hi = (values >> np.uint64(s2)) & ((one << np.uint64(w2)) - one)
  return (hi << np.uint64(w1)) | lo


def _pairs_in_runs(order: np.ndarray, sorted_keys: np.ndarray, chunk: int = 1 << 22):
  """Index pairs (order[p], order[q]), p < q, of equal sorted keys, in chunks."""
  same = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
  if not len(same):
    return
  # Positions inside runs of ≥ 2 equal keys (each run contiguous), and each one's run.
  inside = np.unique(np.concatenate([same, same + 1]))
  keys = sorted_keys[inside]
  run = np.concatenate([[0], np.cumsum(keys[1:] != keys[:-1])])
  for offset in itertools.count(1):
    if offset >= len(inside):
      return
    hit = np.flatnonzero(run[offset:] == run[:-offset])
    if not len(hit):
      return
    for start in range(0, len(hit), chunk):
      h = hit[start:start + chunk]
      yield order[inside[h]], order[inside[h + offset]]


def near_pairs(values: np.ndarray, max_distance: int = MAX_DISTANCE) -> np.ndarray:
  """All index pairs (i, j), i < j, of distinct `values` (uint64) within Hamming distance
  `max_distance`: [P, 2] int64, sorted. Exact (multi-index hashing, every candidate
  verified)."""
  values = np.asarray(values, np.uint64)
  found = []
  for spec in _block_keys(max_distance):
    key = _key(values, spec)
    order = np.argsort(key, kind="stable")
    for i, j in _pairs_in_runs(order, key[order]):
      close = hamming(values[i], values[j]) <= max_distance
      found.append(np.stack([np.minimum(i, j)[close], np.maximum(i, j)[close]], axis=1))
  if not found:
    return np.zeros((0, 2), np.int64)
  pairs = np.concatenate(found).astype(np.int64)
  return np.unique(pairs, axis=0) if len(pairs) else pairs.reshape(0, 2)


def near_any(values: np.ndarray, others: np.ndarray, max_distance: int = MAX_DISTANCE
             ) -> np.ndarray:
  """Which `values` lie within `max_distance` of any of `others` ([N] bool), by the same
  block keys (a sorted search of each key)."""
  values = np.asarray(values, np.uint64)
  others = np.unique(np.asarray(others, np.uint64))
  hit = np.zeros(len(values), bool)
  if not len(others) or not len(values):
    return hit
  for spec in _block_keys(max_distance):
    theirs = _key(others, spec)
    order = np.argsort(theirs, kind="stable")
    theirs = theirs[order]
    mine = _key(values, spec)
    lo, hi = np.searchsorted(theirs, mine, "left"), np.searchsorted(theirs, mine, "right")
    rows = np.flatnonzero(hi > lo)
    counts = (hi - lo)[rows]
    row = np.repeat(rows, counts)
    at = np.repeat(lo[rows], counts) + (np.arange(counts.sum()) -
                                        np.repeat(np.cumsum(counts) - counts, counts))
    close = hamming(values[row], others[order[at]]) <= max_distance
    hit[row[close]] = True
  return hit


def keep_first(values: np.ndarray, max_distance: int = MAX_DISTANCE) -> np.ndarray:
  """[N] bool: in row order, a row is kept unless it lies within `max_distance` of an
  earlier kept row."""
  values = np.asarray(values, np.uint64)
  unique, first, inverse = np.unique(values, return_index=True, return_inverse=True)
  keep = np.zeros(len(values), bool)
  keep[first] = True  # of identical hashes, the first — unless a neighbour decides below
  pairs = near_pairs(unique, max_distance) if max_distance > 0 else np.zeros((0, 2), int)
  if not len(pairs):
    return keep
  neighbours: dict[int, list[int]] = {}
  for a, b in pairs.tolist():
    neighbours.setdefault(a, []).append(b)
    neighbours.setdefault(b, []).append(a)
  # Hashes with neighbours: decided in row order by their first rows (a hash's later rows
  # are exact duplicates of its first and go whatever happens).
  taken = set()
  for u in sorted(neighbours, key=lambda u: first[u]):
    if any(v in taken for v in neighbours[u]):
      keep[first[u]] = False
    else:
      taken.add(u)
  return keep


# ---- captions -------------------------------------------------------------------------------


def caption_digest(caption: str) -> tuple[int, int]:
  """A caption's 128-bit BLAKE2b digest as two uint64 halves (equal digests ⇔ equal text,
  short of a 2⁻¹²⁸ collision)."""
  d = hashlib.blake2b(caption.encode("utf-8"), digest_size=16).digest()
  return int.from_bytes(d[:8], "big"), int.from_bytes(d[8:], "big")


def _digest_keys(digests: np.ndarray) -> np.ndarray:
  """[N, 2] uint64 → a structured view whose equality is the whole digest's."""
  return np.ascontiguousarray(digests, np.uint64).view([("hi", np.uint64), ("lo", np.uint64)])[:, 0]


def first_of_equal(digests: np.ndarray) -> np.ndarray:
  """[N] bool: the first row of each distinct digest."""
  keys = _digest_keys(digests)
  keep = np.zeros(len(keys), bool)
  keep[np.unique(keys, return_index=True)[1]] = True
  return keep


def multiplicities(digests: np.ndarray) -> list[dict]:
  """Table 7: per bin of copies (1, 2, 3, 4, 5, 6–10, 11–100, 101–1000, >1000), the distinct
  captions with that many copies and the rows they cover."""
  _, counts = np.unique(_digest_keys(digests), return_counts=True)
  bins = [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 10), (11, 100), (101, 1000),
          (1001, None)]
  rows = []
  for lo, hi in bins:
    sel = (counts >= lo) & (counts <= (hi if hi is not None else np.inf))
    rows.append({"copies": f"{lo}" if lo == hi else (f"{lo}-{hi}" if hi else f">{lo - 1}"),
                 "captions": int(sel.sum()), "rows": int(counts[sel].sum())})
  return rows


# ---- hashing a dataset, resumably --------------------------------------------------------------


@dataclasses.dataclass
class Hashes:
  """Per record, in dataset order: row id, pHash, caption digest, and what was missing."""
  ids: np.ndarray          # int64
  phash: np.ndarray        # uint64
  digest: np.ndarray       # [N, 2] uint64
  image_ok: np.ndarray     # bool: a readable image
  caption_ok: np.ndarray   # bool: a non-empty caption
  recomputed: int = 0      # pHashes recomputed in f64 (near a median)

  @classmethod
  def concatenate(cls, parts: Sequence["Hashes"]) -> "Hashes":
    return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                 ("ids", "phash", "digest", "image_ok", "caption_ok")),
               recomputed=sum(p.recomputed for p in parts))


def _hash_record(record):
  from plato_jax.data import decode_image
  # In its stored mode: imagehash converts that to grayscale (via RGB differs for CMYK).
  image = decode_image(record.media, mode=None) if record.media else None
  pixels = phash_pixels(image) if image is not None else None
  caption = record.caption if isinstance(record.caption, str) else None
  caption = caption if caption and caption.strip() else None
  return record.row_id, pixels, caption_digest(caption) if caption else (0, 0)


def _hash_part(results) -> Hashes:
  ids = np.asarray([r[0] for r in results], np.int64)
  ok = np.asarray([r[1] is not None for r in results], bool)
  pixels = np.stack([r[1] for r in results if r[1] is not None]) if ok.any() else \
      np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
  hashes, recomputed = phash_batch(pixels)
  phashes = np.zeros(len(results), np.uint64)
  phashes[ok] = hashes
  digest = np.asarray([r[2] for r in results], np.uint64).reshape(-1, 2)
  return Hashes(ids, phashes, digest, ok, digest.any(axis=1), recomputed)


def hash_dataset(reader, directory: str, *, part_rows: int = 16384, workers: int = 2,
                 progress: bool = True, label: str = "hash") -> Hashes:
  """pHashes and caption digests of every record of `reader`, saved as parts under
  `directory` as they are done; a rerun continues after the last saved part (the same
  dataset: its record count and files are checked). Images decode on `workers` threads."""
  from plato_jax.progress import Progress
  os.makedirs(directory, exist_ok=True)
  total = len(reader)
  state_path = os.path.join(directory, "state.json")
  identity = {"records": total, "files": sorted(str(f) for f in (
      getattr(reader, "files", None) or [getattr(reader, "path", "")]))}
  state = {"identity": identity, "parts": 0, "consumed": 0}
  if os.path.isfile(state_path):
    with open(state_path) as f:
      saved = json.load(f)
    if saved.get("identity") != identity:
      raise ValueError(f"{directory} holds hashes of another dataset ({saved.get('identity')}"
                       f" vs {identity}): remove it or choose another output")
    state = saved
  parts = [_load_part(directory, i) for i in range(state["parts"])]
  meter = Progress(total, initial=state["consumed"], label=label, unit="rows",
                   enabled=progress)
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
    for batch in _batched(reader.records(state["consumed"]), part_rows):
      part = _hash_part(list(pool.map(_hash_record, batch)))
      _save_part(directory, state["parts"], part)
      parts.append(part)
      state["parts"] += 1
      state["consumed"] += len(batch)
      _write_json(state_path, state)
      meter.update(len(batch))
  meter.close()
  if state["consumed"] != total:
    raise ValueError(f"{label}: the reader gave {state['consumed']} records, its length says "
                     f"{total}")
  return Hashes.concatenate(parts) if parts else Hashes.concatenate([_hash_part([])])


def _batched(it: Iterator, n: int) -> Iterator[list]:
  while batch := list(itertools.islice(it, n)):
    yield batch


def _save_part(directory: str, index: int, part: Hashes) -> None:
  path = os.path.join(directory, f"part-{index:06d}.npz")
  tmp = path + ".tmp.npz"
  np.savez(tmp, ids=part.ids, phash=part.phash, digest=part.digest, image_ok=part.image_ok,
           caption_ok=part.caption_ok, recomputed=part.recomputed)
  os.replace(tmp, path)


def _load_part(directory: str, index: int) -> Hashes:
  path = os.path.join(directory, f"part-{index:06d}.npz")
  if not os.path.isfile(path):
    raise ValueError(f"{path}: a hash part that state.json lists is missing")
  try:
    with np.load(path) as z:
      part = Hashes(z["ids"], z["phash"], z["digest"], z["image_ok"], z["caption_ok"],
                    int(z["recomputed"]))
  except (OSError, ValueError, KeyError) as e:
    raise ValueError(f"{path}: an unreadable hash part ({e}); remove the folder to hash "
                     f"afresh") from None
  lengths = {len(part.ids), len(part.phash), len(part.digest), len(part.image_ok),
             len(part.caption_ok)}
  if len(lengths) != 1:
    raise ValueError(f"{path}: its ids, hashes and flags do not line up ({sorted(lengths)} "
                     f"rows); remove the folder to hash afresh")
  return part


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f)
  os.replace(tmp, path)


# ---- the gallery --------------------------------------------------------------------------------


@dataclasses.dataclass
class Gallery:
  ids: np.ndarray           # the kept rows' ids, in dataset order
  counts: list[dict]        # Table 6: step, rows removed or left
  multiplicity: list[dict]  # Table 7: caption copies after the image step
  top_captions: list[dict]  # the most repeated captions (text, copies)
  skipped: dict             # ids of rows without a readable image / a caption


def build_gallery(reader, directory: str, *, queries=None, query_ids=None,
                  max_distance: int = MAX_DISTANCE, workers: int = 2, top: int = 10,
                  progress: bool = True) -> Gallery:
  """The deduplicated gallery of `reader`'s records (see the module docstring). The query
  set is another dataset (`queries`, a reader) or rows of this one (`query_ids`: they are
  left out of the gallery). Hashes are kept under `directory` — the pool's, and each query
  set's beside them — so a rerun resumes, and another query set or distance reuses them."""
  if (queries is None) == (query_ids is None):
    raise ValueError("give the query set as a dataset (queries) or as ids of this one "
                     "(query_ids)")
  pool = hash_dataset(reader, os.path.join(directory, "hashes"), workers=workers,
                      progress=progress, label="hash pool")
  _check_ids(pool.ids, "the pool")
  if queries is not None:
    files = sorted(str(f) for f in (getattr(queries, "files", None) or
                                    [getattr(queries, "path", "")]))
    key = hashlib.sha256(json.dumps(files).encode()).hexdigest()[:12]
    asked = hash_dataset(queries, os.path.join(directory, f"query_hashes-{key}"),
                         workers=workers, progress=progress, label="hash queries")
    in_pool = np.zeros(len(pool.ids), bool)
  else:
    query_ids = np.unique(np.asarray(query_ids, np.int64))
    in_pool = np.isin(pool.ids, query_ids)
    missing = np.setdiff1d(query_ids, pool.ids)
    if len(missing):
      raise ValueError(f"{len(missing)} query ids are not in the dataset, e.g. "
                       f"{missing[:5].tolist()}")
    asked = Hashes(*(getattr(pool, f)[in_pool] for f in
                     ("ids", "phash", "digest", "image_ok", "caption_ok")))
  if not asked.image_ok.any():
    raise ValueError("no query has a readable image: nothing to deduplicate against")
  bad_image = ~pool.image_ok & ~in_pool
  bad_caption = pool.image_ok & ~pool.caption_ok & ~in_pool
  alive = ~in_pool & pool.image_ok & pool.caption_ok
  counts = [{"step": "raw pool", "rows": int((~in_pool).sum())},
            {"step": "unreadable image", "rows": int(bad_image.sum())},
            {"step": "missing caption", "rows": int(bad_caption.sum())}]

  def remove(step, drop):
    nonlocal alive
    counts.append({"step": step, "rows": int((alive & drop).sum())})
    alive = alive & ~drop

  remove("image dups with queries",
         near_any(pool.phash, asked.phash[asked.image_ok], max_distance))
  rows = np.flatnonzero(alive)
  within = np.ones(len(pool.ids), bool)
  within[rows] = keep_first(pool.phash[rows], max_distance)
  remove("image dups within gallery", ~within)
  counts.append({"step": "pool after image dedup", "rows": int(alive.sum())})
  image_deduped = np.flatnonzero(alive)
  multiplicity = multiplicities(pool.digest[image_deduped])
  query_digests = _digest_keys(asked.digest[asked.caption_ok])
  remove("caption dups with queries", np.isin(_digest_keys(pool.digest), query_digests))
  rows = np.flatnonzero(alive)
  within = np.ones(len(pool.ids), bool)
  within[rows] = first_of_equal(pool.digest[rows])
  remove("caption dups within gallery", ~within)
  counts.append({"step": "final pool", "rows": int(alive.sum())})
  top_captions = _top_captions(reader, pool, image_deduped, top)
  return Gallery(pool.ids[alive], counts, multiplicity, top_captions,
                 {"unreadable_image": pool.ids[bad_image].tolist(),
                  "missing_caption": pool.ids[bad_caption].tolist()})


def _check_ids(ids: np.ndarray, what: str) -> None:
  unique, counts = np.unique(ids, return_counts=True)
  if (counts > 1).any():
    raise ValueError(f"{what}: row ids repeat, e.g. {unique[counts > 1][:5].tolist()}")


def _top_captions(reader, pool: Hashes, rows: np.ndarray, top: int) -> list[dict]:
  """The `top` most repeated captions among `rows` with their text (read back from the
  dataset up to the last first occurrence needed)."""
  if top <= 0 or not len(rows):
    return []
  keys = _digest_keys(pool.digest[rows])
  unique, first, counts = np.unique(keys, return_index=True, return_counts=True)
  order = np.argsort(-counts, kind="stable")[:top]
  order = order[counts[order] > 1]
  wanted = {int(rows[first[i]]): int(counts[i]) for i in order}
  found = {}
  for position, record in enumerate(reader.records(0)):
    if position in wanted:
      found[position] = record.caption
      if len(found) == len(wanted):
        break
  return [{"caption": found.get(p), "copies": c} for p, c in
          sorted(wanted.items(), key=lambda pc: -pc[1])]
