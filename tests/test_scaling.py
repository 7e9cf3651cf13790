"""The scaling protocol against a brute force per size and k; resume after kill -9; flag errors."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from knn_reference import brute_mutual_knn, cosine_top_k

from plato_jax import metrics
from plato_jax.gallery import gallery_order, parse_count, resolve_k
from plato_jax.scaling import run_scaling
from plato_jax.synthetic import WorldConfig, build_world

SMALL = WorldConfig(num_concepts=20, dims=(16, 24), layers=(3, 4))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  return build_world(str(tmp_path_factory.mktemp("worlds")), 6000, SMALL, progress=False)


QUERIES = 300


def test_results_equal_brute_force_per_size_and_k(world):
  store_a, store_b = world
  sizes = [QUERIES, 1000, 6000]
  res = run_scaling(store_a, store_b, queries=QUERIES, sizes=sizes, ks=["1", "10", "n/100"],
                    seed=3, layer_a="auto", layer_b="auto", progress=False, tile_rows=512)
  rows = {(r["size"], r["k_spec"]): r for r in res.rows}
  assert len(rows) == 9
  # the same order the run used: queries first, then chunks
  from plato_jax.gallery import choose_queries
  qrows = choose_queries(6000, QUERIES, 3)
  order = gallery_order(6000, qrows, 3)
  xa = store_a.read_layer(res.layer_a).astype(np.float32)[order]
  xb = store_b.read_layer(res.layer_b).astype(np.float32)[order]
  for n in sizes:
    for spec in ["1", "10", "n/100"]:
      k = resolve_k(spec, n)
      want = brute_mutual_knn(xa[:n], xb[:n], QUERIES, k)
      assert rows[(n, spec)]["mutual_knn"] == pytest.approx(want, abs=2.0 / (QUERIES * k)), (n, spec)
      assert rows[(n, spec)]["chance"] == pytest.approx(k / (n - 1))
      row = rows[(n, spec)]
      # its interval: the bootstrap of the float64 brute force's per-query overlaps
      a, b = cosine_top_k(xa[:n], QUERIES, k), cosine_top_k(xb[:n], QUERIES, k)
      overlap = np.array([len(np.intersect1d(r, t)) / k for r, t in zip(a, b)])
      low, high = metrics.bootstrap_interval(overlap, seed=3)
      assert (row["mutual_knn_low"], row["mutual_knn_high"]) == pytest.approx(
          (low, high), abs=2.0 / (QUERIES * k)), (n, spec)
      c = k / (n - 1)
      assert [row["chance_corrected"], row["chance_corrected_low"],
              row["chance_corrected_high"]] == pytest.approx(
          [(row[m] - c) / (1 - c) for m in ("mutual_knn", "mutual_knn_low", "mutual_knn_high")])
  # rank-biased overlap of the two rankings at depth 100, per size, from float64 rankings
  for r in res.ranking:
    n = r["size"]
    want = metrics.rank_biased_overlap(cosine_top_k(xa[:n], QUERIES, r["depth"]),
                                       cosine_top_k(xb[:n], QUERIES, r["depth"]), r["p"])
    assert r["depth"] == 100 and r["rbo"] == pytest.approx(want.mean(), abs=1e-3), n
    assert r["rbo_low"] <= r["rbo"] <= r["rbo_high"]
  # the fall from the smallest gallery to the largest, paired over the same queries
  change = {c["k_spec"]: c for c in res.change}
  assert set(change) == {"1", "10", "n/100"}
  drop = change["10"]
  assert drop["difference"] == pytest.approx(rows[(QUERIES, "10")]["mutual_knn"]
                                             - rows[(6000, "10")]["mutual_knn"])
  assert 0 < drop["low"] <= drop["difference"] <= drop["high"] and drop["p_value"] < 0.01
  # at n = queries the gallery is the queries alone: the PRH all-vs-all mutual_knn
  want = metrics.mutual_knn(xa[:QUERIES] / np.linalg.norm(xa[:QUERIES], axis=1, keepdims=True),
                            xb[:QUERIES] / np.linalg.norm(xb[:QUERIES], axis=1, keepdims=True), 10)
  assert rows[(QUERIES, "10")]["mutual_knn"] == pytest.approx(want, abs=1e-3)
  # the planted best layers (last of a, second-to-last of b) are found
  assert (res.layer_a, res.layer_b) == (2, 2)
  # the synthetic world shows the papers' shape: fixed-k alignment falls, n/100 holds
  assert rows[(6000, "10")]["mutual_knn"] < 0.5 * rows[(QUERIES, "10")]["mutual_knn"]
  assert rows[(6000, "n/100")]["mutual_knn"] > 0.5 * rows[(1000, "n/100")]["mutual_knn"]
  top1 = [q["top1_cosine"] for q in res.quality if q["model"] == "a"]
  assert top1 == sorted(top1), "neighbours get closer as the gallery grows"
  quality = {(q["size"], q["model"]): q for q in res.quality}
  for r in res.rows:  # each row carries its size's cosines, for the CSV
    for model in "ab":
      for what in ("top1_cosine", "top10_cosine"):
        assert r[f"{what}_{model}"] == quality[(r["size"], model)][what]


def test_argument_errors(world):
  store_a, store_b = world
  with pytest.raises(ValueError, match="exceeds the 6,000 rows of the stores"):
    run_scaling(store_a, store_b, queries=100, sizes=[100, 7000], progress=False)
  with pytest.raises(ValueError, match="smaller than the 100 queries"):
    run_scaling(store_a, store_b, queries=100, sizes=[50, 1000], progress=False)
  with pytest.raises(ValueError, match="gives 200 > 99 neighbours"):
    run_scaling(store_a, store_b, queries=100, sizes=[100, 1000], ks=["200"], progress=False)
  with pytest.raises(ValueError, match=r"query ids not in file://.*/a/: \[99999\]"):
    run_scaling(store_a, store_b, queries=[1, 2, 99999], sizes=[3, 100], progress=False)
  with pytest.raises(ValueError, match="not a count"):
    parse_count("ten")
  assert parse_count("1.5m") == 1_500_000 and parse_count("10k") == 10_000


def test_stores_with_different_rows_are_refused(tmp_path, world):
  other = build_world(str(tmp_path), 5000, SMALL, progress=False)
  with pytest.raises(ValueError, match="do not hold the same rows"):
    run_scaling(world[0], other[1], queries=100, sizes=[100], progress=False)


def test_common_rows_measure_the_ids_both_stores_hold(tmp_path, world):
  """Model b failed on 29 items: its store lacks their rows. Refused by default (the error
  counts them); with common_rows, the same protocol on the ids both hold equals a brute
  force on those rows in the plan's order."""
  from plato_jax.gallery import plan_galleries
  from plato_jax.store import StoreWriter
  store_a, store_b = world
  kept = np.sort(np.random.default_rng(1).permutation(6000)[29:])
  w = StoreWriter.create(str(tmp_path / "short"), num_rows=kept.size,
                         num_layers=store_b.num_layers, dim=store_b.dim,
                         dtype=store_b.meta["dtype"])
  w.append(store_b.gather(kept), store_b.ids()[kept])
  short = w.close()
  with pytest.raises(ValueError, match=r"29 ids of a are not in b, 0 of b not in a .*"
                                       r"measures the 5,971 both hold"):
    run_scaling(store_a, short, queries=100, sizes=[100], progress=False)
  sizes = [100, 2000, 5971]
  res = run_scaling(store_a, short, queries=100, sizes=sizes, ks=["10"], seed=2,
                    common_rows=True, progress=False, tile_rows=512)
  plan = plan_galleries(store_a, short, 100, sizes, ["10"], 2, common_rows=True)
  on_short = plan.on(short)
  np.testing.assert_array_equal(plan.ids[plan.order], on_short.ids[on_short.order])
  assert not np.isin(store_a.ids()[plan.order], store_a.ids()[np.setdiff1d(np.arange(6000),
                                                                           kept)]).any()
  xa = store_a.read_layer(res.layer_a).astype(np.float32)[plan.order]
  xb = short.read_layer(res.layer_b).astype(np.float32)[on_short.order]
  for row in res.rows:
    n = row["size"]
    want = brute_mutual_knn(xa[:n], xb[:n], 100, 10)
    assert row["mutual_knn"] == pytest.approx(want, abs=2.0 / 1000), n
  # the command line: refused without the flag; with it, says what it left out, same rows
  args = [f"--features_a={store_a.root}", f"--features_b={short.root}", "--queries=100",
          "--sizes=100,2000", "--k=10", "--seed=2", "--tile_rows=512", "--noprogress",
          f"--out={tmp_path / 'out'}"]
  refused = _run_cli(args)
  said = refused.communicate(timeout=300)[0]
  assert refused.returncode != 0 and "--common_rows" in said
  done = _run_cli(args + ["--common_rows"])
  out = done.communicate(timeout=300)[0]
  assert done.returncode == 0, out
  assert "5,971 rows in both stores; 29 of" in out
  written = json.loads((tmp_path / "out" / "scaling" / "scaling.json").read_text())["rows"]
  assert [r["mutual_knn"] for r in written] == [r["mutual_knn"] for r in res.rows[:2]]


