"""The ring self-join (gallery shards rotating with ppermute) against a float64 brute force
and the streaming engine: exact ties, duplicates, padding, 1 vs 8 devices, large k."""
import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from knn_reference import brute_force, integer_rows, skip_unless_runs_here

from plato_jax.knn import search
from plato_jax.knn.ring import ring_self_join


def mesh_of(p):
  return Mesh(np.array(jax.devices()[:p]), ("gallery",))


@pytest.fixture(params=["xla", "cpu"])
def kernel(request):
  skip_unless_runs_here(request.param)
  return request.param


@pytest.mark.parametrize("devices", [1, 8])
def test_ring_equals_brute_force_with_ties_and_padding(rng, devices, kernel):
  x = integer_rows(rng, 1003, 6)          # massive exact ties; 1003: padding everywhere
  x[500:520] = x[0]                       # duplicate rows
  ids = rng.permutation(10**6)[:1003]     # ids in no particular order
  res = ring_self_join(x, 12, ids=ids, mesh=mesh_of(devices), block=64, kernel=kernel)
  assert res.kernel == kernel
  ref_ids, ref_scores = brute_force(x, x, 12, query_ids=ids, gallery_ids=ids)
  np.testing.assert_array_equal(res.ids, ref_ids)
  np.testing.assert_array_equal(res.scores, ref_scores)


def test_ring_equals_the_engine_on_float_data_and_without_exclusion(rng, kernel):
  x = rng.standard_normal((700, 16)).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  for exclude in (True, False):
    ref = search(x, x, 5, exclude_self=exclude, tile_rows=128, kernel=kernel)
    res = ring_self_join(x, 5, exclude_self=exclude, mesh=mesh_of(8), block=32, kernel=kernel)
    np.testing.assert_array_equal(res.ids, ref.ids)
    # Scores: the kernel's float32 ones (float64 rounded where rescored), within the bound.
    np.testing.assert_allclose(res.scores, ref.scores, rtol=0, atol=2 * (16 + 8) * 2.0**-24)
  assert (res.ids[:, 0] == np.arange(700)).all()  # unit rows: without exclusion, itself first


def test_ring_large_k(rng, kernel):
  x = integer_rows(rng, 2000, 5)
  res = ring_self_join(x, [20, 150], mesh=mesh_of(8), block=64, kernel=kernel)
  ref_ids, ref_scores = brute_force(x, x, 150, query_ids=np.arange(2000))
  np.testing.assert_array_equal(res.ids, ref_ids)
  np.testing.assert_array_equal(res.top(20).ids, ref_ids[:, :20])


def test_ring_bad_input():
  with pytest.raises(ValueError, match=r"k=5 exceeds the neighbours available in a gallery of 5 rows \(after "
                                       r"self-exclusion\)"):
    ring_self_join(np.ones((5, 3), np.float32), 5)
  x = np.ones((6, 3), np.float32)
  x[4, 1] = np.nan
  with pytest.raises(ValueError, match=r"NaN/Inf values: \[4\]"):
    ring_self_join(x, 2)
  with pytest.raises(ValueError, match=r"duplicate gallery ids: ids \[1\] at rows \[0, 1\]"):
    ring_self_join(np.ones((3, 2), np.float32), 1, ids=[1, 1, 2])


@pytest.mark.parametrize("kernel,devices", [("fused:triton", 8), ("fused:mosaic_gpu", 1),
                                            ("fused:tpu", 1)])
def test_ring_with_the_fused_kernel_equals_brute_force(rng, kernel, devices):
  """The fused Pallas kernel inside the ring (interpreted on CPU; the Mosaic interpreters on
  one device): exact ties, duplicates, padding, shuffled ids; bf16 for Mosaic GPU."""
  skip_unless_runs_here(kernel)
  n = 140 if kernel == "fused:mosaic_gpu" else 300  # (its interpreter: ~0.2 s per row)
  x = integer_rows(rng, n, 8)
  x[n - 100:n - 90] = x[0]
  ids = rng.permutation(10**6)[:n]
  dtype = jax.numpy.bfloat16 if kernel == "fused:mosaic_gpu" else np.float32
  res = ring_self_join(x.astype(dtype), 6, ids=ids, mesh=mesh_of(devices), kernel=kernel,
                       compute_dtype=dtype)
  ref_ids, ref_scores = brute_force(x, x, 6, query_ids=ids, gallery_ids=ids)
  assert res.kernel == kernel and res.fallbacks >= 0
  np.testing.assert_array_equal(res.ids, ref_ids)
  np.testing.assert_array_equal(res.scores, ref_scores)
  with pytest.raises(ValueError, match="kernel must be"):
    ring_self_join(x, 2, kernel="triton")
