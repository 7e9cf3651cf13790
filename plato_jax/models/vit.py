"""Vision transformers: ViT (HF and timm augreg naming), DINOv2 (layer scale, SwiGLU,
register tokens), the MAE encoder (no masking), CLIP's vision tower, Pixio (eight class
tokens) and VideoMAE (tubelets of frames, fixed sinusoid positions, no class token; input
[B, T, C, H, W]), v1 as transformers has it and v2 as OpenGVLab publishes it (config.json
`model_config`, the original names under `model.`, layer scale as `gamma_1/2`).

One module serves all of them; a `VitConfig` decoded from config.json says which parts a
family has, and `checkpoint_key` renames our parameter paths (the HF ViT names) to the
family's checkpoint names. `Vit(...)(pixel_values)` returns the hidden states transformers'
`output_hidden_states` gives: the embedding output (after CLIP's pre-norm), then every
block's output, **before** the final norm ([L+1] arrays of [B, tokens, D]; the papers'
features are the CLS token, index 0, of entries 1..L). Position embeddings are
interpolated bicubically (as torch, a = -0.75) for any input size.
"""
from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from plato_jax.models import layers
from plato_jax.models.hf import (CheckpointError, config_value, count_indexed, required_shape,
                                 sliced, sub_config)

MODEL_TYPES = ("vit", "vit_mae", "dinov2", "dinov2_with_registers", "clip_vision_model", "clip",
               "pixio", "videomae", "videomaev2", "timm")

# Our paths (HF ViT names) → each family's checkpoint names.
_RENAMES = {
    "dinov2": [(r"\.layernorm_before\.", ".norm1."), (r"\.layernorm_after\.", ".norm2."),
               (r"(layer\.\d+)\.intermediate\.dense\.", r"\1.mlp.fc1."),
               (r"(layer\.\d+)\.output\.dense\.", r"\1.mlp.fc2.")],
    "pixio": [(r"\.layernorm_before\.", ".norm1."), (r"\.layernorm_after\.", ".norm2.")],
    "videomae": [(r"\.attention\.query\.bias$", ".attention.q_bias"),
                 (r"\.attention\.value\.bias$", ".attention.v_bias")],
    "clip": [(r"^embeddings\.cls_token$", "embeddings.class_embedding"),
             (r"^embeddings\.position_embeddings$", "embeddings.position_embedding.weight"),
             (r"^embeddings\.patch_embeddings\.projection\.", "embeddings.patch_embedding."),
             (r"^pre_layernorm\.", "pre_layrnorm."), (r"^encoder\.layer\.", "encoder.layers."),
             (r"\.layernorm_before\.", ".layer_norm1."), (r"\.layernorm_after\.", ".layer_norm2."),
             (r"\.attention\.attention\.query\.", ".self_attn.q_proj."),
             (r"\.attention\.attention\.key\.", ".self_attn.k_proj."),
             (r"\.attention\.attention\.value\.", ".self_attn.v_proj."),
             (r"\.attention\.output\.dense\.", ".self_attn.out_proj."),
             (r"(layers\.\d+)\.intermediate\.dense\.", r"\1.mlp.fc1."),
             (r"(layers\.\d+)\.output\.dense\.", r"\1.mlp.fc2.")],
}


