"""plato_jax.kernels.topk.bucket_topk against its plain reference (lax.top_k), ties and -inf included."""
import jax.numpy as jnp
import numpy as np
import pytest

from plato_jax.kernels.topk import BucketConfig, bucket_topk, reference_topk


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


@pytest.mark.parametrize("k", [1, 3, 10])
@pytest.mark.parametrize("width", [None, 4, 64])
def test_scale_padding_and_own_ids_equal_the_materialised_reference(rng, k, width):
  """column_scale is fused into the bucket pass and re-applied to the candidates; padding
  after num_valid and one own-id column per row are covered by spare buckets, also when
  the excluded column is the row's best, inside a run of ties, or beside the padding.
  -0.0 ranks as +0.0."""
  q, t = 41, 4096
  raw = rng.integers(-3, 4, size=(q, t)).astype(np.float32)
  raw[rng.random(raw.shape) < 0.1] = -0.0
  scale = rng.choice(np.float32([1, 2, 4, 0.5]), t)
  num_valid = t - 37                                  # padding ends inside a bucket
  raw[:, num_valid:] = 9.0                            # padding that would win if not masked
  ids = rng.permutation(10 * t)[:t].astype(np.int32)
  own = rng.integers(0, num_valid, q)
  own[:5] = np.argmax(raw[:5, :num_valid] * scale[:num_valid], axis=1)  # the row's best
  own[7] = num_valid - 1                              # in the straddling bucket
  raw[5, :] = 1.0                                     # all tied: exclusion inside the run
  raw[6, :] = -0.0
  raw[6, own[6]] = 9.0
  row_ids = ids[own]
  row_ids[8] = -5                                     # a query whose id is not in the tile

  values, columns = bucket_topk(jnp.asarray(raw), k, BucketConfig(width=width),
                                column_scale=jnp.asarray(scale), num_valid=jnp.int32(num_valid),
                                column_ids=jnp.asarray(ids), row_ids=jnp.asarray(row_ids))
  final = raw * scale
  final[:, num_valid:] = -np.inf
  final[final == 0] = 0.0
  final[ids[None, :] == row_ids[:, None]] = -np.inf
  ref_values, ref_columns = reference_topk(jnp.asarray(final), k)
  np.testing.assert_array_equal(values, ref_values)
  np.testing.assert_array_equal(columns, ref_columns)
