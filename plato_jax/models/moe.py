"""Sparse mixture-of-experts feed-forward blocks (Mixtral, OLMoE, GPT-OSS), computed by
grouped dispatch.

Each token picks `top_k` of `num_experts` experts. The (token, expert) assignments are sorted
by expert, and each expert's group is padded to a multiple of `block` rows. A scan over the
experts slices each expert's weights once and runs its blocks, and only its blocks, through
them. The work is the assigned rows plus at most `block - 1` padding rows per expert, never
every expert on every token, and every shape is static under jit.

Routing, as transformers does it:
  "softmax_topk" (Mixtral, OLMoE): softmax over all experts in f32, the top k of it,
      renormalised to sum 1 when `renormalize` (Mixtral; OLMoE's norm_topk_prob).
  "topk_softmax" (GPT-OSS): the top k router logits (with the router's bias), softmax over
      those k.
Experts, with parameters stacked over the expert axis as the checkpoints store them:
  "swiglu" (Mixtral, OLMoE): down(act(gate x) * up x), gate/up [E, I, D], down [E, D, I].
  "clamped_swiglu" (GPT-OSS): gate_up [E, D, 2I] (gate and up interleaved) with bias; gate
      clamped above at `limit`, up to ±limit; (up + 1) · gate · σ(alpha · gate); down
      [E, I, D] with bias.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from plato_jax.models import layers

MAX_BLOCK = 256  # rows per expert block: big enough for an efficient matmul per scan step


@dataclasses.dataclass(frozen=True)
class MoeConfig:
  num_experts: int
  top_k: int
  intermediate_size: int
  routing: str = "softmax_topk"
  renormalize: bool = True
  experts: str = "swiglu"
  hidden_act: str = "silu"
  router_bias: bool = False
  swiglu_alpha: float = 1.702
  swiglu_limit: float = 7.0


class Grouping(NamedTuple):
  """Where each (token, expert) assignment sits among blocks of one expert each."""
  source: jax.Array         # [M] the assignment each padded row holds (A: a zero row)
  slot: jax.Array           # [A] the padded row of each assignment
  first_block: jax.Array    # [E] each expert's first block
  num_blocks: jax.Array     # [E] each expert's blocks (0 for an expert with no tokens)
  block: int


def block_rows(assignments: int, num_experts: int) -> int:
  """A power of two at most half the mean group size, in [8, MAX_BLOCK]: padding costs at
  most a block per expert, a scan step's fixed cost is small beside its matmuls."""
  half = max(assignments // (2 * num_experts), 1)
  return int(min(max(8, 1 << (half.bit_length() - 1)), MAX_BLOCK))


def group_by_expert(expert_ids, num_experts: int, block: int) -> Grouping:
  """expert_ids [A] int → the padded, expert-sorted layout of the A assignments."""
  a = expert_ids.shape[0]
  order = jnp.argsort(expert_ids, stable=True)
  sizes = jnp.bincount(expert_ids, length=num_experts)
  blocks = (sizes + block - 1) // block
  first = jnp.cumsum(blocks) - blocks
  starts = jnp.cumsum(sizes) - sizes
  sorted_ids = expert_ids[order]
  rows = first[sorted_ids] * block + jnp.arange(a) - starts[sorted_ids]
  # sum over experts of ceil(size / block) <= (A + E (block - 1)) / block, and is whole.
  total_blocks = (a + num_experts * (block - 1)) // block
  source = jnp.full((total_blocks * block,), a, jnp.int32).at[rows].set(order.astype(jnp.int32))
  slot = jnp.zeros((a,), jnp.int32).at[order].set(rows.astype(jnp.int32))
  return Grouping(source, slot, first, blocks, block)


def grouped_experts(x, expert_ids, weights, params, expert_fn, num_experts: int,
                    block: int | None = None):
  """sum_k weights[n, k] · expert_fn(x[n], params[expert_ids[n, k]]) for each token n.

  x [N, D]; expert_ids, weights [N, k]; params a pytree of arrays stacked over experts
  (leading axis E); expert_fn(rows [b, D], one expert's params) → [b, D]. Experts run one
  after another, each over its own blocks only, so each expert's weights are sliced once.
  """
  n, k = expert_ids.shape
  flat = expert_ids.reshape(-1).astype(jnp.int32)
  g = group_by_expert(flat, num_experts, block or block_rows(n * k, num_experts))
  with_zero = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])
  rows = with_zero[jnp.where(g.source < n * k, g.source // k, n)]  # padding: the zero row

  def one_expert(out, e):
    p = jax.tree.map(lambda w: w[e], params)

    def one_block(j, out):
      start = (g.first_block[e] + j) * g.block
      y = expert_fn(jax.lax.dynamic_slice_in_dim(rows, start, g.block), p)
      return jax.lax.dynamic_update_slice_in_dim(out, y.astype(x.dtype), start, 0)

    return jax.lax.fori_loop(0, g.num_blocks[e], one_block, out), None

  out, _ = jax.lax.scan(one_expert, jnp.zeros_like(rows), jnp.arange(num_experts))
  per_assignment = out[g.slot].reshape(n, k, -1)
  return (per_assignment * weights[..., None]).astype(x.dtype).sum(axis=1)


def route(logits, c: MoeConfig):
  """Router logits [N, E] → (expert ids [N, k], weights [N, k])."""
  if c.routing == "topk_softmax":
    top, ids = jax.lax.top_k(logits, c.top_k)
    return ids, jax.nn.softmax(top, axis=-1)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  top, ids = jax.lax.top_k(probs, c.top_k)
  if c.renormalize:
    top = top / top.sum(axis=-1, keepdims=True)
  return ids, top


def _stacked(shape, dtype):
  return nnx.Param(jnp.zeros(shape, dtype))


class Experts(nnx.Module):
  def __init__(self, c: MoeConfig, hidden: int, dtype):
    e, i = c.num_experts, c.intermediate_size
    if c.experts == "swiglu":
      self.gate_proj = _stacked((e, i, hidden), dtype)
      self.up_proj = _stacked((e, i, hidden), dtype)
      self.down_proj = _stacked((e, hidden, i), dtype)
      self.act = layers.activation(c.hidden_act)
    else:
      self.gate_up_proj = _stacked((e, hidden, 2 * i), dtype)
      self.gate_up_proj_bias = _stacked((e, 2 * i), dtype)
      self.down_proj = _stacked((e, i, hidden), dtype)
      self.down_proj_bias = _stacked((e, hidden), dtype)
    self.c = c

  def params(self) -> dict:
    names = (("gate_proj", "up_proj", "down_proj") if self.c.experts == "swiglu" else
             ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"))
    return {name: getattr(self, name)[...] for name in names}

  def __call__(self, x, p):
    """One block of rows x [b, D] through one expert's parameters p."""
    dt = x.dtype
    if self.c.experts == "swiglu":
      gate = jnp.einsum("bd,id->bi", x, p["gate_proj"].astype(dt))
      up = jnp.einsum("bd,id->bi", x, p["up_proj"].astype(dt))
      return jnp.einsum("bi,di->bd", self.act(gate) * up, p["down_proj"].astype(dt))
    gate_up = jnp.einsum("bd,di->bi", x, p["gate_up_proj"].astype(dt)) + \
        p["gate_up_proj_bias"].astype(dt)
    limit, alpha = self.c.swiglu_limit, self.c.swiglu_alpha
    gate = jnp.minimum(gate_up[:, ::2], limit)
    up = jnp.clip(gate_up[:, 1::2], -limit, limit)
    hidden = (up + 1) * (gate * jax.nn.sigmoid(gate * alpha))
    return jnp.einsum("bi,id->bd", hidden, p["down_proj"].astype(dt)) + \
        p["down_proj_bias"].astype(dt)


class SparseMoe(nnx.Module):
  """The router (`gate` for Mixtral/OLMoE, `router` for GPT-OSS, as the checkpoints name it)
  and the experts."""

  def __init__(self, c: MoeConfig, hidden: int, dtype, router_name: str = "gate"):
    setattr(self, router_name, layers.Linear(hidden, c.num_experts, bias=c.router_bias,
                                             dtype=dtype))
    self.router_name = router_name
    self.experts = Experts(c, hidden, dtype)
    self.c = c

  def __call__(self, x):
    b, t, d = x.shape
    flat = x.reshape(b * t, d)
    ids, weights = route(getattr(self, self.router_name)(flat), self.c)
    out = grouped_experts(flat, ids, weights, self.experts.params(), self.experts,
                          self.c.num_experts)
    return out.reshape(b, t, d)
