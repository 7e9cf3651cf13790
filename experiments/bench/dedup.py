"""Near-duplicate search at gallery scale: multi-index hashing against a brute-force scan.

    python -m plato_jax.experiments.bench.dedup                  # 20M hashes, a 200k subset
    python -m plato_jax.experiments.bench.dedup --rows=2m --subset=50k

Random 64-bit hashes with near copies planted at Hamming distance 0, 1, 2 and 3. Checks
that every planted pair within 2 is found and none at 3 (`keep_first` then removes exactly
the later member of each within-2 pair), times `near_pairs` and `keep_first` on all rows
with their peak numpy memory (tracemalloc), and on the subset compares the pairs with a
brute-force scan of every pair (XLA, blocked) in the same run, printing the time ratio.
"""
from __future__ import annotations

import time
import tracemalloc

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("rows", "20m", "hashes")
flags.DEFINE_string("subset", "200k", "rows of the brute-force comparison")
flags.DEFINE_integer("planted", 10_000, "near copies planted per distance 0..3")
flags.DEFINE_integer("seed", 0, "random seed")


def plant(rng, n, per_distance):
  """n random hashes; `per_distance` (i, j) pairs at each distance 0..3, over distinct rows."""
  values = rng.integers(0, 2**64, n, dtype=np.uint64)
  rows = rng.choice(n, 8 * per_distance, replace=False).reshape(4, per_distance, 2)
  for d in range(4):
    flips = np.zeros(per_distance, np.uint64)
    for b in range(d):  # d distinct bits per pair
      bit = rng.integers(0, 64, per_distance).astype(np.uint64)
      while True:
        clash = (flips >> bit) & np.uint64(1) == 1
        if not clash.any():
          break
        bit[clash] = rng.integers(0, 64, int(clash.sum())).astype(np.uint64)
      flips |= np.uint64(1) << bit
    i, j = rows[d, :, 0], rows[d, :, 1]
    values[j] = values[i] ^ flips
  return values, rows


def brute_force_pairs(values: np.ndarray, max_distance: int, block: int = 4096):
  """Every pair within `max_distance`, by a full scan (XLA: xor and popcount of the two
  32-bit halves, block against block)."""
  import jax
  import jax.numpy as jnp
  hi = jnp.asarray((values >> np.uint64(32)).astype(np.uint32))
  lo = jnp.asarray((values & np.uint64(0xFFFFFFFF)).astype(np.uint32))

  @jax.jit
  def close(hi_a, lo_a, hi_b, lo_b):
    d = (jax.lax.population_count(hi_a[:, None] ^ hi_b[None, :]) +
         jax.lax.population_count(lo_a[:, None] ^ lo_b[None, :]))
    return d <= max_distance

  n = len(values)
  pad = -n % block
  hi, lo = jnp.pad(hi, (0, pad)), jnp.pad(lo, (0, pad))
  found = []
  for a in range(0, n, block):
    for b in range(a, n, block):
      m = np.asarray(close(hi[a:a + block], lo[a:a + block], hi[b:b + block], lo[b:b + block]))
      i, j = np.nonzero(m)
      i, j = i + a, j + b
      keep = (i < j) & (j < n)
      found.append(np.stack([i[keep], j[keep]], 1))
  return np.unique(np.concatenate(found), axis=0)


def main(argv):
  del argv
  from plato_jax import dedup
  from plato_jax.gallery import parse_count
  n, subset = parse_count(FLAGS.rows), parse_count(FLAGS.subset)
  rng = np.random.default_rng(FLAGS.seed)
  values, rows = plant(rng, n, FLAGS.planted)
  print(f"{n:,} hashes, {FLAGS.planted:,} near copies planted per distance 0..3")

  tracemalloc.start()
  t = time.perf_counter()
  unique, inverse = np.unique(values, return_inverse=True)
  pairs = dedup.near_pairs(unique)
  t_pairs = time.perf_counter() - t
  _, peak_pairs = tracemalloc.get_traced_memory()
  tracemalloc.reset_peak()
  t = time.perf_counter()
  keep = dedup.keep_first(values)
  t_keep = time.perf_counter() - t
  _, peak_keep = tracemalloc.get_traced_memory()
  tracemalloc.stop()

  found = set(map(tuple, pairs.tolist()))
  ok = True
  for d in range(4):
    a, b = inverse[rows[d, :, 0]], inverse[rows[d, :, 1]]
    if d == 0:
      hit = int((a == b).sum())
    else:
      hit = sum((min(x, y), max(x, y)) in found for x, y in zip(a.tolist(), b.tolist()))
    want = FLAGS.planted if d <= 2 else 0
    ok &= hit == want
    print(f"  distance {d}: {hit:,} of {FLAGS.planted:,} planted pairs found (want {want:,})")
  later = np.maximum(rows[:3, :, 0], rows[:3, :, 1]).reshape(-1)
  ok &= not keep[later].any()
  print(f"  near pairs among distinct hashes: {len(pairs):,}; rows removed by keep_first: "
        f"{int((~keep).sum()):,} (each planted pair's later row among them: "
        f"{not keep[later].any()})")
  print(f"near_pairs {t_pairs:.1f} s (peak numpy memory {peak_pairs / 2**30:.2f} GiB); "
        f"keep_first {t_keep:.1f} s (peak {peak_keep / 2**30:.2f} GiB)")

  # The subset: every planted row, then the first rows up to its size.
  planted = rows.reshape(-1)
  rest = np.setdiff1d(np.arange(min(n, subset)), planted)[:max(0, subset - len(planted))]
  sub = np.unique(values[np.concatenate([planted, rest])])
  t = time.perf_counter()
  ours = dedup.near_pairs(sub)
  t_ours = time.perf_counter() - t
  t = time.perf_counter()
  theirs = brute_force_pairs(sub, dedup.MAX_DISTANCE)
  t_brute = time.perf_counter() - t
  same = np.array_equal(ours, theirs)
  ok &= same
  print(f"subset of {len(sub):,}: multi-index {t_ours:.2f} s, brute force {t_brute:.1f} s "
        f"(ratio {t_brute / t_ours:,.0f}x), {len(ours):,} pairs, identical: {same}")
  print("PASS" if ok else "FAIL")


if __name__ == "__main__":
  app.run(main)
