"""One progress reporter for everything that runs long: rate, bytes/s and ETA on stderr."""
from __future__ import annotations

import sys
import time


class Progress:
  """Counts units of work (rows) and prints a throttled status line.

  `initial` is work already done before this run (a resumed run): it counts towards the
  total but not towards the rate.

  `enabled=False` keeps the counters (for callers that report rates) but prints nothing.
  """

  def __init__(self, total: int, *, initial: int = 0, label: str = "", unit: str = "rows",
               enabled: bool = True, every_s: float = 1.0, stream=None):
    self.total = int(total)
    self.label = label
    self.unit = unit
    self.enabled = enabled
    self.every_s = every_s
    self.stream = stream or sys.stderr
    self.done = self._initial = int(initial)
    self.bytes = 0
    self._start = time.perf_counter()
    self._last_print = 0.0
    self._printed = -1
    self._width = 0

  @property
  def elapsed(self) -> float:
    return time.perf_counter() - self._start

  def update(self, units: int, nbytes: int = 0) -> None:
    self.done += int(units)
    self.bytes += int(nbytes)
    now = time.perf_counter()
    if self.enabled and (now - self._last_print >= self.every_s or self.done >= self.total):
      self._last_print = now
      self._print()

  def status_line(self) -> str:
    elapsed = max(self.elapsed, 1e-9)
    rate = (self.done - self._initial) / elapsed
    remaining = (self.total - self.done) / rate if rate > 0 else float("inf")
    pct = 100.0 * self.done / self.total if self.total else 100.0
    eta = _fmt_seconds(remaining) if remaining != float("inf") else "?"
    return (f"{self.label} {self.done:,}/{self.total:,} {self.unit} ({pct:5.1f}%) "
            f"{rate:,.0f} {self.unit}/s {self.bytes / elapsed / 1e6:,.1f} MB/s "
            f"elapsed {_fmt_seconds(elapsed)} ETA {eta}")

  def _print(self) -> None:
    self._printed = self.done
    line = self.status_line()
    self.stream.write("\r" + line.ljust(self._width))  # pad over a longer previous line
    self._width = len(line)
    self.stream.flush()

  def close(self) -> None:
    if self.enabled:
      if self._printed != self.done:
        self._print()
      self.stream.write("\n")
      self.stream.flush()


def _fmt_seconds(s: float) -> str:
  s = int(round(s))
  h, rem = divmod(s, 3600)
  m, sec = divmod(rem, 60)
  return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"