@dataclasses.dataclass(frozen=True)
class VitConfig:
  family: str               # checkpoint naming: "vit" (also MAE), "dinov2", "clip", "timm"
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  image_size: int
  patch_size: int
  num_channels: int
  layer_norm_eps: float
  hidden_act: str
  qkv_bias: bool = True
  key_bias: bool = True         # VideoMAE: biases on queries and values only
  tubelet_size: int = 0         # VideoMAE: frames per patch (0: images)
  num_frames: int = 1           # VideoMAE: frames per clip (sampled by extraction)
  layer_scale: bool = False     # DINOv2
  swiglu: bool = False          # DINOv2 giant
  num_registers: int = 0        # DINOv2 with registers
  pre_norm: bool = False        # CLIP: a layer norm before the blocks
  patch_bias: bool = True       # CLIP: none
  flat_embeddings: bool = False  # HF CLIP: class embedding [D], positions [N, D]
  antialias: bool = False       # position resize with torch's antialias=True
  class_position: bool = True   # a position embedding for the class token (timm's
  #                               DINOv2-with-registers has none: patches only)
  num_class_tokens: int = 1     # Pixio: 8 (each with a position)

  @classmethod
  def from_hf(cls, config: dict) -> "VitConfig":
    config = sub_config(config, "clip", "vision_config", "clip_vision_model")
    kind = config.get("model_type")
    if is_videomae_v2(kind):
      return cls.from_videomae_v2(config)
    if kind not in MODEL_TYPES:
      raise CheckpointError(f"config.json model_type {kind!r} is not a vision transformer")
    need = lambda key: config_value(config, key, required=True)  # noqa: E731
    get = lambda key, default=None: config_value(config, key, default)  # noqa: E731
    hidden = int(need("hidden_size"))
    family = {"vit": "vit", "vit_mae": "vit", "dinov2": "dinov2",
              "dinov2_with_registers": "dinov2", "clip_vision_model": "clip",
              "pixio": "pixio", "videomae": "videomae"}[kind]
    if family in ("dinov2", "pixio"):
      inter = int(hidden * float(get("mlp_ratio", 4)))
    else:
      inter = int(need("intermediate_size"))
    swiglu = bool(get("use_swiglu_ffn", False))
    if swiglu:
      inter = (int(inter * 2 / 3) + 7) // 8 * 8
    return cls(family=family, hidden_size=hidden, num_layers=int(need("num_hidden_layers")),
               num_heads=int(need("num_attention_heads")), intermediate_size=inter,
               image_size=int(need("image_size")), patch_size=int(need("patch_size")),
               num_channels=int(get("num_channels", 3)),
               layer_norm_eps=float(get("layer_norm_eps", 1e-12)),
               hidden_act=str(get("hidden_act", "gelu")),
               qkv_bias=bool(get("qv_bias" if family == "videomae" else "qkv_bias", True)),
               layer_scale=family == "dinov2",
               swiglu=swiglu, num_registers=int(get("num_register_tokens", 0)),
               pre_norm=family == "clip", patch_bias=family != "clip",
               flat_embeddings=family == "clip",
               antialias=kind == "dinov2_with_registers",
               num_class_tokens=int(get("n_cls_tokens", 8)) if family == "pixio" else 1,
               **(dict(key_bias=False, tubelet_size=int(get("tubelet_size", 2)),
                       num_frames=int(get("num_frames", 16)))
                  if family == "videomae" else {}))

  @classmethod
  def from_videomae_v2(cls, config: dict) -> "VitConfig":
    """OpenGVLab's VideoMAE-v2 (`VideoMAEv2_Base`, ...): its VisionTransformer's arguments
    in config.json's `model_config`."""
    where = "config.json model_config"
    args = config.get("model_config")
    if not isinstance(args, dict):
      raise CheckpointError(f"config.json: a {config.get('model_type')} checkpoint needs a "
                            f"model_config object")
    need = lambda key: config_value(args, key, required=True, where=where)  # noqa: E731
    for key, wanted in (("cos_attn", False), ("use_learnable_pos_emb", False),
                        ("qk_scale", None), ("attn_head_dim", None)):
      if args.get(key, wanted) not in (wanted, 0):
        raise CheckpointError(f"{where}: {key}={args[key]!r} is not supported (only "
                              f"{wanted!r})")
    norm = args.get("norm_layer", "nn.LayerNorm")
    if norm not in (None, "nn.LayerNorm", "LayerNorm"):
      raise CheckpointError(f"{where}: norm_layer={norm!r} is not supported (nn.LayerNorm)")
    hidden = int(need("embed_dim"))
    return cls(family="videomaev2", hidden_size=hidden, num_layers=int(need("depth")),
               num_heads=int(need("num_heads")),
               intermediate_size=int(hidden * float(args.get("mlp_ratio", 4.0))),
               image_size=int(args.get("img_size", 224)), patch_size=int(need("patch_size")),
               num_channels=int(args.get("in_chans", 3)),
               layer_norm_eps=float(args.get("layer_norm_eps", 1e-6)), hidden_act="gelu",
               qkv_bias=bool(args.get("qkv_bias", False)), key_bias=False,
               tubelet_size=int(args.get("tubelet_size", 2)),
               num_frames=int(args.get("num_frames", args.get("all_frames", 16))),
               layer_scale=float(args.get("init_values") or 0.0) > 0)

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size


