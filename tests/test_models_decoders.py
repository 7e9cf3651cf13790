"""Decoder parity (LLaMA family, BLOOM, Gemma, OLMo): every hidden state of our Flax port equals
model (eager, f32) within 1e-4 relative, through save_pretrained → from_pretrained."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from model_reference import assert_close_rel, save_tiny

from plato_jax.models import from_pretrained
from plato_jax.models.hf import CheckpointError, write_safetensors

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
ROPE = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
}


def batch(rng, b=3, t=11, vocab=97, pad_rows=(1, 2)):
  ids = rng.integers(0, vocab, (b, t))
  mask = np.ones((b, t), np.int64)
  for row, n in zip(pad_rows, (3, 7)):
    mask[row, :n] = 0  # left padding
  return ids, mask


def check_parity(torch_model, path, ids, mask):
  with torch.no_grad():
    theirs = torch_model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                         output_hidden_states=True).hidden_states
  ours = from_pretrained(str(path))(jnp.asarray(ids), jnp.asarray(mask))
  assert len(ours) == len(theirs)
  real = mask.astype(bool)  # padding positions hold junk in both
  for i, (a, b) in enumerate(zip(ours, theirs)):
    assert_close_rel(np.asarray(a)[real], b.numpy()[real], where=f"hidden state {i}")


@pytest.mark.parametrize("rope", sorted(ROPE))
def test_llama_rope_variants_and_gqa(rng, tmp_path, rope):
  cfg = transformers.LlamaConfig(**SMALL, rope_scaling=ROPE[rope])
  model = save_tiny(transformers.LlamaForCausalLM, cfg, tmp_path)   # "model." prefix
  ids, mask = batch(rng)
  if rope == "dynamic":  # longer than max_position_embeddings: the base is rescaled
    ids, mask = batch(rng, t=40)
  check_parity(model.model, tmp_path, ids, mask)


def test_llama_bare_model_sharded_checkpoint_with_biases(rng, tmp_path):
  cfg = transformers.LlamaConfig(**SMALL, attention_bias=True, mlp_bias=True, head_dim=32)
  model = save_tiny(transformers.LlamaModel, cfg, tmp_path, max_shard_size="40KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  check_parity(model, tmp_path, *batch(rng))


def test_mistral_sliding_window(rng, tmp_path):
  cfg = transformers.MistralConfig(**SMALL, sliding_window=4)
  model = save_tiny(transformers.MistralForCausalLM, cfg, tmp_path)
  check_parity(model.model, tmp_path, *batch(rng))


def test_qwen2_qkv_bias_and_sliding_layers(rng, tmp_path):
  cfg = transformers.Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=4,
                                 max_window_layers=1)
  model = save_tiny(transformers.Qwen2ForCausalLM, cfg, tmp_path)
  assert model.model.layers[0].self_attn.q_proj.bias is not None
  check_parity(model.model, tmp_path, *batch(rng))


def test_qwen3_qk_norm(rng, tmp_path):
  cfg = transformers.Qwen3Config(**SMALL, head_dim=24)
  model = save_tiny(transformers.Qwen3ForCausalLM, cfg, tmp_path)
  check_parity(model.model, tmp_path, *batch(rng))


def test_granite_multipliers(rng, tmp_path):
  """IBM Granite: embeddings, sublayer outputs and the attention scale multiplied (values far
  from 1, so a missed multiplier shows), logits scaling outside the hidden states."""
  cfg = transformers.GraniteConfig(**SMALL, embedding_multiplier=12.0, residual_multiplier=0.22,
                                   attention_multiplier=0.0078125, logits_scaling=8.0)
  model = save_tiny(transformers.GraniteForCausalLM, cfg, tmp_path)
  check_parity(model.model, tmp_path, *batch(rng))
  config = json.loads((tmp_path / "config.json").read_text())
  del config["residual_multiplier"]
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match="residual_multiplier"):
    from_pretrained(str(tmp_path))


def test_left_padding_gives_each_row_alone(rng, tmp_path):
  """Pooled (masked mean) features of a left-padded batch equal each row run alone."""
  cfg = transformers.LlamaConfig(**SMALL)
  save_tiny(transformers.LlamaForCausalLM, cfg, tmp_path)
  model = from_pretrained(str(tmp_path))
  ids, mask = batch(rng)
  states = model(jnp.asarray(ids), jnp.asarray(mask))
  for row in range(ids.shape[0]):
    real = mask[row].astype(bool)
    alone = model(jnp.asarray(ids[row:row + 1, real]))
    for layer, (a, b) in enumerate(zip(states, alone)):
      pooled_batch = np.asarray(a)[row, real].mean(0)
      pooled_alone = np.asarray(b)[0].mean(0)
      assert_close_rel(pooled_batch, pooled_alone, rtol=1e-5, where=f"row {row} layer {layer}")


def test_bf16_checkpoint_loads_in_requested_dtype(rng, tmp_path):
  cfg = transformers.LlamaConfig(**SMALL)
  model = save_tiny(transformers.LlamaForCausalLM, cfg, tmp_path)
  model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
  ours = from_pretrained(str(tmp_path / "bf16"), dtype=jnp.float32)
  assert ours.embed_tokens.weight[...].dtype == jnp.float32
  np.testing.assert_array_equal(  # bf16 → f32 is exact
      np.asarray(ours.embed_tokens.weight[...]),
      model.model.embed_tokens.weight.detach().float().numpy())
  ours16 = from_pretrained(str(tmp_path / "bf16"), dtype=jnp.bfloat16)
  assert ours16(jnp.asarray(batch(rng)[0]))[-1].dtype == jnp.bfloat16


def test_bad_checkpoints_name_the_problem(tmp_path):
  cfg = transformers.LlamaConfig(**SMALL)
  save_tiny(transformers.LlamaModel, cfg, tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())

  def write(**change):
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))

  write(intermediate_size=100)
  with pytest.raises(CheckpointError, match=r"layers.0.mlp.down_proj.weight.*\[64, 96\].*\[64, 100\]"):
    from_pretrained(str(tmp_path))
  write(model_type="gpt_unknown")
  with pytest.raises(CheckpointError, match="unsupported model_type 'gpt_unknown'"):
    from_pretrained(str(tmp_path))
  write(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4})
  with pytest.raises(CheckpointError, match="unsupported rope_type 'longrope'"):
    from_pretrained(str(tmp_path))(jnp.zeros((1, 3), jnp.int32))
  write(num_hidden_layers=4)  # found before the model is built
  with pytest.raises(CheckpointError, match=r"num_hidden_layers=4, but the checkpoint's "
                                            r"tensors cover layers 0\.\.2"):
    from_pretrained(str(tmp_path))
  write(num_attention_heads=3)
  with pytest.raises(CheckpointError, match="not a multiple of num_key_value_heads"):
    from_pretrained(str(tmp_path))
  write()
  del config["hidden_size"]
  write()
  with pytest.raises(CheckpointError, match="'hidden_size' is missing"):
    from_pretrained(str(tmp_path))
  (tmp_path / "model.safetensors").write_bytes(b"\x10\x00")
  with pytest.raises(CheckpointError, match="model.safetensors: truncated"):
    from_pretrained(str(tmp_path))
  (tmp_path / "model.safetensors").unlink()
  (tmp_path / "model.pth").write_bytes(b"")
  with pytest.raises(CheckpointError, match=r"no model.safetensors, pytorch_model.bin.*"
                                            r"model\.pth"):
    from_pretrained(str(tmp_path))
  (tmp_path / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(CheckpointError, match="pytorch_model.bin: not a torch.save zip"):
    from_pretrained(str(tmp_path))


@pytest.mark.parametrize("heads,post_norm", [(4, False), (6, True)])  # 6: not a power of 2
def test_bloom_alibi_and_embedding_norm(rng, tmp_path, heads, post_norm):
  cfg = transformers.BloomConfig(vocab_size=97, hidden_size=48, n_layer=2, n_head=heads,
                                 apply_residual_connection_post_layernorm=post_norm)
  model = save_tiny(transformers.BloomForCausalLM, cfg, tmp_path)   # "transformer." prefix
  check_parity(model.transformer, tmp_path, *batch(rng))


GEMMA = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=24,
             max_position_embeddings=64)


def test_gemma1(rng, tmp_path):
  model = save_tiny(transformers.GemmaForCausalLM, transformers.GemmaConfig(**GEMMA), tmp_path)
  check_parity(model.model, tmp_path, *batch(rng))


def test_gemma2_softcap_query_scale_and_sliding_layers(rng, tmp_path):
  cfg = transformers.Gemma2Config(**GEMMA, sliding_window=4, attn_logit_softcapping=2.0,
                                  query_pre_attn_scalar=16)
  model = save_tiny(transformers.Gemma2ForCausalLM, cfg, tmp_path)
  check_parity(model.model, tmp_path, *batch(rng))


def test_gemma3_qk_norm_and_two_rope_bases(rng, tmp_path):
  cfg = transformers.Gemma3TextConfig(**GEMMA, sliding_window=4, sliding_window_pattern=2,
                                      query_pre_attn_scalar=16, rope_theta=1e6,
                                      rope_local_base_freq=10.0)
  model = save_tiny(transformers.Gemma3ForCausalLM, cfg, tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["layer_types"][:2] == ["sliding_attention", "full_attention"]
  check_parity(model.model, tmp_path, *batch(rng))


def test_olmo_clip_qkv_and_parameter_free_norms(rng, tmp_path):
  cfg = transformers.OlmoConfig(**SMALL, clip_qkv=0.5)
  model = save_tiny(transformers.OlmoForCausalLM, cfg, tmp_path)
  check_parity(model.model, tmp_path, *batch(rng))


def test_olmo2_post_norms_and_full_qk_norm(rng, tmp_path):
  model = save_tiny(transformers.Olmo2ForCausalLM, transformers.Olmo2Config(**SMALL), tmp_path)
  check_parity(model.model, tmp_path, *batch(rng))


def test_olmo3_sliding_layers(rng, tmp_path):
  cfg = transformers.Olmo3Config(**{**SMALL, "num_hidden_layers": 4}, sliding_window=4)
  model = save_tiny(transformers.Olmo3ForCausalLM, cfg, tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  assert "sliding_attention" in config["layer_types"]
  check_parity(model.model, tmp_path, *batch(rng))


@pytest.mark.parametrize("name", ["llama", "gemma2", "bloom"])
def test_logits_equal_the_causal_lm(rng, tmp_path, name):
  """Separate lm_head (LLaMA), tied embedding with final soft-capping (Gemma 2), tied (BLOOM)."""
  model_cls, cfg = {
      "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig(**SMALL)),
      "gemma2": (transformers.Gemma2ForCausalLM,
                 transformers.Gemma2Config(**GEMMA, final_logit_softcapping=3.0)),
      "bloom": (transformers.BloomForCausalLM,
                transformers.BloomConfig(vocab_size=97, hidden_size=48, n_layer=2, n_head=4)),
  }[name]
  model = save_tiny(model_cls, cfg, tmp_path)
  ids, mask = batch(rng)
  with torch.no_grad():
    theirs = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits
  ours = from_pretrained(str(tmp_path))
  logits = ours.logits(ours(jnp.asarray(ids), jnp.asarray(mask))[-1])
  real = mask.astype(bool)
  assert_close_rel(np.asarray(logits)[real], theirs.numpy()[real], where=f"{name} logits")


def test_bare_model_has_no_logits(tmp_path):
  save_tiny(transformers.LlamaModel, transformers.LlamaConfig(**SMALL), tmp_path)
  model = from_pretrained(str(tmp_path))
  with pytest.raises(ValueError, match="no output embedding"):
    model.logits(jnp.zeros((1, 64)))


def test_converted_params_round_trip_through_orbax(rng, tmp_path):
  from plato_jax.models import load_converted, save_converted
  save_tiny(transformers.Qwen3ForCausalLM, transformers.Qwen3Config(**SMALL), tmp_path / "hf")
  model = from_pretrained(str(tmp_path / "hf"), dtype=jnp.bfloat16)
  save_converted(model, str(tmp_path / "converted"))
  again = load_converted(str(tmp_path / "converted"))
  ids = jnp.asarray(batch(rng)[0])
  for a, b in zip(model(ids), again(ids)):
    assert a.dtype == b.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  with pytest.raises(CheckpointError, match="no source.json"):
    load_converted(str(tmp_path / "hf"))


def ministral3(num_layers=2):
  """A Mistral3ForConditionalGeneration (Pixtral vision + Ministral 3 text), as published;
  the Llama 4 query scale's period is 4 positions here, so it grows within the batch."""
  text = transformers.Ministral3Config(
      **{**SMALL, "num_hidden_layers": num_layers}, head_dim=16,
      rope_parameters={"type": "yarn", "rope_theta": 1e6, "factor": 16.0,
                       "original_max_position_embeddings": 4, "max_position_embeddings": 32,
                       "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0,
                       "mscale": 1.0, "llama_4_scaling_beta": 0.1})
  vision = transformers.PixtralVisionConfig(hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=1, num_attention_heads=2,
                                            image_size=32, patch_size=8, head_dim=16)
  return transformers.Mistral3Config(vision_config=vision, text_config=text)


