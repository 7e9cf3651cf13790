"""Sparse mixture-of-experts decoders (Mixtral, OLMoE, GPT-OSS): parity with transformers
(eager, f32) through save_pretrained → from_pretrained, GPT-OSS's MXFP4 experts against
transformers' own dequantization, and the grouped dispatch against a dense reference."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from model_reference import assert_close_rel, save_tiny
from test_models_decoders import batch, check_parity

from safetensors.numpy import load_file

from plato_jax.models import from_pretrained, moe
from plato_jax.models.hf import CheckpointError, dequantize_mxfp4, write_safetensors

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=48, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def test_mixtral_top2_renormalised(rng, tmp_path):
  cfg = transformers.MixtralConfig(**SMALL, num_local_experts=6, num_experts_per_tok=2,
                                   sliding_window=5)
  model = save_tiny(transformers.MixtralForCausalLM, cfg, tmp_path)
  names = json.loads((tmp_path / "config.json").read_text())
  assert names["model_type"] == "mixtral"
  ids, mask = batch(rng, t=17)
  check_parity(model.model, tmp_path, ids, mask)
  f32 = from_pretrained(str(tmp_path))(jnp.asarray(ids), jnp.asarray(mask))[-1]
  bf16 = from_pretrained(str(tmp_path), dtype=jnp.bfloat16)(jnp.asarray(ids), jnp.asarray(mask))
  assert bf16[-1].dtype == jnp.bfloat16
  # bf16 rounding can flip a near-tied routing choice: compare the bulk, not every token.
  err = np.abs(np.asarray(bf16[-1], np.float32) - np.asarray(f32))[mask.astype(bool)]
  assert np.median(err) < 0.05 * np.abs(np.asarray(f32)).max()


@pytest.mark.parametrize("renormalise", [False, True])
def test_olmoe_qk_norm_and_top_k(rng, tmp_path, renormalise):
  cfg = transformers.OlmoeConfig(**SMALL, num_experts=8, num_experts_per_tok=3,
                                 norm_topk_prob=renormalise, clip_qkv=3.0 if renormalise else None)
  model = save_tiny(transformers.OlmoeForCausalLM, cfg, tmp_path)
  check_parity(model.model, tmp_path, *batch(rng, t=17))


def gpt_oss_config(**kw):
  return transformers.GptOssConfig(
      **{**SMALL, "num_hidden_layers": 4, "intermediate_size": 64}, head_dim=16,
      num_local_experts=4,
      num_experts_per_tok=2, sliding_window=4, swiglu_limit=1.5,
      rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                       "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                       "original_max_position_embeddings": 8}, **kw)


def test_gpt_oss_sinks_sliding_layers_yarn_and_clamped_experts(rng, tmp_path):
  model = save_tiny(transformers.GptOssForCausalLM, gpt_oss_config(), tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["layer_types"][:2] == ["sliding_attention", "full_attention"]
  # swiglu_limit 1.5 with weights of std 0.2: the clamps are active on many entries.
  ids, mask = batch(rng, t=17)
  check_parity(model.model, tmp_path, ids, mask)
  bf16 = from_pretrained(str(tmp_path), dtype=jnp.bfloat16)(jnp.asarray(ids), jnp.asarray(mask))
  assert all(s.dtype == jnp.bfloat16 and np.isfinite(np.asarray(s, np.float32)).all()
             for s in bf16)


def test_gpt_oss_mxfp4_experts_dequantized_as_transformers_does(rng, tmp_path):
  """A checkpoint as published: expert weights as MXFP4 blocks + scales. The reference model
  holds transformers' own dequantization of the same bytes."""
  from transformers.integrations.mxfp4 import convert_moe_packed_tensors
  model = save_tiny(transformers.GptOssForCausalLM, gpt_oss_config(), tmp_path / "bf16")
  tensors = load_file(str(tmp_path / "bf16" / "model.safetensors"))
  e, d, i = 4, SMALL["hidden_size"], 64  # MXFP4 blocks: multiples of 32
  for layer in range(4):
    experts = model.model.layers[layer].mlp.experts
    for proj, rows, cols in (("gate_up_proj", 2 * i, d), ("down_proj", d, i)):
      blocks = rng.integers(0, 256, (e, rows, cols // 32, 16), dtype=np.uint8)
      scales = rng.integers(117, 123, (e, rows, cols // 32), dtype=np.uint8)
      name = f"model.layers.{layer}.mlp.experts.{proj}"
      del tensors[name]
      tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
      theirs = convert_moe_packed_tensors(torch.as_tensor(blocks), torch.as_tensor(scales),
                                          dtype=torch.float32)
      np.testing.assert_array_equal(dequantize_mxfp4(blocks, scales), theirs.numpy())
      with torch.no_grad():
        getattr(experts, proj).copy_(theirs)
  (tmp_path / "mxfp4").mkdir()
  write_safetensors(str(tmp_path / "mxfp4" / "model.safetensors"), tensors)
  config = json.loads((tmp_path / "bf16" / "config.json").read_text())
  config["quantization_config"] = {"quant_method": "mxfp4",
                                   "modules_to_not_convert": ["model.layers.*.self_attn"]}
  (tmp_path / "mxfp4" / "config.json").write_text(json.dumps(config))
  check_parity(model.model, tmp_path / "mxfp4", *batch(rng, t=17))

  name = "model.layers.1.mlp.experts.down_proj_scales"
  tensors[name] = tensors[name].copy()
  tensors[name][2, 0, 0] = 255
  write_safetensors(str(tmp_path / "mxfp4" / "model.safetensors"), tensors)
  with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.experts\.down_proj.*expert 2 "
                                            r"has a NaN scale"):
    from_pretrained(str(tmp_path / "mxfp4"))
  config["quantization_config"] = {"quant_method": "awq"}
  (tmp_path / "mxfp4" / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match="quant_method 'awq' is not supported for "
                                            "model_type 'gpt_oss'"):
    from_pretrained(str(tmp_path / "mxfp4"))


def test_missing_expert_tensor_is_named(tmp_path):
  cfg = transformers.MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2)
  save_tiny(transformers.MixtralModel, cfg, tmp_path)
  tensors = load_file(str(tmp_path / "model.safetensors"))
  del tensors["layers.2.block_sparse_moe.experts.3.w3.weight"]
  write_safetensors(str(tmp_path / "model.safetensors"), tensors)
  with pytest.raises(CheckpointError, match=r"layers\.2\.block_sparse_moe\.experts\.3\.w3"):
    from_pretrained(str(tmp_path))
  config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**config, "num_experts_per_tok": 5}))
  with pytest.raises(CheckpointError, match="num_experts_per_tok=5"):
    from_pretrained(str(tmp_path))


