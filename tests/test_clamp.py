"""The outlier clamp at scale: streamed thresholds against the reference's formulas on the
whole tensor, clamped and concatenated galleries against a brute force."""
import ml_dtypes
import numpy as np
import pytest
from knn_reference import brute_mutual_knn

from plato_jax import clamp, metrics
from plato_jax.clamp import (CONCAT, ClampedLayer, ConcatenatedLayers, clamp_rows, concatenated,
                             gallery_threshold)
from plato_jax.knn import search
from plato_jax.store import FeatureStore, StoreWriter


def write(path, x, dtype):
  w = StoreWriter.create(str(path), num_rows=len(x), num_layers=x.shape[1], dim=x.shape[2],
                         dtype=dtype, chunk_rows=64)
  w.append(x, np.arange(len(x)) * 3 + 1)
  return w.close()


def heavy_tailed(rng, n, layers, d):
  """Student-t values (outliers to clamp) rounded to a grid: many exact ties."""
  return np.round(rng.standard_t(2, (n, layers, d)) * 8).astype(np.float32) / 8


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_exact_threshold_equals_the_sorted_tensors(tmp_path, rng, dtype, monkeypatch):
  monkeypatch.setattr(clamp, "_BLOCK_BYTES", 3000)  # many blocks
  x = heavy_tailed(rng, 900, 3, 20)
  if dtype == "float32":
    x += rng.standard_normal(x.shape).astype(np.float32) * 1e-3  # all 32 bits matter
  store = write(tmp_path / "s", x, dtype)
  values = store.gather(np.arange(900)).astype(np.float32)
  rows = np.sort(rng.choice(900, 555, replace=False))
  for q in (0.95, 0.5, 0.999):
    got = gallery_threshold(store, rows, "exact", q)
    flat = np.sort(np.abs(values[rows]).ravel())  # the reference: sort(|x|)[int(q·numel)]
    assert got == flat[int(q * flat.size)], q
  assert gallery_threshold(store, np.arange(900), "exact") == \
      metrics._clamp_threshold(np.abs(values), 0.95, True)
  approx = gallery_threshold(store, rows, "approx")
  want = metrics._clamp_threshold(np.abs(values[rows]), 0.95, False)
  assert approx == pytest.approx(float(want), rel=1e-6)
  assert gallery_threshold(store, rows, "none") is None


def test_threshold_arguments_are_checked(tmp_path, rng):
  store = write(tmp_path / "s", rng.standard_normal((50, 2, 4)).astype(np.float32), "float32")
  with pytest.raises(ValueError, match="clamp must be one of"):
    gallery_threshold(store, np.arange(10), "p95")
  with pytest.raises(ValueError, match=r"quantile must lie in \(0, 1\)"):
    gallery_threshold(store, np.arange(10), "exact", q=1.0)


def test_clamped_and_concatenated_sources_equal_brute_force(tmp_path, rng):
  x = heavy_tailed(rng, 600, 3, 8)
  store = write(tmp_path / "s", x, "bfloat16")
  values = store.gather(np.arange(600)).astype(np.float32)
  t = gallery_threshold(store, np.arange(600), "exact")
  assert np.abs(values).max() > t  # something is clamped
  layer = ClampedLayer(store, 1, t)
  assert layer.read(0, 600).dtype == ml_dtypes.bfloat16
  clipped = np.clip(values[:, 1], -t, t)
  np.testing.assert_array_equal(layer.read(0, 600).astype(np.float32), clipped)
  np.testing.assert_array_equal(layer.take([5, 3, 5]).astype(np.float32), clipped[[5, 3, 5]])
  res = search(clipped[:40], layer, 10, query_ids=store.ids()[:40], normalize=True)
  unit = clipped / np.linalg.norm(clipped, axis=1, keepdims=True)
  want = np.argsort(-(unit[:40].astype(np.float64) @ unit.T.astype(np.float64)
                      - 10 * np.eye(40, 600)), axis=1, kind="stable")[:, :10]
  np.testing.assert_array_equal(res.ids, store.ids()[want])
  # the concatenation: each layer clamped and unit-normalised, side by side
  both = ConcatenatedLayers(store, t)
  by_hand = np.concatenate([np.clip(values[:, l], -t, t) / np.linalg.norm(
      np.clip(values[:, l], -t, t), axis=1, keepdims=True) for l in range(3)], axis=1)
  np.testing.assert_allclose(both.read(0, 600), by_hand, rtol=1e-6)
  np.testing.assert_array_equal(both.read(100, 200), both.take(np.arange(100, 200)))
  np.testing.assert_array_equal(concatenated(values[:5], t), both.read(0, 5))
  assert both.dim == 24 and clamp_rows(values, None) is values
  # a threshold bf16 cannot hold (an approx one) clamps in float32, as the queries are
  between = float(np.float32(t) + np.float32(1e-3))
  off = ClampedLayer(store, 1, between)
  assert off.dtype == np.float32 and off.read(0, 5).dtype == np.float32
  np.testing.assert_array_equal(off.read(0, 600), np.clip(values[:, 1], -between, between))


