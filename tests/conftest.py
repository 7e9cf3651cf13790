"""Test configuration: 8 fake CPU devices, set before jax is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402


@pytest.fixture
def rng():
  """A fresh random stream per test; its seed is printed so a failure can be replayed with
  PLATO_TEST_SEED=<seed>."""
  seed = int(os.environ.get("PLATO_TEST_SEED") or np.random.SeedSequence().entropy)
  print("seed", seed)
  return np.random.default_rng(seed)
