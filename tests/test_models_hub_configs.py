"""The papers' LLMs from their published config.json files, shrunk to tiny sizes.

Each entry is the checkpoint's config.json as published on the hub (keys, options and
values), except the sizes, which `shrink` scales down keeping what shapes the model: the
heads per key/value head (GQA), explicit head dims, layer-type patterns, rope settings.
transformers builds the reference from that dict and saves it; the directory then gets the
shrunk published config.json itself, so our loader reads the file as users will have it.
Parity: every hidden state within 1e-4 relative of transformers (eager, f32).
"""
import json

import pytest
import transformers
from model_reference import save_tiny
from test_models_decoders import batch, check_parity

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 11008, "max_position_embeddings": 4096, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "tie_word_embeddings": False, "torch_dtype": "float16", "use_cache": True,
    "vocab_size": 32000}
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 128256}
HUB = {
    "Llama-2-7b": LLAMA2_7B,
    "Meta-Llama-3-70B": {
        **LLAMA31_8B, "hidden_size": 8192, "intermediate_size": 28672,
        "max_position_embeddings": 8192, "num_attention_heads": 64, "num_hidden_layers": 80,
        "rope_scaling": None},
    "Llama-3.1-8B": LLAMA31_8B,
    "DeepSeek-R1-Distill-Llama-8B": {**LLAMA31_8B, "eos_token_id": 128001,
                                     "bos_token_id": 128000},
    "Falcon3-7B-Base": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 11, "eos_token_id": 11, "head_dim": 256,
        "hidden_act": "silu", "hidden_size": 3072, "initializer_range": 0.02,
        "intermediate_size": 23040, "max_position_embeddings": 32768, "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": 12, "num_hidden_layers": 28,
        "num_key_value_heads": 4, "pretraining_tp": 1, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 1000042, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 131072},
    "Yi-1.5-34B": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 1,
        "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 7168,
        "initializer_range": 0.02, "intermediate_size": 20480, "max_position_embeddings": 4096,
        "model_type": "llama", "num_attention_heads": 56, "num_hidden_layers": 60,
        "num_key_value_heads": 8, "pad_token_id": 0, "pretraining_tp": 1,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 5000000.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 64000},
    "open_llama_3b": {
        "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "hidden_size": 3200, "initializer_range": 0.02,
        "intermediate_size": 8640, "max_position_embeddings": 2048, "model_type": "llama",
        "num_attention_heads": 32, "num_hidden_layers": 26, "pad_token_id": 0,
        "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "torch_dtype": "float16",
        "use_cache": True, "vocab_size": 32000},
    "DeepSeek-R1-Distill-Qwen-7B": {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu",
        "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
        "max_position_embeddings": 131072, "max_window_layers": 28, "model_type": "qwen2",
        "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06, "rope_theta": 10000, "sliding_window": 4096,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "use_mrope": False, "use_sliding_window": False, "vocab_size": 152064},
    "Qwen3-8B": {
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
        "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
        "intermediate_size": 12288, "max_position_embeddings": 40960, "max_window_layers": 36,
        "model_type": "qwen3", "num_attention_heads": 32, "num_hidden_layers": 36,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
        "vocab_size": 151936},
    "gemma-2-9b": {
        "architectures": ["Gemma2ForCausalLM"], "attention_bias": False,
        "attention_dropout": 0.0, "attn_logit_softcapping": 50.0, "bos_token_id": 2,
        "cache_implementation": "hybrid", "eos_token_id": 1, "final_logit_softcapping": 30.0,
        "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 3584,
        "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 8192,
        "model_type": "gemma2", "num_attention_heads": 16, "num_hidden_layers": 42,
        "num_key_value_heads": 8, "pad_token_id": 0, "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096,
        "sliding_window_size": 4096, "torch_dtype": "float32", "use_cache": True,
        "vocab_size": 256000},
    "gemma-3-27b": {
        "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999,
        "eoi_token_index": 256000, "eos_token_id": [1, 106], "image_token_index": 262144,
        "initializer_range": 0.02, "mm_tokens_per_image": 256, "model_type": "gemma3",
        "text_config": {
            "head_dim": 128, "hidden_size": 5376, "intermediate_size": 21504,
            "model_type": "gemma3_text", "num_attention_heads": 32, "num_hidden_layers": 62,
            "num_key_value_heads": 16, "query_pre_attn_scalar": 168,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024},
        "torch_dtype": "bfloat16",
        "vision_config": {
            "hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
            "model_type": "siglip_vision_model", "num_attention_heads": 16,
            "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False}},
    "OLMo-2-1124-7B": {
        "architectures": ["Olmo2ForCausalLM"], "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": None, "eos_token_id": 100257,
        "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
        "intermediate_size": 11008, "max_position_embeddings": 4096, "model_type": "olmo2",
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
        "pad_token_id": 100277, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": 500000, "tie_word_embeddings": False, "torch_dtype": "float32",
        "use_cache": True, "vocab_size": 100352},
    "Olmo-3-1025-7B": {
        "architectures": ["Olmo3ForCausalLM"], "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": None, "eos_token_id": 100257,
        "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
        "intermediate_size": 11008, "layer_types": (["sliding_attention"] * 3
                                                    + ["full_attention"]) * 8,
        "max_position_embeddings": 65536, "model_type": "olmo3", "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 32, "pad_token_id": 100277,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"attention_factor": 1.2079441541679836, "beta_fast": 32,
                         "beta_slow": 1, "factor": 8.0,
                         "original_max_position_embeddings": 8192, "rope_type": "yarn"},
        "rope_theta": 500000, "sliding_window": 4096, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 100278},
    "bloomz-7b1": {
        "apply_residual_connection_post_layernorm": False,
        "architectures": ["BloomForCausalLM"], "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True, "bias_dropout_fusion": True, "bos_token_id": 1,
        "eos_token_id": 2, "hidden_dropout": 0.0, "hidden_size": 4096,
        "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "masked_softmax_fusion": True,
        "model_type": "bloom", "n_head": 32, "n_inner": None, "n_layer": 30,
        "offset_alibi": 100, "pad_token_id": 3, "pretraining_tp": 4, "seq_length": 2048,
        "skip_bias_add": True, "skip_bias_add_qkv": False, "slow_but_exact": False,
        "torch_dtype": "float16", "unk_token_id": 0, "use_cache": True, "vocab_size": 250880},
}

VOCAB, HEAD_DIM, MAX_KV = 97, 16, 2
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id",
             "boi_token_index", "eoi_token_index", "image_token_index")


