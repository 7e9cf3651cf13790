"""Tensor-parallel placement of encoder parameters over a mesh's `model` axis.

A model too big for one device (Llama-3-70B, Mixtral-8x7B: 140 and 94 GB in bf16) is loaded
with each parameter split across the devices of the `model` axis, tensor by tensor, so that
no device ever holds a whole copy; jit then partitions the forward pass around the
parameters (GSPMD), and the hidden states are those of the unsplit model.

The split follows Megatron: linear layers that produce heads or hidden units
(column-parallel: q/k/v, gate/up, fc1) split their output rows, the layers that consume
them (row-parallel: o, down, fc2) their input columns, so each block needs one all-reduce
per sublayer. Experts split their hidden units the same way (each device holds a slice of
every expert, so the grouped dispatch indexes experts locally). Any other large parameter
(embeddings) splits its largest dimension the axis divides; small ones (norms, biases) are
replicated.
"""
from __future__ import annotations

import math
import re

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

MODEL_AXIS = "model"
MIN_SPLIT_ELEMENTS = 1 << 14  # smaller parameters are replicated

# Linear weights are [out, in] (the checkpoints' layout).
_COLUMN = re.compile(r"(^|\.)(q_proj|k_proj|v_proj|gate_proj|up_proj|query|key|value|"
                     r"query_key_value|dense_h_to_4h|fc1|intermediate\.dense)$")
_ROW = re.compile(r"(^|\.)(o_proj|down_proj|out_proj|dense_4h_to_h|fc2|output\.dense|"
                  r"self_attention\.dense)$")


def model_axis_size(mesh: Mesh | None) -> int:
  if mesh is None or MODEL_AXIS not in mesh.axis_names:
    return 1
  return mesh.shape[MODEL_AXIS]


def partition_spec(path: str, shape: tuple[int, ...], axis_size: int) -> P:
  """How the parameter at `path` (dotted, ending in its leaf name) splits over the model
  axis."""
  if axis_size == 1 or math.prod(shape) < MIN_SPLIT_ELEMENTS:
    return P()
  module, _, leaf = path.rpartition(".")
  if leaf == "weight" and len(shape) == 2:
    if _COLUMN.search(module) and shape[0] % axis_size == 0:
      return P(MODEL_AXIS, None)
    if _ROW.search(module) and shape[1] % axis_size == 0:
      return P(None, MODEL_AXIS)
  first = 1 if ".experts" in f".{module}" else 0  # experts: never the expert axis
  dims = sorted(range(first, len(shape)), key=lambda d: -shape[d])
  for d in dims:
    if shape[d] % axis_size == 0:
      return P(*[MODEL_AXIS if i == d else None for i in range(len(shape))])
  return P()


def device_bytes(params) -> np.ndarray:
  """Bytes of `params` (a pytree of jax arrays) that each device holds, by device id."""
  held = {}
  for leaf in jax.tree.leaves(params):
    for shard in leaf.addressable_shards:
      held[shard.device.id] = held.get(shard.device.id, 0) + shard.data.nbytes
  return np.array([held[k] for k in sorted(held)])
