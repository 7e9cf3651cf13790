"""Flax (nnx) encoders that load Hugging Face checkpoint directories without torch.

    model = plato_jax.models.from_pretrained("/ckpt/open_llama_3b", dtype=jnp.bfloat16)
    hidden_states = model(input_ids, attention_mask)      # [L+1] x [B, T, D]

One file per architecture family; each model's parameter paths are the checkpoint's tensor
names, so loading is a walk over the model's parameters, reading each tensor once.
"""
from plato_jax.models.hf import Checkpoint, CheckpointError
from plato_jax.models.pretrained import (ARCHITECTURES, TOWERS, architecture, from_pretrained,
                                         hidden_states_fn, load_converted, save_converted)

__all__ = ["ARCHITECTURES", "TOWERS", "Checkpoint", "CheckpointError", "architecture",
           "from_pretrained", "hidden_states_fn", "load_converted", "save_converted"]