def shrink(config: dict, layers: int) -> dict:
  """Tiny sizes with the published shape: the same heads per key/value head (up to 4), an
  explicit head_dim kept explicit, the same intermediate/hidden ratio, `layers` layers (a
  published layer-type pattern is cut to length), rope lengths scaled down ×1/1024."""
  c = dict(config)
  heads = c.get("num_attention_heads", c.get("n_head"))
  kv = c.get("num_key_value_heads") or heads
  groups = min(heads // kv, 4)
  new_kv = min(kv, MAX_KV) if groups > 1 else 4
  new_heads = new_kv * groups
  hidden = new_heads * HEAD_DIM
  if "n_head" in c:  # BLOOM
    c.update(n_head=new_heads, hidden_size=hidden, n_layer=layers)
  else:
    ratio = c["intermediate_size"] / c["hidden_size"]
    c.update(hidden_size=hidden, intermediate_size=int(round(ratio * hidden / 8)) * 8,
             num_attention_heads=new_heads, num_hidden_layers=layers)
    if "num_key_value_heads" in config:
      c["num_key_value_heads"] = new_kv
    if "head_dim" in c:
      c["head_dim"] = HEAD_DIM
    if c.get("query_pre_attn_scalar"):  # Gemma: it was the head dim (or hidden / heads)
      c["query_pre_attn_scalar"] = HEAD_DIM
    if "layer_types" in c:
      c["layer_types"] = c["layer_types"][:layers]
    for key in ("max_position_embeddings", "sliding_window", "sliding_window_size",
                "max_window_layers"):
      if c.get(key):
        c[key] = max(c[key] // 1024, 4) if key != "max_window_layers" else layers
    if isinstance(c.get("rope_scaling"), dict) and \
        "original_max_position_embeddings" in c["rope_scaling"]:
      c["rope_scaling"] = {**c["rope_scaling"], "original_max_position_embeddings": max(
          c["rope_scaling"]["original_max_position_embeddings"] // 1024, 2)}
  c["vocab_size"] = VOCAB
  for key in TOKEN_IDS:  # inside the tiny vocabulary (the image token just past it)
    if isinstance(c.get(key), int):
      c[key] = c[key] % (VOCAB - 1)
    elif isinstance(c.get(key), list):
      c[key] = [i % (VOCAB - 1) for i in c[key]]
  if "image_token_index" in c:
    c["image_token_index"] = VOCAB
  return c


def shrink_composite(config: dict, layers: int) -> dict:
  """Gemma 3: the text model shrunk as above, the SigLIP tower to one block at 28 px."""
  text = shrink({**config["text_config"], "num_key_value_heads":
                 config["text_config"]["num_key_value_heads"]}, layers)
  vision = {**config["vision_config"], "hidden_size": 32, "image_size": 28,
            "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1}
  top = shrink({k: v for k, v in config.items() if k not in ("text_config", "vision_config")}
               | {"num_attention_heads": 1, "intermediate_size": 1, "hidden_size": 1}, 1)
  for key in ("num_attention_heads", "intermediate_size", "hidden_size",
              "num_hidden_layers", "vocab_size"):
    top.pop(key, None)
  return {**top, "mm_tokens_per_image": 4, "text_config": text, "vision_config": vision}


@pytest.mark.parametrize("name", sorted(HUB))
def test_published_config_loads_and_matches(rng, tmp_path, name):
  published = HUB[name]
  layers = 8 if "layer_types" in published or published.get("model_type") == "gemma3" else 3
  config = (shrink_composite if "text_config" in published else shrink)(published, layers)
  arch = getattr(transformers, published["architectures"][0])
  reference = save_tiny(arch, transformers.AutoConfig.for_model(**config), tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(config))  # the file as published
  body = {"LlamaForCausalLM": "model", "Qwen2ForCausalLM": "model",
          "Qwen3ForCausalLM": "model", "Gemma2ForCausalLM": "model",
          "Olmo2ForCausalLM": "model", "Olmo3ForCausalLM": "model",
          "BloomForCausalLM": "transformer"}
  if arch.__name__ == "Gemma3ForConditionalGeneration":
    torch_body = reference.model.language_model
  else:
    torch_body = getattr(reference, body[arch.__name__])
  check_parity(torch_body, tmp_path, *batch(rng, t=24))
