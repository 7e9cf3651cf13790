"""Host work split across the cores: numpy's sorts, partitions, gathers and BLAS calls on
large arrays release the GIL, so threads over disjoint slices of queries run in parallel."""
from __future__ import annotations

import concurrent.futures
import os
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")

MIN_ITEMS = 2 ** 16  # below this, one thread: a pool costs more than it saves


def cores() -> int:
  return os.cpu_count() or 1


def spans(rows: int, per_row: int, most: int | None = None) -> list[tuple[int, int]]:
  """[start, stop) ranges covering `rows` rows of `per_row` items each: four per core, so that
  a core slowed by other work leaves its share to the others (one in all if there are few
  items); more where a range would hold over `most` items."""
  parts = 1 if rows * per_row < MIN_ITEMS else 4 * cores()
  if most:
    parts = max(parts, -(-rows * per_row // most))
  parts = max(1, min(parts, rows))
  edges = [rows * i // parts for i in range(parts + 1)]
  return list(zip(edges[:-1], edges[1:]))


def each(fn: Callable[[T], object], items: Sequence[T]) -> list:
  """fn(item) for every item, in a thread per core when there are several; results in order.
  An exception in any call is raised here."""
  if len(items) <= 1:
    return [fn(item) for item in items]
  with concurrent.futures.ThreadPoolExecutor(min(len(items), cores())) as pool:
    return list(pool.map(fn, items))
