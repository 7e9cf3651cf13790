"""The LLaMA family of decoders: LLaMA 1/2/3/3.1 (rope scaling), OpenLLaMA, Mistral,
DeepSeek-R1-Distill-Llama, Qwen2 (q/k/v bias), Qwen3 (per-head q/k RMSNorm), OLMo
(1: parameter-free layer norms, q/k/v clipping; 2 and 3: norms after each sublayer, q/k
RMSNorm over the whole projection; 3: sliding layers), IBM Granite (embedding, residual
and attention multipliers; its logits scaling touches no hidden state) and the sparse
mixture-of-experts decoders (`moe.py`): Mixtral (top-2, renormalised), OLMoE (OLMo 2's q/k
norms before each sublayer, top-8 of 64) and GPT-OSS (attention biases and sinks, alternating
sliding/full layers, yarn rope, clamped SwiGLU experts stored as MXFP4), and Ministral 3
(Llama 4's position-dependent query scale; the language model of the published
Mistral3ForConditionalGeneration checkpoints); GQA throughout.

`LlamaConfig.from_hf` decodes a transformers config.json (model_type in MODEL_TYPES);
`Llama(...)(input_ids, attention_mask)` returns every hidden
state as transformers' `output_hidden_states` does: the embedding output, then each
layer's output, the last one after the final norm ([L+1] arrays of [B, T, D]). Positions are 0..T-1 whatever the
padding, as in transformers without explicit position_ids (rotary attention depends only on
position differences, so left padding changes no token's features beyond rounding).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from plato_jax.models import layers, moe
from plato_jax.models.hf import CheckpointError, config_value, mxfp4, stacked, sub_config

MODEL_TYPES = ("llama", "mistral", "ministral3", "qwen2", "qwen3", "olmo", "olmo2", "olmo3",
               "granite", "mixtral", "olmoe", "gpt_oss")
# The MoE block's checkpoint name and each stacked expert tensor's per-expert name.
_EXPERT_NAMES = {"mixtral": ("block_sparse_moe", {"gate_proj": "w1", "up_proj": "w3",
                                                  "down_proj": "w2"}),
                 "olmoe": ("mlp", {"gate_proj": "gate_proj", "up_proj": "up_proj",
                                   "down_proj": "down_proj"}),
                 "gpt_oss": ("mlp", {})}


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
  qk_norm: str | None       # "head" (Qwen3) or "full" (OLMo 2/3): RMSNorm of q and k, before rope
  norm: str                 # "rms", "rms_f32" (OLMo 2/3) or "layer" (OLMo: no parameters)
  post_norms: bool          # OLMo 2/3: norms on the sublayer outputs, none on their inputs
  clip_qkv: float | None    # OLMo: q, k, v clamped to ±clip_qkv
  layer_types: tuple        # "full_attention" / "sliding_attention" per layer
  sliding_window: int | None
  rope: tuple               # (layer type, frozen rope config) pairs
  head: str = "tied"         # output embedding: "tied" (input embedding), "separate", "none"
  embedding_multiplier: float = 1.0  # Granite: the embeddings scaled,
  residual_multiplier: float = 1.0   # each sublayer's output scaled before its residual add,
  attention_multiplier: float | None = None  # and this the attention scale (default 1/√d)
  sinks: bool = False                # GPT-OSS: a learned sink logit per attention head
  moe: moe.MoeConfig | None = None   # sparse MoE feed-forward blocks instead of the MLP
  experts_stored: str = "stacked"    # "per_expert" tensors, "stacked" [E, ...], or "mxfp4"
  model_type: str = "llama"
  # Ministral 3 (Llama 4's attention scaling): queries × 1 + beta · log(1 + ⌊pos / period⌋).
  query_scale_beta: float | None = None
  query_scale_period: int = 1

  @classmethod
  def from_hf(cls, config: dict) -> "LlamaConfig":
    config = sub_config(config, "mistral3", "text_config")  # the language model of Mistral 3
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
      elif kind == "olmo3":
        types = ["sliding_attention" if (i + 1) % 4 else "full_attention" for i in range(layers_n)]
      else:
        types = ["sliding_attention" if window is not None else "full_attention"] * layers_n
    if len(types) != layers_n:
      raise CheckpointError(f"config.json layer_types has {len(types)} entries for "
                            f"{layers_n} layers")
    if window is None and "sliding_attention" in types:
      raise CheckpointError("config.json: sliding_attention layers but no sliding_window")
    rope = layers.rope_configs_by_layer_type(
        config, types, scaled_types=("full_attention",) if kind == "olmo3" else None)
    rope_params = layers.rope_parameters(config)
    beta = rope_params.get("llama_4_scaling_beta")
    olmo2 = kind in ("olmo2", "olmo3")
    quant = (get("quantization_config") or {}).get("quant_method")  # checked by the loader
    experts = None
    if kind in ("mixtral", "olmoe", "gpt_oss"):
      experts = moe.MoeConfig(
          num_experts=int(need("num_experts" if kind == "olmoe" else "num_local_experts")),
          top_k=int(need("num_experts_per_tok")),
          intermediate_size=int(need("intermediate_size")),
          routing="topk_softmax" if kind == "gpt_oss" else "softmax_topk",
          renormalize=bool(get("norm_topk_prob", False)) if kind == "olmoe" else True,
          experts="clamped_swiglu" if kind == "gpt_oss" else "swiglu",
          hidden_act=str(get("hidden_act", "silu")), router_bias=kind == "gpt_oss",
          swiglu_alpha=float(get("swiglu_alpha", 1.702)),
          swiglu_limit=float(get("swiglu_limit", 7.0)))
      if not 1 <= experts.top_k <= experts.num_experts:
        raise CheckpointError(f"config.json: num_experts_per_tok={experts.top_k} must be in "
                              f"1..{experts.num_experts} (the number of experts)")
    return cls(vocab_size=int(need("vocab_size")), hidden_size=hidden,
               intermediate_size=int(need("intermediate_size")), num_layers=layers_n,
               num_heads=heads, num_kv_heads=kv_heads,
               head_dim=int(get("head_dim") or hidden // heads),
               rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
               hidden_act=str(get("hidden_act", "silu")), qkv_bias=qkv_bias, o_bias=o_bias,
               mlp_bias=bool(get("mlp_bias", False)),
               qk_norm="head" if kind == "qwen3" else "full" if olmo2 or kind == "olmoe"
               else None,
               norm="layer" if kind == "olmo" else "rms_f32" if olmo2 or kind == "gpt_oss"
               else "rms",
               post_norms=olmo2,
               clip_qkv=get("clip_qkv") if kind in ("olmo", "olmoe") else None,
               layer_types=tuple(types), sliding_window=window,
               rope=tuple(sorted((k, layers.freeze(v)) for k, v in rope.items())),
               head="tied" if get("tie_word_embeddings", False) else "separate",
               **(dict(embedding_multiplier=float(need("embedding_multiplier")),
                       residual_multiplier=float(need("residual_multiplier")),
                       attention_multiplier=float(need("attention_multiplier")))
                  if kind == "granite" else {}),
               sinks=kind == "gpt_oss", moe=experts, model_type=kind,
               query_scale_beta=None if beta is None else float(beta),
               query_scale_period=int(rope_params.get("original_max_position_embeddings")
                                      or 1),
               experts_stored="mxfp4" if quant == "mxfp4" else "stacked" if kind == "gpt_oss"
               else "per_expert")

  def norm_layer(self, dim: int, dtype):
    if self.norm == "layer":  # OLMo: F.layer_norm without weight or bias, eps 1e-5
      return layers.LayerNorm(dim, eps=1e-5, dtype=dtype, affine=False)
    return layers.RMSNorm(dim, eps=self.rms_norm_eps, dtype=dtype,
                          style="f32" if self.norm == "rms_f32" else "llama")


class Attention(nnx.Module):
  def __init__(self, c: LlamaConfig, dtype):
    self.q_proj = layers.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias, dtype=dtype)
    self.k_proj = layers.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias, dtype=dtype)
    self.v_proj = layers.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias, dtype=dtype)
    self.o_proj = layers.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.o_bias, dtype=dtype)
    if c.qk_norm == "head":
      self.q_norm = c.norm_layer(c.head_dim, dtype)
      self.k_norm = c.norm_layer(c.head_dim, dtype)
    elif c.qk_norm == "full":
      self.q_norm = c.norm_layer(c.num_heads * c.head_dim, dtype)
      self.k_norm = c.norm_layer(c.num_kv_heads * c.head_dim, dtype)
    if c.sinks:
      self.sinks = nnx.Param(jnp.zeros((c.num_heads,), dtype))
    self.c = c

  def __call__(self, x, cos, sin, mask):
    b, t, _ = x.shape
    c = self.c
    q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    if c.qk_norm == "full":
      q, k = self.q_norm(q), self.k_norm(k)
    if c.clip_qkv is not None:
      q, k, v = (jnp.clip(a, -c.clip_qkv, c.clip_qkv) for a in (q, k, v))
    q = q.reshape(b, t, c.num_heads, c.head_dim)
    k = k.reshape(b, t, c.num_kv_heads, c.head_dim)
    v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
    if c.qk_norm == "head":
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
    if c.query_scale_beta is not None:
      pos = jnp.arange(t, dtype=jnp.float32)
      scale = 1 + c.query_scale_beta * jnp.log(1 + jnp.floor(pos / c.query_scale_period))
      q = q * scale[None, :, None, None].astype(q.dtype)
    scaling = c.head_dim ** -0.5 if c.attention_multiplier is None else c.attention_multiplier
    out = layers.attention(q, k, v, mask, scaling=scaling,
                           sinks=self.sinks[...] if c.sinks else None)
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
  def __init__(self, c: LlamaConfig, dtype):
    if not c.post_norms:
      self.input_layernorm = c.norm_layer(c.hidden_size, dtype)
    self.self_attn = Attention(c, dtype)
    # Before the MLP (LLaMA), or on the attention output (OLMo 2/3).
    self.post_attention_layernorm = c.norm_layer(c.hidden_size, dtype)
    if c.post_norms:
      self.post_feedforward_layernorm = c.norm_layer(c.hidden_size, dtype)
    if c.moe is None:
      self.mlp = MLP(c, dtype)
    else:
      name = _EXPERT_NAMES[c.model_type][0]
      setattr(self, name, moe.SparseMoe(c.moe, c.hidden_size, dtype,
                                        router_name="router" if c.model_type == "gpt_oss"
                                        else "gate"))
      self.mlp_name = name
    self.post_norms, self.scale = c.post_norms, c.residual_multiplier

  def feed_forward(self, x):
    return getattr(self, getattr(self, "mlp_name", "mlp"))(x)

  def __call__(self, x, cos, sin, mask):
    if self.post_norms:
      x = x + self.post_attention_layernorm(self.self_attn(x, cos, sin, mask))
      return x + self.post_feedforward_layernorm(self.feed_forward(x))
    if self.scale != 1.0:  # Granite
      x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask) * self.scale
      return x + self.feed_forward(self.post_attention_layernorm(x)) * self.scale
    x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
    return x + self.feed_forward(self.post_attention_layernorm(x))


class Llama(layers.Decoder):
  """Parameter paths are the checkpoint's (without the `model.` prefix of *ForCausalLM)."""

  def __init__(self, config: LlamaConfig, *, dtype=jnp.float32):
    c = config
    self.config = c
    self.embed_tokens = layers.Embedding(c.vocab_size, c.hidden_size, dtype=dtype)
    self.layers = nnx.List([DecoderLayer(c, dtype) for _ in range(c.num_layers)])
    self.norm = c.norm_layer(c.hidden_size, dtype)
    if c.head == "separate":
      self.lm_head = layers.Linear(c.hidden_size, c.vocab_size, bias=False, dtype=dtype)

  def input_embedding(self):
    return self.embed_tokens.weight[...]

  def checkpoint_key(self, name: str):
    """Expert tensors as the checkpoint stores them: one per expert (Mixtral, OLMoE), or
    stacked, bf16 or MXFP4 (GPT-OSS)."""
    c = self.config
    parts = name.split(".")
    if c.moe is None or len(parts) < 5 or parts[3] != "experts":
      return super().checkpoint_key(name)
    if c.experts_stored == "per_expert":
      base, tensor = ".".join(parts[:4]), _EXPERT_NAMES[c.model_type][1][parts[4]]
      return stacked([f"{base}.{e}.{tensor}.weight" for e in range(c.moe.num_experts)])
    if c.experts_stored == "mxfp4" and parts[4] in ("gate_up_proj", "down_proj"):
      return mxfp4(name)
    return name

  def __call__(self, input_ids, attention_mask=None):
    """input_ids [B, T] int; attention_mask [B, T] (1 = token, 0 = padding).
    Returns the L+1 hidden states, each [B, T, D]."""
    c = self.config
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    x = self.embed_tokens(input_ids)
    if c.embedding_multiplier != 1.0:  # Granite
      x = x * c.embedding_multiplier
    rope, masks = self.rope_and_masks(attention_mask, x.dtype)
    states = [x]
    for layer, kind in zip(self.layers, c.layer_types):
      x = layer(x, *rope[kind], masks[kind])
      states.append(x)
    states[-1] = self.norm(x)
    return states
