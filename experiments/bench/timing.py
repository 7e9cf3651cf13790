"""Timing rules for the benchmarks: a warm-up call, then the best of `repeats` calls; or,
to compare methods on a machine whose speed drifts, rounds in which every method runs once
(`interleaved_times`)."""
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


def interleaved_times(fns: dict, rounds: int) -> dict:
  """{name: (seconds of each round, the last output)} for a dict of callables. After one
  warm-up call each, every round calls each method once, the order rotating from round to
  round, so a slow spell of the machine falls on all methods alike instead of on whichever
  ran during it."""
  import jax
  names = list(fns)
  out = {name: jax.block_until_ready(fns[name]()) for name in names}
  times = {name: [] for name in names}
  for r in range(max(1, rounds)):
    for name in names[r % len(names):] + names[:r % len(names)]:
      t = time.perf_counter()
      out[name] = jax.block_until_ready(fns[name]())
      times[name].append(time.perf_counter() - t)
  return {name: (times[name], out[name]) for name in names}


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
