"""The package's names collide with nothing: Hugging Face's `kernels` (which transformers
imports) stays importable beside a checkout, and the wheel installs `plato_jax` alone."""
import importlib.util
import pathlib
import subprocess
import sys
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_transformers_imports_beside_the_checkout():
  """From the repository root (on sys.path, as `python -m experiments.scaling` has it),
  `kernels` is the installed distribution, not our folder."""
  if importlib.util.find_spec("kernels") is None:
    pytest.skip("Hugging Face's kernels package is not installed")
  code = ("import plato_jax.knn, plato_jax.models, plato_jax.kernels.topk\n"
          "from transformers import activations\n"
          "import kernels, pathlib\n"
          "assert 'site-packages' in kernels.__file__ or 'dist-packages' in kernels.__file__, "
          "kernels.__file__\n")
  done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]


def test_experiments_run_from_a_checkout_by_both_names():
  for module in ("experiments.scaling", "plato_jax.experiments.scaling"):
    done = subprocess.run([sys.executable, "-m", module, "--helpshort"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    # absl's help exits with 1; a failed import would print a traceback instead.
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "--gallery" in done.stdout


def test_the_wheel_installs_plato_jax_alone(tmp_path):
  done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                         str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  (wheel,) = tmp_path.glob("*.whl")
  names = zipfile.ZipFile(wheel).namelist()
  tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
  assert tops == {"plato_jax"}, tops
  assert "plato_jax/kernels/cpu_topk.cc" in names
  assert "plato_jax/experiments/scaling.py" in names
  assert "plato_jax/experiments/bench/engine.py" in names
