"""CLIP's text tower (the vision tower is `vit.Vit` with the clip naming).

Token + learned position embeddings, then pre-norm blocks (quick-GELU) under a causal mask
that also hides padding. `ClipText(...)(input_ids, attention_mask)` returns transformers'
hidden states: the embedding output and every layer's output, the last one **before** the
final layer norm (transformers does not tie it for CLIP text). Positions are 0..T-1.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from plato_jax.models import layers, vit
from plato_jax.models.hf import CheckpointError, config_value, sub_config

MODEL_TYPES = ("clip_text_model", "clip")


@dataclasses.dataclass(frozen=True)
class ClipTextConfig:
  vocab_size: int
  max_positions: int
  block: vit.VitConfig      # the transformer blocks, shared with the vision tower

  @classmethod
  def from_hf(cls, config: dict) -> "ClipTextConfig":
    config = sub_config(config, "clip", "text_config", "clip_text_model")
    if config.get("model_type") != "clip_text_model":
      raise CheckpointError(f"config.json model_type {config.get('model_type')!r} is not a "
                            f"CLIP text tower")
    need = lambda key: config_value(config, key, required=True)  # noqa: E731
    block = vit.VitConfig(
        family="clip", hidden_size=int(need("hidden_size")),
        num_layers=int(need("num_hidden_layers")), num_heads=int(need("num_attention_heads")),
        intermediate_size=int(need("intermediate_size")), image_size=1, patch_size=1,
        num_channels=0, layer_norm_eps=float(config_value(config, "layer_norm_eps", 1e-5)),
        hidden_act=str(config_value(config, "hidden_act", "quick_gelu")))
    return cls(vocab_size=int(need("vocab_size")),
               max_positions=int(need("max_position_embeddings")), block=block)


class TextEmbeddings(nnx.Module):
  def __init__(self, c: ClipTextConfig, dtype):
    self.token_embedding = layers.Embedding(c.vocab_size, c.block.hidden_size, dtype=dtype)
    self.position_embedding = layers.Embedding(c.max_positions, c.block.hidden_size, dtype=dtype)


class ClipText(nnx.Module):
  def __init__(self, config: ClipTextConfig, *, dtype=jnp.float32):
    self.config = config
    self.embeddings = TextEmbeddings(config, dtype)
    self.encoder = vit.Encoder(config.block, dtype)

  def checkpoint_key(self, name: str) -> str:
    return vit.rename(name, "clip")

  def __call__(self, input_ids, attention_mask=None):
    t = input_ids.shape[1]
    if t > self.config.max_positions:
      raise ValueError(f"sequence length {t} exceeds the CLIP text tower's "
                       f"{self.config.max_positions} positions")
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    x = self.embeddings.token_embedding(input_ids)
    x = x + self.embeddings.position_embedding.weight[:t][None].astype(x.dtype)
    mask = layers.causal_mask(attention_mask)
    states = [x]
    for block in self.encoder.layer:
      x = block(x, mask)
      states.append(x)
    return states
