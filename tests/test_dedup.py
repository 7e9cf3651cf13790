"""Gallery construction: pHash bit for bit against the `imagehash` package, near duplicates
and keep-first against brute force, the whole pipeline's counts against a direct
recomputation (imagehash + plain loops), resumable hashing, `--gallery_ids` in the scaling
protocol, and the command on its synthetic pool."""
import collections
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from plato_jax import data, dedup

imagehash = pytest.importorskip("imagehash")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_phash_equals_imagehash_bit_for_bit(rng):
  """Noise, smooth patterns, gradients, flat colours (every AC coefficient ~0: the median
  is a tie, settled in f64 as imagehash settles it), every PIL mode, odd sizes."""
  images = []
  for i in range(120):
    h, w = (int(v) for v in rng.integers(9, 400, 2))
    kind = i % 5
    if kind == 0:
      a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    elif kind == 1:
      small = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
      a = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC))
    elif kind == 2:
      y, x = np.mgrid[0:h, 0:w]
      a = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h)], -1).astype(np.uint8)
    elif kind == 3:
      a = np.full((h, w, 3), rng.integers(0, 256, 3), np.uint8)
    else:
      a = np.zeros((h, w, 3), np.uint8)
      a[h // 4:h // 2, w // 3:] = rng.integers(0, 256, 3)
    image = Image.fromarray(a)
    images.append(image.convert(["RGB", "L", "RGBA", "P", "CMYK"][i % 5]))
  want = [int(str(imagehash.phash(im)), 16) for im in images]
  hashes, recomputed = dedup.phash_batch(np.stack([dedup.phash_pixels(im) for im in images]))
  assert [int(h) for h in hashes] == want
  assert 0 < recomputed < len(images)  # the flat ones, not the noise
  assert dedup.phash(images[0]) == want[0]


def planted(rng, n, distances=(0, 1, 2, 3, 4), copies=400):
  """Random distinct 64-bit values with near copies planted at the given distances, a
  cluster sharing 32 bits (one large run of a block key) and a chain of 2-bit steps."""
  v = rng.integers(0, 2**64, n, dtype=np.uint64)
  for _ in range(copies):
    x = v[rng.integers(n)]
    for b in rng.choice(64, int(rng.choice(distances)), replace=False):
      x ^= np.uint64(1) << np.uint64(b)
    v[rng.integers(n)] = x
  v[:300] = (v[:300] & np.uint64(0xFFFFFFFF)) | np.uint64(0xABCD1234 << 32)
  chain = v[300]
  for i in range(301, 320):
    chain ^= np.uint64(3) << np.uint64(2 * (i - 301))
    v[i] = chain
  return v


def brute_pairs(v, d):
  dist = dedup.hamming(v[:, None], v[None, :])
  i, j = np.nonzero(np.triu(dist <= d, 1))
  return np.stack([i, j], 1)


@pytest.mark.parametrize("d", [0, 1, 2, 3])
def test_near_pairs_and_near_any_equal_brute_force(rng, d):
  v = np.unique(planted(rng, 2500))
  np.testing.assert_array_equal(dedup.near_pairs(v, d), brute_pairs(v, d))
  others = np.concatenate([v[rng.choice(len(v), 40)] ^ np.uint64(1 << 5),
                           rng.integers(0, 2**64, 40, dtype=np.uint64)])
  want = (dedup.hamming(v[:, None], others[None, :]) <= d).any(axis=1)
  np.testing.assert_array_equal(dedup.near_any(v, others, d), want)


def greedy_keep_first(v, d):
  kept = []
  keep = np.zeros(len(v), bool)
  for i, x in enumerate(v):
    if not any(dedup.hamming(x, v[j]) <= d for j in kept):
      kept.append(i)
      keep[i] = True
  return keep


@pytest.mark.parametrize("d", [0, 2])
def test_keep_first_equals_the_greedy_definition(rng, d):
  """Exact copies, chains (a–b–c with a, c apart: b goes, c stays), copies of removed rows."""
  v = planted(rng, 700, copies=300)
  v = np.concatenate([v, v[rng.choice(len(v), 100)]])
  rng.shuffle(v)
  np.testing.assert_array_equal(dedup.keep_first(v, d), greedy_keep_first(v, d))


# ---- the pipeline -------------------------------------------------------------------------------


def expected_gallery(pool_path, queries=None, query_ids=None, d=2):
  """The gallery recomputed directly: imagehash's pHash per image, plain loops."""
  import pyarrow.parquet as pq
  pool = pq.read_table(pool_path).to_pylist()

  def phash(b):
    try:
      return int(str(imagehash.phash(Image.open(io.BytesIO(b)))), 16)
    except Exception:  # noqa: BLE001  (unreadable)
      return None

  hashes = [phash(r["image"]) for r in pool]
  if queries is not None:
    q_rows = pq.read_table(queries).to_pylist()
    q_hashes, q_caps = [phash(r["image"]) for r in q_rows], [r["caption"] for r in q_rows]
  else:
    q_hashes = [h for r, h in zip(pool, hashes) if r["id"] in query_ids]
    q_caps = [r["caption"] for r in pool if r["id"] in query_ids]
  close = lambda a, b: bin(a ^ b).count("1") <= d  # noqa: E731
  counts = collections.Counter()
  kept, kept_hashes = [], []
  for r, h in zip(pool, hashes):
    if query_ids is not None and r["id"] in query_ids:
      continue
    counts["raw pool"] += 1
    if h is None:
      counts["unreadable image"] += 1
    elif any(q is not None and close(h, q) for q in q_hashes):
      counts["image dups with queries"] += 1
    elif any(close(h, k) for k in kept_hashes):
      counts["image dups within gallery"] += 1
    else:
      kept.append(r)
      kept_hashes.append(h)
  copies = collections.Counter(r["caption"] for r in kept)
  final, seen = [], set()
  for r in kept:
    if r["caption"] in q_caps:
      counts["caption dups with queries"] += 1
    elif r["caption"] in seen:
      counts["caption dups within gallery"] += 1
    else:
      seen.add(r["caption"])
      final.append(r["id"])
  return counts, copies, final


def test_build_gallery_equals_a_direct_recomputation(tmp_path):
  from plato_jax.synthetic import build_image_pool
  pool_path, queries_path = build_image_pool(str(tmp_path / "world"), rows=500, queries=40)
  pool, queries = data.open_dataset(pool_path), data.open_dataset(queries_path)
  g = dedup.build_gallery(pool, str(tmp_path / "h"), queries=queries, progress=False)
  counts, copies, final = expected_gallery(pool_path, queries=queries_path)
  got = {c["step"]: c["rows"] for c in g.counts}
  for step in ("raw pool", "unreadable image", "image dups with queries",
               "image dups within gallery", "caption dups with queries",
               "caption dups within gallery"):
    assert got[step] == counts[step], step
  assert min(counts.values()) > 0  # every kind of duplicate was planted and found
  assert g.ids.tolist() == final and got["final pool"] == len(final)
  per_copies = collections.Counter(copies.values())
  by_bin = {m["copies"]: m for m in g.multiplicity}
  for c in (1, 2, 3):
    assert by_bin[str(c)]["captions"] == per_copies[c]
    assert by_bin[str(c)]["rows"] == c * per_copies[c]
  top = g.top_captions[0]
  assert top["copies"] == max(copies.values()) and copies[top["caption"]] == top["copies"]
  assert len(g.skipped["unreadable_image"]) == counts["unreadable image"]
  # The queries as rows of the pool instead: they leave the gallery, their duplicates too.
  ids = list(range(10, 30))
  g2 = dedup.build_gallery(pool, str(tmp_path / "h"), query_ids=ids, progress=False)
  counts, _, final = expected_gallery(pool_path, query_ids=set(ids))
  assert g2.ids.tolist() == final
  assert {c["step"]: c["rows"] for c in g2.counts}["image dups within gallery"] == \
      counts["image dups within gallery"]
  with pytest.raises(ValueError, match=r"2 query ids are not in the dataset, e.g. \[-5, 99999\]"):
    dedup.build_gallery(pool, str(tmp_path / "h"), query_ids=[3, -5, 99999], progress=False)


class Crashing:
  """A reader that fails after `after` records (a crash mid-run)."""

  def __init__(self, reader, after):
    self.reader, self.after, self.files = reader, after, reader.files

  def __len__(self):
    return len(self.reader)

  def records(self, start=0):
    for i, r in enumerate(self.reader.records(start), start=start):
      if i >= self.after:
        raise RuntimeError("crash")
      yield r


def test_hashing_resumes_after_a_crash_and_refuses_another_dataset(tmp_path):
  from plato_jax.synthetic import build_image_pool
  pool_path, queries_path = build_image_pool(str(tmp_path / "world"), rows=300, queries=8)
  pool = data.open_dataset(pool_path)
  whole = dedup.hash_dataset(pool, str(tmp_path / "a"), part_rows=64, progress=False)
  with pytest.raises(RuntimeError, match="crash"):
    dedup.hash_dataset(Crashing(pool, 150), str(tmp_path / "b"), part_rows=64, progress=False)
  state = json.loads((tmp_path / "b" / "state.json").read_text())
  assert state["consumed"] == 128 and state["parts"] == 2
  resumed = dedup.hash_dataset(pool, str(tmp_path / "b"), part_rows=64, progress=False)
  for field in ("ids", "phash", "digest", "image_ok", "caption_ok"):
    np.testing.assert_array_equal(getattr(resumed, field), getattr(whole, field))
  with pytest.raises(ValueError, match="holds hashes of another dataset"):
    dedup.hash_dataset(data.open_dataset(queries_path), str(tmp_path / "b"), progress=False)
  part = tmp_path / "b" / "part-000001.npz"
  with np.load(part) as z:
    arrays = dict(z)
  np.savez(part, **dict(arrays, ids=arrays["ids"][:-3]))
  with pytest.raises(ValueError, match=r"part-000001.npz: its ids, hashes and flags do not "
                                       r"line up \(\[61, 64\] rows\)"):
    dedup.hash_dataset(pool, str(tmp_path / "b"), part_rows=64, progress=False)


def test_scaling_draws_galleries_from_gallery_ids_only(tmp_path):
  from plato_jax.gallery import plan_galleries
  from plato_jax.synthetic import WorldConfig, build_world
  a, b = build_world(str(tmp_path), 2000, WorldConfig(num_concepts=10, dims=(8, 8),
                                                      layers=(2, 2)), progress=False)
  allowed = np.arange(0, 2000, 3)
  plan = plan_galleries(a, b, 50, [50, 500, len(allowed)], ["1"], seed=1, gallery_ids=allowed)
  assert np.isin(plan.ids[plan.order], allowed).all() and len(plan.order) == len(allowed)
  queries = [1, 2, 4]  # explicit queries outside the gallery ids are measured all the same
  plan = plan_galleries(a, b, queries, [3, 100], ["1"], seed=1, gallery_ids=allowed)
  assert plan.ids[plan.order[:3]].tolist() == queries
  assert np.isin(plan.ids[plan.order[3:]], allowed).all()
  with pytest.raises(ValueError, match=r"1 of the 668 gallery ids are not in both stores, "
                                       r"e.g. \[5000\]"):
    plan_galleries(a, b, 50, [50], ["1"], seed=1, gallery_ids=np.append(allowed, 5000))


def test_command_on_its_synthetic_pool_then_scaling_on_the_gallery(tmp_path):
  run = lambda *args: subprocess.run(  # noqa: E731
      [sys.executable, "-m", *args, "--progress=false", f"--world_dir={tmp_path / 'w'}"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  done = run("experiments.build_gallery", "--synthetic_rows=400", f"--out={tmp_path}")
  assert done.returncode == 0, done.stdout + done.stderr
  result = json.loads((tmp_path / "build_gallery" / "build_gallery.json").read_text())
  ids = (tmp_path / "build_gallery" / "gallery_ids.txt").read_text().split()
  assert result["gallery_rows"] == len(ids) == result["counts"][-1]["rows"] > 200
  assert "final pool" in done.stdout
  # The synthetic feature world's rows 0..n-1 stand in for the pool's features here.
  done = run("experiments.scaling", "--gallery=2000", "--queries=64", "--sizes=64,200",
             f"--gallery_ids={tmp_path / 'build_gallery' / 'gallery_ids.txt'}",
             f"--out={tmp_path / 'res'}")
  assert done.returncode == 0, done.stdout + done.stderr
  config = json.loads((tmp_path / "res" / "scaling" / "scaling.json").read_text())["config"]
  assert config["gallery_ids"].endswith("gallery_ids.txt")
  done = run("experiments.null", f"--gallery_ids={tmp_path / 'build_gallery' / 'gallery_ids.txt'}",
             f"--out={tmp_path / 'res'}")
  assert done.returncode != 0 and "does not apply --gallery_ids" in done.stderr
