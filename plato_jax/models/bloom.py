"""BLOOM / BLOOMZ: ALiBi attention (no position embeddings), a layer norm on the word
embeddings, fused q/k/v laid out [heads, 3, head_dim], tanh-GELU MLP.

`Bloom(...)(input_ids, attention_mask)` returns transformers' hidden states: the normed
embeddings, then each block's output, the last after `ln_f` ([L+1] × [B, T, D]). ALiBi
positions count real tokens only (the cumulative sum of the mask), as transformers does.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from plato_jax.models import layers
from plato_jax.models.hf import CheckpointError, config_value

MODEL_TYPES = ("bloom",)


@dataclasses.dataclass(frozen=True)
class BloomConfig:
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  layer_norm_eps: float
  residual_after_norm: bool   # apply_residual_connection_post_layernorm
  head: str = "tied"         # output embedding: "tied" (input embedding), "separate", "none"

  @classmethod
  def from_hf(cls, config: dict) -> "BloomConfig":
    if config.get("model_type") != "bloom":
      raise CheckpointError(f"config.json model_type {config.get('model_type')!r} is not bloom")

    def either(*keys):
      for key in keys:
        if config.get(key) is not None:
          return config[key]
      raise CheckpointError(f"config.json: required field {keys[0]!r} (or {keys[1:]}) is missing")

    hidden, heads = int(either("hidden_size", "n_embed")), int(either("n_head", "num_attention_heads"))
    if hidden % heads:
      raise CheckpointError(f"config.json: hidden_size={hidden} is not a multiple of n_head={heads}")
    if config_value(config, "pretraining_tp", 1) > 1 and config.get("slow_but_exact"):
      raise CheckpointError("config.json: slow_but_exact with pretraining_tp > 1 is not supported")
    return cls(vocab_size=int(either("vocab_size")), hidden_size=hidden,
               num_layers=int(either("n_layer", "num_hidden_layers")), num_heads=heads,
               layer_norm_eps=float(config_value(config, "layer_norm_epsilon", 1e-5)),
               residual_after_norm=bool(config.get("apply_residual_connection_post_layernorm",
                                                   False)),
               head="tied" if config.get("tie_word_embeddings", True) else "separate")


def alibi_slopes(num_heads: int) -> np.ndarray:
  """The ALiBi slope of each head (geometric; interleaved extras when not a power of 2)."""
  closest = 2 ** math.floor(math.log2(num_heads))
  base = np.float32(2 ** (-(2 ** -(math.log2(closest) - 3))))
  slopes = base ** np.arange(1, closest + 1, dtype=np.float32)
  if closest != num_heads:
    extra = np.float32(2 ** (-(2 ** -(math.log2(2 * closest) - 3))))
    rest = min(closest, num_heads - closest)
    slopes = np.concatenate([slopes, extra ** np.arange(1, 1 + 2 * rest, 2, dtype=np.float32)])
  return slopes.astype(np.float32)


class Attention(nnx.Module):
  def __init__(self, c: BloomConfig, dtype):
    self.query_key_value = layers.Linear(c.hidden_size, 3 * c.hidden_size, bias=True, dtype=dtype)
    self.dense = layers.Linear(c.hidden_size, c.hidden_size, bias=True, dtype=dtype)
    self.heads = c.num_heads

  def __call__(self, x, alibi, mask):
    b, t, d = x.shape
    hd = d // self.heads
    qkv = self.query_key_value(x).reshape(b, t, self.heads, 3, hd)
    q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
    out = layers.attention(q, k, v, mask, scaling=hd ** -0.5, bias=alibi)
    return self.dense(out.reshape(b, t, d))


class MLP(nnx.Module):
  def __init__(self, c: BloomConfig, dtype):
    self.dense_h_to_4h = layers.Linear(c.hidden_size, 4 * c.hidden_size, bias=True, dtype=dtype)
    self.dense_4h_to_h = layers.Linear(4 * c.hidden_size, c.hidden_size, bias=True, dtype=dtype)

  def __call__(self, x):
    return self.dense_4h_to_h(jax.nn.gelu(self.dense_h_to_4h(x), approximate=True))


class Block(nnx.Module):
  def __init__(self, c: BloomConfig, dtype):
    self.input_layernorm = layers.LayerNorm(c.hidden_size, eps=c.layer_norm_eps, dtype=dtype)
    self.self_attention = Attention(c, dtype)
    self.post_attention_layernorm = layers.LayerNorm(c.hidden_size, eps=c.layer_norm_eps, dtype=dtype)
    self.mlp = MLP(c, dtype)
    self.residual_after_norm = c.residual_after_norm

  def __call__(self, x, alibi, mask):
    h = self.input_layernorm(x)
    x = self.self_attention(h, alibi, mask) + (h if self.residual_after_norm else x)
    h = self.post_attention_layernorm(x)
    return self.mlp(h) + (h if self.residual_after_norm else x)


class Bloom(layers.Decoder):
  """Parameter paths are the checkpoint's (without the `transformer.` prefix)."""

  def __init__(self, config: BloomConfig, *, dtype=jnp.float32):
    c = config
    self.config = c
    self.word_embeddings = layers.Embedding(c.vocab_size, c.hidden_size, dtype=dtype)
    self.word_embeddings_layernorm = layers.LayerNorm(c.hidden_size, eps=c.layer_norm_eps, dtype=dtype)
    self.h = nnx.List([Block(c, dtype) for _ in range(c.num_layers)])
    self.ln_f = layers.LayerNorm(c.hidden_size, eps=c.layer_norm_eps, dtype=dtype)
    if c.head == "separate":
      self.lm_head = layers.Linear(c.hidden_size, c.vocab_size, bias=False, dtype=dtype)

  def input_embedding(self):
    return self.word_embeddings.weight[...]

  def __call__(self, input_ids, attention_mask=None):
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    x = self.word_embeddings_layernorm(self.word_embeddings(input_ids))
    position = (jnp.cumsum(attention_mask, axis=-1) - 1) * attention_mask       # [B, S]
    alibi = jnp.asarray(alibi_slopes(self.config.num_heads))[None, :, None, None] * \
        position[:, None, None, :].astype(jnp.float32)                           # [B, H, 1, S]
    alibi = alibi.astype(x.dtype)
    mask = layers.causal_mask(attention_mask)
    states = [x]
    for block in self.h:
      x = block(x, alibi, mask)
      states.append(x)
    states[-1] = self.ln_f(x)
    return states