def test_galleries_are_random_rows_of_a_store_written_in_sorted_order(tmp_path, world):
  """A store written in dataset order (sorted by a feature): each gallery is a random subset
  of its rows, and the results are the brute force's on those explicit subsets."""
  from plato_jax.gallery import plan_galleries
  from plato_jax.store import StoreWriter
  store_a, store_b = world
  by = np.argsort(store_a.read_layer(0)[:, 0].astype(np.float32), kind="stable")
  written = []
  for name, store in (("a", store_a), ("b", store_b)):
    w = StoreWriter.create(str(tmp_path / name), num_rows=6000, num_layers=store.num_layers,
                           dim=store.dim, dtype=store.meta["dtype"], chunk_rows=256)
    w.append(store.gather(by), store.ids()[by])
    written.append(w.close())
  sorted_a, sorted_b = written
  sizes = [100, 500, 2000, 6000]
  res = run_scaling(sorted_a, sorted_b, queries=100, sizes=sizes, ks=["10", "n/100"], seed=4,
                    layer_a=2, layer_b=2, progress=False, tile_rows=256)
  plan = plan_galleries(sorted_a, sorted_b, 100, sizes, ["10"], 4)
  # the 400 non-query rows of the 500-row gallery are spread over the store, not its start
  spread = np.setdiff1d(plan.order[:500], plan.query_rows)
  assert abs(np.mean(spread) / 6000 - 0.5) < 0.06 and spread.max() > 5000
  xa = sorted_a.read_layer(2).astype(np.float32)
  xb = sorted_b.read_layer(2).astype(np.float32)
  for row in res.rows:
    n, k = row["size"], row["k"]
    gallery = plan.order[:n]  # queries first, then the seeded random rows
    assert set(plan.query_rows) <= set(gallery)
    want = brute_mutual_knn(xa[gallery], xb[gallery], 100, k)
    assert row["mutual_knn"] == pytest.approx(want, abs=2.0 / (100 * k)), (n, k)


