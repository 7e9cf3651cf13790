"""The dataset readers (`plato_jax.data`): media folders with captions, Parquet, WebDataset;
and the decoders of their media (images, videos, audio)."""
from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os
import tarfile
from typing import Iterator



@dataclasses.dataclass(frozen=True)
class Record:
  row_id: int
  media: bytes | None  # an image, a video or an audio clip, as stored (decoded by extraction)
  caption: str | None
  source: str = ""   # where the record came from (file, line), for error messages
  group: int | None = None  # the item's source (e.g. the image of one of its captions),
                            # when the reader is given a group field


def _files(path: str, suffixes: tuple[str, ...]) -> list[str]:
  if os.path.isdir(path):
    found = sorted(p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                   if p.endswith(suffixes))
  else:
    found = sorted(glob.glob(path)) if any(c in path for c in "*?[") else [path]
  if not found:
    raise FileNotFoundError(f"no {'/'.join(suffixes)} files at {path}")
  for f in found:
    if not os.path.isfile(f):
      raise FileNotFoundError(f"{f}: not a file")
  return found


def _row_id(value, where: str, what: str = "id") -> int:
  try:
    row_id = int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{where}: {what} {value!r} is not an integer") from None
  if not -2**63 <= row_id < 2**63:
    raise ValueError(f"{where}: {what} {row_id} does not fit int64")
  return row_id


def _group(value, field: str | None, where: str) -> int | None:
  """A record's group: None when the reader has no group field; an error naming the
  record when the field is missing or not an integer."""
  if field is None:
    return None
  if value in (None, ""):
    raise ValueError(f"{where}: no group ({field!r} field): every record needs one")
  return _row_id(value, where, f"group ({field!r})")


