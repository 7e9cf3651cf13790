"""Dasheng against the `dasheng` package itself (its torch model and torchaudio front end),
each clip run alone through the reference; the audio decoder and resampler against
soundfile + torchaudio; audio extraction into a store that the scaling protocol reads."""
import io
import json
import tarfile

import jax.numpy as jnp
import numpy as np
import pytest
from model_reference import assert_close_rel
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("torchaudio")
pytest.importorskip("dasheng")
soundfile = pytest.importorskip("soundfile")

from dasheng.pretrained.pretrained import Dasheng as Reference  # noqa: E402

from plato_jax import data as datasets  # noqa: E402
from plato_jax.models import CheckpointError, dasheng, from_pretrained  # noqa: E402
from plato_jax.models.hf import write_safetensors  # noqa: E402

TINY = dict(embed_dim=32, depth=2, num_heads=4, target_length=32)  # 8 patches a chunk


def tiny_reference(seed=0, **kw):
  """The package's model with random weights (larger than its init, so differences show),
  random BatchNorm statistics, in eval mode."""
  torch.manual_seed(seed)
  model = Reference(**{**TINY, **kw}).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.1)
    bn = model.init_bn[1]
    bn.running_mean.normal_(0, 10)
    bn.running_var.uniform_(20, 200)
  return model


def save_package_file(model, path, kw):
  torch.save({"model": model.state_dict(), "config": {**TINY, **kw}}, path)
  return str(path)


def reference_states(model, wave):
  """The package's embedding output and every block's output on one clip (chunks joined)."""
  embedded, blocks = [], {i: [] for i in range(len(model.blocks))}
  hooks = [model.blocks[0].register_forward_pre_hook(lambda m, a: embedded.append(a[0]))]
  for i, block in enumerate(model.blocks):
    hooks.append(block.register_forward_hook(lambda m, a, out, i=i: blocks[i].append(out)))
  with torch.no_grad():
    model(torch.from_numpy(wave)[None])
  for h in hooks:
    h.remove()
  joined = [torch.cat(embedded, 1)] + [torch.cat(blocks[i], 1) for i in range(len(blocks))]
  return [s[0].numpy() for s in joined]


