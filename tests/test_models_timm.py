"""timm checkpoints against timm itself: PRH's ViT families (IN-21k augreg, MAE, DINOv2 with
and without registers, DINOv2-giant's SwiGLU, CLIP LAION-2B and its IN-12k fine-tune) and
the ResNet-18/50 of its vision-vision study, in timm's and torchvision's layouts. Each
model is built by timm (torchvision) with random weights at tiny sizes, saved in its own
hub format (`save_for_hf`: config.json + model.safetensors), loaded by our loader; every
hidden state within 1e-4 relative of the reference's (f32)."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from model_reference import assert_bf16_runs, assert_close_rel
from timm.models._hub import save_for_hf

from plato_jax.models import from_pretrained
from plato_jax.models.resnet import pooled

TINY_VIT = dict(embed_dim=32, depth=2, num_heads=2)
VITS = {  # PRH's 17 ViTs are these families at several sizes
    "vit_base_patch16_224.augreg_in21k": dict(TINY_VIT, img_size=32),
    "vit_base_patch16_224.mae": dict(TINY_VIT, img_size=32),
    "vit_small_patch14_dinov2.lvd142m": dict(TINY_VIT, img_size=28),
    "vit_small_patch14_reg4_dinov2.lvd142m": dict(TINY_VIT, img_size=28),
    "vit_giant_patch14_dinov2.lvd142m": dict(TINY_VIT, embed_dim=48, img_size=28),
    "vit_base_patch16_clip_224.laion2b": dict(TINY_VIT, img_size=32),
    "vit_base_patch16_clip_224.laion2b_ft_in12k": dict(TINY_VIT, img_size=32),
}


def randomize(model, seed=0):
  """Weights far from their init (so a missed scale or bias shows); BatchNorm variances
  positive."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.normal_(0, 0.2 if p.ndim > 1 else 0.5)
    for name, b in model.named_buffers():
      if name.endswith("running_mean"):
        b.normal_(0, 0.5)
      elif name.endswith("running_var"):
        b.uniform_(0.5, 1.5)
  return model.eval()


def capture(model, modules, x):
  """The outputs of `modules` (in order) in one forward pass of `model`."""
  out = {}
  hooks = [m.register_forward_hook(lambda _m, _i, o, i=i: out.__setitem__(i, o))
           for i, m in enumerate(modules)]
  with torch.no_grad():
    model(x)
  for h in hooks:
    h.remove()
  return [out[i].numpy() for i in range(len(modules))]


@pytest.mark.parametrize("name", sorted(VITS))
def test_timm_vits(tmp_path, name):
  kwargs = VITS[name]
  model = randomize(timm.create_model(name, pretrained=False, num_classes=0, **kwargs))
  save_for_hf(model, str(tmp_path), model_args=kwargs, safe_serialization=True)
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["architecture"] == name.split(".")[0]
  size = kwargs["img_size"]
  x = torch.randn(2, 3, size, size)
  theirs = capture(model, [model.norm_pre, *model.blocks], x)
  ours = from_pretrained(str(tmp_path))(jnp.asarray(x.numpy()))
  assert len(ours) == len(theirs)
  for i, (a, b) in enumerate(zip(ours, theirs)):
    assert_close_rel(a, b, where=f"{name} hidden state {i}")
  assert_bf16_runs(tmp_path, (jnp.asarray(x.numpy()),), theirs)


def check_resnet(tmp_path, model, x):
  stages = [model.maxpool, model.layer1, model.layer2, model.layer3, model.layer4]
  theirs = capture(model, stages, x)
  ours = from_pretrained(str(tmp_path))(jnp.asarray(x.numpy()))
  for i, (a, b) in enumerate(zip(ours, theirs)):
    assert_close_rel(a, b, where=f"stage {i}")
  assert_bf16_runs(tmp_path, (jnp.asarray(x.numpy()),), theirs)
  with torch.no_grad():  # the pooled feature is the classifier's input
    reference = model.forward_head(model.forward_features(x), pre_logits=True) \
        if hasattr(model, "forward_head") else \
        torch.flatten(model.avgpool(torch.as_tensor(theirs[-1])), 1)
  assert_close_rel(pooled(ours)[:, 0], reference.numpy(), where="pooled")


@pytest.mark.parametrize("name", ["resnet18.a1_in1k", "resnet50.a1_in1k"])
def test_timm_resnets(tmp_path, name):
  model = randomize(timm.create_model(name, pretrained=False, num_classes=7))
  save_for_hf(model, str(tmp_path), safe_serialization=True)
  check_resnet(tmp_path, model, torch.randn(2, 3, 64, 48))


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_resnets(tmp_path, depth):
  """torchvision's layout: its state dict as safetensors beside {"architecture": ...}."""
  import torchvision
  from safetensors.torch import save_file
  model = randomize(getattr(torchvision.models, f"resnet{depth}")(weights=None))
  save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps({"architecture": f"resnet{depth}"}))
  check_resnet(tmp_path, model, torch.randn(2, 3, 64, 48))


def test_bad_resnet_checkpoint_names_the_problem(tmp_path):
  from plato_jax.models.hf import CheckpointError
  model = randomize(timm.create_model("resnet18", pretrained=False, num_classes=3))
  save_for_hf(model, str(tmp_path), safe_serialization=True)
  config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**config, "architecture": "resnet19"}))
  with pytest.raises(CheckpointError, match="'resnet19' is not a supported ResNet"):
    from_pretrained(str(tmp_path))
  from safetensors.torch import load_file, save_file
  tensors = load_file(str(tmp_path / "model.safetensors"))
  tensors["layer3.1.conv2.weight"] = tensors["layer3.1.conv2.weight"][:, :5].contiguous()
  save_file(tensors, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match=r"layer3\.1\.conv2\.weight.*\[256, 5, 3, 3\]"):
    from_pretrained(str(tmp_path))
