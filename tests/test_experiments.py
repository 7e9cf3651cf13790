"""The experiments of both papers beyond scaling: each run from its command on a small
synthetic world, its numbers recomputed directly with numpy / plato_jax.metrics."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from knn_reference import brute_mutual_knn, cosine_top_k

from plato_jax.gallery import choose_queries, expand_k, gallery_order
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
  order = gallery_order(ROWS, rows, seed)
  return store.read_layer(layer).astype(np.float32)[order]


def test_k_sweep_equals_brute_force_at_every_size_and_k(world, tmp_path):
  a, b = world
  out = run_experiment("k_sweep", f"--features_a={a.root}", f"--features_b={b.root}",
                       f"--queries={QUERIES}", f"--sizes={QUERIES},{ROWS}", "--num_k=6",
                       "--max_k=1000", f"--out={tmp_path}")
  assert "wrote" in out
  result = json.loads((tmp_path / "k_sweep" / "k_sweep.json").read_text())
  assert {p.name for p in (tmp_path / "k_sweep").iterdir()} == {
      "k_sweep.json", "k_sweep.csv", "k_sweep.png", "k_sweep.pdf", "manifest.json"}
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
  assert result["change"] == []  # a log grid of k's names no one k to compare across sizes
  # the mean lift over chance, on the k/n range both sweeps cover
  lift = {r["size"]: r for r in result["lift"]}
  sweeps = {n: expand_k("log:6:1000", n) for n in (QUERIES, ROWS)}
  lo = max(np.log(ks[0] / n) for n, ks in sweeps.items())
  hi = min(np.log(ks[-1] / n) for n, ks in sweeps.items())
  assert set(lift) == {QUERIES, ROWS}
  for n in (QUERIES, ROWS):
    ks = expand_k("log:6:1000", n)
    a, b = cosine_top_k(xa[:n], QUERIES, ks[-1]), cosine_top_k(xb[:n], QUERIES, ks[-1])
    per_query = np.array([[len(np.intersect1d(r[:k], t[:k])) / k for k in ks]
                          for r, t in zip(a, b)])
    fine = np.linspace(lo, hi, 100_001)
    want = np.mean([np.trapezoid(np.interp(fine, np.log(np.array(ks) / n), row), fine)
                    for row in per_query / (np.array(ks) / (n - 1))]) / (hi - lo)
    assert lift[n]["lift_area"] == pytest.approx(want, rel=1e-4), n
    assert lift[n]["from_k_over_n"] == pytest.approx(1 / QUERIES)
    assert lift[n]["lift_area_low"] <= lift[n]["lift_area"] <= lift[n]["lift_area_high"]


def test_gallery_seeds_give_the_spread_of_other_gallery_draws(tmp_path):
  """--gallery_seeds=3: the same queries in three gallery orders (seeds 5, 6, 7); each row
  reports how far m_NN moves between them. The queries-only and the whole-store galleries
  are the same in every draw. (20,000 rows: several of the order's 4,096-row runs.)"""
  rows_total = 20_000
  a, b = build_world(str(tmp_path / "w"), rows_total, SMALL, progress=False)
  run_experiment("scaling", f"--features_a={a.root}", f"--features_b={b.root}",
                 f"--queries={QUERIES}", f"--sizes={QUERIES},10k,{rows_total}", "--k=10",
                 "--seed=5", "--gallery_seeds=3", f"--out={tmp_path}")
  result = json.loads((tmp_path / "scaling" / "scaling.json").read_text())
  rows = {r["size"]: r for r in result["rows"]}
  q_rows = choose_queries(rows_total, QUERIES, 5)
  xa = a.read_layer(result["layer_a"]).astype(np.float32)
  xb = b.read_layer(result["layer_b"]).astype(np.float32)
  for n in (QUERIES, 10_000, rows_total):
    draws = []
    for seed in (5, 6, 7):
      order = gallery_order(rows_total, q_rows, seed)[:n]
      draws.append(brute_mutual_knn(xa[order], xb[order], QUERIES, 10))
    tol = 2.0 / (QUERIES * 10)
    assert rows[n]["mutual_knn"] == pytest.approx(draws[0], abs=tol)
    assert rows[n]["mutual_knn_gallery_sd"] == pytest.approx(np.std(draws, ddof=1), abs=tol)
    assert rows[n]["mutual_knn_gallery_min"] == pytest.approx(min(draws), abs=tol)
    assert rows[n]["mutual_knn_gallery_max"] == pytest.approx(max(draws), abs=tol)
  assert rows[QUERIES]["mutual_knn_gallery_sd"] == 0 == rows[rows_total]["mutual_knn_gallery_sd"]
  assert rows[10_000]["mutual_knn_gallery_sd"] > 0


def test_model_family_shares_rows_and_labels_and_grades_alignment(world, tmp_path):
  from plato_jax import metrics
  from plato_jax.synthetic import World, build_model
  a, b = world
  directory = os.path.dirname(os.path.dirname(a.root.rstrip("/").removeprefix("file://")))
  same = build_model(directory, ROWS, 0, 0, 1.0, SMALL, progress=False)
  assert same.root == a.root  # model 0 is the world's own store
  concepts = np.concatenate([World(SMALL).block(i, min(8192, ROWS - i * 8192))[0]
                             for i in range(-(-ROWS // 8192))])
  np.testing.assert_array_equal(a.column("label"), concepts)
  scores = []
  for j, quality in ((1, 0.25), (2, 4.0)):
    model = build_model(str(tmp_path), ROWS, 0, j, quality, SMALL, progress=False)
    np.testing.assert_array_equal(model.ids(), a.ids())
    np.testing.assert_array_equal(model.column("label"), concepts)
    assert model.meta["quality"] == quality and model.meta["model_index"] == j
    x = model.read_layer(2).astype(np.float32)[:500]
    y = b.read_layer(2).astype(np.float32)[:500]
    scores.append(metrics.mutual_knn(x / np.linalg.norm(x, axis=1, keepdims=True),
                                     y / np.linalg.norm(y, axis=1, keepdims=True), 10))
  assert scores[0] < scores[1]  # less layer noise: closer to the other modality


def test_within_modality_pairs_equal_brute_force(world, tmp_path):
  from plato_jax.synthetic import build_model
  a, b = world
  same_a = build_model(str(tmp_path / "w"), ROWS, 0, 1, 1.0, SMALL, progress=False)
  run_experiment("within_modality", f"--features_a={a.root}", f"--features_b={b.root}",
                 f"--same_a={same_a.root}", f"--queries={QUERIES}", f"--sizes={QUERIES},{ROWS}",
                 "--k=1,10", f"--out={tmp_path / 'out'}")
  result = json.loads((tmp_path / "out" / "within_modality" / "within_modality.json").read_text())
  assert [run["pair"] for run in result["runs"]] == ["a vs a'", "a vs b"]  # no --same_b
  for run, (x, y) in zip(result["runs"], ((a, same_a), (a, b))):
    xs, ys = gallery(x, run["layer_a"]), gallery(y, run["layer_b"])
    for r in run["rows"]:
      want = brute_mutual_knn(xs[:r["size"]], ys[:r["size"]], QUERIES, r["k"])
      assert r["mutual_knn"] == pytest.approx(want, abs=2.0 / (QUERIES * r["k"])), (run["pair"], r)


def test_null_calibration_equals_the_calibrated_similarity_package(world):
  """Gröger et al.'s own package (calibrated-similarity, Algorithm 2: max over layer pairs)
  on the queries' features, fed the same permutations through its perm_fn: the same
  critical value τ, calibrated score and p-value as `plato_jax.null` at n = Q."""
  import torch
  from calibrated_similarity import calibrate_layers

  from plato_jax import metrics
  from plato_jax.gallery import plan_galleries
  from plato_jax.null import run_null
  a, b = world
  k, permutations, seed = 10, 25, 3
  res = run_null(a, b, queries=QUERIES, sizes=[QUERIES, 1000], ks=[str(k)],
                 permutations=permutations, seed=seed, progress=False, tile_rows=512)
  row = next(r for r in res.rows if r["size"] == QUERIES)
  plan = plan_galleries(a, b, QUERIES, [QUERIES], [str(k)], seed)
  def layers(store):  # the queries in gallery order, each layer's rows L2-normalised
    x = store.gather(plan.order[:QUERIES]).astype(np.float64)
    return [torch.from_numpy(x[:, l] / np.linalg.norm(x[:, l], axis=1, keepdims=True))
            for l in range(store.num_layers)]
  draw = np.random.default_rng([seed, QUERIES, k])  # the draws `permuted` makes, in order
  def same_permutations(n, device):
    return torch.from_numpy(np.concatenate([draw.permutation(n), n + draw.permutation(0)]))
  def mutual_knn(x, y):
    return metrics.mutual_knn(x.numpy().astype(np.float32), y.numpy().astype(np.float32), k)
  score, p_value, tau = calibrate_layers(layers(a), layers(b), mutual_knn, agg="max",
                                         K=permutations, alpha=0.05, perm_fn=same_permutations)
  assert row["tau"] == pytest.approx(float(tau), abs=1e-6)
  assert row["calibrated_tau"] == pytest.approx(float(score), abs=1e-6)
  assert row["p_value"] == pytest.approx(float(p_value), abs=1e-6)


def test_relabelled_neighbours_are_the_neighbours_of_the_relabelled_model(rng):
  """N_{b∘π}(q) = π⁻¹(N_b(π(q))): the identity that lets one search serve every permutation."""
  from knn_reference import cosine_top_k

  from plato_jax.null import permuted
  n, q, k = 400, 30, 7
  x = rng.standard_normal((n, 12))
  neighbours = cosine_top_k(x, q, k)[None]            # [1 layer, Q, k] positions
  seed = int(rng.integers(2**31))
  got = permuted(neighbours, n, q, np.random.default_rng(seed))[0]
  draw = np.random.default_rng(seed)                  # the same π, applied to the rows
  perm = np.concatenate([draw.permutation(q), q + draw.permutation(n - q)])
  want = cosine_top_k(x[perm], q, k)                  # row r of b∘π is row π(r) of b
  np.testing.assert_array_equal(np.sort(got, axis=1), np.sort(want, axis=1))


def test_null_scores_equal_direct_computation(world):
  from plato_jax import metrics
  from plato_jax.null import run_null
  a, b = world
  res = run_null(a, b, queries=QUERIES, sizes=[QUERIES, ROWS], ks=["1", "10"], permutations=30,
                 seed=0, progress=False, tile_rows=512)
  for r in res.rows:
    n, k = r["size"], r["k"]
    raw = np.array([[brute_mutual_knn(gallery(a, la)[:n], gallery(b, lb)[:n], QUERIES, k)
                     for lb in range(b.num_layers)] for la in range(a.num_layers)])
    assert r["raw_fixed"] == pytest.approx(raw[res.layer_a, res.layer_b], abs=2 / (QUERIES * k))
    for name in ("raw_fixed", "raw_reselected"):
      assert r[f"{name}_low"] <= r[name] <= r[f"{name}_high"]
    assert r["raw_reselected"] == pytest.approx(raw.max(), abs=2 / (QUERIES * k))
    assert r["null_fixed"] <= r["null_max"]  # per permutation, one pair's score <= the max
    assert r["calibrated"] == pytest.approx(r["raw_reselected"] - r["null_max"])
    assert r["calibrated_tau"] == pytest.approx(
        min(max((r["raw_reselected"] - r["tau"]) / (1 - r["tau"]), 0), 1))
    assert 1 / 31 <= r["p_value"] <= 1
    # the shuffled pairing of one pair sits at chance k/(n-1), within sampling error
    assert r["null_fixed"] == pytest.approx(k / (n - 1), rel=0.5, abs=3 / (QUERIES * k))
  q_rows = choose_queries(ROWS, QUERIES, 0)
  qa = a.gather(q_rows).astype(np.float32)
  qb = b.gather(q_rows).astype(np.float32)
  best = metrics.compute_score(qa, qb, "mutual_knn", topk=10)
  assert (res.layer_a, res.layer_b) == tuple(best.indices)  # fixed on the queries, as scaling


def test_alignment_grid_equals_compute_score_per_pair(world, tmp_path):
  from plato_jax import metrics
  from plato_jax.grid import model_name
  from plato_jax.synthetic import build_model
  a, b = world
  a1 = build_model(str(tmp_path / "w"), ROWS, 0, 1, 0.3, SMALL, progress=False)
  values = tmp_path / "values.csv"
  values.write_text(f"model,value\n{model_name(b)},0.25\n")
  run_experiment("alignment_grid", f"--models_a={a.root},{a1.root}", f"--models_b={b.root}",
                 f"--queries={QUERIES}", "--metrics=mutual_knn,cka", "--topk=5",
                 f"--values={values}", f"--out={tmp_path / 'out'}")
  rows = json.loads((tmp_path / "out" / "alignment_grid" / "alignment_grid.json").read_text())["rows"]
  assert [(r["model_a"], r["metric"]) for r in rows] == [
      (model_name(a), "mutual_knn@5"), (model_name(a), "cka"),
      (model_name(a1), "mutual_knn@5"), (model_name(a1), "cka")]
  q_rows = choose_queries(ROWS, QUERIES, 0)
  xb = metrics.prepare_features(b.gather(q_rows).astype(np.float32))
  for r, store in zip(rows, (a, a, a1, a1)):
    xa = metrics.prepare_features(store.gather(q_rows).astype(np.float32))
    metric, topk = ("mutual_knn", 5) if r["metric"] == "mutual_knn@5" else ("cka", None)
    want = metrics.compute_score(xa, xb, metric, topk=topk)
    assert r["score"] == pytest.approx(want.score, rel=1e-6)
    assert (r["layer_a"], r["layer_b"]) == tuple(want.indices)
    assert r["value_b"] == 0.25
    if metric == "mutual_knn":  # its interval over the queries, for the chosen pair
      per_row = metrics.mutual_knn_per_row(xa[:, r["layer_a"]], xb[:, r["layer_b"]], 5)
      assert per_row.mean() == pytest.approx(r["score"], rel=1e-6)
      assert (r["score_low"], r["score_high"]) == metrics.bootstrap_interval(per_row, seed=0)
    else:
      assert "score_low" not in r
  bad = tmp_path / "bad.csv"
  bad.write_text("model,value\nsomething-else,1\n")
  done = subprocess.run([sys.executable, "-m", "experiments.alignment_grid", "--progress=false",
                         f"--models_a={a.root}", f"--models_b={b.root}", f"--queries={QUERIES}",
                         f"--values={bad}", f"--out={tmp_path / 'bad'}"],
                        cwd=REPO, capture_output=True, text=True, timeout=600)
  assert done.returncode != 0 and f"no value for models ['{model_name(b)}']" in done.stderr


def test_trend_fit_equals_the_formulas(rng):
  from plato_jax.grid import trend_fit
  x, y = rng.random(8), rng.random(8)
  xn, yn = rng.random(5), rng.random(5)
  fit = trend_fit(x, y, xn, yn)
  slope, intercept = np.polyfit(x, y, 1)
  assert fit["slope"] == pytest.approx(slope) and fit["intercept"] == pytest.approx(intercept)
  assert fit["r2_base"] == pytest.approx(np.corrcoef(x, y)[0, 1] ** 2)
  predicted = intercept + slope * xn
  assert fit["r2_new"] == pytest.approx(
      1 - np.sum((yn - predicted) ** 2) / np.sum((yn - yn.mean()) ** 2))
  assert np.isnan(trend_fit(x, y, xn[:1], yn[:1])["r2_new"])
  with pytest.raises(ValueError, match="two distinct x"):
    trend_fit([1, 1], [0, 1])


def test_llm_trend_fits_equal_direct_ols(world, tmp_path):
  from plato_jax import metrics
  from plato_jax.grid import model_name, trend_fit
  from plato_jax.synthetic import build_model
  a, b = world
  language = [b] + [build_model(str(tmp_path / "w"), ROWS, 1, j, q, SMALL, progress=False)
                    for j, q in ((1, 0.1), (2, 0.3), (3, 2.0))]
  bench = tmp_path / "bench.csv"
  bench.write_text("model,group,hellaswag,gsm8k\n" + "".join(
      f"{model_name(s)},{g},{h},{m}\n" for s, g, h, m in zip(
          language, ("base", "base", "new", "new"), (0.3, 0.5, 0.4, 0.9), (0.1, 0.2, 0.6, 0.3))))
  run_experiment("llm_trend", f"--models_a={a.root}", f"--models_b={','.join(s.root for s in language)}",
                 f"--benchmarks={bench}", f"--queries={QUERIES}", "--k=5", f"--out={tmp_path / 'out'}")
  result = json.loads((tmp_path / "out" / "llm_trend" / "llm_trend.json").read_text())
  q_rows = choose_queries(ROWS, QUERIES, 0)
  xa = metrics.prepare_features(a.gather(q_rows).astype(np.float32))
  align = [metrics.compute_score(xa, metrics.prepare_features(s.gather(q_rows).astype(np.float32)),
                                 "mutual_knn", topk=5).score for s in language]
  scores = {"hellaswag": (0.3, 0.5, 0.4, 0.9), "gsm8k": (0.1, 0.2, 0.6, 0.3)}
  for fit in result["fits"]:
    x = scores[fit["benchmark"]]
    want = trend_fit(x[:2], align[:2], x[2:], align[2:])
    for key in ("slope", "intercept", "r2_new"):
      assert fit[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), (fit, want)
  assert {s["benchmark"] for s in result["summary"]} == {"hellaswag", "gsm8k"}
  bench.write_text("model,group,hellaswag\nx,old,0.1\n")
  done = subprocess.run([sys.executable, "-m", "experiments.llm_trend", "--progress=false",
                         f"--models_a={a.root}", f"--models_b={b.root}", f"--benchmarks={bench}",
                         f"--out={tmp_path / 'bad'}"], cwd=REPO, capture_output=True, text=True)
  assert done.returncode != 0 and "line 2: group must be base or new, got 'old'" in done.stderr


def brute_neighbours(queries, gallery, gallery_ids, k):
  """float64 cosine top-k; ties by id ascending (as the engine)."""
  q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
  s = q.astype(np.float64) @ g.astype(np.float64).T
  return np.stack([gallery_ids[np.lexsort((gallery_ids, -row))[:k]] for row in s])


def test_class_decomposition_equals_numpy(rng):
  from plato_jax.decomposition import class_decomposition, class_name_features, class_order
  classes, per_class, d = 12, 8, 6
  labels = np.repeat(np.arange(classes), per_class)[rng.permutation(classes * per_class)]
  centres = rng.standard_normal((classes, d))
  xa = (centres[labels] + 0.8 * rng.standard_normal((len(labels), d))).astype(np.float32)
  xb = (centres[labels] + 1.2 * rng.standard_normal((len(labels), d))).astype(np.float32)
  names = class_name_features(xb, labels)
  ids = np.arange(len(labels)) * 5 + 3
  rows = class_decomposition(xa, xb, labels, [1, 3, 7], [1, 3], seed=4, ids=ids,
                             features_b_names=names)
  queries, gallery, _, depth = class_order(labels, 4)
  assert depth == per_class - 1 and len(rows) == 6
  for r in rows:
    g = gallery[:classes * r["ipc"]]
    # the gallery holds exactly ipc items of every class, no query
    assert np.all(np.bincount(labels[g], minlength=classes) == r["ipc"])
    assert not np.isin(g, queries).any()
    nb = {m: brute_neighbours(x[queries], x[g], ids[g], r["k"])
          for m, x in (("a", xa), ("b", xb), ("n", names))}
    label = {int(i): int(c) for i, c in zip(ids, labels)}
    acc = {m: np.mean([[label[i] == labels[q] for i in row] for q, row in zip(queries, v)],
                      axis=1) for m, v in nb.items()}
    assert r["acc_img"] == pytest.approx(acc["a"].mean())
    assert r["acc_txt"] == pytest.approx(acc["b"].mean())
    assert r["both"] == pytest.approx((acc["a"] * acc["b"]).mean())
    assert r["strict"] == pytest.approx(np.mean([len(np.intersect1d(x, y)) for x, y in
                                                 zip(nb["a"], nb["b"])]) / r["k"])
    hit = np.mean([[label[i] == labels[q] for i in row] for q, row in zip(queries, nb["a"])],
                  axis=1) > 0
    assert r["hit_img"] == pytest.approx(hit.mean())  # hit@k: any of the k of its class
    for name in ("acc_img", "acc_txt", "both", "strict"):
      assert r[f"{name}_low"] <= r[name] <= r[f"{name}_high"]
    # a class-name caption is nearest its own class: all of its ipc items come first
    assert r["acc_txt_names"] == pytest.approx(min(r["ipc"], r["k"]) / r["k"])
    assert r["strict_names"] == pytest.approx(np.mean([len(np.intersect1d(x, y)) for x, y in
                                                       zip(nb["a"], nb["n"])]) / r["k"])
  with pytest.raises(ValueError, match=r"ipc must lie in \[1, 7\]"):
    class_decomposition(xa, xb, labels, [8], [1])


def test_imagenet_experiment_runs_on_store_labels(world, tmp_path):
  a, b = world
  out = run_experiment("imagenet", f"--features_a={a.root}", f"--features_b={b.root}",
                       "--ipc=1,5", "--k=1,3", f"--out={tmp_path}")
  result = json.loads((tmp_path / "imagenet" / "imagenet.json").read_text())
  assert [(r["ipc"], r["k"]) for r in result["rows"]] == [(1, 1), (1, 3), (5, 1), (5, 3)]
  assert "strict_names" not in result["rows"][0]  # real stores: no class-name stand-in
  assert "20 classes" in out
  labels = tmp_path / "labels.txt"
  labels.write_text("1\n2\n")
  done = subprocess.run([sys.executable, "-m", "experiments.imagenet", "--progress=false",
                         f"--features_a={a.root}", f"--features_b={b.root}", f"--labels={labels}",
                         f"--out={tmp_path / 'bad'}"], cwd=REPO, capture_output=True, text=True)
  assert done.returncode != 0 and f"--labels has 2 labels, the stores {ROWS} rows" in done.stderr


def test_round_robin_orders_items_by_rank_within_their_source(rng):
  from plato_jax.many_to_many import round_robin
  groups = rng.integers(0, 5, 40)
  order, rank = round_robin(groups)
  assert sorted(order.tolist()) == list(range(40)) and np.all(np.diff(rank) >= 0)
  for g in range(5):  # within a source, items keep their store order and ranks 0, 1, 2, ...
    rows = order[groups[order] == g]
    assert np.all(np.diff(rows) > 0)
    np.testing.assert_array_equal(rank[groups[order] == g], np.arange(len(rows)))


def test_many_to_many_equals_brute_force(world, tmp_path):
  from plato_jax.many_to_many import run_many_to_many
  from plato_jax.synthetic import build_items
  a, b = world
  dense = build_items(str(tmp_path), ROWS, 0, 3, SMALL, progress=False)
  out = run_many_to_many(dense, b, layer_dense=2, layer_sparse=3, queries=QUERIES,
                         multiplicities=[1, 2, 3], ks=[1, 5], seed=1, tile_rows=512)
  q = choose_queries(ROWS, QUERIES, 1)                 # sources = rows of the world
  xd, xs = dense.read_layer(2).astype(np.float32), b.read_layer(3).astype(np.float32)
  dense_ids, groups = dense.ids(), dense.column("group").astype(int)
  for r in out["rows"]:
    m, k = r["multiplicity"], r["k"]
    gallery = np.flatnonzero(dense_ids < m * ROWS)    # items 0..m-1 of every source
    near_d = np.stack([brute_neighbours(xd[[s]], xd[gallery[gallery != s]],
                                        dense_ids[gallery[gallery != s]], k)[0] for s in q])
    others = [np.delete(np.arange(ROWS), s) for s in q]
    near_s = np.stack([brute_neighbours(xs[[s]], xs[o], b.ids()[o], k)[0]
                       for s, o in zip(q, others)])
    gd = groups[near_d]                               # dense ids are rows here
    want_set = np.mean([len(np.intersect1d(d, s)) for d, s in zip(gd, near_s)]) / k
    want_slots = np.mean([np.isin(d, s).sum() for d, s in zip(gd, near_s)]) / k
    assert r["group_set"] == pytest.approx(want_set), r
    assert r["matched_slots"] == pytest.approx(want_slots), r
    for name in ("group_set", "matched_slots"):
      assert r[f"{name}_low"] <= r[name] <= r[f"{name}_high"]
    assert r["own_source_in_dense"] == pytest.approx(np.mean(gd == q[:, None]))
    assert r["dense_gallery"] == m * ROWS
  with pytest.raises(ValueError, match="no 'group' column"):
    run_many_to_many(a, b, queries=QUERIES)


def test_many_to_many_experiment_command(world, tmp_path):
  from plato_jax.synthetic import build_items
  a, b = world
  dense = build_items(str(tmp_path / "w"), ROWS, 1, 2, SMALL, progress=False)
  run_experiment("many_to_many", f"--features_a={a.root}", f"--features_b={b.root}",
                 f"--dense_b={dense.root}", "--multiplicities=1,2", "--k=1,3",
                 f"--queries={QUERIES}", f"--out={tmp_path / 'out'}")
  result = json.loads((tmp_path / "out" / "many_to_many" / "many_to_many.json").read_text())
  assert [run["direction"] for run in result["runs"]] == ["I2T"]
  rows = result["runs"][0]["rows"]
  assert [(r["multiplicity"], r["k"]) for r in rows] == [(1, 1), (1, 3), (2, 1), (2, 3)]
  # one item per source: both readings are mutual k-NN
  assert rows[0]["group_set"] == rows[0]["matched_slots"]
  assert (tmp_path / "out" / "many_to_many" / "many_to_many.png").exists()


def test_alignment_grid_runs_all_eight_metrics_with_concat(world, tmp_path):
  from plato_jax import metrics
  a, b = world
  run_experiment("alignment_grid", f"--models_a={a.root}", f"--models_b={b.root}", "--queries=40",
                 "--metrics=all", "--topk=5", "--cknna_k=5,10", "--concat", f"--out={tmp_path}")
  rows = json.loads((tmp_path / "alignment_grid" / "alignment_grid.json").read_text())["rows"]
  want = []
  for m in metrics.SUPPORTED_METRICS:
    want += ["cknna@5", "cknna@10"] if m == "cknna" else [f"{m}@5" if "knn" in m else m]
  assert [r["metric"] for r in rows] == want
  assert all(np.isfinite(r["score"]) for r in rows)
  knn = next(r for r in rows if r["metric"] == "mutual_knn@5")
  assert knn["score_low"] <= knn["score"] <= knn["score_high"]
  q_rows = choose_queries(ROWS, 40, 0)
  xa = metrics.prepare_features(a.gather(q_rows).astype(np.float32))
  xb = metrics.prepare_features(b.gather(q_rows).astype(np.float32))
  for r in rows:
    if r["metric"] in ("cka", "svcca", "cknna@10"):
      metric, topk = (("cknna", 10) if r["metric"] == "cknna@10" else (r["metric"], None))
      best = metrics.compute_score(xa, xb, metric, topk=topk, concat=True)
      assert r["score"] == pytest.approx(best.score, rel=1e-6)
      assert (r["layer_a"], r["layer_b"]) == tuple(best.indices)


def test_exact_vs_approx_numbers_equal_numpy(world):
  from plato_jax.approx import buckets_for, compare, tie_epsilon
  a, b = world
  out = compare(a, b, queries=QUERIES, sizes=[QUERIES, ROWS], k=5,
                methods=["approx_max_k", "bucketed", "faiss_ivf", "faiss_hnsw"],
                recall_targets=(0.7, 0.95), nprobe=(1, 1000), ef=(8,),
                layer_a=2, layer_b=3, seed=0, keep_ids=True)
  xa = {n: gallery(a, 2)[:n] for n in (QUERIES, ROWS)}
  xb = {n: gallery(b, 3)[:n] for n in (QUERIES, ROWS)}
  eps = tie_epsilon(16)
  assert out["epsilon"] == eps
  seen = set()
  for r in out["rows"]:
    n, ga = r["size"], r["gallery_ids"]
    seen.add(r["method"])
    exact = {}
    for name, x in (("a", xa[n]), ("b", xb[n])):
      unit = x / np.linalg.norm(x, axis=1, keepdims=True)
      s = unit[:QUERIES].astype(np.float64) @ unit.T.astype(np.float64)
      s[np.arange(QUERIES), np.arange(QUERIES)] = -np.inf
      top = np.argsort(-s, axis=1, kind="stable")[:, :5]
      exact[name] = (ga[top], s, np.take_along_axis(s, top, 1)[:, -1])
    position = {int(v): i for i, v in enumerate(ga)}
    hits = {m: np.array([len(np.intersect1d(f, e)) for f, e in zip(r[f"ids_{m}"], exact[m][0])])
            for m in "ab"}
    assert r["recall_a"] == pytest.approx(hits["a"].mean() / 5)
    assert r["recall"] == pytest.approx((hits["a"].mean() + hits["b"].mean()) / 10)
    assert r["intersections_a"] == np.bincount(hits["a"], minlength=6).tolist()
    tie = [np.mean([(exact[m][1][q, [position[int(i)] for i in row]] >= exact[m][2][q] - eps).sum()
                    for q, row in enumerate(r[f"ids_{m}"])]) for m in "ab"]
    assert r["tie_recall"] == pytest.approx(np.mean(tie) / 5, abs=1e-9)
    assert r["mnn_exact"] == pytest.approx(brute_mutual_knn(xa[n], xb[n], QUERIES, 5))
    assert r["mnn_approx"] == pytest.approx(np.mean(
        [len(np.intersect1d(x, y)) for x, y in zip(r["ids_a"], r["ids_b"])]) / 5)
    assert r["delta_mnn"] == pytest.approx(r["mnn_approx"] - r["mnn_exact"])
    if r["method"] == "exact" or (r["method"] == "faiss_ivf" and not r["approximate"]):
      assert r["recall"] == 1.0 and r["delta_mnn"] == 0.0
    if r["method"] == "approx_max_k":
      assert r["approximate"] is False and r["recall"] == 1.0  # exact off TPU
    if r["method"] == "bucketed" and n == ROWS:
      target = float(r["setting"].split("=")[1].split()[0])
      assert r["recall"] > target - 0.05  # expected recall 1 - (k-1)/(2L) >= target
  assert seen == {"exact", "approx_max_k", "bucketed", "faiss_ivf", "faiss_hnsw"}
  assert buckets_for(10, 0.9) == 45 and buckets_for(1, 0.99) == 1
  from plato_jax.approx import available
  with pytest.raises(ValueError, match="unknown method 'no_such_method'"):
    available(["bucketed", "no_such_method"])
  import importlib.util
  ok, missing = available(["bucketed", "hnswlib"])
  if importlib.util.find_spec("hnswlib") is not None:
    assert (ok, missing) == (["bucketed", "hnswlib"], [])
  else:  # a method whose library is absent is skipped and reported
    assert (ok, missing) == (["bucketed"], ["hnswlib"])


def test_vision_vision_matrix_bins_and_rank_correlations_equal_direct_computation(tmp_path):
  """The command on a synthetic family: its matrix equals a float64 brute force on the
  stores' clamped, normalised query rows; the bins and Spearman correlations are recomputed
  from it with numpy (ranks by argsort, ties averaged)."""
  from plato_jax import metrics
  from plato_jax.clamp import QUANTILE
  from plato_jax.gallery import resolve_queries
  from plato_jax.store import FeatureStore
  from plato_jax.synthetic import build_model
  family = [build_model(str(tmp_path / "w"), ROWS, 0, j + 1, q, SMALL, progress=False)
            for j, q in enumerate((0.1, 0.2, 0.4, 0.8, 1.6, 3.2))]
  (tmp_path / "scores.csv").write_text("model,value\n" + "".join(
      f"{s.meta['model']},{s.meta['quality']}\n" for s in family))
  out = run_experiment("vision_vision", f"--models={','.join(s.root for s in family)}",
                       f"--scores={tmp_path / 'scores.csv'}", "--queries=300", "--topk=5",
                       "--noumap", "--rank_metrics=mutual_knn,cka,svcca", "--bins=2",
                       f"--out={tmp_path}")
  assert "6 models, 15 pairs, 300 rows" in out
  result = json.loads((tmp_path / "vision_vision" / "vision_vision.json").read_text())
  stores = [FeatureStore.open(p) for p in result["config"]["models"]]
  rows = resolve_queries(stores[0].ids(), 300, 0)
  feats = [metrics.prepare_features(s.gather(rows).astype(np.float32), q=QUANTILE)[:, -1]
           for s in stores]  # PRH's clamp: one threshold over all layers
  matrix = np.array(result["matrix"])
  for i in range(6):
    for j in range(6):
      want = brute_mutual_knn(feats[i], feats[j], 300, 5)
      assert matrix[i, j] == pytest.approx(want, abs=1e-9), (i, j)
  scores = np.array([result["scores"][n] for n in result["models"]])
  edges = np.quantile(scores, [0, 0.5, 1])
  for b in result["bins"]:
    members = [k for k in range(6) if (edges[b["bin"]] <= scores[k] < edges[b["bin"] + 1])
               or (b["bin"] == 1 and scores[k] == edges[2])]
    assert sorted(b["models"]) == sorted(result["models"][k] for k in members)
    pairs = [matrix[x, y] for x in members for y in members if x < y]
    assert b["alignment"] == pytest.approx(np.mean(pairs))
  # Spearman: Pearson of average ranks, by hand, over the 15 pairs.
  iu = np.triu_indices(6, 1)
  cka = np.array([[metrics.cka(feats[i], feats[j]) for j in range(6)] for i in range(6)])

  def ranks(v):
    order = np.argsort(v, kind="stable")
    r = np.empty(len(v))
    r[order] = np.arange(len(v))
    for value in np.unique(v):  # ties: their mean rank
      r[v == value] = r[v == value].mean()
    return r

  rho = np.corrcoef(ranks(matrix[iu]), ranks(cka[iu]))[0, 1]
  got = next(r for r in result["rank_correlations"]
             if r["metric_a"] == "mutual_knn@5" and r["metric_b"] == "cka")
  assert got["spearman"] == pytest.approx(rho, abs=1e-9) and got["pairs"] == 15


def test_bins_by_score(rng):
  from plato_jax import model_matrix
  m = rng.uniform(0, 1, (5, 5))
  rows = model_matrix.bin_alignment(m, [1, 2, 2, 3, 9], [0, 2.5, 10])
  assert [r["models"] for r in rows] == [[0, 1, 2], [3, 4]]
  assert rows[0]["alignment"] == pytest.approx(np.mean([m[0, 1], m[0, 2], m[1, 2]]))
  with pytest.raises(ValueError, match=r"scores \[9.0\] lie outside the bin edges"):
    model_matrix.bin_alignment(m, [1, 2, 2, 3, 9], [0, 5])
  equal = model_matrix.bin_alignment(m, [4, 4, 4, 4, 7], 4)  # repeated quantiles merge
  assert [len(r["models"]) for r in equal] == [5]


def test_embedding_separates_two_families(rng):
  """UMAP of −log(alignment) on two families (high alignment within, low across): every
  model lies nearer its own family's centre than the other's."""
  from plato_jax import model_matrix
  m = np.full((12, 12), 0.01) + rng.uniform(0, 0.005, (12, 12))
  m[:6, :6] = m[6:, 6:] = 0.3
  np.fill_diagonal(m, 1.0)
  emb = model_matrix.embedding(m, floor=1e-4, seed=0)
  centres = emb[:6].mean(0), emb[6:].mean(0)
  for i, point in enumerate(emb):
    own, other = centres[i // 6], centres[1 - i // 6]
    assert np.linalg.norm(point - own) < np.linalg.norm(point - other), i
  assert np.array_equal(model_matrix.cluster_order(m, 1e-4)[:6] < 6, [True] * 6) or \
      np.array_equal(model_matrix.cluster_order(m, 1e-4)[:6] >= 6, [True] * 6)


def test_caption_length_equals_best_layer_brute_force(world, tmp_path):
  """Each (length, language model): the best layer pair's mutual k-NN by a float64 brute
  force over every layer pair; the row: their mean, and the bootstrap interval of the
  per-query overlap averaged over the language models."""
  from plato_jax import metrics
  from plato_jax.clamp import QUANTILE
  from plato_jax.gallery import resolve_queries
  from plato_jax.store import FeatureStore
  from plato_jax.synthetic import build_model
  a = world[0]
  llms = {name: [build_model(str(tmp_path / "w"), ROWS, 1, j, q, SMALL, progress=False)
                 for j, q in models]
          for name, models in (("short", ((1, 0.15), (2, 0.1))), ("long", ((3, 1.5), (4, 1.0))))}
  captions = ",".join(f"{n}={s.root}" for n, stores in llms.items() for s in stores)
  run_experiment("caption_length", f"--models_a={a.root}", f"--captions={captions}",
                 "--words=short=12,long=480", "--queries=150", "--topk=5", f"--out={tmp_path}")
  result = json.loads((tmp_path / "caption_length" / "caption_length.json").read_text())
  rows = resolve_queries(a.ids(), 150, 0)
  xa = metrics.prepare_features(a.gather(rows).astype(np.float32), q=QUANTILE)

  def overlaps(xa, xb):
    best, per = -1, None
    for i in range(xa.shape[1]):
      for j in range(xb.shape[1]):
        na, nb = cosine_top_k(xa[:, i], 150, 5), cosine_top_k(xb[:, j], 150, 5)
        o = np.array([len(np.intersect1d(r, t)) / 5 for r, t in zip(na, nb)])
        if o.mean() > best:
          best, per = o.mean(), o
    return per

  assert [(r["length"], r["words"]) for r in result["rows"]] == [("short", 12), ("long", 480)]
  for row in result["rows"]:
    per = [overlaps(xa, metrics.prepare_features(FeatureStore.open(p).gather(rows).astype(
        np.float32), q=QUANTILE)) for p in result["config"]["captions"][row["length"]]]
    assert row["alignment"] == pytest.approx(np.mean([p.mean() for p in per]), abs=2 / 750)
    low, high = metrics.bootstrap_interval(np.mean(per, axis=0), seed=0)
    assert (row["alignment_low"], row["alignment_high"]) == pytest.approx((low, high),
                                                                          abs=2 / 750)
  first, last = result["rows"][0], result["rows"][-1]
  assert last["alignment"] > first["alignment"]  # the synthetic world's longer captions


def test_other_modalities_on_stores_equal_brute_force(world, tmp_path):
  """Video and audio stores (the SMALL world's modalities c and d) against two language
  models: every row a float64 brute force in the scaling protocol's gallery order; the
  capability trend the least-squares line through the alignments at the largest size."""
  from plato_jax.synthetic import WorldConfig, build_model
  config = WorldConfig(num_concepts=20, dims=(16, 24, 12, 10), layers=(3, 4, 2, 3))
  w = str(tmp_path / "w")
  video, audio = (build_model(w, ROWS, m, 0, 1.0, config, progress=False) for m in (2, 3))
  texts = [build_model(w, ROWS, 1, j, q, config, progress=False) for j, q in ((1, 0.3), (2, 2.0))]
  (tmp_path / "bench.csv").write_text("model,value\n" + "".join(
      f"{t.meta['model']},{t.meta['quality']}\n" for t in texts))
  names = ",".join(t.root for t in texts)
  run_experiment("other_modalities", f"--video={video.root}", f"--video_texts={names}",
                 f"--audio={audio.root}", f"--audio_texts={names}",
                 f"--benchmarks={tmp_path / 'bench.csv'}", f"--queries={QUERIES}",
                 f"--sizes={QUERIES},{ROWS}", "--k=1,10", f"--out={tmp_path / 'out'}")
  result = json.loads((tmp_path / "out" / "other_modalities" / "other_modalities.json").read_text())
  assert [(r["modality"], len(r["rows"])) for r in result["runs"]] == [
      ("video", 4), ("video", 4), ("audio", 4), ("audio", 4)]
  for run, (x, y) in zip(result["runs"], [(video, t) for t in texts] + [(audio, t) for t in texts]):
    xs, ys = gallery(x, run["layer_a"]), gallery(y, run["layer_b"])
    for r in run["rows"]:
      want = brute_mutual_knn(xs[:r["size"]], ys[:r["size"]], QUERIES, r["k"])
      assert r["mutual_knn"] == pytest.approx(want, abs=2.0 / (QUERIES * r["k"])), r
  for modality in ("video", "audio"):
    trend = result["trend"][modality]
    at = [next(r for r in run["rows"] if r["size"] == ROWS and r["k_spec"] == "10")
          for run in result["runs"] if run["modality"] == modality]
    slope, intercept = np.polyfit([0.3, 2.0], [r["mutual_knn"] for r in at], 1)
    assert (trend["slope"], trend["intercept"]) == pytest.approx((slope, intercept))


def test_recipe_runs_equal_brute_force_and_bad_recipes_are_named(world, tmp_path):
  from plato_jax.synthetic import build_model
  a, b = world
  b2 = build_model(str(tmp_path / "w"), ROWS, 1, 1, 0.5, SMALL, progress=False)
  (tmp_path / "even.txt").write_text("".join(f"{i}\n" for i in range(0, ROWS, 2)))
  (tmp_path / "r.toml").write_text(f"""
title = "test"
[defaults]
k = ["1", "10"]
queries = "{QUERIES}"
sizes = ["{QUERIES}", "{ROWS}"]
[[run]]
name = "a x b"
features_a = "${{A}}"
features_b = "{b.root}"
[[run]]
name = "a x b2"
features_a = "${{A}}"
features_b = "{b2.root}"
[[run]]
name = "a x b, even rows"
features_a = "${{A}}"
features_b = "{b.root}"
gallery_ids = "{tmp_path / 'even.txt'}"
sizes = ["{QUERIES}", "500"]
""")
  run_experiment("recipe", f"--recipe={tmp_path / 'r.toml'}", f"--var=A={a.root}",
                 f"--out={tmp_path / 'out'}")
  result = json.loads((tmp_path / "out" / "r" / "r.json").read_text())
  assert [r["run"]["name"] for r in result["runs"]] == ["a x b", "a x b2", "a x b, even rows"]
  assert sorted({r["size"] for r in result["runs"][2]["rows"]}) == [QUERIES, 500, ROWS // 2]
  for run, y in zip(result["runs"], (b, b2)):
    xs, ys = gallery(a, run["layer_a"]), gallery(y, run["layer_b"])
    assert len(run["rows"]) == 4
    for r in run["rows"]:
      want = brute_mutual_knn(xs[:r["size"]], ys[:r["size"]], QUERIES, r["k"])
      assert r["mutual_knn"] == pytest.approx(want, abs=2.0 / (QUERIES * r["k"])), r
  assert not (tmp_path / "out" / "resume").exists() or \
      not list((tmp_path / "out" / "resume").iterdir())
  bad = tmp_path / "bad.toml"
  bad.write_text('[[run]]\nname = "x"\nfeatures_a = "${A}"\nfeatures_b = "b"\nk_values = [1]\n')
  done = subprocess.run([sys.executable, "-m", "experiments.recipe", f"--recipe={bad}",
                         f"--out={tmp_path}"], cwd=REPO, capture_output=True, text=True)
  assert done.returncode != 0 and "run 1 (x): unknown settings ['k_values']" in done.stderr
  bad.write_text('[[run]]\nname = "x"\nfeatures_a = "${A}"\nfeatures_b = "b"\n')
  done = subprocess.run([sys.executable, "-m", "experiments.recipe", f"--recipe={bad}",
                         f"--out={tmp_path}"], cwd=REPO, capture_output=True, text=True)
  assert done.returncode != 0 and "uses ${A}: give --var=A=..." in done.stderr


def test_the_papers_recipe_names_eight_runs_of_known_settings():
  out = run_experiment("recipe", "--recipe=experiments/recipes/koepke_e12.toml",
                       "--var=STORES=/data/stores", "--dry_run")
  lines = out.strip().splitlines()
  assert lines[0].endswith(": 8 runs") and len(lines) == 9
  runs = [json.loads(line) for line in lines[1:]]
  assert all(r["features_a"].startswith("/data/stores/") for r in runs)
  assert len({r["name"] for r in runs}) == 8
