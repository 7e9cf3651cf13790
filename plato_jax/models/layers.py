"""Building blocks shared by the encoders, with Hugging Face parameter names and layouts.

Parameters are named and shaped as in the PyTorch checkpoints (`weight` [out, in] for
linear layers, `weight`/`bias` for norms), so a checkpoint tensor `a.b.0.c.weight` is the
module path a → b → 0 → c → weight, and loading is a rename-free walk (`hf.load_into`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from plato_jax.models.errors import CheckpointError


def _param(shape, dtype, value=0.0):
  return nnx.Param(jnp.full(shape, value, dtype))


class Linear(nnx.Module):
  def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype):
    self.weight = _param((out_features, in_features), dtype)
    self.bias = _param((out_features,), dtype) if bias else None

  def __call__(self, x):
    y = jnp.einsum("...i,oi->...o", x, self.weight[...].astype(x.dtype))
    return y if self.bias is None else y + self.bias[...].astype(x.dtype)


class Embedding(nnx.Module):
  def __init__(self, num: int, dim: int, *, dtype):
    self.weight = _param((num, dim), dtype)

  def __call__(self, ids):
    return jnp.take(self.weight[...], ids, axis=0)


class RMSNorm(nnx.Module):
  """x / rms(x) in f32, then the weight, as each family does it: "llama" casts back first
  and multiplies in the input dtype; "f32" (OLMo 2) multiplies in f32 and casts after;
  "plus_one" (Gemma) multiplies by 1 + weight in f32 (the weight is stored around 0)."""

  def __init__(self, dim: int, *, eps: float, dtype, style: str = "llama"):
    self.weight = _param((dim,), dtype, 0.0 if style == "plus_one" else 1.0)
    self.eps, self.style = eps, style

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    w = self.weight[...]
    if self.style == "plus_one":
      return (normed * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
    if self.style == "f32":
      return (w.astype(jnp.float32) * normed).astype(x.dtype)
    return w.astype(x.dtype) * normed.astype(x.dtype)


class LayerNorm(nnx.Module):
  def __init__(self, dim: int, *, eps: float, dtype, affine: bool = True):
    self.weight = _param((dim,), dtype, 1.0) if affine else None
    self.bias = _param((dim,), dtype) if affine else None
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    if self.weight is not None:
      y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


ACTIVATIONS = {
    "silu": jax.nn.silu, "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
}


def activation(name: str, where: str = "config.json hidden_act"):
  if name not in ACTIVATIONS:
    raise CheckpointError(f"{where}: unsupported activation {name!r} "
                          f"(supported: {sorted(ACTIVATIONS)})")
  return ACTIVATIONS[name]


def freeze(value):
  """A JSON-like value as nested tuples (hashable: configs are static under jit)."""
  if isinstance(value, dict):
    return ("__dict__", tuple(sorted((k, freeze(v)) for k, v in value.items())))
  if isinstance(value, list):
    return ("__list__", tuple(freeze(v) for v in value))
  return value


def thaw(value):
  if isinstance(value, tuple) and value and value[0] == "__dict__":
    return {k: thaw(v) for k, v in value[1]}
  if isinstance(value, tuple) and value and value[0] == "__list__":
    return [thaw(v) for v in value[1]]
  return value


# ---- rotary position embeddings -----------------------------------------------------------

def rope_parameters(config: dict) -> dict:
  """The rope settings of a config, old (`rope_scaling` + `rope_theta`) or new
  (`rope_parameters`) style, as one dict with `rope_type` and `rope_theta`."""
  params = dict(config.get("rope_parameters") or {})
  if not params:
    params = dict(config.get("rope_scaling") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
  params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
  return params


def rope_configs_by_layer_type(config: dict, layer_types, sliding_theta_key: str | None = None,
                               scaled_types=None) -> dict:
  """One rope config per layer type. transformers 5 may store `rope_parameters` keyed by
  layer type ("full_attention", "sliding_attention"); older configs have one rope for all,
  except that `sliding_theta_key` (Gemma 3: rope_local_base_freq) gives sliding layers
  their own base, and that an old-style `rope_scaling` applies only to the layer types in
  `scaled_types` when given (OLMo 3: its full-attention layers)."""
  base = {k: config[k] for k in ("max_position_embeddings", "partial_rotary_factor")
          if k in config}
  params = config.get("rope_parameters") or {}
  out = {}
  for kind in set(layer_types):
    if kind in params:
      out[kind] = {**base, "rope_parameters": params[kind]}
    elif kind == "sliding_attention" and sliding_theta_key and sliding_theta_key in config:
      out[kind] = {**base, "rope_theta": config[sliding_theta_key]}
    else:
      keys = ("rope_parameters", "rope_theta") if scaled_types is not None and \
          kind not in scaled_types else ("rope_parameters", "rope_scaling", "rope_theta")
      out[kind] = {**base, **{k: config[k] for k in keys if k in config}}
  return out


def rope_frequencies(config: dict, head_dim: int, seq_len: int) -> tuple[np.ndarray, float]:
  """Inverse frequencies [rotary_dim/2] and the cos/sin scale, as transformers computes
  them for rope types default, linear, dynamic, llama3 and yarn (float32)."""
  p = rope_parameters(config)
  kind, base = p["rope_type"], float(p["rope_theta"])
  dim = int(head_dim * p.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))
  max_pos = config.get("max_position_embeddings", 2048)

  def default(base):
    return 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))

  def need(key):
    if p.get(key) is None:
      raise CheckpointError(f"config.json rope parameters: {kind!r} needs {key!r}")
    return p[key]

  if kind == "default":
    return default(base).astype(np.float32), 1.0
  if kind == "linear":
    return (default(base) / np.float32(need("factor"))).astype(np.float32), 1.0
  if kind == "dynamic":
    factor = float(need("factor"))
    length = max(seq_len, max_pos)
    base = base * ((factor * length / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return default(base).astype(np.float32), 1.0
  if kind == "llama3":
    inv = default(base)
    factor, low, high = (float(need(k)) for k in ("factor", "low_freq_factor",
                                                    "high_freq_factor"))
    old = float(need("original_max_position_embeddings"))
    wavelen = 2 * np.pi / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
  if kind == "yarn":
    factor = p.get("factor")
    original = float(need("original_max_position_embeddings"))
    if factor is None:
      factor = max_pos / original
    factor = float(factor)

    def mscale(scale, m=1.0):
      return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = p.get("attention_factor")
    if attention is None:
      if p.get("mscale") and p.get("mscale_all_dim"):
        attention = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
      else:
        attention = mscale(factor)
    fast, slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction(rotations):
      return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = correction(fast), correction(slow)
    if p.get("truncate", True):
      lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
      hi += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - lo) / (hi - lo), 0, 1)
    extrapolation = 1 - ramp
    pos = base ** (np.arange(0, dim, 2).astype(np.float32) / dim)
    inv = (1.0 / (factor * pos)) * (1 - extrapolation) + (1.0 / pos) * extrapolation
    return inv.astype(np.float32), float(attention)
  raise CheckpointError(f"config.json rope parameters: unsupported rope_type {kind!r} "
                        f"(supported: default, linear, dynamic, llama3, yarn)")


def rope_cos_sin(inv_freq: np.ndarray, scale: float, positions, dtype):
  """cos, sin [..., T, rotary_dim] for integer positions [..., T] (computed in f32)."""
  freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return (jnp.cos(emb) * scale).astype(dtype), (jnp.sin(emb) * scale).astype(dtype)


def apply_rope(x, cos, sin):
  """x [B, T, H, hd]; cos/sin [B or 1, T, rotary_dim]; rotates the first rotary_dim dims
  with the rotate-half convention."""
  rot = cos.shape[-1]
  x_rot, x_pass = x[..., :rot], x[..., rot:]
  half = rot // 2
  rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
  out = x_rot * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return jnp.concatenate([out, x_pass], axis=-1) if x_pass.shape[-1] else out


# ---- decoders -------------------------------------------------------------------------------

class Decoder(nnx.Module):
  """What the decoder families share: the output embedding and the per-layer-type rope and
  masks. Subclasses have `config` (with `head`: "tied" | "separate" | "none", and for
  `rope_and_masks` also rope, head_dim, layer_types, sliding_window) and `input_embedding`."""

  def input_embedding(self):
    raise NotImplementedError

  def checkpoint_key(self, name: str) -> str:
    return "/" + name if name.startswith("lm_head.") else name  # beside the body's prefix

  def logits(self, hidden):
    """Next-token logits [..., vocab] (f32) from the last hidden state."""
    head = self.config.head
    if head == "none":
      raise ValueError("this checkpoint has no output embedding (lm_head): logits and "
                       "losses need a *ForCausalLM checkpoint")
    w = self.lm_head.weight[...] if head == "separate" else self.input_embedding()
    out = jnp.einsum("...d,vd->...v", hidden, w.astype(hidden.dtype),
                     preferred_element_type=jnp.float32)
    cap = getattr(self.config, "final_softcap", None)
    return out if cap is None else jnp.tanh(out / cap) * cap

  def rope_and_masks(self, attention_mask, dtype):
    """{layer type: (cos, sin)} and {layer type: mask} for positions 0..T-1."""
    c = self.config
    t = attention_mask.shape[1]
    rope = {}
    for kind, frozen in c.rope:
      inv_freq, scale = rope_frequencies(thaw(frozen), c.head_dim, t)
      rope[kind] = rope_cos_sin(inv_freq, scale, jnp.arange(t)[None], dtype)
    masks = {kind: causal_mask(attention_mask, c.sliding_window
                               if kind == "sliding_attention" else None)
             for kind in set(c.layer_types)}
    return rope, masks


# ---- attention ------------------------------------------------------------------------------

def attention(q, k, v, mask, *, scaling: float, bias=None, softcap: float | None = None,
              sinks=None):
  """Softmax attention, eager-style: q [B, T, H, hd], k/v [B, S, KV, hd] (KV divides H);
  mask [B, 1 or H, T, S] bool (True = attend; None: everything); bias added to the logits
  (ALiBi); sinks [H] (GPT-OSS): one extra logit per head that takes part in the softmax
  and attends to nothing.
  Softmax in f32, probabilities cast back to the input dtype, like transformers' eager path.
  """
  b, t, h, hd = q.shape
  groups = h // k.shape[2]
  if sinks is None and _fused_attention_applies(q, mask, bias, softcap):
    try:  # cuDNN's flash attention: the [T, S] probabilities never reach device memory
      return jax.nn.dot_product_attention(q, k, v, scale=scaling, implementation="cudnn")
    except (ValueError, NotImplementedError, RuntimeError):
      pass  # a shape cuDNN does not take: the plain path below
  if groups > 1:
    k = jnp.repeat(k, groups, axis=2)
    v = jnp.repeat(v, groups, axis=2)
  # Heads-major operands: XLA:CPU ran the [B, T, H, D]-layout contractions ~2x slower.
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
  logits = jnp.einsum("bhtd,bhsd->bhts", q, k) * jnp.asarray(scaling, q.dtype)
  if softcap is not None:
    logits = jnp.tanh(logits / softcap) * softcap
  if bias is not None:
    logits = logits + bias.astype(logits.dtype)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  if sinks is not None:
    sink = jnp.broadcast_to(sinks.astype(logits.dtype)[None, :, None, None],
                            (*logits.shape[:3], 1))
    probs = jax.nn.softmax(jnp.concatenate([logits, sink], axis=-1).astype(jnp.float32),
                           axis=-1)[..., :-1].astype(q.dtype)
  else:
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)
  return jnp.einsum("bhts,bhsd->bhtd", probs, v).transpose(0, 2, 1, 3)


def _fused_attention_applies(q, mask, bias, softcap) -> bool:
  """cuDNN attention on a GPU, for half-precision unmasked attention without logit
  transforms (the vision towers): it keeps the probabilities in f32 where the eager path
  rounds them to the input dtype, a difference well inside bf16's own rounding."""
  return (mask is None and bias is None and softcap is None
          and q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] % 8 == 0
          and q.shape[-1] <= 128 and jax.default_backend() == "gpu")


def causal_mask(attention_mask, sliding_window: int | None = None):
  """[B, 1, T, T] bool from a [B, T] padding mask (1 = token): causal, keys must be tokens,
  and with a sliding window only the last `sliding_window` positions (as transformers)."""
  t = attention_mask.shape[1]
  i = jnp.arange(t)[:, None]
  j = jnp.arange(t)[None, :]
  allowed = j <= i
  if sliding_window is not None:
    allowed = allowed & (i - j < sliding_window)
  return allowed[None, None] & attention_mask[:, None, None, :].astype(bool)