_RENAMES["timm"] = [
    (r"^embeddings\.cls_token$", "cls_token"), (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.register_tokens$", "reg_token"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^pre_layernorm\.", "norm_pre."), (r"^encoder\.layer\.", "blocks."),
    (r"\.layernorm_before\.", ".norm1."), (r"\.layernorm_after\.", ".norm2."),
    (r"\.attention\.output\.dense\.", ".attn.proj."),
    (r"\.layer_scale(\d)\.lambda1$", r".ls\1.gamma"),
    (r"(blocks\.\d+)\.intermediate\.dense\.", r"\1.mlp.fc1."),
    (r"(blocks\.\d+)\.output\.dense\.", r"\1.mlp.fc2."),
    (r"\.mlp\.weights_in\.", ".mlp.fc1."), (r"\.mlp\.weights_out\.", ".mlp.fc2.")]
_TIMM_QKV = re.compile(r"^(blocks\.\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")
# VideoMAE-v2: timm's names, but separate query and value biases and gamma_1/2 layer scales.
_RENAMES["videomaev2"] = [
    (r"\.attention\.attention\.query\.bias$", ".attn.q_bias"),
    (r"\.attention\.attention\.value\.bias$", ".attn.v_bias"),
    (r"\.layer_scale(\d)\.lambda1$", r".gamma_\1")] + _RENAMES["timm"]


def is_videomae_v2(model_type) -> bool:
  """OpenGVLab's model types: VideoMAEv2_Base, VideoMAEv2_Large, ..."""
  return isinstance(model_type, str) and model_type.lower().startswith("videomaev2")


def rename(name: str, family: str, hidden_size: int = 0):
  """Our parameter path (HF ViT names) → the family's checkpoint name, or a slice of a
  checkpoint tensor (timm's fused qkv)."""
  for pattern, repl in _RENAMES.get(family, []):
    name = re.sub(pattern, repl, name)
  qkv = _TIMM_QKV.match(name) if family in ("timm", "videomaev2") else None
  if qkv:
    part = ("query", "key", "value").index(qkv.group(2))
    return sliced(f"{qkv.group(1)}.attn.qkv.{qkv.group(3)}",
                  (slice(part * hidden_size, (part + 1) * hidden_size),))
  return name


# timm model names → heads (the sizes themselves come from the tensors).
_TIMM_HEADS = {"tiny": 3, "small": 6, "base": 12, "large": 16, "huge": 16, "giant": 24,
               "gigantic": 16}


