"""TensorStore feature stores: round trips, resume, zarr-python interop, errors."""
import json

import ml_dtypes
import numpy as np
import pytest

from plato_jax import shardfile
from plato_jax.store import FeatureStore, StoreWriter

# This machine reads local stores' shard files directly (a CPU with a CRC-32C instruction
# and the crc32c package); elsewhere TensorStore reads them, and the tests say which ran.
DIRECT = shardfile._CRC32C is not None


def _write(path, x, ids, dtype, batch=333, **kw):
  kw = {"chunk_rows": 256, "shard_rows": 1024, **kw}
  w = StoreWriter.create(str(path), num_rows=len(x), num_layers=x.shape[1], dim=x.shape[2],
                         dtype=dtype, model="m", dataset="d", pooling="mean", **kw)
  for s in range(0, len(x), batch):
    w.append(x[s:s + batch], ids[s:s + batch])
  return w.close()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_round_trip_is_bit_exact(tmp_path, rng, dtype):
  x = rng.standard_normal((2500, 3, 20)).astype(np.float32)
  ids = rng.permutation(10**6)[:2500]
  store = _write(tmp_path / "s", x, ids, dtype)
  want = x.astype({"bfloat16": ml_dtypes.bfloat16}.get(dtype, dtype))
  assert store.dtype == want.dtype and store.meta["complete"]
  assert (store._direct is not None) == DIRECT
  np.testing.assert_array_equal(store.ids(), ids)
  for layer in range(3):
    got = store.read_layer(layer)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got.view(np.uint8), want[:, layer].view(np.uint8))
    tiles = np.concatenate([store.layer(layer).read(s, min(s + 300, 2500)) for s in range(0, 2500, 300)])
    np.testing.assert_array_equal(tiles.view(np.uint8), want[:, layer].view(np.uint8))
  rows = [2499, 0, 17, 1024]
  np.testing.assert_array_equal(store.gather(rows).view(np.uint8), want[rows].view(np.uint8))
  np.testing.assert_array_equal(store.gather(rows, layer=1).view(np.uint8), want[rows, 1].view(np.uint8))
  assert store.layer_index("2") == 2 and store.layer_index(-1) == 2


def test_kvstore_url_memory(rng):
  x = rng.standard_normal((300, 2, 8)).astype(np.float32)
  _write("memory://plato_test_store/", x, np.arange(300), "float32")
  np.testing.assert_array_equal(FeatureStore.open("memory://plato_test_store/").read_layer(0), x[:, 0])


def test_partial_store_is_never_complete_and_resumes(tmp_path, rng):
  x = rng.standard_normal((5000, 2, 16)).astype(np.float32)
  ids = np.arange(5000) * 3
  w = StoreWriter.create(str(tmp_path / "s"), num_rows=5000, num_layers=2, dim=16,
                         dtype="float32", chunk_rows=256, shard_rows=1024)
  for s in range(0, 2600, 200):
    w.append(x[s:s + 200], ids[s:s + 200])
  w.commit()
  del w  # crash: the buffered tail and the metadata's later updates are lost
  with pytest.raises(ValueError, match="incomplete"):
    FeatureStore.open(str(tmp_path / "s"))
  partial = FeatureStore.open(str(tmp_path / "s"), allow_partial=True)
  assert 0 < partial.num_rows < 2600 and partial.num_rows % 1024 == 0
  w = StoreWriter.resume(str(tmp_path / "s"))
  start = w.rows_written
  for s in range(start, 5000, 700):
    w.append(x[s:s + 700], ids[s:s + 700])
  store = w.close()
  np.testing.assert_array_equal(store.read_layer(1), x[:, 1])
  np.testing.assert_array_equal(store.ids(), ids)


def test_zarr_python_reads_the_arrays(tmp_path, rng):
  zarr = pytest.importorskip("zarr")
  x = rng.standard_normal((1500, 3, 12)).astype(np.float16)
  store = _write(tmp_path / "s", x, np.arange(1500) + 7, "float16")
  feats = zarr.open_array(str(tmp_path / "s" / "features"), mode="r")
  np.testing.assert_array_equal(feats[:], x)
  np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "s" / "ids"), mode="r")[:], store.ids())


