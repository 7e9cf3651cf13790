"""Tensor-parallel loading over a `model` mesh axis (8 fake CPU devices): no device holds a
whole copy of any split parameter, and the hidden states equal the unsplit model's."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from jax.sharding import Mesh, PartitionSpec as P
from model_reference import assert_close_rel, save_tiny
from test_models_decoders import batch

from plato_jax.models import from_pretrained, hidden_states_fn, parallel

CASES = {
    "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=32)),
    "mixtral": (transformers.MixtralForCausalLM, transformers.MixtralConfig(
        vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=32)),
    "vit": (transformers.ViTModel, transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=8, intermediate_size=128,
        image_size=28, patch_size=14)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_split_over_the_model_axis(rng, tmp_path, monkeypatch, name):
  monkeypatch.setattr(parallel, "MIN_SPLIT_ELEMENTS", 1)  # tiny: split all that divide
  model_cls, config = CASES[name]
  save_tiny(model_cls, config, tmp_path)
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
  whole = from_pretrained(str(tmp_path))
  split = from_pretrained(str(tmp_path), mesh=mesh)
  run, params = hidden_states_fn(split)
  _, whole_params = hidden_states_fn(whole)
  total = sum(x.nbytes for x in jax.tree.leaves(whole_params))
  replicated = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    shard = leaf.addressable_shards[0].data
    if any(d % 4 == 0 for d in leaf.shape[1 if "experts" in str(path) else 0:]):
      assert shard.size * 4 == leaf.size, f"{jax.tree_util.keystr(path)} is not split"
    else:
      replicated += leaf.nbytes
  held = parallel.device_bytes(params)
  assert len(held) == 8 and held.max() <= (total - replicated) / 4 + replicated < total
  if name == "vit":
    inputs = (jnp.asarray(rng.standard_normal((2, 3, 28, 28)), jnp.float32),)
  else:
    ids, mask = batch(rng, vocab=96)
    inputs = (jnp.asarray(ids), jnp.asarray(mask))
  ours, reference = run(params, *inputs), whole(*inputs)
  for i, (a, b) in enumerate(zip(ours, reference)):
    assert_close_rel(np.asarray(a), np.asarray(b), rtol=1e-5, where=f"hidden state {i}")


def test_partition_specs_follow_megatron():
  spec = parallel.partition_spec
  assert spec("layers.0.self_attn.q_proj.weight", (4096, 4096), 8) == P("model", None)
  assert spec("layers.0.self_attn.o_proj.weight", (4096, 4096), 8) == P(None, "model")
  assert spec("layers.0.mlp.down_proj.weight", (4096, 14336), 8) == P(None, "model")
  assert spec("encoder.layer.0.attention.output.dense.weight", (768, 768), 8) == \
      P(None, "model")
  assert spec("layers.0.block_sparse_moe.experts.gate_proj", (8, 14336, 4096), 8) == \
      P(None, "model", None)
  assert spec("embed_tokens.weight", (32000, 4096), 8) == P("model", None)
  assert spec("norm.weight", (4096,), 8) == P()
  assert spec("layers.0.self_attn.q_proj.weight", (4096, 4096), 1) == P()
