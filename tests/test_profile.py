"""plato_jax.experiments.bench.profile on a small tile: every figure present and consistent with its timings."""
import pytest
from knn_reference import skip_unless_runs_here

from plato_jax.experiments.bench.profile import profile


@pytest.mark.parametrize("k,kernel", [(4, "xla"), (200, "xla"), (4, "cpu"), (200, "cpu")])
def test_profile_reports_consistent_figures(tmp_path, k, kernel):
  skip_unless_runs_here(kernel)
  r = profile(64, 512, 32, k, "float32", repeats=1, peak_tflops=1.0,
              trace_dir=str(tmp_path / "trace") if k == 4 else None, kernel=kernel)
  flop = 2 * 64 * 512 * 32
  assert r["kernel"].startswith(f"{kernel} (") and r["fallbacks"] == 0
  assert r["dot_tflops"] == pytest.approx(flop / r["dot_s"] / 1e12)
  assert r["step_tflops"] == pytest.approx(flop / r["step_s"] / 1e12)
  assert r["pct_of_dot"] == pytest.approx(r["dot_s"] / r["step_s"])
  assert r["pct_of_peak"] == pytest.approx(r["step_tflops"])
  assert r["bytes_tile"] == 512 * 32 * 4
  if kernel == "xla":  # writes and reads its score tile, and its selection runs alone
    assert r["bytes_scores"] == 2 * 64 * 512 * 4 and r["select_s"] > 0
  else:  # selects inside its matmul
    assert r["bytes_scores"] == 0 and r["select_s"] is None
  if k == 4:
    assert any((tmp_path / "trace").rglob("*")), "a trace was written"


@pytest.mark.parametrize("kernel,dtype,backend", [("fused", "float32", "triton"),
                                                  ("fused:mosaic_gpu", "bfloat16", "mosaic_gpu")])
def test_profile_of_the_fused_kernel_counts_fallbacks(kernel, dtype, backend):
  r = profile(64, 512, 16, 5, dtype, repeats=1, kernel=kernel, fused_keep=1)
  assert r["kernel"].startswith("fused (Pallas, interpreted")
  assert f"backend='{backend}'" in r["kernel"]
  assert 0 <= r["fallbacks"] <= 1 and r["step_s"] > 0