def test_world_rows_do_not_depend_on_the_worker_count(tmp_path, world):
  """Blocks come from per-block random streams: made by two spawned processes, the world is
  the one the fixture made in this process, bit for bit."""
  a, b = build_world(str(tmp_path), 6000, SMALL, progress=False, workers=2)
  for made, want in ((a, world[0]), (b, world[1])):
    for layer in range(want.num_layers):
      np.testing.assert_array_equal(made.read_layer(layer).view(np.uint16),
                                    want.read_layer(layer).view(np.uint16))


def _run_cli(args, log=None):
  """The experiment as a subprocess; output to `log` (a file: an unread pipe would fill up
  and stall a run that is never waited on)."""
  out = subprocess.PIPE if log is None else open(log, "w")
  return subprocess.Popen([sys.executable, "-m", "experiments.scaling", *args], cwd=REPO,
                          stdout=out, stderr=subprocess.STDOUT, text=True)


def test_cli_kill_9_then_resume_gives_identical_results(world, tmp_path):
  store_a, store_b = world
  common = [f"--features_a={store_a.root}", f"--features_b={store_b.root}", "--queries=200",
            "--sizes=200,1000,6000", "--k=1,10,n/100", "--tile_rows=128", "--checkpoint_every=1",
            "--noprogress"]
  clean = _run_cli(common + [f"--out={tmp_path / 'clean'}"])
  out = clean.communicate(timeout=300)[0]
  assert clean.returncode == 0, out[-3000:]

  crashed = _run_cli(common + [f"--out={tmp_path / 'crash'}"], log=tmp_path / "crash.log")
  deadline = time.time() + 120
  def b_checkpointed():
    runs = list((tmp_path / "crash" / "resume").glob("*/b"))
    return bool(runs) and any(p.name.isdigit() for p in runs[0].iterdir())  # a saved step
  while time.time() < deadline and not b_checkpointed():
    time.sleep(0.05)
  assert crashed.poll() is None, "the run ended before it could be killed: " + \
      (tmp_path / "crash.log").read_text()[-2000:]
  os.kill(crashed.pid, signal.SIGKILL)
  crashed.wait()
  assert not os.path.lexists(tmp_path / "crash" / "scaling")
  again = _run_cli(common + [f"--out={tmp_path / 'crash'}"])
  out = again.communicate(timeout=300)[0]
  assert again.returncode == 0, out[-3000:]
  a = json.loads((tmp_path / "clean" / "scaling" / "scaling.json").read_text())
  b = json.loads((tmp_path / "crash" / "scaling" / "scaling.json").read_text())
  assert a["rows"] == b["rows"] and a["quality"] == b["quality"]
  for name in ("scaling.csv", "scaling.png"):
    assert (tmp_path / "crash" / "scaling" / name).stat().st_size > 0
  # spent checkpoints are removed, and the resume folder with them: --out holds results only
  assert not (tmp_path / "crash" / "resume").exists()
  assert {p.name for p in (tmp_path / "crash").iterdir()} == {".sets", "scaling"}