def test_bad_inputs_name_the_problem(tmp_path, rng):
  x = rng.standard_normal((100, 2, 4)).astype(np.float32)
  w = StoreWriter.create(str(tmp_path / "s"), num_rows=100, num_layers=2, dim=4, dtype="float32")
  with pytest.raises(ValueError, match=r"do not match the store's \[B, 2, 4\]"):
    w.append(x[:, :, :3], np.arange(100))
  bad = x.copy()
  bad[[4, 9], 1, 2] = np.nan
  with pytest.raises(ValueError, match=r"NaN/Inf features at store rows \[4, 9\]"):
    w.append(bad, np.arange(100))
  with pytest.raises(ValueError, match="already exists"):
    StoreWriter.create(str(tmp_path / "s"), num_rows=100, num_layers=2, dim=4)
  with pytest.raises(ValueError, match="plato_store.json is missing"):
    FeatureStore.open(str(tmp_path / "nothing"))
  (tmp_path / "s" / "plato_store.json").write_text("{not json")
  with pytest.raises(ValueError, match="corrupt store metadata"):
    FeatureStore.open(str(tmp_path / "s"))
  store = _write(tmp_path / "t", x, np.arange(100), "float32")
  meta = json.loads((tmp_path / "t" / "plato_store.json").read_text())
  meta["dim"] = 5
  (tmp_path / "t" / "plato_store.json").write_text(json.dumps(meta))
  with pytest.raises(ValueError, match=r"metadata says \(100, 2, 5\)"):
    FeatureStore.open(str(tmp_path / "t"))
  with pytest.raises(ValueError, match="no layer named 'x'"):
    store.layer("x")


def test_columns_notes_and_a_short_close(rng, tmp_path):
  """Per-row columns travel with the rows; the note of the last durable append lands in the
  metadata; a producer that skipped rows closes a shorter, complete store."""
  path = str(tmp_path / "s")
  w = StoreWriter.create(path, num_rows=50, num_layers=2, dim=4, dtype="float32",
                         chunk_rows=8, shard_rows=16, columns=["loss"])
  x = rng.standard_normal((50, 2, 4)).astype(np.float32)
  loss = rng.standard_normal(50).astype(np.float32)
  with pytest.raises(ValueError, match=r"columns \[\] given, the store has \['loss'\]"):
    w.append(x[:5], np.arange(5))
  w.append(x[:20], np.arange(20), {"loss": loss[:20]}, note={"consumed": 21})
  w.commit()
  assert w.rows_written == 16  # one whole shard is durable, its note is not yet
  assert w.meta["note"] is None
  w.append(x[20:40], np.arange(20, 40), {"loss": loss[20:40]}, note={"consumed": 43})
  w.commit()
  assert w.rows_written == 32 and w.meta["note"] == {"consumed": 21}
  del w  # a crash: a writer whose object is gone leaves its lock to be taken over
  resumed = StoreWriter.resume(path)  # continues where the note was taken
  assert resumed.rows_written == 20 and resumed.meta["note"] == {"consumed": 21}
  resumed.append(x[20:45], np.arange(20, 45), {"loss": loss[20:45]}, note={"consumed": 99})
  assert resumed.close() is None  # short of 50 rows: not complete
  store = resumed.close(allow_fewer=True)
  assert store.num_rows == 45 and store.meta["complete"] and store.meta["note"] == {"consumed": 99}
  np.testing.assert_array_equal(store.read_layer(1), x[:45, 1])
  np.testing.assert_array_equal(store.column("loss"), loss[:45])
  np.testing.assert_array_equal(store.ids(), np.arange(45))


