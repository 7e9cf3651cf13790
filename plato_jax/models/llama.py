"""The LLaMA family of decoders: LLaMA 1/2/3/3.1 (rope scaling), OpenLLaMA, Mistral,
DeepSeek-R1-Distill-Llama, Qwen2 (q/k/v bias) and Qwen3 (q/k RMSNorm); GQA throughout.

`LlamaConfig.from_hf` decodes a transformers config.json (model_type llama, mistral, qwen2,
qwen3); `Llama(...)(input_ids, attention_mask)` returns every hidden state as transformers'
`output_hidden_states` does: the embedding output, then each layer's output, the last one
after the final RMSNorm ([L+1] arrays of [B, T, D]). Positions are 0..T-1 whatever the
padding, as in transformers without explicit position_ids (rotary attention depends only on
position differences, so left padding changes no token's features beyond rounding).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from plato_jax.models import layers
from plato_jax.models.hf import CheckpointError, config_value

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float
  hidden_act: str
  qkv_bias: bool            # Qwen2: q/k/v biases, o without
  o_bias: bool
  mlp_bias: bool
  qk_norm: bool             # Qwen3: RMSNorm over each head of q and k, before rope
  sliding_windows: tuple    # per layer: None or the window
  rope: tuple               # sorted items of the raw config fields rope needs (hashable)

  @classmethod
  def from_hf(cls, config: dict) -> "LlamaConfig":
    kind = config.get("model_type")
    if kind not in MODEL_TYPES:
      raise CheckpointError(f"config.json model_type {kind!r} is not a LLaMA-family model")
    get = lambda key, default=None: config_value(config, key, default)  # noqa: E731
    need = lambda key: config_value(config, key, required=True)  # noqa: E731
    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    kv_heads = int(get("num_key_value_heads", heads))
    if heads % kv_heads:
      raise CheckpointError(f"config.json: num_attention_heads={heads} is not a multiple of "
                            f"num_key_value_heads={kv_heads}")
    layers_n = int(need("num_hidden_layers"))
    if kind == "qwen2":
      qkv_bias, o_bias = True, False
    else:
      qkv_bias = o_bias = bool(get("attention_bias", False))
    window = get("sliding_window")
    if kind in ("qwen2", "qwen3") and not get("use_sliding_window", False):
      window = None
    types = get("layer_types")
    if types is None:
      if kind in ("qwen2", "qwen3"):
        first = int(get("max_window_layers", layers_n))
        types = ["sliding_attention" if window is not None and i >= first else "full_attention"
                 for i in range(layers_n)]
      else:
        types = ["sliding_attention" if window is not None else "full_attention"] * layers_n
    if len(types) != layers_n:
      raise CheckpointError(f"config.json layer_types has {len(types)} entries for "
                            f"{layers_n} layers")
    windows = tuple(int(window) if t == "sliding_attention" and window is not None else None
                    for t in types)
    rope_keys = ("rope_parameters", "rope_scaling", "rope_theta", "max_position_embeddings",
                 "partial_rotary_factor")
    rope = tuple(sorted((k, _frozen(config[k])) for k in rope_keys if k in config))
    return cls(vocab_size=int(need("vocab_size")), hidden_size=hidden,
               intermediate_size=int(need("intermediate_size")), num_layers=layers_n,
               num_heads=heads, num_kv_heads=kv_heads,
               head_dim=int(get("head_dim") or hidden // heads),
               rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
               hidden_act=str(get("hidden_act", "silu")), qkv_bias=qkv_bias, o_bias=o_bias,
               mlp_bias=bool(get("mlp_bias", False)), qk_norm=kind == "qwen3",
               sliding_windows=windows, rope=rope)

  def rope_config(self) -> dict:
    return {k: _thawed(v) for k, v in self.rope}


def _frozen(value):
  if isinstance(value, dict):
    return ("__dict__", tuple(sorted((k, _frozen(v)) for k, v in value.items())))
  if isinstance(value, list):
    return ("__list__", tuple(_frozen(v) for v in value))
  return value


def _thawed(value):
  if isinstance(value, tuple) and value and value[0] == "__dict__":
    return {k: _thawed(v) for k, v in value[1]}
  if isinstance(value, tuple) and value and value[0] == "__list__":
    return [_thawed(v) for v in value[1]]
  return value


class Attention(nnx.Module):
  def __init__(self, c: LlamaConfig, window, dtype):
    self.q_proj = layers.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias, dtype=dtype)
    self.k_proj = layers.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias, dtype=dtype)
    self.v_proj = layers.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias, dtype=dtype)
    self.o_proj = layers.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.o_bias, dtype=dtype)
    if c.qk_norm:
      self.q_norm = layers.RMSNorm(c.head_dim, eps=c.rms_norm_eps, dtype=dtype)
      self.k_norm = layers.RMSNorm(c.head_dim, eps=c.rms_norm_eps, dtype=dtype)
    self.c, self.window = c, window

  def __call__(self, x, cos, sin, mask):
    b, t, _ = x.shape
    c = self.c
    q = self.q_proj(x).reshape(b, t, c.num_heads, c.head_dim)
    k = self.k_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim)
    v = self.v_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim)
    if c.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
    out = layers.attention(q, k, v, mask, scaling=c.head_dim ** -0.5)
    return self.o_proj(out.reshape(b, t, c.num_heads * c.head_dim))


class MLP(nnx.Module):
  def __init__(self, c: LlamaConfig, dtype):
    self.gate_proj = layers.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias, dtype=dtype)
    self.up_proj = layers.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias, dtype=dtype)
    self.down_proj = layers.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias, dtype=dtype)
    self.act = layers.activation(c.hidden_act)

  def __call__(self, x):
    return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  def __init__(self, c: LlamaConfig, window, dtype):
    self.input_layernorm = layers.RMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=dtype)
    self.self_attn = Attention(c, window, dtype)
    self.post_attention_layernorm = layers.RMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=dtype)
    self.mlp = MLP(c, dtype)

  def __call__(self, x, cos, sin, mask):
    x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
    return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nnx.Module):
  """Parameter paths are the checkpoint's (without the `model.` prefix of *ForCausalLM)."""

  def __init__(self, config: LlamaConfig, *, dtype=jnp.float32):
    c = config
    self.config = c
    self.embed_tokens = layers.Embedding(c.vocab_size, c.hidden_size, dtype=dtype)
    self.layers = nnx.List([DecoderLayer(c, w, dtype) for w in c.sliding_windows])
    self.norm = layers.RMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=dtype)

  def __call__(self, input_ids, attention_mask=None):
    """input_ids [B, T] int; attention_mask [B, T] (1 = token, 0 = padding).
    Returns the L+1 hidden states, each [B, T, D]."""
    c = self.config
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    x = self.embed_tokens(input_ids)
    t = input_ids.shape[1]
    inv_freq, scale = layers.rope_frequencies(c.rope_config(), c.head_dim, t)
    cos, sin = layers.rope_cos_sin(inv_freq, scale, jnp.arange(t)[None], x.dtype)
    masks = {w: layers.causal_mask(attention_mask, w) for w in set(c.sliding_windows)}
    states = [x]
    for layer, window in zip(self.layers, c.sliding_windows):
      x = layer(x, cos, sin, masks[window])
      states.append(x)
    states[-1] = self.norm(x)
    return states