def test_cli_two_processes_equal_one(world, tmp_path):
  import socket
  store_a, store_b = world
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  common = [f"--features_a={store_a.root}", f"--features_b={store_b.root}", "--queries=150",
            "--sizes=150,2000,6000", "--tile_rows=256", "--noprogress", "--noresume"]
  single = _run_cli(common + [f"--out={tmp_path / 'one'}"], log=tmp_path / "one.log")
  assert single.wait(timeout=300) == 0, (tmp_path / "one.log").read_text()[-3000:]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  procs = [subprocess.Popen(
      [sys.executable, "-m", "experiments.scaling", *common, f"--out={tmp_path / 'two'}",
       f"--coordinator=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=REPO, env=env, stdout=open(tmp_path / f"p{i}.log", "w"), stderr=subprocess.STDOUT)
      for i in range(2)]
  for i, p in enumerate(procs):
    assert p.wait(timeout=300) == 0, (tmp_path / f"p{i}.log").read_text()[-3000:]
  a = json.loads((tmp_path / "one" / "scaling" / "scaling.json").read_text())
  b = json.loads((tmp_path / "two" / "scaling" / "scaling.json").read_text())
  assert a["rows"] == b["rows"] and a["quality"] == b["quality"]


def test_cli_flag_errors(tmp_path):
  p = _run_cli(["--features_a=x", "--noprogress"])
  out = p.communicate(timeout=120)[0]
  assert p.returncode != 0 and "give both --features_a and --features_b" in out


def test_mutual_knn_from_neighbours_counts_shared_ids():
  rng = np.random.default_rng()
  for q, k in [(50, 1), (40, 10), (7, 3000)]:
    a = np.stack([rng.choice(4 * k, k, replace=False) for _ in range(q)])
    b = np.stack([rng.choice(4 * k, k, replace=False) for _ in range(q)])  # overlap by chance
    want = np.mean([len(np.intersect1d(x, y)) for x, y in zip(a, b)]) / k
    assert metrics.mutual_knn_from_neighbours(a, b) == pytest.approx(want, abs=1e-12)
  assert metrics.mutual_knn_from_neighbours(a, a) == 1.0
  with pytest.raises(ValueError, match="both be"):
    metrics.mutual_knn_from_neighbours(a, a[:, :5])


def test_interval_covers_the_whole_stores_alignment_on_the_synthetic_world(world, rng):
  """The m_NN interval over queries, on the synthetic world's whole-store gallery: the
  population is every row as a query (its overlap at k = n/100 = 60 in both models), each sample
  draws 300 of them without replacement; the 95% interval covers the population's mean in
  93–97% of 2,000 samples (binomial sd of the rate: 0.5%; measured 95.4%)."""
  store_a, store_b = world
  xa = store_a.read_layer(2).astype(np.float32)
  xb = store_b.read_layer(2).astype(np.float32)
  per_row = metrics.mutual_knn_per_row(xa / np.linalg.norm(xa, axis=1, keepdims=True),
                                       xb / np.linalg.norm(xb, axis=1, keepdims=True), 60)
  truth, covered = per_row.mean(), 0
  assert 0.05 < truth < 0.95 and np.ptp(per_row) > 0  # an interval with something to cover
  for trial in range(2000):
    sample = per_row[rng.choice(per_row.size, 300, replace=False)]
    low, high = metrics.bootstrap_interval(sample, seed=trial)
    covered += low <= truth <= high
  assert 0.93 <= covered / 2000 <= 0.97, covered / 2000