def test_one_writer_at_a_time(tmp_path, rng):
  """A second writer (in this process or another) is refused while the first is alive; a
  dead writer's lock is taken over; a finished writer leaves no lock."""
  import subprocess
  import sys

  from plato_jax.store import LOCK, StoreBusy
  path = str(tmp_path / "s")
  x = rng.standard_normal((64, 2, 4)).astype(np.float32)
  w = StoreWriter.create(path, num_rows=64, num_layers=2, dim=4, dtype="float32",
                         chunk_rows=16, shard_rows=16)
  w.append(x[:32], np.arange(32))
  with pytest.raises(StoreBusy, match=r"in use by pid \d+"):
    StoreWriter.resume(path)
  with pytest.raises(StoreBusy):
    StoreWriter.create(path, num_rows=64, num_layers=2, dim=4, overwrite=True)
  other = subprocess.run(
      [sys.executable, "-c", f"from plato_jax.store import StoreWriter\n"
       f"StoreWriter.resume({path!r})"], capture_output=True, text=True, timeout=120)
  assert other.returncode != 0 and "in use by pid" in other.stderr
  w.commit()
  del w  # a crashed writer of this process: its lock may be taken over
  w = StoreWriter.resume(path)
  w.append(x[w.rows_written:], np.arange(w.rows_written, 64))
  store = w.close()
  assert not (tmp_path / "s" / LOCK).exists()
  np.testing.assert_array_equal(store.read_layer(1), x[:, 1])
  # The lock of a process that died (kill -9) is taken over, with a warning.
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True).stdout.strip()
  w = StoreWriter.create(str(tmp_path / "t"), num_rows=8, num_layers=2, dim=4)
  w.release()
  (tmp_path / "t" / LOCK).write_text(json.dumps({"host": __import__("socket").gethostname(),
                                                 "pid": int(dead), "since": 0}))
  with pytest.warns(UserWarning, match="taking over the lock of a process that is gone"):
    StoreWriter.resume(str(tmp_path / "t")).release()


@pytest.mark.parametrize("damage", ["missing", "bit_flip"])
def test_a_damaged_shard_is_an_error_naming_its_file(tmp_path, rng, damage):
  """A deleted shard is not read as zero rows, a flipped bit not as data: each chunk
  carries a CRC-32C, and missing chunks are not filled."""
  x = rng.standard_normal((64, 2, 4)).astype(np.float32)
  _write(tmp_path / "s", x, np.arange(64), "float32", chunk_rows=8, shard_rows=16)
  shard = tmp_path / "s" / "features" / "c" / "1" / "0" / "0"  # rows 16-31 of layer 0
  if damage == "missing":
    shard.unlink()
  else:
    data = bytearray(shard.read_bytes())
    data[int(rng.integers(0, 8 * 4 * 4))] ^= 1 << int(rng.integers(8))  # in the first chunk
    shard.write_bytes(bytes(data))
  for direct in (True, False):  # read from the shard files here, or by TensorStore
    store = FeatureStore.open(str(tmp_path / "s"))
    assert (store._direct is not None) == DIRECT
    store._direct = store._direct if direct else None
    np.testing.assert_array_equal(store.read_layer(1), x[:, 1])  # other shards still read
    for read in (lambda: store.read_layer(0), lambda: store.layer(0).read(0, 64),
                 lambda: store.gather([17], layer=0)):
      with pytest.raises(ValueError, match=r"c/1/0/0.*(missing|Digest mismatch|rows 16..23 "
                                           r"fails its CRC-32C)"):
        read()


@pytest.mark.parametrize("swap", ["rows", "layers", "ids", "column", "copied_in"])
def test_a_shard_file_in_another_place_is_an_error_naming_it(tmp_path, rng, swap):
  """Swapped or copied shard files are whole and pass their checksums, but hold other rows
  than the writer put there: every read path refuses them, naming the file."""
  x = rng.standard_normal((64, 2, 4)).astype(np.float32)
  w = StoreWriter.create(str(tmp_path / "s"), num_rows=64, num_layers=2, dim=4,
                         dtype="float32", chunk_rows=8, shard_rows=16, columns=["loss"])
  w.append(x, np.arange(64) * 7, columns={"loss": rng.random(64)})
  store = w.close()
  root = tmp_path / "s"
  a, b = {"rows": ("features/c/1/0/0", "features/c/2/0/0"),
          "layers": ("features/c/1/0/0", "features/c/1/1/0"),
          "ids": ("ids/c/1", "ids/c/2"), "column": ("columns/loss/c/1", "columns/loss/c/2"),
          "copied_in": ("features/c/1/0/0", None)}[swap]
  if b is None:  # the same shard of another store of the same shape
    _write(tmp_path / "other", x + 1, np.arange(64), "float32", chunk_rows=8, shard_rows=16)
    (root / a).write_bytes((tmp_path / "other" / a).read_bytes())
  else:
    first, second = (root / a).read_bytes(), (root / b).read_bytes()
    (root / a).write_bytes(second)
    (root / b).write_bytes(first)
  store = FeatureStore.open(str(root))
  reads = {"rows": [lambda: store.read_layer(0), lambda: store.layer(0).read(16, 20),
                    lambda: store.gather([20]), lambda: store.layer(0).take([40])],
           "ids": [store.ids], "column": [lambda: store.column("loss")]}
  reads["layers"] = reads["copied_in"] = reads["rows"][:3]
  for read in reads[swap]:
    with pytest.raises(ValueError, match=r"c/[12][ /].*is not the one its writer wrote there"):
      read()
  if swap in ("rows", "copied_in"):
    np.testing.assert_array_equal(store.read_layer(1), x[:, 1])  # the rest still reads


