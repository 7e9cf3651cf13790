"""Exclusive ownership of a folder (a feature store, a resume folder) by one live worker.

The owner writes a lock file (host, pid, since, a token) into the folder with a conditional
write: created only if missing, so of two workers one gets it, on local disks and object
stores alike (TensorStore's kvstore generations). A lock whose owner is gone — a dead
process on this host (kill -9), or an owner object of this process that no longer exists —
is taken over with a warning; a live owner's, or another host's, is a `Busy` error that
names the owner and the file to delete if it is gone.
"""
from __future__ import annotations

import json
import os
import socket
import time
import uuid
import warnings
import weakref

import tensorstore as ts


class Busy(RuntimeError):
  """Another worker, alive, owns the folder."""


# Owner objects of this process by lock URL: a lock held by this pid whose owner object is
# gone (an exception, a `del`) may be taken over; one whose owner is alive may not.
_OWNERS: "weakref.WeakValueDictionary[str, object]" = weakref.WeakValueDictionary()


def _gone(holder: dict, url: str) -> bool:
  if holder.get("host") != socket.gethostname():
    return False
  pid = holder.get("pid")
  if pid == os.getpid():
    return url not in _OWNERS
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return True
  except (PermissionError, TypeError, ValueError, OverflowError):
    return False
  return False


class Lock:
  """The lock file `name` in the folder at kvstore URL `root` (ending in "/"), held for
  an owner object (`adopt`; weakly referenced: an owner that is gone leaves the lock to be
  taken over)."""

  def __init__(self, root: str, name: str, *, what: str = "folder", context=None):
    self.url = root + name
    self._kv = ts.KvStore.open(root, context=context).result() if context is not None else \
        ts.KvStore.open(root).result()
    self._name = name
    mine = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
                       "token": uuid.uuid4().hex}).encode()
    for _ in range(3):
      got = self._kv.read(name).result()
      if got.state == "value":
        try:
          holder = json.loads(bytes(got.value))
        except ValueError:
          holder = {}
        holder = holder if isinstance(holder, dict) else {}
        if not _gone(holder, self.url):
          since = holder.get("since")
          raise Busy(
              f"{what} {root} is in use by pid {holder.get('pid', '?')} on "
              f"{holder.get('host', '?')}"
              + (f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}"
                 if isinstance(since, (int, float)) else "")
              + f"; if that process is gone, delete {self.url}")
        warnings.warn(f"{what} {root}: taking over the lock of a process that is gone "
                      f"(pid {holder.get('pid')} on {holder.get('host')})")
      generation = self._kv.write(name, mine, if_equal=got.stamp.generation).result().generation
      if generation:
        self._generation = generation
        return
    raise Busy(f"{what} {root}: another process took the lock first ({self.url})")

  def adopt(self, owner) -> "Lock":
    """Ties the lock to `owner`: while it lives, this process's own later attempts fail."""
    _OWNERS[self.url] = owner
    return self

  def release(self) -> None:
    """Deletes the lock file if it is still ours."""
    if self._generation is not None:
      self._kv.write(self._name, None, if_equal=self._generation).result()
      self._generation = None
      _OWNERS.pop(self.url, None)