def timm_config(config: dict, shapes) -> VitConfig:
  """A VitConfig for a timm checkpoint (config.json with `architecture`, no model_type),
  sizes read from the tensors' shapes (`shapes(name)` → shape or None)."""
  arch = str(config.get("architecture", ""))
  args = config.get("model_args") or {}
  size = re.search(r"vit_(tiny|small|base|large|huge|giant|gigantic)_", arch)
  heads = args.get("num_heads") or (size and _TIMM_HEADS[size.group(1)])
  if not arch.startswith("vit_") or not heads:
    raise CheckpointError(f"config.json: timm architecture {arch!r} is not a supported ViT "
                          f"(vit_<tiny|small|base|large|huge|giant>_..., or model_args.num_heads)")

  def need(name):
    return required_shape(shapes, name, f"timm checkpoint ({arch})")

  hidden = need("cls_token")[-1]
  proj = need("patch_embed.proj.weight")
  depth = count_indexed(shapes, "blocks.{}.norm1.weight")
  fc1, fc2 = need("blocks.0.mlp.fc1.weight"), need("blocks.0.mlp.fc2.weight")
  swiglu = fc1[0] == 2 * fc2[1]  # packed gate and value (DINOv2 giant)
  regs = shapes("reg_token")
  positions = need("pos_embed")[1]  # grid² (no class position) or 1 + grid²
  class_position = round(positions ** 0.5) ** 2 != positions
  grid = int(round((positions - class_position) ** 0.5))
  clip = "clip" in arch
  return VitConfig(
      family="timm", hidden_size=hidden, num_layers=depth, num_heads=int(heads),
      intermediate_size=fc2[1], image_size=grid * proj[-1], patch_size=proj[-1],
      num_channels=proj[1], layer_norm_eps=1e-5 if clip else 1e-6,
      hidden_act="quick_gelu" if "quickgelu" in arch or "openai" in arch else "gelu",
      qkv_bias=shapes("blocks.0.attn.qkv.bias") is not None,
      layer_scale=shapes("blocks.0.ls1.gamma") is not None, swiglu=bool(swiglu),
      num_registers=regs[1] if regs else 0, pre_norm=shapes("norm_pre.weight") is not None,
      patch_bias=shapes("patch_embed.proj.bias") is not None, antialias=True,
      class_position=class_position)

def bicubic_matrix(in_size: int, out_size: int, antialias: bool = False) -> np.ndarray:
  """[out, in] weights of torch's bicubic resize (align_corners=False), so resizing an axis
  is one matrix product. Plain: a = -0.75, edge indices clamped. `antialias` (torch's
  antialias=True, PIL's filter): a = -0.5, the kernel widened by the scale when shrinking,
  truncated at the edges and renormalised."""
  scale = in_size / out_size
  m = np.zeros((out_size, in_size), np.float64)

  def cubic(x, a):
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))

  if antialias:
    support = 2 * max(scale, 1.0)
    inv = 1 / scale if scale >= 1 else 1.0
    for i in range(out_size):
      center = scale * (i + 0.5)
      lo = max(int(center - support + 0.5), 0)
      hi = min(int(center + support + 0.5), in_size)
      w = cubic((np.arange(lo, hi) - center + 0.5) * inv, -0.5)
      m[i, lo:hi] = w / w.sum()
    return m.astype(np.float32)
  real = scale * (np.arange(out_size) + 0.5) - 0.5
  base = np.floor(real).astype(np.int64)
  t = real - base
  for j in range(4):
    np.add.at(m, (np.arange(out_size), np.clip(base - 1 + j, 0, in_size - 1)),
              cubic(t + 1 - j, -0.75))
  return m.astype(np.float32)


