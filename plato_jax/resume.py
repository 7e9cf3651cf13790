"""Resume points for long work: an orbax checkpoint of a pytree at a position in the work.

The first call of a run passes a fingerprint of everything that determines the result
(inputs, flags, layout). A directory holding a checkpoint of another fingerprint is never
resumed from silently: it raises, naming both fingerprints. One run at a time: the folder's
`plato_resume.lock` (`plato_jax.lock`) makes a second run on it a clear error, not a crash
inside orbax.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from plato_jax.lock import Lock

LOCK = "plato_resume.lock"


class ResumePoint:
  """Saves `(position, tree)` every `every` calls of `maybe_save`; `load` returns the last."""

  def __init__(self, directory: str, fingerprint: dict[str, Any], every: int = 8):
    self.directory = os.path.abspath(directory)
    self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
    self.every = max(1, int(every))
    self._calls = 0
    os.makedirs(self.directory, exist_ok=True)
    self._lock = Lock(f"file://{self.directory}/", LOCK, what="resume folder").adopt(self)
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))

  def load(self, abstract_tree) -> tuple[int, Any] | None:
    """(position, tree) of the latest checkpoint, or None when there is none. `abstract_tree`
    is the tree's template, or a function of the position that gives it."""
    step = self._manager.latest_step()
    if step is None:
      return None
    meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if meta["fingerprint"] != self.fingerprint:
      raise ValueError(
          f"resume directory {self.directory} holds a checkpoint of another run: "
          f"{meta['fingerprint']} != {self.fingerprint}; use another directory or delete it")
    if callable(abstract_tree):
      abstract_tree = abstract_tree(int(meta["position"]))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_tree)
    tree = self._manager.restore(
        step, args=ocp.args.Composite(tree=ocp.args.StandardRestore(abstract)))["tree"]
    return int(meta["position"]), tree

  def maybe_save(self, position: int, tree, *, force: bool = False) -> bool:
    self._calls += 1
    if not force and self._calls % self.every:
      return False
    self._manager.save(position, args=ocp.args.Composite(
        tree=ocp.args.StandardSave(tree),
        meta=ocp.args.JsonSave({"fingerprint": self.fingerprint, "position": position})),
        force=True)
    self._manager.wait_until_finished()
    return True

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
    self._lock.release()

  def abandon(self) -> None:
    """After a failure: the saved checkpoint stays for a rerun; the folder is free."""
    try:
      self._manager.close()
    finally:
      self._lock.release()
