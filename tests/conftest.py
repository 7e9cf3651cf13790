"""Test configuration: 8 fake CPU devices, set before jax is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Where PYTHONDONTWRITEBYTECODE is set (CI machines set it), every process the tests start —
# the xdist workers, each experiment run as a command — would compile jax, torch and the
# rest from source again: ~4 s of a 10 s command. Their bytecode goes to one folder for the
# run instead (PYTHONPYCACHEPREFIX: nothing written beside the sources), removed at its end.
if os.environ.pop("PYTHONDONTWRITEBYTECODE", None) is not None:
  import atexit
  import shutil
  import sys
  import tempfile
  _pycache = tempfile.mkdtemp(prefix="plato-jax-test-pycache-")
  atexit.register(shutil.rmtree, _pycache, True)
  os.environ["PYTHONPYCACHEPREFIX"] = sys.pycache_prefix = _pycache
  sys.dont_write_bytecode = False

import numpy as np  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402


@pytest.fixture
def rng():
  """A fresh random stream per test; its seed is printed so a failure can be replayed with
  PLATO_TEST_SEED=<seed>."""
  seed = int(os.environ.get("PLATO_TEST_SEED") or np.random.SeedSequence().entropy)
  print("seed", seed)
  return np.random.default_rng(seed)