def test_ministral3_language_model_of_a_mistral3_checkpoint(rng, tmp_path):
  model = save_tiny(transformers.Mistral3ForConditionalGeneration, ministral3(), tmp_path)
  ids, mask = batch(rng, t=17)
  check_parity(model.model.language_model, tmp_path, ids, mask)
  bf16 = from_pretrained(str(tmp_path), dtype=jnp.bfloat16)(jnp.asarray(ids), jnp.asarray(mask))
  assert all(s.dtype == jnp.bfloat16 for s in bf16)
  assert from_pretrained(str(tmp_path), tower="text").config.query_scale_beta == 0.1
  with pytest.raises(CheckpointError, match=r"towers of a mistral3 checkpoint that load are "
                                            r"\['text'\].*got 'vision'"):
    from_pretrained(str(tmp_path), tower="vision")


@pytest.mark.parametrize("block", [None, [24, 40]])  # per-tensor scales; 24×40 blocks
def test_fp8_weights_dequantized_as_transformers_does(rng, tmp_path, block):
  """Linear weights stored as float8_e4m3 with `weight_scale_inv` (one per tensor, or a grid
  of blocks that do not divide the weights evenly) and static activation scales, as
  Ministral 3's published checkpoints are; the reference holds transformers' own
  dequantization (per tensor) or the scales multiplied out (blocks)."""
  import ml_dtypes
  from safetensors.numpy import load_file
  from transformers.integrations.finegrained_fp8 import Fp8Dequantize
  model = save_tiny(transformers.Mistral3ForConditionalGeneration, ministral3(), tmp_path / "f32")
  tensors = load_file(str(tmp_path / "f32" / "model.safetensors"))
  params = dict(model.named_parameters())
  for name in [n for n in tensors if ".layers." in n and n.endswith("proj.weight")
               and n.startswith("language_model.")]:
    w = tensors[name]
    if block is None:
      scale = np.array(np.abs(w).max() / 448, np.float32)
    else:
      (bm, bn), grid = block, (-(-w.shape[0] // block[0]), -(-w.shape[1] // block[1]))
      padded = np.zeros((grid[0] * bm, grid[1] * bn), np.float32)
      padded[:w.shape[0], :w.shape[1]] = np.abs(w)
      scale = (padded.reshape(grid[0], bm, grid[1], bn).max(axis=(1, 3)) / 448).astype(np.float32)
    full = scale if block is None else \
        np.kron(scale, np.ones(block, np.float32))[:w.shape[0], :w.shape[1]]
    q = (w / full).astype(ml_dtypes.float8_e4m3fn)
    tensors[name], tensors[name + "_scale_inv"] = q, scale
    tensors[name.replace(".weight", ".activation_scale")] = np.array(1.0, np.float32)
    if block is None:  # transformers' dequantization (per-tensor; its grid must divide)
      theirs = Fp8Dequantize(None)._dequantize_one(torch.as_tensor(q.astype(np.float32)),
                                                   torch.as_tensor(scale), torch.float32)
    else:
      theirs = torch.as_tensor(q.astype(np.float32) * full)
    target = name.replace("language_model.model.", "model.language_model.")
    with torch.no_grad():
      params[target].copy_(theirs)
  (tmp_path / "fp8").mkdir()
  write_safetensors(str(tmp_path / "fp8" / "model.safetensors"), tensors)
  config = json.loads((tmp_path / "f32" / "config.json").read_text())
  config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static",
                                   "weight_block_size": block}
  (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
  check_parity(model.model.language_model, tmp_path / "fp8", *batch(rng, t=17))

  name = "language_model.model.layers.1.mlp.up_proj.weight"
  del tensors[name + "_scale_inv"]
  write_safetensors(str(tmp_path / "fp8" / "model.safetensors"), tensors)
  with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.up_proj\.weight' is float8_e4m3fn "
                                            r"without its scale"):
    from_pretrained(str(tmp_path / "fp8"))