def clips(rng, lengths, loud=(), silent=()):
  """Noise clips, `loud` ones 10× louder, `silent` ones digital silence in their second half
  (a loud one's range then passes 120 dB: its floor takes effect; a quiet one's does not,
  though a floor under the batch's peak would). Noise, not a tone: a tone's far bins sit
  ~120 dB under its peak, where f32 FFTs (torch's and ours alike) are off from f64 by
  ~0.1 dB."""
  out = []
  for i, n in enumerate(lengths):
    wave = (rng.standard_normal(n) * (0.5 if i in loud else 0.05)).astype(np.float32)
    if i in silent:
      wave[n // 2:] = 0
    out.append(wave)
  return out


def padded(waves):
  x = np.zeros((len(waves), max(len(w) for w in waves)), np.float32)
  for i, w in enumerate(waves):
    x[i, :len(w)] = w
  return jnp.asarray(x), jnp.asarray([len(w) for w in waves])


@pytest.mark.parametrize("kw", [{}, {"init_values": 0.5}, {"pooling": "token"}],
                            ids=["base", "layer_scale", "class_token"])
def test_every_hidden_state_matches_the_package_clip_by_clip(rng, tmp_path, kw):
  """Clips of different lengths in one batch — several chunks with a partial last one,
  under one chunk, exactly one patch, one with silence below the dB floor — each equal to
  the package run on that clip alone."""
  ref = tiny_reference(**kw)
  model = from_pretrained(save_package_file(ref, tmp_path / "tiny.pt", kw))
  assert model.config.layer_scale == ("init_values" in kw)
  lengths = [16000 + int(rng.integers(0, 160)), 4321, dasheng.min_samples(model.config), 9000]
  waves = clips(rng, lengths, loud=(3,), silent=(1, 3))
  states, real = model(*padded(waves))
  assert len(states) == TINY["depth"] + 1
  for i, wave in enumerate(waves):
    ref_states = reference_states(ref, wave)
    keep = np.asarray(real[i])
    assert keep.sum() == ref_states[0].shape[0], f"clip {i}: real tokens"
    for layer, (ours, theirs) in enumerate(zip(states, ref_states)):
      assert_close_rel(np.asarray(ours[i])[keep], theirs, where=f"clip {i} state {layer}")


def test_front_end_matches_torchaudio_per_clip(rng, tmp_path):
  """The dB mel spectrogram after the BatchNorm, clip by clip: reflect padding at each
  clip's own end and the 120 dB floor under each clip's own peak (which torchaudio takes
  over the whole batch)."""
  ref = tiny_reference()
  model = from_pretrained(save_package_file(ref, tmp_path / "tiny.pt", {}))
  waves = clips(rng, [8000, 3333, 6000], loud=(0,), silent=(0, 2))
  spec = model.spectrogram(*padded(waves))
  frames = np.asarray(dasheng.frame_counts(model.config, np.array([len(w) for w in waves])))
  floored = 0
  for i, wave in enumerate(waves):
    with torch.no_grad():
      theirs = ref.forward_to_spec(torch.from_numpy(wave)[None])[0, 0].numpy()
      db = ref.front_end(torch.from_numpy(wave)[None])[0].numpy()
    floored += int(np.sum(db <= db.max() - 120 + 1e-3))
    assert_close_rel(np.asarray(spec[i])[:, :frames[i]], theirs, where=f"clip {i}")
  assert floored > 0, "no clip reached the dB floor"


def test_hugging_face_layout_loads_the_same_model(rng, tmp_path):
  """mispeech/dasheng-*'s layout (config.json name + encoder_kwargs, tensors under
  `encoder.`) gives the package file's hidden states; the published name fixes the sizes."""
  ref = tiny_reference()
  package = from_pretrained(save_package_file(ref, tmp_path / "tiny.pt", {}))
  hf = tmp_path / "hf"
  hf.mkdir()
  (hf / "config.json").write_text(json.dumps({
      "model_type": "dasheng", "architectures": ["DashengModel"], "loss": "BCELoss",
      "encoder_kwargs": {**TINY, "patch_size": [64, 4], "patch_stride": [64, 4]}}))
  write_safetensors(str(hf / "model.safetensors"),
                    {f"encoder.{k}": v.numpy() for k, v in ref.state_dict().items()
                     if not k.startswith("front_end.")})
  loaded = from_pretrained(str(hf))
  x = padded(clips(rng, [7000, 5000]))
  for a, b in zip(package(*x)[0], loaded(*x)[0]):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  (hf / "config.json").write_text(json.dumps({"model_type": "dasheng", "name": "dasheng-base",
                                              "encoder_kwargs": TINY}))
  with pytest.raises(CheckpointError, match="num_heads=12 does not divide the width 32"):
    from_pretrained(str(hf))


def test_bf16_runs(rng, tmp_path):
  ref = tiny_reference()
  path = save_package_file(ref, tmp_path / "tiny.pt", {})
  x = padded(clips(rng, [6000, 4000]))
  f32, real = from_pretrained(path)(*x)
  bf16, _ = from_pretrained(path, dtype=jnp.bfloat16)(*x)
  for i, (a, b) in enumerate(zip(bf16, f32)):
    assert a.dtype == jnp.bfloat16
    keep = np.asarray(real)
    assert_close_rel(np.asarray(a, np.float32)[keep], np.asarray(b)[keep], rtol=0.1,
                     where=f"bf16 state {i}")


def test_bad_checkpoints_name_the_tensor_or_field(tmp_path):
  ref = tiny_reference()
  state = ref.state_dict()
  torch.save({"model": state, "config": {**TINY, "time_patch_out": 0.2}}, tmp_path / "a.pt")
  with pytest.raises(CheckpointError, match="time_patch_out=0.2"):
    from_pretrained(str(tmp_path / "a.pt"))
  torch.save({"model": state, "config": {**TINY, "num_heads": 5}}, tmp_path / "b.pt")
  with pytest.raises(CheckpointError, match="num_heads=5 does not divide the width 32"):
    from_pretrained(str(tmp_path / "b.pt"))
  bad = dict(state, **{"blocks.1.mlp.fc2.weight": torch.zeros(32, 7)})
  torch.save({"model": bad, "config": TINY}, tmp_path / "c.pt")
  with pytest.raises(CheckpointError, match=r"'blocks.1.mlp.fc2.weight' .*shape \[32, 7\]"):
    from_pretrained(str(tmp_path / "c.pt"))
  torch.save({"model": state, "config": {**TINY, "n_fft": 1024, "win_size": 1024}},
             tmp_path / "d.pt")
  with pytest.raises(CheckpointError, match=r"front_end.0.mel_scale.fb has shape \[257, 64\], "
                                            r"the config implies \[513, 64\]"):
    from_pretrained(str(tmp_path / "d.pt"))
  torch.save({"model": state, "config": {**TINY, "n_mels": 40}}, tmp_path / "f.pt")
  with pytest.raises(CheckpointError, match=r"patch_size=\[64, 4\] does not fit n_mels=40"):
    from_pretrained(str(tmp_path / "f.pt"))
  torch.save({"model": state, "config": {**TINY, "target_length": 64}}, tmp_path / "g.pt")
  with pytest.raises(CheckpointError, match=r"time_pos_embed covers 8 patches, a chunk of "
                                            r"target_length=64 has 16"):
    from_pretrained(str(tmp_path / "g.pt"))
  no_length = {k: v for k, v in TINY.items() if k != "target_length"}
  torch.save({"model": state, "config": no_length}, tmp_path / "h.pt")
  assert from_pretrained(str(tmp_path / "h.pt")).config.target_length == 32  # the positions'
  torch.save(state, tmp_path / "e.pt")
  with pytest.raises(CheckpointError, match="e.pt: not a checkpoint directory"):
    from_pretrained(str(tmp_path / "e.pt"))


# ---- decoding and resampling -----------------------------------------------------------------

@pytest.mark.parametrize("rate", [44100, 48000, 22050, 8000, 16000])
def test_resampling_matches_torchaudio(rng, rate):
  import torchaudio.functional as F
  wave = rng.standard_normal(int(rng.integers(rate // 3, rate))).astype(np.float32)
  ours = datasets.resample(wave, rate, 16000)
  theirs = F.resample(torch.from_numpy(wave)[None].double(), rate, 16000)[0].numpy()
  assert ours.shape == theirs.shape
  np.testing.assert_allclose(ours, theirs, atol=1e-9)


def encoded(wave, rate, fmt):
  buf = io.BytesIO()
  soundfile.write(buf, wave, rate, format=fmt)
  return buf.getvalue()


def test_decode_audio_mono_resampled_and_cut(rng):
  stereo = rng.uniform(-0.5, 0.5, (30000, 2)).astype(np.float32)
  data = encoded(stereo, 44100, "WAV")
  full, seconds = datasets.decode_audio(data, 16000)
  assert seconds == pytest.approx(30000 / 44100)
  read, _ = soundfile.read(io.BytesIO(data), dtype="float32")
  np.testing.assert_allclose(full, datasets.resample(read.mean(1, dtype=np.float64), 44100,
                                                     16000), atol=1e-6)
  cut, seconds = datasets.decode_audio(data, 16000, max_seconds=0.25)
  assert seconds == pytest.approx(30000 / 44100) and len(cut) == 4000
  np.testing.assert_array_equal(cut, full[:4000])  # the cut leaves the samples it keeps as they are
  flac = encoded(stereo[:, 0], 16000, "FLAC")
  np.testing.assert_allclose(datasets.decode_audio(flac, 16000)[0], stereo[:, 0], atol=1e-4)
  for bad in (b"", b"RIFF not really a wave file", encoded(stereo[:0], 16000, "WAV"),
              encoded(stereo, 44099, "WAV")):  # (a rate whose resampling kernel is huge)
    assert datasets.decode_audio(bad, 16000) is None


# ---- extraction ------------------------------------------------------------------------------

def test_audio_extraction_equals_the_package_per_clip(rng, tmp_path):
  """A folder of WAV/FLAC clips (44.1 kHz stereo, 16 kHz mono, one longer than the cut, one
  too short, one broken) → every block's real tokens averaged, each row equal to the package
  on that clip (decoded by soundfile, resampled by torchaudio); webdataset shards give the
  same store; the scaling protocol reads it beside a text store of the same ids."""
  import torchaudio.functional as F

  from plato_jax.extract import Options, extract
  from plato_jax.scaling import run_scaling
  ref = tiny_reference()
  ckpt = save_package_file(ref, tmp_path / "dasheng.pt", {})
  root = tmp_path / "audio"
  root.mkdir()
  specs = [(44100, 2, 0.9), (16000, 1, 0.5), (16000, 1, 3.0), (22050, 2, 0.01), (16000, 1, 0.7),
           (44100, 1, 1.3), (16000, 1, 0.4)]
  lines = []
  for i, (rate, channels, seconds) in enumerate(specs):
    wave = (rng.standard_normal((int(rate * seconds), channels)) * 0.1).astype(np.float32)
    name = f"c{i}.{'flac' if i % 2 else 'wav'}"
    (root / name).write_bytes(encoded(wave, rate, "FLAC" if i % 2 else "WAV"))
    lines.append(json.dumps({"audio": name, "caption": f"w{i}", "id": 10 + i}))
  (root / "c4.wav").write_bytes(b"broken")
  (root / "captions.jsonl").write_text("\n".join(lines))
  reader = datasets.ImageFolder(str(root), image_field="audio")
  with pytest.raises(ValueError, match=r"row id 13 .*c3.flac.*unreadable audio \(or shorter "
                                       r"than 30 ms\)"):
    extract(ckpt, reader, str(tmp_path / "s0"), Options(progress=False))
  opts = Options(batch_size=2, dtype="float32", on_bad_image="skip", progress=False,
                 max_audio_seconds=2.0)
  store = extract(ckpt, reader, str(tmp_path / "s"), opts)
  assert store.meta["modality"] == "audio" and store.meta["skipped_ids"] == [13, 14]
  assert store.meta["pooling"] == "mean_over_tokens_per_block" and store.num_layers == 2
  kept = [0, 1, 2, 5, 6]
  np.testing.assert_array_equal(store.ids(), [10 + i for i in kept])
  for row, i in enumerate(kept):
    wave, rate = soundfile.read(str(root / json.loads(lines[i])["audio"]), dtype="float32",
                                always_2d=True)
    mono = torch.from_numpy(wave.mean(1))[None]
    mono = F.resample(mono.double(), rate, 16000).float()[0, :32000].numpy()
    ref_states = reference_states(ref, mono)
    want = np.stack([s.mean(0) for s in ref_states[1:]])
    assert_close_rel(store.gather(np.array([row]))[0], want, where=f"clip {i}")
  with tarfile.open(tmp_path / "audio.tar", "w") as tar:
    for i in kept:
      name = json.loads(lines[i])["audio"]
      tar.add(root / name, arcname=f"{i:04d}.{name.split('.')[1]}")
      thumb = tmp_path / "thumb.png"  # a cover image beside the clip: the clip is the media
      Image.new("RGB", (8, 8)).save(thumb)
      tar.add(thumb, arcname=f"{i:04d}.png")
      meta = tmp_path / f"{i}.json"
      meta.write_text(json.dumps({"caption": f"w{i}", "id": 10 + i}))
      tar.add(meta, arcname=f"{i:04d}.json")
  shards = extract(ckpt, str(tmp_path / "audio.tar"), str(tmp_path / "w"), opts)
  np.testing.assert_array_equal(shards.ids(), store.ids())
  np.testing.assert_array_equal(shards.gather(np.arange(5)), store.gather(np.arange(5)))
  result = run_scaling(store, shards, queries=3, sizes=["5"], ks=["1"], progress=False)
  assert [row["size"] for row in result.rows] == [5]
