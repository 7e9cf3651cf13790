"""kernels.topk.bucket_topk against its plain reference (lax.top_k), ties and -inf included."""
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.topk import BucketConfig, bucket_topk, reference_topk


@pytest.mark.parametrize("k", [1, 5, 10, 60])
@pytest.mark.parametrize("width", [None, 8, 64])
def test_bucket_topk_equals_reference_with_ties(rng, k, width):
  scores = rng.integers(-3, 4, size=(37, 4096)).astype(np.float32)  # massive exact ties
  scores[rng.random(scores.shape) < 0.2] = -np.inf                    # excluded columns
  scores[3, :] = -np.inf
  scores[3, 100:100 + k // 2] = 7.0
  values, columns = bucket_topk(jnp.asarray(scores), k, BucketConfig(width=width))
  ref_values, ref_columns = reference_topk(jnp.asarray(scores), k)
  np.testing.assert_array_equal(values, ref_values)
  np.testing.assert_array_equal(columns, ref_columns)  # equal scores: lower column first


def test_bucket_topk_on_continuous_scores(rng):
  scores = rng.standard_normal((64, 65536)).astype(np.float32)
  for k in (10, 100):
    values, columns = bucket_topk(jnp.asarray(scores), k)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(columns, order)
    np.testing.assert_array_equal(values, np.take_along_axis(scores, order, 1))


def test_auto_width_keeps_enough_buckets():
  config = BucketConfig()
  assert config.width_for(65536, 10) == 64
  assert config.width_for(32768, 2621) == 2
  assert config.width_for(1024, 500) == 1  # plain top_k
