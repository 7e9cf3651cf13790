"""The experiments of PAPERS.md §4.3 beyond scaling: each run from its command on a small
synthetic world, its numbers recomputed directly with numpy / plato_jax.metrics."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from knn_reference import brute_mutual_knn

from plato_jax.scaling import choose_queries, expand_k, gallery_order
from plato_jax.synthetic import WorldConfig, build_world

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = WorldConfig(num_concepts=20, dims=(16, 24), layers=(3, 4))
ROWS, QUERIES = 3000, 64


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  return build_world(str(tmp_path_factory.mktemp("worlds")), ROWS, SMALL, progress=False)


def run_experiment(name, *args):
  """The experiment's command; returns its printed output (fails the test on an error)."""
  done = subprocess.run([sys.executable, "-m", f"experiments.{name}", "--progress=false", *args],
                        cwd=REPO, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stdout + done.stderr
  return done.stdout


def gallery(store, layer, seed=0):
  """The rows of one layer in the experiments' gallery order (queries first)."""
  rows = choose_queries(ROWS, QUERIES, seed)
  order = gallery_order(ROWS, rows, store.meta["chunk_rows"], seed)
  return store.read_layer(layer).astype(np.float32)[order]


def test_k_sweep_equals_brute_force_at_every_size_and_k(world, tmp_path):
  a, b = world
  out = run_experiment("k_sweep", f"--features_a={a.root}", f"--features_b={b.root}",
                       f"--queries={QUERIES}", f"--sizes={QUERIES},{ROWS}", "--num_k=6",
                       "--max_k=1000", f"--out={tmp_path}")
  assert "wrote" in out
  result = json.loads((tmp_path / "k_sweep.json").read_text())
  assert {p.name for p in tmp_path.iterdir()} >= {"k_sweep.json", "k_sweep.csv", "k_sweep.png"}
  xa, xb = gallery(a, result["layer_a"]), gallery(b, result["layer_b"])
  rows = result["rows"]
  for n in (QUERIES, ROWS):
    ks = [r["k"] for r in rows if r["size"] == n]
    assert ks == expand_k("log:6:1000", n) and ks[0] == 1 and ks[-1] == min(n - 1, 1000)
    for r in (r for r in rows if r["size"] == n):
      want = brute_mutual_knn(xa[:n], xb[:n], QUERIES, r["k"])
      assert r["mutual_knn"] == pytest.approx(want, abs=2.0 / (QUERIES * r["k"])), r
      assert r["chance"] == pytest.approx(r["k"] / (n - 1))
  # all neighbours of the queries-only gallery: every set is the same, alignment is 1
  assert [r for r in rows if r["size"] == QUERIES][-1]["mutual_knn"] == 1.0