class ImageFolder:
  """Media files (images, videos or audio clips) under `root` listed by a captions file
  (jsonl: one object per line; csv with a header) with fields `image` (a path relative to
  root; `image_field` names another, e.g. "audio"), `caption`, and optionally `id` and a
  group field (`group_field`)."""

  def __init__(self, root: str, captions: str = "captions.jsonl", *, image_field: str = "image",
               caption_field: str = "caption", id_field: str = "id",
               group_field: str | None = None):
    self.root = root
    self.path = captions if os.path.isabs(captions) else os.path.join(root, captions)
    if not os.path.isfile(self.path):
      raise FileNotFoundError(f"captions file {self.path} not found")
    self.fields = (image_field, caption_field, id_field)
    self.group_field = group_field
    self._rows = list(self._read())

  def _read(self):
    image_field, caption_field, id_field = self.fields
    if self.path.endswith(".csv"):
      with open(self.path, newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
          yield line, row
    else:
      with open(self.path) as f:
        for line, text in enumerate(f, start=1):
          if text.strip():
            try:
              yield line, json.loads(text)
            except json.JSONDecodeError as e:
              raise ValueError(f"{self.path}:{line}: not valid JSON ({e})") from None

  def __len__(self) -> int:
    return len(self._rows)

  def records(self, start: int = 0) -> Iterator[Record]:
    image_field, caption_field, id_field = self.fields
    for position, (line, row) in enumerate(self._rows[start:], start=start):
      where = f"{self.path}:{line}"
      if not isinstance(row, dict) or (image_field not in row and caption_field not in row):
        raise ValueError(f"{where}: needs a {image_field!r} or {caption_field!r} field")
      media = None
      if row.get(image_field):
        path = os.path.join(self.root, row[image_field])
        try:
          with open(path, "rb") as f:
            media = f.read()
        except OSError:
          media = b""  # unreadable: the extractor skips or fails, naming the row
        where = f"{where} ({path})"
      row_id = _row_id(row[id_field], where) if row.get(id_field) not in (None, "") else position
      yield Record(row_id, media, row.get(caption_field), where,
                   _group(row.get(self.group_field), self.group_field, where))


class Parquet:
  """Parquet files in the WIT / HF-datasets layout: an image (or video, audio) column
  holding bytes (or a struct {bytes, path}) and caption column(s); row ids from `id_column`
  or the position; a group from `group_column` when given."""

  def __init__(self, path: str, *, image_column: str | None = "image",
               caption_column: str | None = "caption", id_column: str | None = "id",
               group_column: str | None = None):
    import pyarrow.parquet as pq
    self.files = _files(path, (".parquet",))
    self.columns = (image_column, caption_column, id_column)
    self._meta = [pq.ParquetFile(f) for f in self.files]
    names = set(self._meta[0].schema_arrow.names)
    for what, col in (("image", image_column), ("caption", caption_column)):
      if col is not None and col not in names:
        raise ValueError(f"{self.files[0]}: no {what} column {col!r}; columns are "
                         f"{sorted(names)}")
    if image_column not in names and caption_column not in names:
      raise ValueError(f"{self.files[0]}: neither image nor caption column")
    self.group_field = group_column
    for path, meta in zip(self.files, self._meta):
      if group_column is not None and group_column not in meta.schema_arrow.names:
        raise ValueError(f"{path}: no group column {group_column!r}; columns are "
                         f"{sorted(meta.schema_arrow.names)}")

  def __len__(self) -> int:
    return sum(m.metadata.num_rows for m in self._meta)

  def records(self, start: int = 0) -> Iterator[Record]:
    image_column, caption_column, id_column = self.columns
    position = 0
    for path, meta in zip(self.files, self._meta):
      names = set(meta.schema_arrow.names)
      wanted = [c for c in (image_column, caption_column, id_column, self.group_field)
                if c in names]
      for group in range(meta.num_row_groups):
        n = meta.metadata.row_group(group).num_rows
        if position + n <= start:
          position += n
          continue
        table = meta.read_row_group(group, columns=wanted).to_pydict()
        for i in range(n):
          if position >= start:
            where = f"{path} row {position}"
            media = table[image_column][i] if image_column in table else None
            if isinstance(media, dict):
              media = media.get("bytes")
            caption = table[caption_column][i] if caption_column in table else None
            ident = table[id_column][i] if id_column in table else None
            row_id = _row_id(ident, where) if ident is not None else position
            group = table[self.group_field][i] if self.group_field in table else None
            yield Record(row_id, media, caption, where,
                         _group(group, self.group_field, where))
          position += 1


class WebDataset:
  """webdataset tar shards: files grouped by key (the name before the first dot); the media
  from .jpg/.jpeg/.png/.webp (an image), .mp4/.webm/.mkv/.avi/.mov (a video) or
  .flac/.wav/.mp3/.ogg/.opus (audio), the caption from .txt or .json (`caption` field), an id from
  .id or the json's `id`, else the sample's position over the sorted shards; a group from
  the json's `group_field` when given."""

  IMAGE = (".jpg", ".jpeg", ".png", ".webp")
  VIDEO = (".mp4", ".webm", ".mkv", ".avi", ".mov")
  AUDIO = (".flac", ".wav", ".mp3", ".ogg", ".opus")

  def __init__(self, path: str, *, caption_field: str = "caption", id_field: str = "id",
               group_field: str | None = None):
    self.files = _files(path, (".tar",))
    self.caption_field, self.id_field = caption_field, id_field
    self.group_field = group_field
    self.media_extensions = self.IMAGE + self.VIDEO + self.AUDIO

  def prefer(self, kind: str) -> None:
    """Which file is a sample's media when it holds several kinds (a clip with a .jpg
    thumbnail): `kind`'s ("image", "video" or "audio") before the others."""
    first = {"image": self.IMAGE, "video": self.VIDEO, "audio": self.AUDIO}[kind]
    self.media_extensions = first + tuple(e for e in self.media_extensions if e not in first)

  @staticmethod
  def _key_ext(member) -> tuple[str, str]:
    base = os.path.basename(member.name)
    dot = base.find(".")
    key = os.path.join(os.path.dirname(member.name), base[:dot] if dot > 0 else base)
    return key, base[dot:].lower() if dot > 0 else ""

  def _samples(self) -> Iterator[tuple[str, dict]]:
    for path in self.files:
      with tarfile.open(path) as tar:
        key, parts = None, {}
        for member in tar:
          if not member.isfile():
            continue
          k, ext = self._key_ext(member)
          if k != key and parts:
            yield f"{path}:{key}", parts
            parts = {}
          key = k
          parts[ext] = tar.extractfile(member).read()
        if parts:
          yield f"{path}:{key}", parts

  def __len__(self) -> int:
    """Samples counted from the tar headers alone (no payload is read)."""
    n = 0
    for path in self.files:
      with tarfile.open(path) as tar:
        keys = [self._key_ext(m)[0] for m in tar if m.isfile()]
      n += sum(1 for i, k in enumerate(keys) if i == 0 or k != keys[i - 1])
    return n

  def records(self, start: int = 0) -> Iterator[Record]:
    for position, (where, parts) in enumerate(self._samples()):
      if position < start:
        continue
      media = next((parts[e] for e in self.media_extensions if e in parts), None)
      meta = {}
      if ".json" in parts:
        try:
          meta = json.loads(parts[".json"])
        except json.JSONDecodeError as e:
          raise ValueError(f"{where}.json: not valid JSON ({e})") from None
      caption = parts[".txt"].decode("utf-8") if ".txt" in parts else \
          meta.get(self.caption_field)
      ident = parts[".id"].decode().strip() if ".id" in parts else meta.get(self.id_field)
      row_id = _row_id(ident, where) if ident not in (None, "") else position
      yield Record(row_id, media, caption, where,
                   _group(meta.get(self.group_field), self.group_field, where))


def open_dataset(path: str, *, image: str = "image", caption: str = "caption", id: str = "id",
                 group: str | None = None):
  """The reader for `path`: a directory with captions.jsonl/csv (image folder), parquet
  file(s) (a file, a directory or a glob) or tar shard(s); `image`, `caption`, `id` and
  `group` name the fields / columns (webdataset: the json's caption, id and group fields)."""
  folder = dict(image_field=image, caption_field=caption, id_field=id, group_field=group)
  table = dict(image_column=image, caption_column=caption, id_column=id, group_column=group)
  tars = dict(caption_field=caption, id_field=id, group_field=group)

  def has(suffix):
    return bool(glob.glob(os.path.join(path, "**", f"*{suffix}"), recursive=True))

  if os.path.isdir(path):
    for name in ("captions.jsonl", "captions.csv"):
      if os.path.isfile(os.path.join(path, name)):
        return ImageFolder(path, name, **folder)
    if has(".parquet"):
      return Parquet(path, **table)
    if has(".tar"):
      return WebDataset(path, **tars)
    raise ValueError(f"{path}: no captions.jsonl/csv, parquet or tar files")
  if path.endswith((".jsonl", ".csv")):
    return ImageFolder(os.path.dirname(path) or ".", os.path.basename(path), **folder)
  if path.endswith(".parquet"):
    return Parquet(path, **table)
  if path.endswith(".tar"):
    return WebDataset(path, **tars)
  raise ValueError(f"{path}: not a dataset this reader knows (an image folder with "
                   f"captions.jsonl/csv, .parquet files, .tar shards; globs must end in "
                   f".parquet or .tar)")