def dense_reference(x, ids, weights, params):
  """Every token through each of its experts, one at a time, in float64."""
  out = np.zeros(x.shape, np.float64)
  for n in range(x.shape[0]):
    for j in range(ids.shape[1]):
      w = params[ids[n, j]]
      out[n] += weights[n, j] * np.tanh(x[n].astype(np.float64) @ w)
  return out


@pytest.mark.parametrize("case", ["random", "one_expert", "idle_experts", "tiny_block"])
def test_grouped_dispatch_equals_dense(rng, case):
  n, k, e, d = 37, 3, 5, 8
  x = rng.standard_normal((n, d)).astype(np.float32)
  ids = np.stack([rng.permutation(e)[:k] for _ in range(n)])
  if case == "one_expert":  # every token's first choice is expert 4
    ids[:, 0] = 4
    ids[:, 1:] = np.where(ids[:, 1:] == 4, 0, ids[:, 1:])
  if case == "idle_experts":  # experts 0 and 3 get nothing
    ids = np.stack([rng.permutation([1, 2, 4])[:k] for _ in range(n)])
  weights = rng.random((n, k)).astype(np.float32)
  params = rng.standard_normal((e, d, d)).astype(np.float32)
  def expert_fn(rows, w):
    return jnp.tanh(rows @ w)

  block = 4 if case == "tiny_block" else None
  ours = jax.jit(lambda *a: moe.grouped_experts(*a, expert_fn, e, block))(
      jnp.asarray(x), jnp.asarray(ids), jnp.asarray(weights), jnp.asarray(params))
  np.testing.assert_allclose(np.asarray(ours), dense_reference(x, ids, weights, params),
                             rtol=1e-5, atol=1e-5)
  g = moe.group_by_expert(jnp.asarray(ids.reshape(-1), jnp.int32), e,
                          block or moe.block_rows(n * k, e))
  sizes = np.bincount(ids.reshape(-1), minlength=e)
  np.testing.assert_array_equal(g.num_blocks, -(-sizes // g.block))  # padding < a block
  assert g.source.shape[0] <= n * k + e * g.block  # static rows: assignments + padding
  # Each expert's blocks hold its own assignments, each once, then padding (the zero row).
  source = np.asarray(g.source).reshape(-1, g.block)
  for expert in range(e):
    first, count = int(g.first_block[expert]), int(g.num_blocks[expert])
    mine = source[first:first + count].reshape(-1)
    real = mine[mine < n * k]
    assert sorted(real) == sorted(np.flatnonzero(ids.reshape(-1) == expert))
    assert (mine[len(real):] == n * k).all()
