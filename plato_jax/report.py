"""Result files of experiments: JSON, CSV and PNG, each written atomically (temp + rename)."""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from typing import Sequence


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


def write_json(path: str, obj) -> None:
  _atomic_write(path, (json.dumps(obj, indent=1, sort_keys=True, default=float) + "\n").encode())


def write_csv(path: str, rows: Sequence[dict]) -> None:
  buf = io.StringIO()
  if rows:
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  _atomic_write(path, buf.getvalue().encode())


def write_plot(path: str, figure) -> None:
  buf = io.BytesIO()
  figure.savefig(buf, format="png", dpi=120, bbox_inches="tight")
  _atomic_write(path, buf.getvalue())


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
  """A fixed-width text table of `columns` (floats to 4 significant digits)."""
  def cell(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)
  cells = [[cell(r[c]) for c in columns] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
  lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
  lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
  return "\n".join(lines)
