"""The fused Pallas kernel (interpret mode on CPU) against its plain-jnp reference, and the
certified merge + fallback against the exact selection: random data, exact ties, padding.
All three lowerings: Triton, Mosaic GPU (its own interpreter simulates TMA, barriers and
wgmma; bf16 only) and Pallas TPU (its interpreter)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from plato_jax.kernels.fused_topk import (FusedConfig, block_topk, fused_topk, fused_update,
                                 reference_block_topk)
from plato_jax.kernels.topk import reference_topk

HI = lax.Precision.HIGHEST


def data(rng, q, t, d, kind):
  """Integer rows: every f32 product and sum is exact, so any summation order gives the
  same scores and results can be compared exactly. "integers": massive ties and zeros of
  both signs; "wide": few ties (|x| <= 300, d <= 24 keeps sums below 2**24)."""
  span = 2 if kind == "integers" else 300
  qs, gs = rng.integers(-span, span + 1, (q, d)), rng.integers(-span, span + 1, (t, d))
  ids = np.arange(t, dtype=np.int32) * 3 + 1
  ids[-37:] = -1  # padding at the end of the tile
  return (jnp.asarray(qs, jnp.float32), jnp.asarray(gs, jnp.float32), jnp.asarray(ids))


def assert_same_blocks(got, want):
  """Kernel outputs equal the reference's: values and bounds exactly, columns wherever the
  value is finite (a -inf value's column is unspecified)."""
  (v, c, b), (rv, rc, rb) = (tuple(np.asarray(x) for x in t) for t in (got, want))
  np.testing.assert_array_equal(v, rv)
  np.testing.assert_array_equal(b, rb)
  np.testing.assert_array_equal(np.where(np.isfinite(v), c, 0), np.where(np.isfinite(rv), rc, 0))


def exact(q, g, ids, k):
  s = jnp.dot(q, g.T, precision=HI)
  s = jnp.where(ids[None, :] < 0, -jnp.inf, s)
  v, c = reference_topk(jnp.where(s == 0, 0.0, s), k)
  return v, jnp.where(v > -jnp.inf, ids[c], -1)


@pytest.mark.parametrize("kind", ["wide", "integers"])
def test_kernel_equals_its_reference(rng, kind):
  q, g, ids = data(rng, 128, 1024, 24, kind)
  cfg = FusedConfig(block_q=64, block_t=128, keep=3)
  got = block_topk(q, g, ids, cfg, precision=HI, interpret=True)
  assert_same_blocks(got, reference_block_topk(q, g, ids, cfg, precision=HI))


def test_kernel_masks_self_scales_columns_and_skips_below_thresholds(rng):
  q, g, ids = data(rng, 128, 1024, 24, "wide")
  query_ids = ids[rng.choice(1000, 128, replace=False)]  # each query's own row is present
  scale = jnp.asarray(rng.integers(1, 4, 1024), jnp.float32)
  s = np.asarray(jnp.dot(q, g.T, precision=HI)) * np.asarray(scale)[None, :]
  s[(np.asarray(ids)[None, :] < 0) | (np.asarray(ids)[None, :] == np.asarray(query_ids)[:, None])] \
      = -np.inf
  # First query block (4 rows): each row's maximum, so the programs holding one of them
  # select (at most 4 of 8) and the others skip; the rest: +inf (every program skips).
  thresholds = jnp.asarray(np.where(np.arange(128) < 4, s.max(axis=1), np.inf), jnp.float32)
  cfg = FusedConfig(block_q=4, block_t=128, keep=2)
  got = block_topk(q, g, ids, cfg, query_ids=query_ids, column_scale=scale,
                   thresholds=thresholds, precision=HI, interpret=True)
  assert_same_blocks(got, reference_block_topk(q, g, ids, cfg, query_ids=query_ids,
                                               column_scale=scale, thresholds=thresholds,
                                               precision=HI))
  values, columns, _ = (np.asarray(x) for x in got)
  skipped = np.isinf(values.reshape(128, 8, 2)).all(axis=2)  # [Q, gallery blocks]
  assert 0.5 <= skipped[:4].mean() < 1 and skipped[4:].all()  # both branches ran
  own = np.asarray(ids)[columns] == np.asarray(query_ids)[:, None]
  assert not (own & np.isfinite(values)).any()


def test_running_top_k_through_two_tiles_is_exact(rng):
  """The streaming use: the first tile's result is the prior (and threshold) of the next."""
  q, g, ids = data(rng, 128, 2048, 24, "wide")
  ids = jnp.arange(2048, dtype=jnp.int32)
  cfg = FusedConfig(block_q=32, block_t=128, keep=4)
  prior = (jnp.full((128, 10), -jnp.inf), jnp.full((128, 10), -1, jnp.int32))
  for part in (slice(0, 1024), slice(1024, 2048)):
    *prior, fell = fused_update(tuple(prior), q, g[part], ids[part], 10, cfg, precision=HI,
                                interpret=True)
  ref_v, ref_i = exact(q, g, ids, 10)
  np.testing.assert_array_equal(prior[0], ref_v)
  np.testing.assert_array_equal(prior[1], ref_i)


@pytest.mark.parametrize("kind,keep", [("wide", 4), ("integers", 4), ("wide", 1)])
def test_certified_merge_is_exact_and_falls_back_when_it_must(rng, kind, keep):
  q, g, ids = data(rng, 128, 2048, 24, kind)
  if kind == "integers":  # query 0's six best rows share one block: more than K' = 4
    q = q.at[0].set(2.0)
    g = g.at[:6].set(2.0)
  cfg = FusedConfig(block_q=32, block_t=128, keep=keep)
  v, i, fallbacks = fused_topk(q, g, ids, 10, cfg, precision=HI, interpret=True)
  ref_v, ref_i = exact(q, g, ids, 10)
  np.testing.assert_array_equal(v, ref_v)
  np.testing.assert_array_equal(i, ref_i)
  if kind == "integers":
    assert fallbacks > 0  # the crowded block defeats the certificate
  if kind == "wide" and keep == 4:
    # 16 blocks x 4 kept: a row's top-10 rarely has 5 in one block (~0.5 rows of 128), so
    # most query blocks are certified without the exact path.
    assert fallbacks < 128 // 32


def test_bfloat16_inputs(rng):
  q = jnp.asarray(rng.integers(-8, 9, (64, 24)), jnp.bfloat16)   # exact in bf16
  g = jnp.asarray(rng.integers(-8, 9, (1024, 24)), jnp.bfloat16)
  ids = jnp.arange(1024, dtype=jnp.int32)
  v, i, _ = fused_topk(q, g, ids, 5, FusedConfig(block_q=64, block_t=256, keep=2),
                       interpret=True)
  ref_v, ref_i = exact(q.astype(jnp.float32), g.astype(jnp.float32), ids, 5)
  np.testing.assert_array_equal(i, ref_i)
  np.testing.assert_array_equal(v, ref_v)


def test_block_sizes_must_divide():
  with pytest.raises(ValueError, match="multiples of the blocks"):
    block_topk(jnp.zeros((10, 4)), jnp.zeros((256, 4)), jnp.zeros(256, jnp.int32),
               interpret=True)


def test_fewer_kept_candidates_than_k_take_the_exact_path(rng):
  q, g, ids = data(rng, 64, 512, 8, "wide")
  v, i, fallbacks = fused_topk(q, g, ids, 9, FusedConfig(block_q=32, block_t=256, keep=2),
                               precision=HI, interpret=True)  # 2 blocks x 2 kept < 9
  ref_v, ref_i = exact(q, g, ids, 9)
  np.testing.assert_array_equal(v, ref_v)
  np.testing.assert_array_equal(i, ref_i)
  assert fallbacks == 2


@pytest.mark.parametrize("dim,config", [(1024, FusedConfig()), (384, FusedConfig(keep=2, block_k=32)),
                                        (100, FusedConfig(block_q=64, num_warps=4))])
def test_kernel_lowers_to_triton_for_gpus(dim, config):
  """No GPU here: lowering for CUDA still runs Pallas' Triton lowering, which rejects
  primitives it lacks (it once had no reduce_or) — caught here rather than on a GPU."""
  import functools

  import jax
  from jax import export
  q = jax.ShapeDtypeStruct((256, dim), jnp.bfloat16)
  g = jax.ShapeDtypeStruct((1024, dim), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((1024,), jnp.int32)
  prior = (jax.ShapeDtypeStruct((256, 10), jnp.float32), jax.ShapeDtypeStruct((256, 10), jnp.int32))
  fn = jax.jit(functools.partial(fused_update, k=10, config=config, query_ids=None))
  exported = export.export(fn, platforms=["cuda"], disabled_checks=[
      export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(prior, q, g, ids)
  assert "__gpu$xla.gpu.triton" in exported.mlir_module()


def test_tune_checks_each_configuration_and_projects_a_stream():
  """plato_jax.experiments.bench.tune_fused on a tiny shape (interpreted): the exactness check runs per
  configuration, and the stream projection scales per-tile time to an N x N self-join."""
  from plato_jax.experiments.bench.tune_fused import parse_config, stream, tune
  config, mosaic = parse_config("32,128,4,32,4,3"), parse_config("64,128,4,32,4,2,mosaic_gpu")
  assert mosaic.backend == "mosaic_gpu" and config.backend == "triton" and mosaic.warpgroups == 2
  assert parse_config("64,128,4,32,4,2,mosaic_gpu,1").warpgroups == 1
  lines = []
  rows = tune(64, 512, 40, 5, [config], iters=1, with_torch=False, log=lines.append)
  fused = [r for r in rows if r["name"].startswith("fused")]
  assert len(fused) == 1 and fused[0]["exact_on_integers"] is True, lines
  assert {r["name"] for r in rows} >= {"jnp.dot", "xla dot+bucket_topk"}
  out = stream(64, 512, 40, 5, config, 1024, peak_tflops=1.0, log=lines.append)
  fused_stream = next(v for name, v in out.items() if name.startswith("fused"))
  assert fused_stream["fallbacks"] == 0
  assert fused_stream["projected"] == pytest.approx(fused_stream["per_tile"] * 2 * 1024 / 64)


# ---- the Mosaic GPU lowering -----------------------------------------------------------------

MOSAIC = FusedConfig(block_q=64, block_t=128, keep=3, num_stages=2, backend="mosaic_gpu")
MOSAIC_1WG = dataclasses.replace(MOSAIC, warpgroups=1)
INTERPRET = jax.default_backend() != "gpu"  # on a GPU these run compiled


def half_data(rng, q, t, d, span, padding=37):
  """Integer rows exact in bf16 (|x| <= 16), `padding` ids -1 at the tile's end."""
  qs = jnp.asarray(rng.integers(-span, span + 1, (q, d)), jnp.bfloat16)
  gs = jnp.asarray(rng.integers(-span, span + 1, (t, d)), jnp.bfloat16)
  ids = np.arange(t, dtype=np.int32) * 3 + 1
  ids[t - padding:] = -1
  return qs, gs, jnp.asarray(ids)


@pytest.mark.parametrize("span,config", [(2, MOSAIC), (16, MOSAIC), (16, MOSAIC_1WG)])
def test_mosaic_kernel_equals_its_reference(rng, span, config):
  """Self-exclusion, column scale, padding (the last block has 2 real rows, fewer than K′),
  d not a multiple of block_k, and thresholds (rows 0 and 1: their maximum, the rest +inf)
  that make the first query block's programs select where row 0 or 1 peaks and skip
  elsewhere; the second query block always skips."""
  q, g, ids = half_data(rng, 128, 512, 100, span, padding=126)
  query_ids = ids[rng.choice(512 - 126, 128, replace=False)]
  scale = jnp.asarray(rng.integers(1, 4, 512), jnp.float32)
  s = np.asarray(jnp.dot(q, g.T, preferred_element_type=jnp.float32)) * np.asarray(scale)
  s[(np.asarray(ids)[None] < 0) | (np.asarray(ids)[None] == np.asarray(query_ids)[:, None])] = -np.inf
  row_max = s.max(axis=1)
  thresholds = jnp.asarray(np.where(np.arange(128) < 2, row_max, np.inf), jnp.float32)
  kw = dict(query_ids=query_ids, column_scale=scale, thresholds=thresholds)
  got = block_topk(q, g, ids, config, interpret=INTERPRET, **kw)
  assert_same_blocks(got, reference_block_topk(q, g, ids, config, **kw))
  skipped = np.isinf(np.asarray(got[0]).reshape(128, 4, 3)).all(axis=2)
  assert skipped[:64].mean() < 1 and skipped[64:].all()  # both branches ran
  if span == 16:  # few ties: rows 0 and 1 reach their maximum in at most 2 of 4 blocks
    assert skipped[:64].mean() >= 0.5


def test_mosaic_merge_is_exact_and_falls_back_when_it_must(rng):
  q, g, ids = half_data(rng, 64, 1024, 64, 2)
  q = q.at[0].set(2)
  g = g.at[:6].set(2)  # query 0's six best rows in one block: more than K' = 3
  v, i, fallbacks = fused_topk(q, g, ids, 8, MOSAIC, interpret=INTERPRET)
  ref_v, ref_i = exact(q.astype(jnp.float32), g.astype(jnp.float32), ids, 8)
  np.testing.assert_array_equal(v, ref_v)
  np.testing.assert_array_equal(i, ref_i)
  assert fallbacks > 0


def test_mosaic_kernel_refuses_f32_and_odd_blocks():
  with pytest.raises(ValueError, match="backend must be one of"):
    FusedConfig(backend="mosaic")
  with pytest.raises(ValueError, match="warpgroups must be 1 or 2"):
    FusedConfig(backend="mosaic_gpu", warpgroups=0)
  g, ids = jnp.zeros((256, 64), jnp.bfloat16), jnp.zeros(256, jnp.int32)
  with pytest.raises(ValueError, match="bf16/f16 only"):
    block_topk(jnp.zeros((64, 64)), g.astype(jnp.float32), ids, MOSAIC, interpret=True)
  with pytest.raises(ValueError, match="multiple of 64"):
    block_topk(jnp.zeros((32, 64), jnp.bfloat16), g, ids,
               FusedConfig(block_q=32, backend="mosaic_gpu"), interpret=True)
  with pytest.raises(ValueError, match="block_t a multiple of 64"):
    block_topk(jnp.zeros((64, 64), jnp.bfloat16), g, ids,
               FusedConfig(block_q=64, block_t=32, backend="mosaic_gpu"), interpret=True)
  with pytest.raises(ValueError, match="multiples of the blocks"):  # 2 warpgroups x 128 rows
    block_topk(jnp.zeros((64, 64), jnp.bfloat16), g[:128], ids[:128], MOSAIC, interpret=True)


@pytest.mark.parametrize("dim", [1024, 100])
def test_mosaic_kernel_lowers_for_gpus(dim):
  """Pallas' Mosaic GPU lowering runs without a GPU: what it rejects shows up here."""
  import functools

  from jax import export
  q = jax.ShapeDtypeStruct((256, dim), jnp.bfloat16)
  g = jax.ShapeDtypeStruct((1024, dim), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((1024,), jnp.int32)
  prior = (jax.ShapeDtypeStruct((256, 10), jnp.float32), jax.ShapeDtypeStruct((256, 10), jnp.int32))
  fn = jax.jit(functools.partial(fused_update, k=10, config=FusedConfig(backend="mosaic_gpu")))
  exported = export.export(fn, platforms=["cuda"])(prior, q, g, ids)
  assert "mosaic_gpu" in exported.mlir_module()


# ---- the Pallas TPU lowering -----------------------------------------------------------------

TPU = FusedConfig(block_q=64, block_t=128, keep=3, backend="tpu")
INTERPRET_TPU = jax.default_backend() != "tpu"  # on a TPU these run compiled


@pytest.mark.parametrize("kind", ["wide", "integers"])
def test_tpu_kernel_equals_its_reference(rng, kind):
  """Interpreted Pallas TPU: self-exclusion, column scale, padding (the last block has 2
  real rows, fewer than K′), and thresholds that make programs select or skip."""
  q, g, ids = data(rng, 128, 512, 24, kind)
  ids = ids.at[512 - 126:].set(-1)
  query_ids = ids[rng.choice(512 - 126, 128, replace=False)]
  scale = jnp.asarray(rng.integers(1, 4, 512), jnp.float32)
  s = np.asarray(jnp.dot(q, g.T, precision=HI)) * np.asarray(scale)
  s[(np.asarray(ids)[None] < 0) | (np.asarray(ids)[None] == np.asarray(query_ids)[:, None])] = -np.inf
  thresholds = jnp.asarray(np.where(np.arange(128) < 2, s.max(axis=1), np.inf), jnp.float32)
  kw = dict(query_ids=query_ids, column_scale=scale, thresholds=thresholds, precision=HI)
  got = block_topk(q, g, ids, TPU, interpret=INTERPRET_TPU, **kw)
  assert_same_blocks(got, reference_block_topk(q, g, ids, TPU, **kw))
  skipped = np.isinf(np.asarray(got[0]).reshape(128, 4, 3)).all(axis=2)
  assert skipped[:64].mean() < 1 and skipped[64:].all()  # both branches ran


def test_tpu_merge_is_exact_and_falls_back_when_it_must(rng):
  q, g, ids = data(rng, 64, 1024, 16, "integers")
  q = q.at[0].set(2.0)
  g = g.at[:6].set(2.0)  # query 0's six best rows in one block: more than K' = 3
  v, i, fallbacks = fused_topk(q, g, ids, 8, TPU, precision=HI, interpret=INTERPRET_TPU)
  ref_v, ref_i = exact(q, g, ids, 8)
  np.testing.assert_array_equal(v, ref_v)
  np.testing.assert_array_equal(i, ref_i)
  assert fallbacks > 0
  with pytest.raises(ValueError, match="multiple of 128"):
    block_topk(q, g, ids, FusedConfig(block_q=64, block_t=64, backend="tpu"), interpret=True)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_tpu_kernel_lowers_for_tpus(dtype):
  """Pallas TPU's lowering to Mosaic runs without a TPU."""
  import functools

  from jax import export
  q = jax.ShapeDtypeStruct((256, 1024), dtype)
  g = jax.ShapeDtypeStruct((1024, 1024), dtype)
  ids = jax.ShapeDtypeStruct((1024,), jnp.int32)
  prior = (jax.ShapeDtypeStruct((256, 10), jnp.float32), jax.ShapeDtypeStruct((256, 10), jnp.int32))
  fn = jax.jit(functools.partial(fused_update, k=10, config=FusedConfig(backend="tpu"),
                                 precision=HI if dtype == jnp.float32 else None))
  exported = export.export(fn, platforms=["tpu"])(prior, q, g, ids)
  assert "tpu_custom_call" in exported.mlir_module()
