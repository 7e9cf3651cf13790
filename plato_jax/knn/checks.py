"""Checks of the engine's inputs, made by `plan_search` (for `search` and `ring_self_join`):
ids, their uniqueness, the k's asked for. Each failure is a ValueError naming the rows."""
from __future__ import annotations

import numpy as np


def ids_array(ids, n: int, what: str) -> np.ndarray:
  """`ids` as int64 [n]: any integers that int64 holds."""
  ids = np.asarray(ids)
  if ids.shape != (n,):
    raise ValueError(f"{what} has shape {ids.shape}, expected ({n},)")
  if not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"{what} must be integers, got dtype {ids.dtype}")
  if ids.dtype == np.uint64 and n and ids.max() > np.iinfo(np.int64).max:
    bad = np.flatnonzero(ids > np.iinfo(np.int64).max)
    raise ValueError(f"{what} must fit int64; rows {bad[:10].tolist()} do not")
  return ids.astype(np.int64)


def check_unique(ids: np.ndarray, what: str, order: np.ndarray | None = None) -> None:
  """ValueError naming repeated ids and their rows. `order`: an argsort of ids, if at hand."""
  order = np.argsort(ids, kind="stable") if order is None else order
  sorted_ids = ids[order]
  dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
  if dup.size:
    rows = sorted(set(order[dup].tolist()) | set(order[dup + 1].tolist()))
    raise ValueError(f"duplicate {what}: ids {np.unique(sorted_ids[dup])[:10].tolist()} "
                     f"at rows {rows[:10]}")


def k_list(k) -> list[int]:
  ks = [k] if np.isscalar(k) else list(k)
  if not ks or any(int(x) != x or x < 1 for x in ks):
    raise ValueError(f"k must be a positive integer or a list of them, got {k!r}")
  return [int(x) for x in ks]