def test_zero_rows_and_columns_read_back(tmp_path):
  """Chunks equal to the fill value are written like any other, so a missing chunk can be
  an error (TensorStore would leave zeros out)."""
  x = np.zeros((40, 2, 4), np.float32)
  x[30:] = 1
  w = StoreWriter.create(str(tmp_path / "s"), num_rows=40, num_layers=2, dim=4,
                         dtype="float32", chunk_rows=8, shard_rows=16, columns=["loss"])
  w.append(x, np.arange(40), columns={"loss": np.zeros(40)})
  store = w.close()
  np.testing.assert_array_equal(store.gather(np.arange(40)), x)
  np.testing.assert_array_equal(store.column("loss"), np.zeros(40, np.float32))


def test_a_copied_store_reads_and_an_older_store_warns(tmp_path, rng):
  import shutil
  x = rng.standard_normal((40, 2, 4)).astype(np.float32)
  _write(tmp_path / "s", x, np.arange(40), "float32", chunk_rows=8, shard_rows=16)
  shutil.copytree(tmp_path / "s", tmp_path / "moved")  # seals hold the contents, not places
  np.testing.assert_array_equal(FeatureStore.open(str(tmp_path / "moved")).gather(
      np.arange(40)), x)
  meta = json.loads((tmp_path / "moved" / "plato_store.json").read_text())
  del meta["sealed"]
  (tmp_path / "moved" / "plato_store.json").write_text(json.dumps(meta))
  with pytest.warns(UserWarning, match="written before shard seals"):
    old = FeatureStore.open(str(tmp_path / "moved"))
  np.testing.assert_array_equal(old.read_layer(1), x[:, 1])


def test_fingerprint_changes_when_the_store_is_rewritten(tmp_path, rng):
  """Resumed work is keyed on it (search's checkpoints, the experiments' resume folders):
  a store rewritten in place, even with the same shape, is another gallery."""
  x = rng.standard_normal((40, 2, 4)).astype(np.float32)
  first = _write(tmp_path / "s", x, np.arange(40), "float32", overwrite=True)
  again = _write(tmp_path / "s", x + 1, np.arange(40), "float32", overwrite=True)
  assert first.fingerprint() != again.fingerprint()
  assert again.fingerprint() == FeatureStore.open(str(tmp_path / "s")).fingerprint()
  assert again.layer(0).fingerprint() != again.layer(1).fingerprint()


def test_metadata_of_the_wrong_kind_and_bad_chunking_are_errors(tmp_path, rng):
  x = rng.standard_normal((20, 2, 4)).astype(np.float32)
  _write(tmp_path / "s", x, np.arange(20), "float32")
  path = tmp_path / "s" / "plato_store.json"
  meta = json.loads(path.read_text())
  for field, value in [("complete", "true"), ("version", "1"), ("num_rows", -3)]:
    path.write_text(json.dumps({**meta, field: value}))
    with pytest.raises(ValueError, match=f"corrupt store metadata .*{field}="):
      FeatureStore.open(str(tmp_path / "s"))
  for kw in [{"chunk_rows": 0}, {"shard_rows": -8}]:
    with pytest.raises(ValueError, match="must be a positive integer"):
      StoreWriter.create(str(tmp_path / "t"), num_rows=20, num_layers=2, dim=4, **kw)