class Embeddings(nnx.Module):
  def __init__(self, c: VitConfig, dtype):
    d = c.hidden_size
    self.cls_token = nnx.Param(jnp.zeros((d,) if c.flat_embeddings else
                                         (1, c.num_class_tokens, d), dtype))
    n = c.grid ** 2 + c.class_position * c.num_class_tokens
    self.position_embeddings = nnx.Param(
        jnp.zeros((n, d) if c.flat_embeddings else (1, n, d), dtype))
    self.patch_embeddings = PatchEmbed(c, dtype)
    if c.num_registers:
      self.register_tokens = nnx.Param(jnp.zeros((1, c.num_registers, d), dtype))
    self.c = c

  def positions(self, rows: int, cols: int):
    pos = self.position_embeddings[...].reshape(-1, self.c.hidden_size)
    g, first = self.c.grid, self.c.class_position * self.c.num_class_tokens
    if (rows, cols) == (g, g):
      return pos
    patch = pos[first:].reshape(g, g, -1).astype(jnp.float32)
    aa = self.c.antialias
    patch = jnp.einsum("hH,HWd,wW->hwd", bicubic_matrix(g, rows, aa), patch,
                       bicubic_matrix(g, cols, aa), precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([pos[:first], patch.reshape(rows * cols, -1).astype(pos.dtype)],
                           axis=0)

  def __call__(self, pixels):
    b = pixels.shape[0]
    patches, rows, cols = self.patch_embeddings(pixels)
    n_cls = self.c.num_class_tokens
    cls = jnp.broadcast_to(self.cls_token[...].reshape(1, n_cls, -1),
                           (b, n_cls, patches.shape[-1]))
    if self.c.class_position:
      x = jnp.concatenate([cls.astype(patches.dtype), patches], axis=1)
      x = x + self.positions(rows, cols)[None].astype(x.dtype)
    else:
      patches = patches + self.positions(rows, cols)[None].astype(patches.dtype)
      x = jnp.concatenate([cls.astype(patches.dtype), patches], axis=1)
    if self.c.num_registers:
      regs = jnp.broadcast_to(self.register_tokens[...], (b, *self.register_tokens.shape[1:]))
      x = jnp.concatenate([x[:, :n_cls], regs.astype(x.dtype), x[:, n_cls:]], axis=1)
    return x


def sinusoid_positions(n: int, d: int) -> np.ndarray:
  """VideoMAE's fixed positions [n, d]: sin / cos of pos / 10000^(2⌊j/2⌋/d), in f64."""
  angle = np.arange(n, dtype=np.float64)[:, None] / np.power(
      10000.0, 2 * (np.arange(d) // 2) / d)[None]
  angle[:, 0::2], angle[:, 1::2] = np.sin(angle[:, 0::2]), np.cos(angle[:, 1::2])
  return angle.astype(np.float32)


class VideoEmbeddings(nnx.Module):
  """Tubelets (t frames × p × p pixels) projected, plus fixed sinusoid positions."""

  def __init__(self, c: VitConfig, dtype):
    self.patch_embeddings = PatchEmbed(c, dtype)
    self.c = c

  def __call__(self, video):
    """video [B, T, C, H, W] → [B, T/t · H/p · W/p, D] (time-major, as a Conv3d flattens)."""
    b, t, ch, h, w = video.shape
    k = self.c.tubelet_size
    if t % k:
      raise ValueError(f"{t} frames is not a multiple of the tubelet size {k}")
    # Frames of a tubelet fold into the channels, so the 2-D patch projection does the rest.
    folded = video.reshape(b, t // k, k, ch, h, w).transpose(0, 1, 3, 2, 4, 5)
    folded = folded.reshape(b * (t // k), ch * k, h, w)
    x, rows, cols = self.patch_embeddings(folded)
    x = x.reshape(b, (t // k) * rows * cols, -1)
    return x + jnp.asarray(sinusoid_positions(x.shape[1], x.shape[2]), x.dtype)[None]


class PatchEmbed(nnx.Module):
  def __init__(self, c: VitConfig, dtype):
    frames = (c.tubelet_size,) if c.tubelet_size else ()  # a Conv3d's [D, C, t, p, p]
    self.projection = layers.Linear(c.num_channels * max(c.tubelet_size, 1) * c.patch_size ** 2,
                                    c.hidden_size, bias=c.patch_bias, dtype=dtype)
    self.projection.weight = nnx.Param(jnp.zeros(
        (c.hidden_size, c.num_channels, *frames, c.patch_size, c.patch_size), dtype))
    self.p = c.patch_size

  def __call__(self, pixels):
    """pixels [B, C, H, W] (channels first, as the checkpoints) → [B, rows·cols, D]."""
    b, ch, h, w = pixels.shape
    p = self.p
    rows, cols = h // p, w // p
    x = pixels[:, :, :rows * p, :cols * p].reshape(b, ch, rows, p, cols, p)
    x = x.transpose(0, 2, 4, 1, 3, 5).reshape(b, rows * cols, ch * p * p)
    weight = self.projection.weight[...].reshape(self.projection.weight.shape[0], -1)
    y = jnp.einsum("bni,oi->bno", x.astype(weight.dtype), weight)
    if self.projection.bias is not None:
      y = y + self.projection.bias[...]
    return y, rows, cols


class SelfAttention(nnx.Module):
  def __init__(self, c: VitConfig, dtype):
    d = c.hidden_size
    self.query = layers.Linear(d, d, bias=c.qkv_bias, dtype=dtype)
    self.key = layers.Linear(d, d, bias=c.qkv_bias and c.key_bias, dtype=dtype)
    self.value = layers.Linear(d, d, bias=c.qkv_bias, dtype=dtype)
    self.heads = c.num_heads


class Output(nnx.Module):
  def __init__(self, d_in: int, d_out: int, dtype):
    self.dense = layers.Linear(d_in, d_out, bias=True, dtype=dtype)


class Attention(nnx.Module):
  def __init__(self, c: VitConfig, dtype):
    self.attention = SelfAttention(c, dtype)
    self.output = Output(c.hidden_size, c.hidden_size, dtype)

  def __call__(self, x, mask=None):
    b, n, d = x.shape
    a = self.attention
    h = a.heads
    q, k, v = (f(x).reshape(b, n, h, d // h) for f in (a.query, a.key, a.value))
    out = layers.attention(q, k, v, mask, scaling=(d // h) ** -0.5)
    return self.output.dense(out.reshape(b, n, d))


class LayerScale(nnx.Module):
  def __init__(self, d: int, dtype):
    self.lambda1 = nnx.Param(jnp.ones((d,), dtype))


class SwiGLU(nnx.Module):
  def __init__(self, c: VitConfig, dtype):
    self.weights_in = layers.Linear(c.hidden_size, 2 * c.intermediate_size, bias=True, dtype=dtype)
    self.weights_out = layers.Linear(c.intermediate_size, c.hidden_size, bias=True, dtype=dtype)

  def __call__(self, x):
    gate, up = jnp.split(self.weights_in(x), 2, axis=-1)
    return self.weights_out(jax.nn.silu(gate) * up)


class Block(nnx.Module):
  def __init__(self, c: VitConfig, dtype):
    d = c.hidden_size
    self.layernorm_before = layers.LayerNorm(d, eps=c.layer_norm_eps, dtype=dtype)
    self.attention = Attention(c, dtype)
    self.layernorm_after = layers.LayerNorm(d, eps=c.layer_norm_eps, dtype=dtype)
    if c.swiglu:
      self.mlp = SwiGLU(c, dtype)
    else:
      self.intermediate = Output(d, c.intermediate_size, dtype)
      self.output = Output(c.intermediate_size, d, dtype)
      self.act = layers.activation(c.hidden_act)
    if c.layer_scale:
      self.layer_scale1 = LayerScale(d, dtype)
      self.layer_scale2 = LayerScale(d, dtype)
    self.c = c

  def __call__(self, x, mask=None):
    y = self.attention(self.layernorm_before(x), mask)
    if self.c.layer_scale:
      y = y * self.layer_scale1.lambda1[...]
    x = x + y
    h = self.layernorm_after(x)
    y = self.mlp(h) if self.c.swiglu else self.output.dense(self.act(self.intermediate.dense(h)))
    if self.c.layer_scale:
      y = y * self.layer_scale2.lambda1[...]
    return x + y


class Encoder(nnx.Module):
  def __init__(self, c: VitConfig, dtype):
    self.layer = nnx.List([Block(c, dtype) for _ in range(c.num_layers)])


class Vit(nnx.Module):
  def __init__(self, config: VitConfig, *, dtype=jnp.float32):
    c = config
    self.config = c
    self.embeddings = VideoEmbeddings(c, dtype) if c.tubelet_size else Embeddings(c, dtype)
    if c.pre_norm:
      self.pre_layernorm = layers.LayerNorm(c.hidden_size, eps=c.layer_norm_eps, dtype=dtype)
    self.encoder = Encoder(c, dtype)

  def checkpoint_key(self, name: str):
    return rename(name, self.config.family, self.config.hidden_size)

  def __call__(self, pixel_values):
    """pixel_values [B, C, H, W] (VideoMAE: [B, T, C, H, W]) → the L+1 hidden states
    [B, class tokens + registers + patches, D]."""
    x = self.embeddings(pixel_values)
    if self.config.pre_norm:
      x = self.pre_layernorm(x)
    states = [x]
    for block in self.encoder.layer:
      x = block(x)
      states.append(x)
    return states


