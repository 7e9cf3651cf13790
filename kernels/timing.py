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


def device_time(fn, iters: int = 10, sync=None, samples: int = 5) -> float:
  """Seconds per call of an asynchronous `fn` (jax, or torch with `sync` =
  torch.cuda.synchronize): `iters` calls back to back, then one wait; the median of
  `samples` such runs after a warm-up run. Back-to-back calls keep the device busy, so
  host dispatch overlaps device work, as in the engine's loop."""
  import statistics

  import jax

  def wait(out):
    if sync is not None:
      sync()
    else:
      jax.block_until_ready(out)

  wait(fn())
  times = []
  for _ in range(samples):
    t = time.perf_counter()
    out = None
    for _ in range(iters):
      out = fn()
    wait(out)
    times.append((time.perf_counter() - t) / iters)
  return statistics.median(times)