def test_direct_reads_equal_tensorstore_reads(tmp_path, rng):
  """Rows read straight from the shard files equal TensorStore's read of the same array, for
  ranges across chunks and shards, partial chunks and the array's partial last chunk; so do
  gathers of rows in any order, repeated."""
  if not DIRECT:
    pytest.skip("no hardware CRC-32C here: TensorStore reads every store")
  for trial in range(3):
    rows, dim = int(rng.integers(50, 700)), int(rng.integers(1, 40))
    chunk = int(rng.choice([1, 2, 8, 16]))
    dtype = str(rng.choice(["bfloat16", "float16", "float32"]))
    x = rng.standard_normal((rows, 2, dim)).astype(np.float32)
    store = _write(tmp_path / f"s{trial}", x, rng.permutation(rows), dtype, chunk_rows=chunk,
                   shard_rows=chunk * int(rng.integers(1, 9)))
    assert store._direct is not None
    for start, stop in [(0, rows), (rows - 1, rows), (5, 5)] + [
        tuple(sorted(rng.integers(0, rows + 1, 2).tolist())) for _ in range(10)]:
      layer = int(rng.integers(2))
      got = store.read_layer(layer, start, stop)
      want = store._features[start:stop, layer].read().result()
      assert got.dtype == want.dtype and got.shape == want.shape
      np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
    by_tensorstore = FeatureStore.open(str(tmp_path / f"s{trial}"))
    by_tensorstore._direct = None
    for layer in (None, 0, 1):
      wanted = rng.integers(0, rows, int(rng.integers(1, 3 * rows)))  # repeats, any order
      got, want = store.gather(wanted, layer), by_tensorstore.gather(wanted, layer)
      assert got.dtype == want.dtype and got.shape == want.shape and got.flags.c_contiguous
      np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


def test_direct_reads_need_a_local_complete_store_in_the_writers_layout(tmp_path, rng):
  x = rng.standard_normal((40, 2, 4)).astype(np.float32)
  memory = _write("memory://direct/", x, np.arange(40), "float32")
  assert memory._direct is None
  w = StoreWriter.create(str(tmp_path / "p"), num_rows=40, num_layers=2, dim=4)
  w.append(x[:20], np.arange(20))
  w.commit()
  assert FeatureStore.open(str(tmp_path / "p"), allow_partial=True)._direct is None
  w.release()
  zarr_json = json.loads((tmp_path / "p" / "features" / "zarr.json").read_text())
  shard, chunk = zarr_json["chunk_grid"]["configuration"]["chunk_shape"], \
      zarr_json["codecs"][0]["configuration"]["chunk_shape"]
  assert shardfile.ChunkReader.for_array(zarr_json, shard, chunk) == DIRECT
  compressed = json.loads(json.dumps(zarr_json))
  compressed["codecs"][0]["configuration"]["codecs"].insert(1, {"name": "zstd"})
  unchecked = json.loads(json.dumps(zarr_json))
  unchecked["codecs"][0]["configuration"]["codecs"].pop()
  for other in (compressed, unchecked):
    assert not shardfile.ChunkReader.for_array(other, shard, chunk)
  assert not shardfile.ChunkReader.for_array(zarr_json, shard, [c * 2 for c in chunk])


@pytest.mark.parametrize("damage", ["data", "checksum", "index", "truncated", "absent",
                                    "missing"])
