"""Extraction into a store against transformers run row by row: the papers' protocol (CLS
per block; mean over real tokens of every hidden state; loss and bits per byte), the data
readers, bad records, and resume after a crash."""
import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch
import transformers
from model_reference import assert_close_rel, save_tiny
from PIL import Image

from plato_jax import data as datasets
from plato_jax.extract import ImageSpec, Options, extract
from plato_jax.store import FeatureStore

WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(60)]


def save_tokenizer(path):
  """A word-level tokenizer that adds BOS, with eos and no pad token (pad = eos)."""
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                              eos_token="</s>", unk_token="<unk>")
  fast.save_pretrained(path)
  return fast


def captions(rng, n):
  return [" ".join(f"w{j}" for j in rng.integers(0, 60, rng.integers(1, 30))) for _ in range(n)]


def png(rng, h, w):
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def write_image_folder(root, rng, n, bad=()):
  root.mkdir(parents=True, exist_ok=True)
  lines = []
  for i in range(n):
    name = f"img{i}.png"
    data = b"not an image" if i in bad else png(rng, int(rng.integers(30, 50)), int(rng.integers(30, 50)))
    (root / name).write_bytes(data)
    lines.append(json.dumps({"image": name, "caption": f"w{i}", "id": 1000 + i, "src": i // 2}))
  (root / "captions.jsonl").write_text("\n".join(lines))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("llama")
  cfg = transformers.LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
  model = save_tiny(transformers.LlamaForCausalLM, cfg, path)
  return path, model, save_tokenizer(path)


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("dinov2")
  cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=28, patch_size=14)
  model = save_tiny(transformers.Dinov2Model, cfg, path)
  # The PIL backend: the processor's reference path (the torchvision one, transformers'
  # default where torchvision is installed, resizes tensors and differs by ~5e-4).
  processor = transformers.BitImageProcessorPil(size={"shortest_edge": 32},
                                             crop_size={"height": 28, "width": 28},
                                             resample=3, do_convert_rgb=True)
  processor.save_pretrained(path)
  return path, model, processor


def test_model_parallel_extraction_equals_replicated(rng, tmp_path, llama_dir, monkeypatch):
  """The model split over a "model" axis of 4 devices (batches over the other 2): the same
  features, losses and bits per byte as the replicated model."""
  from plato_jax.models import parallel
  monkeypatch.setattr(parallel, "MIN_SPLIT_ELEMENTS", 1)  # tiny: split all that divide
  path, _, _ = llama_dir
  (tmp_path / "d").mkdir()
  (tmp_path / "d" / "captions.jsonl").write_text(
      "\n".join(json.dumps({"caption": t}) for t in captions(rng, 13)))
  stores = [extract(str(path), str(tmp_path / "d"), str(tmp_path / f"s{mp}"),
                    Options(batch_size=4, dtype="float32", progress=False, model_parallel=mp))
            for mp in (1, 4)]
  assert_close_rel(stores[1].gather(np.arange(13)), stores[0].gather(np.arange(13)), rtol=1e-5)
  for column in ("loss", "bits_per_byte"):
    np.testing.assert_allclose(stores[1].column(column), stores[0].column(column), rtol=1e-5)
  with pytest.raises(ValueError, match="model_parallel=3 must be a positive divisor of the 8"):
    extract(str(path), str(tmp_path / "d"), str(tmp_path / "s3"),
            Options(progress=False, model_parallel=3))


def test_text_features_loss_and_bits_per_byte(rng, tmp_path, llama_dir):
  path, model, tok = llama_dir
  texts = captions(rng, 45)
  (tmp_path / "d").mkdir()
  (tmp_path / "d" / "captions.jsonl").write_text(
      "\n".join(json.dumps({"caption": t}) for t in texts))
  store = extract(str(path), str(tmp_path / "d"), str(tmp_path / "s"),
                  Options(batch_size=8, dtype="float32", bucket_window=2, progress=False))
  assert store.num_rows == 45 and store.num_layers == 3 and store.meta["modality"] == "text"
  np.testing.assert_array_equal(store.ids(), np.arange(45))
  feats = store.gather(np.arange(45))
  loss, bpb = store.column("loss"), store.column("bits_per_byte")
  for row, text in enumerate(texts):  # each caption alone through transformers
    ids = torch.as_tensor([tok(text)["input_ids"]])
    with torch.no_grad():
      out = model(input_ids=ids, labels=ids, output_hidden_states=True)
    ref = np.stack([h[0].mean(0).numpy() for h in out.hidden_states])
    assert_close_rel(feats[row], ref, where=f"row {row}")
    n = ids.shape[1]
    if n > 1:
      assert math.isclose(loss[row], out.loss.item(), rel_tol=1e-4)
      ref_bpb = out.loss.item() * (n - 1) / math.log(2) / len(text.encode())
      assert math.isclose(bpb[row], ref_bpb, rel_tol=1e-4)


def test_vision_cls_per_block_with_the_checkpoints_preprocessing(rng, tmp_path, dinov2_dir):
  path, model, processor = dinov2_dir
  write_image_folder(tmp_path / "imgs", rng, 11)
  store = extract(str(path), str(tmp_path / "imgs"), str(tmp_path / "s"),
                  Options(batch_size=4, dtype="float32", progress=False))
  assert store.num_layers == 2 and store.meta["pooling"] == "cls_per_block"
  np.testing.assert_array_equal(store.ids(), 1000 + np.arange(11))
  feats = store.gather(np.arange(11))
  for i in range(11):
    image = Image.open(tmp_path / "imgs" / f"img{i}.png").convert("RGB")
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
      states = model(pixels, output_hidden_states=True).hidden_states
    ref = np.stack([h[0, 0].numpy() for h in states[1:]])
    assert_close_rel(feats[i], ref, rtol=1e-4, where=f"image {i}")


def test_resnet_pooled_features_with_timms_own_transform(rng, tmp_path):
  """A timm ResNet-18 (its hub format): one layer, the last stage averaged over space, equal
  to timm's pre-logits features of timm's own eval transform of each image."""
  import timm
  from timm.models._hub import save_for_hf
  from test_models_timm import randomize
  model = randomize(timm.create_model("resnet18.a1_in1k", pretrained=False, num_classes=5))
  model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 40, 40), "crop_pct": 0.8}
  save_for_hf(model, str(tmp_path / "resnet"), safe_serialization=True)
  write_image_folder(tmp_path / "imgs", rng, 6)
  store = extract(str(tmp_path / "resnet"), str(tmp_path / "imgs"), str(tmp_path / "s"),
                  Options(batch_size=4, dtype="float32", progress=False))
  assert store.num_layers == 1 and store.dim == 512 and store.meta["modality"] == "vision"
  transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
  for i in range(6):
    image = Image.open(tmp_path / "imgs" / f"img{i}.png").convert("RGB")
    with torch.no_grad():
      ref = model.forward_head(model.forward_features(transform(image)[None]),
                               pre_logits=True)
    assert_close_rel(store.gather(np.array([i]))[0, 0], ref[0].numpy(), where=f"image {i}")


