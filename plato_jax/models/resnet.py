"""ResNet (He et al. 2016) as timm and torchvision build it: ResNet-18/34 (basic blocks) and
ResNet-50/101/152 (bottlenecks, the stride on the 3×3 convolution: "v1.5"), BatchNorm in
inference mode. timm's and torchvision's checkpoints share the parameter names (`conv1`,
`bn1`, `layer{1..4}.{i}.conv{1,2,3}`, `downsample.{0,1}`, `fc`), so one loader reads both.

`ResNet(...)(pixel_values)` returns the stem output (after the max pool) and each stage's
output, [B, C, H, W] each; the image feature of the papers' vision-vision study is the last
stage averaged over space (`pooled`), the input of the classifier.
"""
from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
from flax import nnx

from plato_jax.models.hf import CheckpointError, count_indexed, required_shape

DEPTHS = (18, 34, 50, 101, 152)  # the names; blocks per stage come from the tensors


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
  depths: tuple[int, ...]       # blocks per stage
  bottleneck: bool
  widths: tuple[int, ...] = (64, 128, 256, 512)
  stem_width: int = 64
  num_channels: int = 3
  eps: float = 1e-5

  @property
  def hidden_size(self) -> int:  # the pooled feature's width
    return self.widths[-1] * (4 if self.bottleneck else 1)

  @property
  def num_layers(self) -> int:
    return len(self.depths)

  @classmethod
  def from_tensors(cls, arch: str, shapes) -> "ResNetConfig":
    """From a timm/torchvision architecture name (resnet18 … resnet152, tv_resnet50, …)
    and the checkpoint's tensor shapes (`shapes(name)` → shape or None)."""
    m = re.match(r"(?:tv_)?resnet(\d+)(?:$|[._])", arch)
    if not m or int(m.group(1)) not in DEPTHS:
      raise CheckpointError(f"config.json: architecture {arch!r} is not a supported ResNet "
                            f"(resnet{{{','.join(map(str, DEPTHS))}}})")
    depths = [count_indexed(shapes, f"layer{stage}.{{}}.conv1.weight") for stage in range(1, 5)]
    if 0 in depths:
      raise CheckpointError(f"ResNet checkpoint ({arch}): no blocks for stage "
                            f"layer{depths.index(0) + 1}")
    stem = required_shape(shapes, "conv1.weight", f"ResNet checkpoint ({arch})")
    bottleneck = shapes("layer1.0.conv3.weight") is not None
    widths = tuple(shapes(f"layer{s}.0.conv1.weight")[0] if not bottleneck else
                   shapes(f"layer{s}.0.conv2.weight")[0] for s in range(1, 5))
    return cls(depths=tuple(depths), bottleneck=bottleneck, widths=widths,
               stem_width=stem[0], num_channels=stem[1])


def _param(shape, dtype, value=0.0):
  return nnx.Param(jnp.full(shape, value, dtype))


class Conv(nnx.Module):
  """A bias-free 2-D convolution, weight [out, in, kh, kw] (OIHW, as torch), NCHW."""

  def __init__(self, cin: int, cout: int, kernel: int, stride: int, dtype):
    self.weight = _param((cout, cin, kernel, kernel), dtype)
    self.stride, self.pad = stride, kernel // 2

  def __call__(self, x):
    return jax.lax.conv_general_dilated(
        x, self.weight[...].astype(x.dtype), (self.stride, self.stride),
        [(self.pad, self.pad)] * 2, dimension_numbers=("NCHW", "OIHW", "NCHW"))


class BatchNorm(nnx.Module):
  """Inference-mode batch norm with the running statistics, computed in f32."""

  def __init__(self, c: int, eps: float, dtype):
    self.weight, self.bias = _param((c,), dtype, 1.0), _param((c,), dtype)
    self.running_mean, self.running_var = _param((c,), dtype), _param((c,), dtype, 1.0)
    self.eps = eps

  def __call__(self, x):
    f32 = lambda p: p[...].astype(jnp.float32)[None, :, None, None]  # noqa: E731
    scale = f32(self.weight) * jax.lax.rsqrt(f32(self.running_var) + self.eps)
    return ((x.astype(jnp.float32) - f32(self.running_mean)) * scale
            + f32(self.bias)).astype(x.dtype)


class Block(nnx.Module):
  def __init__(self, c: ResNetConfig, cin: int, width: int, stride: int, dtype):
    expansion = 4 if c.bottleneck else 1
    cout = width * expansion
    if c.bottleneck:
      self.conv1, self.bn1 = Conv(cin, width, 1, 1, dtype), BatchNorm(width, c.eps, dtype)
      self.conv2, self.bn2 = Conv(width, width, 3, stride, dtype), BatchNorm(width, c.eps, dtype)
      self.conv3, self.bn3 = Conv(width, cout, 1, 1, dtype), BatchNorm(cout, c.eps, dtype)
    else:
      self.conv1, self.bn1 = Conv(cin, width, 3, stride, dtype), BatchNorm(width, c.eps, dtype)
      self.conv2, self.bn2 = Conv(width, width, 3, 1, dtype), BatchNorm(width, c.eps, dtype)
    if stride != 1 or cin != cout:
      self.downsample = nnx.List([Conv(cin, cout, 1, stride, dtype),
                                  BatchNorm(cout, c.eps, dtype)])
    self.bottleneck = c.bottleneck

  def __call__(self, x):
    shortcut = x
    if hasattr(self, "downsample"):
      shortcut = self.downsample[1](self.downsample[0](x))
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    if self.bottleneck:
      y = self.bn3(self.conv3(jax.nn.relu(y)))
    return jax.nn.relu(y + shortcut)


class ResNet(nnx.Module):
  def __init__(self, config: ResNetConfig, *, dtype=jnp.float32):
    c = config
    self.config = c
    self.conv1 = Conv(c.num_channels, c.stem_width, 7, 2, dtype)
    self.bn1 = BatchNorm(c.stem_width, c.eps, dtype)
    cin = c.stem_width
    for s, (depth, width) in enumerate(zip(c.depths, c.widths)):
      blocks = []
      for i in range(depth):
        blocks.append(Block(c, cin, width, 2 if i == 0 and s > 0 else 1, dtype))
        cin = width * (4 if c.bottleneck else 1)
      setattr(self, f"layer{s + 1}", nnx.List(blocks))

  def __call__(self, pixel_values):
    """pixel_values [B, C, H, W] → [stem, stage 1, …, stage 4] feature maps."""
    x = pixel_values.astype(self.conv1.weight.dtype)  # compute in the parameters' dtype
    x = jax.nn.relu(self.bn1(self.conv1(x)))
    x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, 3, 3), (1, 1, 2, 2),
                              [(0, 0), (0, 0), (1, 1), (1, 1)])
    states = [x]
    for s in range(self.config.num_layers):
      for block in getattr(self, f"layer{s + 1}"):
        x = block(x)
      states.append(x)
    return states


def pooled(states) -> jax.Array:
  """The last stage averaged over space: [B, 1, C] f32 (one layer of features)."""
  return states[-1].astype(jnp.float32).mean(axis=(2, 3))[:, None]