def test_a_direct_read_of_a_damaged_shard_names_its_file_and_rows(tmp_path, rng, damage):
  """The direct reader checks what TensorStore would: each chunk's and the index's CRC-32C,
  the index's entries, the file's length."""
  if not DIRECT:
    pytest.skip("no hardware CRC-32C here: TensorStore reads every store")
  x = rng.standard_normal((64, 1, 4)).astype(np.float32)
  _write(tmp_path / "s", x, np.arange(64), "float32", chunk_rows=8, shard_rows=32)
  path = tmp_path / "s" / "features" / "c" / "1" / "0" / "0"  # rows 32..63
  data = bytearray(path.read_bytes())
  entries = np.frombuffer(bytes(data[-(4 * 16 + 4):-4]), "<u8").reshape(4, 2)
  third = int(entries[2, 0])  # rows 48..55
  if damage == "data":
    data[third + int(rng.integers(8 * 16))] ^= 1 << int(rng.integers(8))
  elif damage == "checksum":
    data[third + 8 * 16 + int(rng.integers(4))] ^= 1 << int(rng.integers(8))
  elif damage == "index":
    data[-20] ^= 1
  elif damage == "truncated":
    data = data[:third + 20] + data[-(4 * 16 + 4):]  # the index kept, chunks 3 and 4 cut
  elif damage == "absent":
    data[-(4 * 16 + 4) + 32:-(4 * 16 + 4) + 48] = b"\xff" * 16
    data[-4:] = shardfile._CRC32C(bytes(data[-(4 * 16 + 4):-4])).to_bytes(4, "little")
  else:
    data = None
  if data is None:
    path.unlink()
  else:
    path.write_bytes(bytes(data))
  reader = shardfile.ChunkReader(chunks=4, chunk_rows=8, row_bytes=16)
  out = np.empty((32, 4), np.float32)
  if damage not in ("index", "missing"):
    reader.read_rows(str(path), 0, 16, out[:16], first_row=32)  # chunks before the damage
    np.testing.assert_array_equal(out[:16], x[32:48, 0])
  said = {"data": "the chunk of rows 48..55 fails its CRC-32C",
          "checksum": "the chunk of rows 48..55 fails its CRC-32C",
          "index": "its index fails its CRC-32C",
          "truncated": "it ends within the chunk of rows 48..55",
          "absent": "the chunk of rows 48..55 is missing",
          "missing": "is missing"}[damage]
  with pytest.raises(shardfile.ShardError, match=f"{path}.* {said}"):
    reader.read_rows(str(path), 3, 32, out[3:], first_row=32)


def test_int64_columns_hold_labels_and_ids_exactly(tmp_path, rng):
  """float32 holds integers exactly only up to 2^24: labels and source ids go in int64
  columns, and a float32 column refuses integers it would round."""
  x = rng.standard_normal((50, 1, 4)).astype(np.float32)
  big = 2**40 + rng.integers(0, 2**20, 50)  # source ids past float32's exact integers
  w = StoreWriter.create(str(tmp_path / "s"), num_rows=50, num_layers=1, dim=4,
                         dtype="float32", chunk_rows=8, shard_rows=16,
                         columns={"group": "int64", "loss": "float32"})
  w.append(x[:30], np.arange(30), columns={"group": big[:30], "loss": rng.random(30)})
  w.commit()
  w.release()
  w = StoreWriter.resume(str(tmp_path / "s"))  # the resumed writer keeps each column's dtype
  at = w.rows_written
  rest = dict(rows=x[at:], ids=np.arange(at, 50))
  with pytest.raises(ValueError, match=r"int64 column 'group' given non-integer values at "
                                       r"rows \[1\]"):
    w.append(**rest, columns={"group": [7.0, 7.5] + [1.0] * (48 - at),
                              "loss": np.zeros(50 - at)})
  with pytest.raises(ValueError, match=r"float32 column 'loss' cannot hold integers past "
                                       r"2\^24 exactly \(rows \[0\]"):
    w.append(**rest, columns={"group": big[at:], "loss": [2**24 + 1] + [0] * (49 - at)})
  w.append(**rest, columns={"group": np.full(50 - at, 3.0), "loss": np.zeros(50 - at)})
  store = w.close()
  group = store.column("group")
  assert group.dtype == np.int64 and store.column("loss").dtype == np.float32
  np.testing.assert_array_equal(group, np.r_[big[:at], np.full(50 - at, 3)])
  assert store.meta["column_dtypes"] == {"group": "int64", "loss": "float32"}
  with pytest.raises(ValueError, match=r"column dtypes must be one of"):
    StoreWriter.create(str(tmp_path / "t"), num_rows=5, num_layers=1, dim=4,
                       columns={"label": "int8"})