def write_video(path, rng, frames, h=40, w=48, fps=8):
  import av
  with av.open(str(path), mode="w") as out:
    stream = out.add_stream("mpeg4", rate=fps)
    stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
    for _ in range(frames):
      image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
      for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
        out.mux(packet)
    for packet in stream.encode():
      out.mux(packet)


def test_video_features_with_the_processors_frames(rng, tmp_path):
  """VideoMAE over a folder of mp4 clips: the frames transformers' video processor samples
  (decoded by PyAV), its PIL image processor's preprocessing, every block's tokens
  averaged; a clip shorter than num_frames and a broken file are bad rows."""
  import av
  from transformers.video_utils import VideoMetadata
  cfg = transformers.VideoMAEConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, image_size=28, patch_size=14,
                                    num_frames=4, tubelet_size=2)
  model = save_tiny(transformers.VideoMAEModel, cfg, tmp_path / "videomae")
  processor = transformers.VideoMAEImageProcessorPil(size={"shortest_edge": 32},
                                                     crop_size={"height": 28, "width": 28})
  processor.save_pretrained(tmp_path / "videomae")
  (tmp_path / "clips").mkdir()
  lengths = [9, 4, 13, 3, 7]
  for i, n in enumerate(lengths):
    write_video(tmp_path / "clips" / f"c{i}.mp4", rng, n)
  (tmp_path / "clips" / "c5.mp4").write_bytes(b"not a video")
  (tmp_path / "clips" / "captions.jsonl").write_text("\n".join(
      json.dumps({"image": f"c{i}.mp4", "caption": "w1"}) for i in range(6)))
  with pytest.raises(ValueError, match=r"row id 3 .*c3.mp4.*unreadable video \(or fewer than "
                                       r"4 frames\)"):
    extract(str(tmp_path / "videomae"), str(tmp_path / "clips"), str(tmp_path / "s0"),
            Options(progress=False))
  store = extract(str(tmp_path / "videomae"), str(tmp_path / "clips"), str(tmp_path / "s"),
                  Options(batch_size=2, dtype="float32", on_bad_image="skip", progress=False))
  assert store.meta["modality"] == "video" and store.meta["skipped_ids"] == [3, 5]
  assert store.meta["pooling"] == "mean_over_tokens_per_block" and store.num_layers == 2
  sampler = transformers.VideoMAEVideoProcessor()
  for row, i in enumerate([0, 1, 2, 4]):
    with av.open(str(tmp_path / "clips" / f"c{i}.mp4")) as container:
      decoded = [f.to_image() for f in container.decode(video=0)]
    picked = sampler.sample_frames(VideoMetadata(total_num_frames=len(decoded)), num_frames=4)
    pixels = processor([decoded[j] for j in picked], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
      states = model(pixels, output_hidden_states=True).hidden_states
    ref = np.stack([h[0].mean(0).numpy() for h in states[1:]])
    assert_close_rel(store.gather(np.array([row]))[0], ref, where=f"clip {i}")
  with tarfile.open(tmp_path / "clips.tar", "w") as tar:  # the same clips as webdataset
    for i in (0, 1, 2, 4):
      tar.add(tmp_path / "clips" / f"c{i}.mp4", arcname=f"{i:04d}.mp4")
      caption = tmp_path / f"{i}.json"
      caption.write_text(json.dumps({"caption": "w1", "id": i}))
      tar.add(caption, arcname=f"{i:04d}.json")
  shards = extract(str(tmp_path / "videomae"), str(tmp_path / "clips.tar"), str(tmp_path / "w"),
                   Options(batch_size=2, dtype="float32", progress=False))
  np.testing.assert_array_equal(shards.ids(), store.ids())
  np.testing.assert_array_equal(shards.gather(np.arange(4)), store.gather(np.arange(4)))


def test_bad_images_fail_or_are_skipped_by_id(rng, tmp_path, dinov2_dir):
  path = str(dinov2_dir[0])
  write_image_folder(tmp_path / "imgs", rng, 9, bad={3})
  with pytest.raises(ValueError, match=r"row id 1003 .*img3.png.*unreadable image"):
    extract(path, str(tmp_path / "imgs"), str(tmp_path / "s1"), Options(progress=False))
  store = extract(path, str(tmp_path / "imgs"), str(tmp_path / "s2"),
                  Options(batch_size=4, on_bad_image="skip", progress=False))
  assert store.num_rows == 8 and store.meta["skipped_ids"] == [1003]
  assert 1003 not in store.ids().tolist()


class Crash(Exception):
  pass


class CrashingReader:
  def __init__(self, reader, after):
    self.reader, self.after = reader, after

  def __len__(self):
    return len(self.reader)

  def __getattr__(self, name):  # the reader's path and files: the same dataset
    return getattr(self.reader, name)

  def records(self, start=0):
    for n, record in enumerate(self.reader.records(start)):
      if start + n >= self.after:
        raise Crash()
      yield record


@pytest.mark.parametrize("batch", [4, 16])  # 16: a batch larger than a shard
def test_resume_after_a_crash_equals_an_uninterrupted_run(rng, tmp_path, llama_dir, batch):
  path = str(llama_dir[0])
  texts = captions(rng, 70)
  texts[5] = "   "  # skipped: empty
  (tmp_path / "d").mkdir()
  (tmp_path / "d" / "captions.csv").write_text(
      "caption\n" + "\n".join(f'"{t}"' for t in texts))
  reader = datasets.open_dataset(str(tmp_path / "d"))
  opts = Options(batch_size=batch, dtype="float32", bucket_window=2, on_empty_caption="skip",
                 chunk_rows=8, shard_rows=8, progress=False)
  clean = extract(path, reader, str(tmp_path / "clean"), opts)
  with pytest.raises(Crash):
    extract(path, CrashingReader(reader, 50), str(tmp_path / "resumed"), opts)
  partial = FeatureStore.open(str(tmp_path / "resumed"), allow_partial=True)
  assert partial.meta["note"] is None or partial.meta["note"]["consumed"] < 50
  resumed = extract(path, reader, str(tmp_path / "resumed"),
                    Options(**{**opts.__dict__, "resume": True}))
  assert resumed.num_rows == clean.num_rows == 69
  assert resumed.meta["skipped_ids"] == clean.meta["skipped_ids"] == [5]
  np.testing.assert_array_equal(resumed.ids(), clean.ids())
  np.testing.assert_array_equal(resumed.gather(np.arange(69)), clean.gather(np.arange(69)))
  np.testing.assert_array_equal(resumed.column("loss"), clean.column("loss"))


def text_folder(rng, root, n):
  root.mkdir()
  (root / "captions.jsonl").write_text("\n".join(json.dumps({"caption": t})
                                                 for t in captions(rng, n)))
  return str(root)


def test_an_existing_store_is_never_replaced_by_accident(rng, tmp_path, llama_dir):
  """Without resume or overwrite, an existing store is an error before any model loads,
  and it is left as it was."""
  data, out = text_folder(rng, tmp_path / "d", 30), str(tmp_path / "s")
  opts = Options(batch_size=8, dtype="float32", progress=False)
  first = extract(str(llama_dir[0]), data, out, opts)
  rows = first.gather(np.arange(30))
  (tmp_path / "not_a_model").mkdir()  # would fail to load: the store check comes first
  with pytest.raises(ValueError, match="a feature store exists at .*resume.*overwrite"):
    extract(str(tmp_path / "not_a_model"), data, out, opts)
  np.testing.assert_array_equal(FeatureStore.open(out).gather(np.arange(30)), rows)
  again = extract(str(llama_dir[0]), data, out, Options(**{**opts.__dict__, "overwrite": True}))
  np.testing.assert_array_equal(again.gather(np.arange(30)), rows)


def test_resume_with_another_model_or_options_is_refused(rng, tmp_path, llama_dir):
  import shutil
  data, out = text_folder(rng, tmp_path / "d", 40), str(tmp_path / "s")
  opts = Options(batch_size=4, dtype="float32", bucket_window=1, chunk_rows=8, shard_rows=8,
                 progress=False)
  reader = datasets.open_dataset(data)
  with pytest.raises(Crash):
    extract(str(llama_dir[0]), CrashingReader(reader, 30), out, opts)
  other = tmp_path / "other_llama"
  shutil.copytree(llama_dir[0], other)
  config = json.loads((other / "config.json").read_text())
  (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
  resume = Options(**{**opts.__dict__, "resume": True})
  with pytest.raises(ValueError, match=r"another run.*model: store has"):
    extract(str(other), data, out, resume)
  with pytest.raises(ValueError, match=r"another run.*options: store has .*'max_length': 7"):
    extract(str(llama_dir[0]), data, out, Options(**{**resume.__dict__, "max_length": 7,
                                                     "on_long_text": "truncate"}))
  store = extract(str(llama_dir[0]), data, out, resume)  # the same run resumes
  assert store.num_rows == 40


def test_readers_agree_on_records(rng, tmp_path):
  """The same records through an image folder, parquet (HF image struct) and webdataset."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  images = [png(rng, 20, 24) for _ in range(7)]
  texts = captions(rng, 7)
  pq.write_table(pa.table({"image": [{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(images)],
                           "caption": texts}), tmp_path / "a.parquet", row_group_size=3)
  with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
    for i, (b, t) in enumerate(zip(images, texts)):
      for ext, payload in ((".png", b), (".txt", t.encode())):
        info = tarfile.TarInfo(f"{i:05d}{ext}")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
  for reader in (datasets.Parquet(str(tmp_path / "a.parquet")),
                 datasets.WebDataset(str(tmp_path / "shard-0.tar"))):
    records = list(reader.records())
    assert len(reader) == 7
    assert [r.row_id for r in records] == list(range(7))
    assert [r.media for r in records] == images and [r.caption for r in records] == texts
    assert [r.row_id for r in reader.records(4)] == [4, 5, 6]
  with pytest.raises(ValueError, match="no caption column 'text'"):
    datasets.Parquet(str(tmp_path / "a.parquet"), caption_column="text")


def test_image_spec_from_timm_config(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_base_patch14_dinov2",
      "pretrained_cfg": {"input_size": [3, 518, 518], "crop_pct": 1.0, "interpolation": "bicubic",
                         "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}))
  spec = ImageSpec.from_checkpoint(str(tmp_path))
  assert spec.crop == (518, 518) and spec.resize == 518
  x = spec(Image.new("RGB", (700, 600), (255, 0, 0)))
  assert x.shape == (3, 518, 518)
  np.testing.assert_allclose(x[:, 0, 0], (np.array([1, 0, 0]) - spec.mean) / spec.std, rtol=1e-6)


def test_extract_command_fills_a_store_that_scaling_reads(rng, tmp_path, llama_dir, dinov2_dir):
  """experiments.extract on both modalities of one image folder, then experiments.scaling
  on the two stores (same ids, same order)."""
  import subprocess
  import sys
  write_image_folder(tmp_path / "imgs", rng, 40)
  out = {}
  for name, model in (("text", llama_dir[0]), ("vision", dinov2_dir[0])):
    out[name] = str(tmp_path / f"{name}.store")
    log = tmp_path / f"{name}.log"
    with open(log, "w") as f:
      code = subprocess.run([sys.executable, "-m", "experiments.extract", f"--model={model}",
                             f"--data={tmp_path / 'imgs'}", f"--out={out[name]}",
                             "--batch_size=8", "--dtype=float32", "--noprogress",
                             *(["--group_column=src"] if name == "vision" else [])],
                            stdout=f, stderr=subprocess.STDOUT).returncode
    assert code == 0, log.read_text()[-3000:]
    assert "40 rows" in log.read_text()
  from plato_jax.store import FeatureStore
  np.testing.assert_array_equal(FeatureStore.open(out["vision"]).column("group"),
                                np.arange(40) // 2)
  assert "group" not in FeatureStore.open(out["text"]).meta["columns"]
  log = tmp_path / "scaling.log"
  with open(log, "w") as f:
    code = subprocess.run([sys.executable, "-m", "experiments.scaling",
                           f"--features_a={out['vision']}", f"--features_b={out['text']}",
                           "--queries=8", "--sizes=16,40", "--k=1,5", f"--out={tmp_path / 'res'}",
                           "--noprogress"], stdout=f, stderr=subprocess.STDOUT).returncode
  assert code == 0, log.read_text()[-3000:]
  result = json.loads((tmp_path / "res" / "scaling" / "scaling.json").read_text())
  assert {16, 40} <= {row["size"] for row in result["rows"]}


def test_readers_carry_groups_and_extract_stores_them(rng, tmp_path, llama_dir):
  """A group field (each caption's image, say) through the three readers, then into the
  store's int64 'group' column — rows skipped by the extractor leave theirs out."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  texts = captions(rng, 9)
  groups = (rng.integers(0, 3, 9) + 2**40).tolist()  # past float32's exact integers
  pq.write_table(pa.table({"caption": texts, "src": groups}), tmp_path / "a.parquet",
                 row_group_size=4)
  with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
    for i, (t, g) in enumerate(zip(texts, groups)):
      payload = json.dumps({"caption": t, "src": g}).encode()
      info = tarfile.TarInfo(f"{i:05d}.json")
      info.size = len(payload)
      tar.addfile(info, io.BytesIO(payload))
  folder = tmp_path / "d"
  folder.mkdir()
  lines = [{"caption": t, "src": g} for t, g in zip(texts, groups)]
  lines[4]["caption"] = ""  # skipped by the extractor: its group must not land on a row
  (folder / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
  for reader in (datasets.open_dataset(str(tmp_path / "a.parquet"), image=None, group="src"),
                 datasets.open_dataset(str(tmp_path / "shard-0.tar"), group="src"),
                 datasets.open_dataset(str(folder), group="src")):
    assert [r.group for r in reader.records()] == groups
  assert [r.group for r in datasets.open_dataset(str(folder)).records()] == [None] * 9
  path, _, _ = llama_dir
  store = extract(str(path), datasets.open_dataset(str(folder), group="src"),
                  str(tmp_path / "s"), Options(batch_size=4, dtype="float32",
                                               on_empty_caption="skip", progress=False))
  assert store.column("group").dtype == np.int64
  np.testing.assert_array_equal(store.ids(), [i for i in range(9) if i != 4])
  np.testing.assert_array_equal(store.column("group"), [g for i, g in enumerate(groups) if i != 4])
  # a record without its group, or with a non-integer one, is an error naming it
  lines[2].pop("src")
  (folder / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
  with pytest.raises(ValueError, match=r"captions.jsonl:3: no group \('src' field\)"):
    list(datasets.open_dataset(str(folder), group="src").records())
  lines[2]["src"] = "left"
  (folder / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
  with pytest.raises(ValueError, match=r"captions.jsonl:3: group \('src'\) 'left' is not an "
                                       r"integer"):
    list(datasets.open_dataset(str(folder), group="src").records())
  with pytest.raises(ValueError, match=r"no group column 'source'"):
    datasets.open_dataset(str(tmp_path / "a.parquet"), image=None, group="source")
