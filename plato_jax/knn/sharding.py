"""Mesh / shard_map plumbing: one gallery tile per device, a running top-k per device, one merge.

Every device keeps its own [Q, k] state (values f32, ids int32). A step scores the queries
against the device's tile, selects the tile's top-k exactly (kernels.topk) and merges it into
the state. `merge_devices` folds the per-device states into one result. Because the merge
orders by (score descending, id ascending) — a total order, ids being unique — the result
does not depend on how the gallery was split into tiles or devices.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kernels.topk import BucketConfig, bucket_topk

AXIS = "gallery"


def default_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.array(devices), (AXIS,))


def mesh_axis(mesh: Mesh) -> str:
  if len(mesh.axis_names) != 1:
    raise ValueError(f"the search mesh must have one axis (gallery tiles), got {mesh.axis_names}")
  return mesh.axis_names[0]


def merge_topk(v1, i1, v2, i2, k: int):
  """Top-k of the union of two candidate lists by (value descending, id ascending)."""
  neg, ids = lax.sort((-jnp.concatenate([v1, v2], -1), jnp.concatenate([i1, i2], -1)),
                      dimension=-1, num_keys=2)
  return -neg[..., :k], ids[..., :k]


def score_tile(queries, query_ids, tile, tile_ids, *, exclude_self: bool, precision):
  """f32 scores [Q, T]; padding columns (id < 0) and self matches are -inf."""
  s = lax.dot_general(queries, tile, (((1,), (1,)), ((), ())), precision=precision,
                      preferred_element_type=jnp.float32)
  masked = tile_ids[None, :] < 0
  if exclude_self:
    masked = masked | (tile_ids[None, :] == query_ids[:, None])
  s = jnp.where(masked, -jnp.inf, s)
  # -0.0 and +0.0 compare equal but sort apart; make them one value.
  return jnp.where(s == 0, jnp.zeros_like(s), s)


def tile_step(state_v, state_i, queries, query_ids, tile, tile_ids, *, k: int,
              exclude_self: bool, precision, config: BucketConfig):
  s = score_tile(queries, query_ids, tile.astype(queries.dtype), tile_ids,
                 exclude_self=exclude_self, precision=precision)
  v, col = bucket_topk(s, min(k, s.shape[1]), config)
  return merge_topk(state_v, state_i, v, tile_ids[col], k)


@functools.lru_cache(maxsize=64)
def sharded_step(mesh: Mesh, k: int, exclude_self: bool, precision, config: BucketConfig):
  """jit(shard_map(tile_step)): state [P, Q, k], tiles [P, T, D] and ids [P, T] split on the axis."""
  axis = mesh_axis(mesh)

  def local(state_v, state_i, queries, query_ids, tiles, tile_ids):
    v, i = tile_step(state_v[0], state_i[0], queries, query_ids, tiles[0], tile_ids[0], k=k,
                     exclude_self=exclude_self, precision=precision, config=config)
    return v[None], i[None]

  split, whole = P(axis), P()
  fn = jax.shard_map(local, mesh=mesh, in_specs=(split, split, whole, whole, split, split),
                     out_specs=(split, split))
  return jax.jit(fn, donate_argnums=(0, 1))


@functools.partial(jax.jit, static_argnames=("k",))
def merge_devices(state_v, state_i, k: int):
  """[P, Q, k] per-device states → [Q, k]."""
  p, q, kk = state_v.shape
  v = jnp.moveaxis(state_v, 0, 1).reshape(q, p * kk)
  i = jnp.moveaxis(state_i, 0, 1).reshape(q, p * kk)
  neg, ids = lax.sort((-v, i), dimension=-1, num_keys=2)
  return -neg[:, :k], ids[:, :k]


def empty_state(mesh: Mesh, num_queries: int, k: int):
  sharding = NamedSharding(mesh, P(mesh_axis(mesh)))
  p = mesh.devices.size
  v = jax.device_put(np.full((p, num_queries, k), -np.inf, np.float32), sharding)
  i = jax.device_put(np.full((p, num_queries, k), -1, np.int32), sharding)
  return v, i


def put_split(mesh: Mesh, array: np.ndarray):
  return jax.device_put(array, NamedSharding(mesh, P(mesh_axis(mesh))))


def put_whole(mesh: Mesh, array):
  return jax.device_put(array, NamedSharding(mesh, P()))
