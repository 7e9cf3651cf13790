"""Result files of experiments: JSON, CSV and PNG, published together as one result set.

A run's set is written into a folder of its own, `<out>/.sets/<name>-<stamp>/`, closed by
`manifest.json` (the run's id, config, command line, time, and every file's SHA-256); then
`<out>/<name>`, a link to the current set, is swapped to it in one rename. A reader of
`<out>/<name>/` sees the previous set or the new one, never files of two runs, whatever
moment a run is killed at. Earlier sets stay in `.sets/` (the newest `KEEP` of each name).
"""
from __future__ import annotations

import csv
import datetime
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import uuid
from typing import Sequence

SETS = ".sets"
MANIFEST = "manifest.json"
KEEP = 10  # sets of one name kept in .sets (the current one among them)


def _atomic_write(path: str, data: bytes) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
  try:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # as open() would make it, not mkstemp's 0600
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def current_set(out: str, name: str) -> dict | None:
  """The manifest of the set `<out>/<name>` shows (None if there is none yet), read without
  checking its files (`read_set` checks them). Raises if `<out>/<name>` is not a set."""
  link = os.path.join(out, name)
  if not os.path.lexists(link):
    return None
  if not os.path.islink(link):
    raise ValueError(f"{link} exists and is not a result set (a link into {SETS}/): move it "
                     f"away or choose another --out")
  try:
    with open(os.path.join(link, MANIFEST)) as f:
      return dict(json.load(f), folder=os.path.realpath(link))
  except (OSError, ValueError, TypeError) as e:
    return {"damaged": str(e), "folder": os.path.realpath(link)}


def describe(manifest: dict) -> str:
  """A set's run in words, from its manifest (`current_set`)."""
  if "damaged" in manifest:
    return f"its manifest is unreadable: {manifest['damaged']}"
  return f"run {manifest.get('run_id')}, written {manifest.get('written')}: " + \
      " ".join(manifest.get("argv") or [])


def notice_of_earlier_run(out: str, name: str, previous: dict) -> str:
  """What a run about to write `<out>/<name>` should say when it shows `previous` (the
  manifest `current_set` read): an earlier run's results."""
  return (f"note: {os.path.join(out, name)} shows the results of an earlier run "
          f"({describe(previous)}); this run's replace them there when it finishes, the "
          f"earlier ones stay in {previous['folder']}")


def read_set(directory: str) -> dict:
  """A result set's manifest, after checking every file it names against its SHA-256."""
  path = os.path.join(directory, MANIFEST)
  try:
    with open(path) as f:
      manifest = json.load(f)
    files = dict(manifest["files"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{path}: not a readable result-set manifest ({e})") from None
  for file, digest in files.items():
    where = os.path.join(directory, file)
    if not os.path.exists(where):
      raise ValueError(f"result set {directory}: {file} is missing")
    if _sha256(where) != digest:
      raise ValueError(f"result set {directory}: {file} does not match its manifest (changed "
                       f"after the run wrote it)")
  return manifest


class ResultSet:
  """One run's result files under `<out>/<name>`, published as one unit (module docstring).

      result = ResultSet(out, "scaling", run_id, config)
      result.write_json("scaling.json", payload); result.write_csv(...); result.write_plot(...)
      result.publish()   # <out>/scaling now shows these files; until here, the previous set
  """

  def __init__(self, out: str, name: str, run_id: str, config: dict):
    self.out, self.name = out, name
    self.manifest = {"name": name, "run_id": run_id, "config": config,
                     "argv": list(sys.argv), "files": {}}
    current_set(out, name)  # fails now, not after the run, if out/name is not a set
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")  # sorts by time
    self.folder = os.path.join(out, SETS, f"{name}-{stamp}-{uuid.uuid4().hex[:6]}")
    self._staging = self.folder + ".partial"

  def _put(self, file: str, data: bytes) -> None:
    if "/" in file or file in ("", ".", "..", MANIFEST):
      raise ValueError(f"result file name {file!r}: a plain name other than {MANIFEST}")
    path = os.path.join(self._staging, file)
    _atomic_write(path, data)
    self.manifest["files"][file] = hashlib.sha256(data).hexdigest()

  def write_bytes(self, file: str, data: bytes) -> None:
    self._put(file, data)

  def write_json(self, file: str, obj) -> None:
    self._put(file, _json_bytes(obj))

  def write_csv(self, file: str, rows: Sequence[dict]) -> None:
    self._put(file, _csv_bytes(rows))

  def write_plot(self, file: str, figure) -> None:
    """A matplotlib figure in the format its name ends with (png, pdf, svg)."""
    self._put(file, _figure_bytes(figure, file.rsplit(".", 1)[-1]))

  def publish(self) -> dict | None:
    """Makes this set the current one; returns the manifest of the set it replaces (None if
    none), for the caller to say so."""
    self.manifest["written"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    _atomic_write(os.path.join(self._staging, MANIFEST), _json_bytes(self.manifest))
    os.rename(self._staging, self.folder)  # complete sets only carry their final name
    link = os.path.join(self.out, self.name)
    before = current_set(self.out, self.name)
    tmp = os.path.join(self.out, f".{self.name}.link-{uuid.uuid4().hex[:6]}")
    os.symlink(os.path.join(SETS, os.path.basename(self.folder)), tmp)
    os.replace(tmp, link)  # the one step that switches sets
    self._prune()
    return before

  def _prune(self) -> None:
    """Keeps the newest KEEP complete sets of this name; removes partial ones left by runs
    that were killed (older than a day: a partial set of a live run is recent)."""
    sets = os.path.join(self.out, SETS)
    mine = sorted(f for f in os.listdir(sets) if f.startswith(self.name + "-")
                  and f[len(self.name) + 1:][:8].isdigit())
    complete = [f for f in mine if not f.endswith(".partial")]
    old = complete[:-KEEP]
    day_ago = datetime.datetime.now().timestamp() - 86400
    old += [f for f in mine if f.endswith(".partial")
            and os.path.getmtime(os.path.join(sets, f)) < day_ago]
    for f in old:
      if os.path.join(sets, f) != self.folder:
        shutil.rmtree(os.path.join(sets, f), ignore_errors=True)


def _json_bytes(obj) -> bytes:
  return (json.dumps(obj, indent=1, sort_keys=True, default=float) + "\n").encode()


def _csv_bytes(rows: Sequence[dict]) -> bytes:
  buf = io.StringIO()
  if rows:
    # Every row's columns, in order of first appearance (rows may carry extra columns).
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
  return buf.getvalue().encode()


def _figure_bytes(figure, fmt: str) -> bytes:
  if fmt not in ("png", "pdf", "svg"):
    raise ValueError(f"figures are written as png, pdf or svg, not {fmt!r}")
  buf = io.BytesIO()
  figure.savefig(buf, format=fmt, dpi=120, bbox_inches="tight")
  return buf.getvalue()


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
  """A fixed-width text table of `columns` (floats to 4 significant digits); no rows: the
  header alone."""
  def cell(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)
  cells = [[cell(r[c]) for c in columns] for r in rows]
  widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
  lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
  lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
  return "\n".join(lines)
