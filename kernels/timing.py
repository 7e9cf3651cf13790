"""One timing rule for every benchmark: a warm-up call, then the best of `repeats` calls."""
from __future__ import annotations

import time


def best_time(fn, repeats: int):
  """(best seconds, the last output) of `fn()`; jax outputs are waited for inside the timing
  (peers that run asynchronously, e.g. torch on CUDA, synchronise inside `fn`)."""
  import jax
  jax.block_until_ready(fn())  # warm-up: compilation, caches
  times, out = [], None
  for _ in range(max(1, repeats)):
    t = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return min(times), out
