"""Gemma 1, 2 and 3 (text): embeddings scaled by √D, (1 + w) RMSNorm in f32, GQA with rope,
tanh-GELU gated MLP. Gemma 2 adds norms after attention and around the MLP, logit
soft-capping, a query scale from `query_pre_attn_scalar` and sliding-window layers; Gemma 3
adds q/k norms and a second rope base for its sliding layers.

`Gemma(...)(input_ids, attention_mask)` returns transformers' hidden states: the scaled
embeddings, each layer's output, the last after the final norm ([L+1] × [B, T, D]).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from plato_jax.models import layers
from plato_jax.models.hf import CheckpointError, config_value, sub_config

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3")


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
  version: int
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float
  hidden_act: str
  scaling: float
  softcap: float | None
  attention_bias: bool
  layer_types: tuple          # "full_attention" / "sliding_attention" per layer
  sliding_window: int | None
  rope: tuple                 # (layer type, frozen rope config) pairs
  final_softcap: float | None = None
  head: str = "tied"         # output embedding: "tied" (input embedding), "separate", "none"

  @classmethod
  def from_hf(cls, config: dict) -> "GemmaConfig":
    config = sub_config(config, "gemma3", "text_config", "gemma3_text")
    kind = config.get("model_type")
    if kind not in MODEL_TYPES:
      raise CheckpointError(f"config.json model_type {kind!r} is not a Gemma model")
    version = {"gemma": 1, "gemma2": 2, "gemma3_text": 3}[kind]
    get = lambda key, default=None: config_value(config, key, default)  # noqa: E731
    need = lambda key: config_value(config, key, required=True)  # noqa: E731
    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    kv = int(get("num_key_value_heads", heads))
    if heads % kv:
      raise CheckpointError(f"config.json: num_attention_heads={heads} is not a multiple of "
                            f"num_key_value_heads={kv}")
    head_dim = int(get("head_dim") or hidden // heads)
    n = int(need("num_hidden_layers"))
    act = get("hidden_activation") or get("hidden_act", "gelu_pytorch_tanh")
    if act == "gelu":  # transformers reads Gemma's legacy "gelu" as the tanh approximation
      act = "gelu_pytorch_tanh"
    if version == 1:
      types = ["full_attention"] * n
    else:
      types = get("layer_types")
      if types is None:
        period = 2 if version == 2 else int(get("sliding_window_pattern", 6))
        types = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(n)]
    if len(types) != n:
      raise CheckpointError(f"config.json layer_types has {len(types)} entries for {n} layers")
    if get("use_bidirectional_attention", False):
      raise CheckpointError("config.json: use_bidirectional_attention is not supported")
    defaults = {"rope_theta": 10_000.0} if version < 3 else \
        {"rope_theta": 1e6, "rope_local_base_freq": 10_000.0}
    rope = layers.rope_configs_by_layer_type({**defaults, **config}, types,
                                             "rope_local_base_freq" if version == 3 else None)
    scalar = get("query_pre_attn_scalar") if version > 1 else None
    return cls(version=version, vocab_size=int(need("vocab_size")), hidden_size=hidden,
               intermediate_size=int(need("intermediate_size")), num_layers=n, num_heads=heads,
               num_kv_heads=kv, head_dim=head_dim, rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
               hidden_act=str(act), scaling=float(scalar or head_dim) ** -0.5,
               softcap=get("attn_logit_softcapping") if version == 2 else None,
               attention_bias=bool(get("attention_bias", False)), layer_types=tuple(types),
               sliding_window=get("sliding_window"),
               rope=tuple(sorted((k, layers.freeze(v)) for k, v in rope.items())),
               head="tied" if get("tie_word_embeddings", True) else "separate",
               final_softcap=get("final_logit_softcapping") if version > 1 else None)


def _norm(c: GemmaConfig, dim: int, dtype):
  return layers.RMSNorm(dim, eps=c.rms_norm_eps, dtype=dtype, style="plus_one")


class Attention(nnx.Module):
  def __init__(self, c: GemmaConfig, dtype):
    hd, bias = c.head_dim, c.attention_bias
    self.q_proj = layers.Linear(c.hidden_size, c.num_heads * hd, bias=bias, dtype=dtype)
    self.k_proj = layers.Linear(c.hidden_size, c.num_kv_heads * hd, bias=bias, dtype=dtype)
    self.v_proj = layers.Linear(c.hidden_size, c.num_kv_heads * hd, bias=bias, dtype=dtype)
    self.o_proj = layers.Linear(c.num_heads * hd, c.hidden_size, bias=bias, dtype=dtype)
    if c.version == 3:
      self.q_norm = _norm(c, hd, dtype)
      self.k_norm = _norm(c, hd, dtype)
    self.c = c

  def __call__(self, x, cos, sin, mask):
    b, t, _ = x.shape
    c = self.c
    q = self.q_proj(x).reshape(b, t, c.num_heads, c.head_dim)
    k = self.k_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim)
    v = self.v_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim)
    if c.version == 3:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
    out = layers.attention(q, k, v, mask, scaling=c.scaling, softcap=c.softcap)
    return self.o_proj(out.reshape(b, t, -1))


class MLP(nnx.Module):
  def __init__(self, c: GemmaConfig, dtype):
    self.gate_proj = layers.Linear(c.hidden_size, c.intermediate_size, bias=False, dtype=dtype)
    self.up_proj = layers.Linear(c.hidden_size, c.intermediate_size, bias=False, dtype=dtype)
    self.down_proj = layers.Linear(c.intermediate_size, c.hidden_size, bias=False, dtype=dtype)
    self.act = layers.activation(c.hidden_act)

  def __call__(self, x):
    return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  def __init__(self, c: GemmaConfig, dtype):
    d = c.hidden_size
    self.input_layernorm = _norm(c, d, dtype)
    self.self_attn = Attention(c, dtype)
    self.post_attention_layernorm = _norm(c, d, dtype)
    if c.version > 1:
      self.pre_feedforward_layernorm = _norm(c, d, dtype)
      self.post_feedforward_layernorm = _norm(c, d, dtype)
    self.mlp = MLP(c, dtype)
    self.version = c.version

  def __call__(self, x, cos, sin, mask):
    y = self.self_attn(self.input_layernorm(x), cos, sin, mask)
    if self.version == 1:  # post_attention_layernorm is the pre-MLP norm
      x = x + y
      return x + self.mlp(self.post_attention_layernorm(x))
    x = x + self.post_attention_layernorm(y)
    return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma(layers.Decoder):
  def __init__(self, config: GemmaConfig, *, dtype=jnp.float32):
    c = config
    self.config = c
    self.embed_tokens = layers.Embedding(c.vocab_size, c.hidden_size, dtype=dtype)
    self.layers = nnx.List([DecoderLayer(c, dtype) for _ in range(c.num_layers)])
    self.norm = _norm(c, c.hidden_size, dtype)
    if c.head == "separate":
      self.lm_head = layers.Linear(c.hidden_size, c.vocab_size, bias=False, dtype=dtype)

  def input_embedding(self):
    return self.embed_tokens.weight[...]

  def __call__(self, input_ids, attention_mask=None):
    c = self.config
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    x = self.embed_tokens(input_ids)
    x = x * jnp.asarray(np.sqrt(c.hidden_size), jnp.float32).astype(x.dtype)
    rope, masks = self.rope_and_masks(attention_mask, x.dtype)
    states = [x]
    for layer, kind in zip(self.layers, c.layer_types):
      x = layer(x, *rope[kind], masks[kind])
      states.append(x)
    states[-1] = self.norm(x)
    return states
