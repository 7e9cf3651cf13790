"""Dasheng (Dinkel et al. 2024): the audio encoder of Koepke et al.'s text–audio study.

A log-mel front end (16 kHz, 512-point STFT, hop 160, 64 mel bands, dB with a 120 dB floor,
a BatchNorm per band), patches of 64 bands × 4 frames, and a pre-norm ViT over chunks of
`target_length` frames (10.08 s): each chunk is encoded on its own (time positions restart)
and the chunks' tokens are concatenated.

Semantics are the `dasheng` package's (0.0.9 on PyPI, `dasheng.pretrained.Dasheng`) run on
**one clip**:
a batch of clips of different lengths gives each clip what it gets alone — the STFT's
reflect padding at the clip's own end, the dB floor from the clip's own peak (torchaudio's
`AmplitudeToDB` takes it over the whole batch), a last partial chunk attended over its real
patches only (the Hugging Face port zero-pads it instead). `Dasheng(...)(waveform, lengths)`
returns the hidden states — the embedding output, then every block's output before the
final norm ([L+1] arrays of [B, tokens, D]) — and which tokens are real ([B, tokens]).

Published layouts: the package's torch.save file (`dasheng_base.pt`, ...: {"model": state
dict, "config": encoder arguments}) and the Hugging Face directory (`mispeech/dasheng-*`:
config.json with `name` and `encoder_kwargs`, tensors under `encoder.`).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from plato_jax.models import layers
from plato_jax.models.errors import CheckpointError
from plato_jax.models.hf import count_indexed, required_shape

# The published sizes (hidden, layers, heads), as the package's dasheng_base/06B/12B and the
# Hugging Face config's `name` set them; the heads of a published width are these.
VARIANTS = {"dasheng-base": (768, 12, 12), "dasheng-0.6B": (1280, 32, 16),
            "dasheng-1.2B": (1536, 40, 24)}
_HEADS_BY_WIDTH = {hidden: heads for hidden, _, heads in VARIANTS.values()}


def _pair(value, field: str) -> tuple[int, int]:
  pair = (value, value) if isinstance(value, int) else tuple(value)
  if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
    raise CheckpointError(f"Dasheng config: {field}={value!r} is not a positive int or a pair")
  return pair


@dataclasses.dataclass(frozen=True)
class DashengConfig:
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  qkv_bias: bool = True
  layer_scale: bool = False
  pooling: str = "mean"            # "token": a class token per chunk
  patch_size: tuple = (64, 4)      # (mel bands, frames)
  patch_stride: tuple = (64, 4)
  target_length: int = 1008        # frames per chunk
  init_bn: bool = True
  sample_rate: int = 16000
  n_fft: int = 512
  win_size: int = 512
  hop_size: int = 160
  n_mels: int = 64
  f_min: float = 0.0
  f_max: float = 8000.0
  center: bool = True
  top_db: float | None = 120.0

  @property
  def chunk_patches(self) -> int:
    return self.target_length // self.patch_stride[1]

  @property
  def freq_patches(self) -> int:
    return (self.n_mels - self.patch_size[0]) // self.patch_stride[0] + 1

  @classmethod
  def from_checkpoint(cls, config: dict, shapes) -> "DashengConfig":
    """From a config dict (Hugging Face: `name` + `encoder_kwargs`; the package's file: its
    encoder arguments, as read into `encoder_kwargs`) and the tensors' shapes (`shapes(name)`
    → shape or None): width and depth come from the tensors, as the package's constructors
    fix them per published model."""
    kw = dict(config.get("encoder_kwargs") or {})
    name = config.get("name")
    if name is not None and name not in VARIANTS:
      raise CheckpointError(f"config.json: Dasheng name {name!r} is not one of "
                            f"{sorted(VARIANTS)}")

    def need(tensor):
      return required_shape(shapes, tensor, "Dasheng checkpoint")

    hidden, grid = need("time_pos_embed")[1], need("time_pos_embed")[-1]
    depth = count_indexed(shapes, "blocks.{}.norm1.weight")
    # The published widths' heads override the file's (as the package's constructors do).
    heads = VARIANTS[name][2] if name else _HEADS_BY_WIDTH.get(hidden, kw.get("num_heads"))
    if not isinstance(heads, int) or heads < 1 or hidden % heads:
      raise CheckpointError(f"Dasheng config: num_heads={heads!r} does not divide the width "
                            f"{hidden} (an unpublished width needs encoder num_heads)")
    pooling = kw.get("pooling", "mean")
    if pooling not in ("mean", "token"):
      raise CheckpointError(f"Dasheng config: pooling={pooling!r} is not 'mean' or 'token'")
    for field in ("time_patch_out", "freq_patch_out"):
      if kw.get(field):
        raise CheckpointError(f"Dasheng config: {field}={kw[field]!r} drops patches at "
                              f"random (training only); features need it unset")
    for field, default in (("block_type", "Block"), ("attention_type", "Attention")):
      if kw.get(field, default) != default:
        raise CheckpointError(f"Dasheng config: {field}={kw[field]!r} is not supported "
                              f"(only {default!r})")
    c = cls(
        hidden_size=hidden, num_layers=depth, num_heads=heads,
        intermediate_size=need("blocks.0.mlp.fc1.weight")[0] if depth else 4 * hidden,
        qkv_bias=shapes("blocks.0.attn.qkv.bias") is not None,
        layer_scale=shapes("blocks.0.ls1.gamma") is not None, pooling=pooling,
        patch_size=_pair(kw.get("patch_size", (64, 4)), "patch_size"),
        patch_stride=_pair(kw.get("patch_stride", (64, 4)), "patch_stride"),
        # (a config without it: the length the positions were trained for)
        target_length=int(kw.get("target_length",
                                 grid * _pair(kw.get("patch_stride", (64, 4)), "patch_stride")[1])),
        init_bn=shapes("init_bn.1.running_mean") is not None,
        n_fft=int(kw.get("n_fft", 512)), win_size=int(kw.get("win_size", 512)),
        hop_size=int(kw.get("hop_size", 160)), n_mels=int(kw.get("n_mels", 64)),
        f_min=float(kw.get("f_min", 0)), f_max=float(kw.get("f_max", 8000)),
        center=bool(kw.get("center", True)), top_db=kw.get("top_db", 120))
    if not c.center:
      raise CheckpointError("Dasheng config: center=False is not supported")
    if c.win_size > c.n_fft or c.f_max > c.sample_rate / 2 or c.f_min >= c.f_max:
      raise CheckpointError(f"Dasheng config: win_size={c.win_size}, n_fft={c.n_fft}, "
                            f"f_min={c.f_min}, f_max={c.f_max} are inconsistent at "
                            f"{c.sample_rate} Hz")
    if c.chunk_patches < 1 or c.patch_size[0] > c.n_mels:
      raise CheckpointError(f"Dasheng config: patch_size={list(c.patch_size)} does not fit "
                            f"n_mels={c.n_mels} × target_length={c.target_length} frames")
    fb = shapes("front_end.0.mel_scale.fb")  # the package's file keeps its filterbank
    if fb is not None and list(fb) != [c.n_fft // 2 + 1, c.n_mels]:
      raise CheckpointError(f"Dasheng checkpoint: front_end.0.mel_scale.fb has shape "
                            f"{list(fb)}, the config implies {[c.n_fft // 2 + 1, c.n_mels]}")
    if grid != c.chunk_patches:
      raise CheckpointError(f"Dasheng checkpoint: time_pos_embed covers {grid} patches, a "
                            f"chunk of target_length={c.target_length} has {c.chunk_patches}")
    return c


# ---- the front end (f32 always: the package turns autocast off for it) ----------------------

def mel_filterbank(c: DashengConfig) -> np.ndarray:
  """[n_fft/2 + 1, n_mels] triangular filters on the HTK mel scale, unnormalised
  (torchaudio's `melscale_fbanks` defaults)."""
  hz_to_mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)  # noqa: E731
  freqs = np.linspace(0, c.sample_rate // 2, c.n_fft // 2 + 1)
  mels = np.linspace(hz_to_mel(c.f_min), hz_to_mel(c.f_max), c.n_mels + 2)
  edges = 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
  slopes = edges[None, :] - freqs[:, None]
  widths = np.diff(edges)
  down = -slopes[:, :-2] / widths[:-1]
  up = slopes[:, 2:] / widths[1:]
  return np.maximum(0.0, np.minimum(down, up)).astype(np.float32)


def frame_counts(c: DashengConfig, lengths):
  """STFT frames of clips of `lengths` samples (centred frames)."""
  return 1 + lengths // c.hop_size


def patch_counts(c: DashengConfig, lengths):
  """Time patches of clips of `lengths` samples (0 when a clip is shorter than a patch)."""
  frames = frame_counts(c, lengths)
  return jnp.maximum((frames - c.patch_size[1]) // c.patch_stride[1] + 1, 0)


def min_samples(c: DashengConfig) -> int:
  """The shortest clip: one patch of frames, and longer than the STFT's reflect padding."""
  return max((c.patch_size[1] - 1) * c.hop_size, c.n_fft // 2 + 1)


def log_mel(c: DashengConfig, waveform, lengths):
  """waveform [B, S] (clip b in its first lengths[b] samples) → dB mel spectrogram
  [B, n_mels, 1 + S // hop], each clip as if alone: reflect padding at its own ends, the
  floor `top_db` below its own peak over its own frames."""
  b, s = waveform.shape
  pad = c.n_fft // 2
  frames = 1 + s // c.hop_size
  idx = (jnp.arange(frames) * c.hop_size)[:, None] + jnp.arange(c.n_fft)[None, :] - pad
  last = (lengths - 1)[:, None, None]
  idx = jnp.abs(idx)[None]                                   # reflect at the start
  idx = jnp.where(idx > last, 2 * last - idx, idx)           # and at the clip's own end
  idx = jnp.clip(idx, 0, s - 1).reshape(b, -1)               # (frames past the clip: unused)
  x = jnp.take_along_axis(waveform.astype(jnp.float32), idx, axis=1)
  x = x.reshape(b, frames, c.n_fft)
  n = np.arange(c.win_size)
  window = np.zeros(c.n_fft, np.float32)
  left = (c.n_fft - c.win_size) // 2
  window[left:left + c.win_size] = 0.5 - 0.5 * np.cos(2 * np.pi * n / c.win_size)
  spec = jnp.fft.rfft(x * window, axis=-1)
  power = jnp.square(spec.real) + jnp.square(spec.imag)
  mel = jnp.einsum("btf,fm->bmt", power, mel_filterbank(c),
                   precision=jax.lax.Precision.HIGHEST)
  db = 10.0 * jnp.log10(jnp.maximum(mel, 1e-10))
  if c.top_db is not None:
    real = jnp.arange(frames)[None, :] < frame_counts(c, lengths)[:, None]
    peak = jnp.max(jnp.where(real[:, None, :], db, -jnp.inf), axis=(1, 2), keepdims=True)
    db = jnp.maximum(db, peak - c.top_db)
  return db


# ---- the encoder --------------------------------------------------------------------------

class BatchNorm(nnx.Module):
  """Inference BatchNorm over the mel bands (running statistics, eps 1e-5)."""

  def __init__(self, n: int, dtype):
    del dtype  # f32 whatever the compute dtype: the front end runs in f32 (the package's too)
    self.weight = nnx.Param(jnp.ones((n,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((n,), jnp.float32))
    self.running_mean = nnx.Param(jnp.zeros((n,), jnp.float32))
    self.running_var = nnx.Param(jnp.ones((n,), jnp.float32))

  def __call__(self, x):  # x [B, bands, T] f32
    scale = self.weight[...].astype(jnp.float32) * jax.lax.rsqrt(
        self.running_var[...].astype(jnp.float32) + 1e-5)
    shift = self.bias[...].astype(jnp.float32) - self.running_mean[...] * scale
    return x * scale[None, :, None] + shift[None, :, None]


class PatchEmbed(nnx.Module):
  def __init__(self, c: DashengConfig, dtype):
    self.proj = layers.Linear(1, c.hidden_size, bias=True, dtype=dtype)
    self.proj.weight = nnx.Param(jnp.zeros((c.hidden_size, 1, *c.patch_size), dtype))
    self.stride = c.patch_stride

  def __call__(self, spec):
    """spec [B, bands, T] → [B, D, freq patches, time patches] (a Conv2d, as the package)."""
    w = self.proj.weight[...]
    y = jax.lax.conv_general_dilated(spec[:, None].astype(w.dtype), w, self.stride, "VALID",
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"))
    return y + self.proj.bias[...][None, :, None, None]


class Attention(nnx.Module):
  def __init__(self, c: DashengConfig, dtype):
    self.qkv = layers.Linear(c.hidden_size, 3 * c.hidden_size, bias=c.qkv_bias, dtype=dtype)
    self.proj = layers.Linear(c.hidden_size, c.hidden_size, bias=True, dtype=dtype)
    self.heads = c.num_heads

  def __call__(self, x, mask):
    b, n, d = x.shape
    q, k, v = jnp.split(self.qkv(x).reshape(b, n, 3 * self.heads, d // self.heads), 3, axis=2)
    out = layers.attention(q, k, v, mask, scaling=(d // self.heads) ** -0.5)
    return self.proj(out.reshape(b, n, d))


class Mlp(nnx.Module):
  def __init__(self, c: DashengConfig, dtype):
    self.fc1 = layers.Linear(c.hidden_size, c.intermediate_size, bias=True, dtype=dtype)
    self.fc2 = layers.Linear(c.intermediate_size, c.hidden_size, bias=True, dtype=dtype)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class LayerScale(nnx.Module):
  def __init__(self, d: int, dtype):
    self.gamma = nnx.Param(jnp.ones((d,), dtype))


class Block(nnx.Module):
  def __init__(self, c: DashengConfig, dtype):
    d = c.hidden_size
    self.norm1 = layers.LayerNorm(d, eps=1e-6, dtype=dtype)
    self.attn = Attention(c, dtype)
    self.norm2 = layers.LayerNorm(d, eps=1e-6, dtype=dtype)
    self.mlp = Mlp(c, dtype)
    if c.layer_scale:
      self.ls1, self.ls2 = LayerScale(d, dtype), LayerScale(d, dtype)
    self.layer_scale = c.layer_scale

  def __call__(self, x, mask):
    y = self.attn(self.norm1(x), mask)
    x = x + (y * self.ls1.gamma[...] if self.layer_scale else y)
    y = self.mlp(self.norm2(x))
    return x + (y * self.ls2.gamma[...] if self.layer_scale else y)


class Dasheng(nnx.Module):
  def __init__(self, config: DashengConfig, *, dtype=jnp.float32):
    c = config
    self.config = c
    if c.init_bn:
      self.init_bn = BatchNorm(c.n_mels, dtype)
    self.patch_embed = PatchEmbed(c, dtype)
    grid = c.target_length // c.patch_stride[1]
    self.time_pos_embed = nnx.Param(jnp.zeros((1, c.hidden_size, 1, grid), dtype))
    self.freq_pos_embed = nnx.Param(jnp.zeros((1, c.hidden_size, c.freq_patches, 1), dtype))
    if c.pooling == "token":
      self.cls_token = nnx.Param(jnp.zeros((1, 1, c.hidden_size), dtype))
      self.token_pos_embed = nnx.Param(jnp.zeros((1, c.hidden_size), dtype))
    self.blocks = nnx.List([Block(c, dtype) for _ in range(c.num_layers)])

  def checkpoint_key(self, name: str) -> str:
    return name.replace("init_bn.", "init_bn.1.", 1) if name.startswith("init_bn.") else name

  def spectrogram(self, waveform, lengths):
    """The front end: dB mel spectrogram, batch-normalised per band, f32 [B, bands, T]."""
    spec = log_mel(self.config, waveform, lengths)
    return self.init_bn(spec) if self.config.init_bn else spec

  def __call__(self, waveform, lengths=None):
    """waveform [B, S] at 16 kHz, clip b in its first lengths[b] samples (None: all S) →
    (hidden states [L+1] of [B, tokens, D], real tokens [B, tokens] bool)."""
    c = self.config
    b, s = waveform.shape
    lengths = jnp.full((b,), s, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
    spec = self.spectrogram(waveform, lengths)
    dtype = self.time_pos_embed[...].dtype
    x = self.patch_embed(spec.astype(dtype))                   # [B, D, F, T]
    _, d, f, t = x.shape
    size = c.chunk_patches
    chunks = -(-t // size)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, chunks * size - t)))
    x = x.reshape(b, d, f, chunks, size)
    x = x + self.time_pos_embed[..., None, :size] + self.freq_pos_embed[..., None]
    # Chunks become batch rows; tokens within a chunk in (frequency, time) order.
    x = x.transpose(0, 3, 2, 4, 1)
    x = x.reshape(b * chunks, f * size, d)
    when = jnp.arange(chunks)[:, None] * size + jnp.arange(size)[None, :]  # [chunks, size]
    real = when[None] < patch_counts(c, lengths)[:, None, None]          # [B, chunks, size]
    real = jnp.broadcast_to(real[:, :, None, :], (b, chunks, f, size)).reshape(b * chunks, -1)
    if c.pooling == "token":
      cls = (self.cls_token[...] + self.token_pos_embed[...][:, None]).astype(dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls, (b * chunks, 1, d)), x], axis=1)
      real = jnp.concatenate([real[:, :1], real], axis=1)
    mask = real[:, None, None, :]
    states = [x]
    for block in self.blocks:
      x = block(x, mask)
      states.append(x)
    tokens = x.shape[1]
    return ([s.reshape(b, chunks * tokens, d) for s in states],
            real.reshape(b, chunks * tokens))