def test_scaling_with_clamp_and_concat_equals_brute_force(tmp_path, rng):
  from plato_jax.gallery import plan_galleries
  from plato_jax.scaling import run_scaling
  x = heavy_tailed(rng, 1500, 3, 10)
  y = x[:, :, :6] * 2 + heavy_tailed(rng, 1500, 3, 6)
  a, b = write(tmp_path / "a", x, "float32"), write(tmp_path / "b", y, "bfloat16")
  sizes = [100, 600, 1500]
  plan = plan_galleries(a, b, 100, sizes, ["10"], 5)
  for how in ("exact", "approx"):
    res = run_scaling(a, b, queries=100, sizes=sizes, ks=["10"], seed=5, clamp=how,
                      layer_a=CONCAT, layer_b=1, progress=False, tile_rows=128)
    t_a = gallery_threshold(a, plan.order, how)
    t_b = gallery_threshold(b, plan.order, how)
    assert res.thresholds == {"a": t_a, "b": t_b} and res.clamp == how
    xa = concatenated(a.gather(plan.order).astype(np.float32), t_a)
    xb = np.clip(b.gather(plan.order, 1).astype(np.float32), -t_b, t_b)
    for row in res.rows:
      n = row["size"]
      assert row["mutual_knn"] == pytest.approx(brute_mutual_knn(xa[:n], xb[:n], 100, 10),
                                                abs=2e-3), (how, n)


def test_layer_choice_sees_the_clamp_and_the_concatenation(tmp_path, rng):
  """`auto` picks the best pair among the layers and their concatenation, on clamped
  queries, as PRH's compute_score does after prepare_features."""
  from plato_jax.gallery import choose_layers
  x = heavy_tailed(rng, 300, 3, 6)
  y = np.concatenate([x[:, :, :3], heavy_tailed(rng, 300, 3, 3)], axis=2)  # shares all layers
  a, b = write(tmp_path / "a", x, "float32"), write(tmp_path / "b", y, "float32")
  q_a, q_b = a.gather(np.arange(300)), b.gather(np.arange(300))
  t_a, t_b = (gallery_threshold(s, np.arange(300), "exact") for s in (a, b))
  la, lb, table = choose_layers(a, b, q_a, q_b, thresholds=(t_a, t_b), concat=True)
  want = metrics.compute_score(metrics.prepare_features(q_a, exact=True),
                               metrics.prepare_features(q_b, exact=True), "mutual_knn", 10,
                               concat=True)
  assert np.allclose(table, want.table)
  names = {-1: CONCAT, **{i: i for i in range(3)}}
  assert (la, lb) == (names[want.indices[0]], names[want.indices[1]])


def test_scaling_command_reports_its_clamp(tmp_path, rng):
  import json
  import os
  import subprocess
  import sys
  x = heavy_tailed(rng, 800, 2, 6)
  a, b = write(tmp_path / "a", x, "bfloat16"), write(tmp_path / "b", x[:, ::-1] * 3, "float32")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run([sys.executable, "-m", "experiments.scaling", "--progress=false",
                         f"--features_a={a.root}", f"--features_b={b.root}", "--queries=50",
                         "--sizes=50,800", "--k=5", "--clamp=approx", "--concat",
                         f"--out={tmp_path / 'out'}"], cwd=repo, capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stdout + done.stderr
  result = json.loads((tmp_path / "out" / "scaling" / "scaling.json").read_text())
  assert result["clamp"] == "approx" and result["config"]["concat"] is True
  from plato_jax.gallery import plan_galleries
  plan = plan_galleries(a, b, 50, [50, 800], ["5"], 0)
  assert result["thresholds"]["a"] == gallery_threshold(a, plan.order, "approx")
  assert "clamp (approx) thresholds" in done.stdout
