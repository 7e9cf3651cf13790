"""Two `jax.distributed` CPU processes, each reading its own tiles, equal one process."""
import os
import socket
import subprocess
import sys

import numpy as np

from plato_jax.knn import search_prefixes

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
  seed = int(np.random.SeedSequence().entropy % 2**31)
  port = _free_port()
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [os.path.dirname(os.path.dirname(WORKER)), os.environ.get("PYTHONPATH", "")])}
  env.pop("XLA_FLAGS", None)
  outs = [tmp_path / f"p{i}.npz" for i in range(2)]
  procs = [subprocess.Popen([sys.executable, WORKER, str(i), str(port), str(seed), str(outs[i])],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = [p.communicate(timeout=240)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]

  rng = np.random.default_rng(seed)
  gallery = rng.integers(-2, 3, size=(1100, 8)).astype(np.float32)
  expected = search_prefixes(gallery[:70], gallery, 12, query_ids=np.arange(70), prefix_sizes=[300, 1100],
                    tile_rows=100)
  reads = [np.load(out)["reads"] for out in outs]
  rows = [np.concatenate([np.arange(a, b) for a, b in r]) for r in reads]
  assert len(np.intersect1d(rows[0], rows[1])) == 0, "each process reads only its own tiles"
  # Every row read (again, in a second pass for queries whose ties outrun the margin).
  np.testing.assert_array_equal(np.unique(np.concatenate(rows)), np.arange(1100))
  for out in outs:
    got = np.load(out)
    for i, r in enumerate(expected):
      np.testing.assert_array_equal(got[f"ids{i}"], r.ids)
      np.testing.assert_array_equal(got[f"scores{i}"], r.scores)
