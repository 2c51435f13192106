"""Shard formats: webdataset-style `.tar` and TFRecord files of image-caption examples.

A tar shard holds, per example, `KEY.jpg|png|webp` and `KEY.json` (`{"captions": {lang:
[...]}, "long_captions": {lang: [...]}, "label": int, "regions": [{"box": [x0, y0, x1, y1],
"captions": {lang: [...]}}]}`, every field optional; regions: data/regions.py) or `KEY.txt`
(one caption, in `config.data.text_language`) -- the layout img2dataset writes. A TFRecord
shard holds `tf.train.Example`s with bytes features `key`, `image`, `image_ext` and `meta`
(the same JSON).

Readers are random access: `index_*` reads only headers (tar) or record lengths (TFRecord)
and returns where each example lives, so a deterministic permutation can visit examples in
any order and a resumed run can start anywhere without reading what came before. Paths may
be local or `gs://` (tf.io.gfile).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, BinaryIO

import tensorflow as tf

from big_clip import fileio
from big_clip.data import regions as regions_lib

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTS = ("json", "txt")


class BadSample(Exception):
  """An example that cannot be used; `reason` is the counter it is skipped under."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class RawExample:
  """Undecoded example: image bytes and caption lists per language."""
  key: str
  image: bytes
  image_ext: str
  captions: Mapping[str, Sequence[str]]
  long_captions: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
  label: int | None = None
  regions: Sequence[tuple] = ()  # (box, {lang: captions}) per region (data/regions.py)

  def meta_json(self) -> bytes:
    meta: dict[str, Any] = {"captions": {k: list(v) for k, v in self.captions.items()}}
    if self.long_captions:
      meta["long_captions"] = {k: list(v) for k, v in self.long_captions.items()}
    if self.label is not None:
      meta["label"] = self.label
    if self.regions:
      meta["regions"] = regions_lib.to_json(self.regions)
    return json.dumps(meta, ensure_ascii=False).encode("utf-8")


def parse_meta(data: bytes, ext: str, key: str, text_language: str
               ) -> tuple[dict[str, list[str]], dict[str, list[str]], int | None, list]:
  """(captions, long_captions, label, regions) of a `.json` / `.txt` caption file."""
  if ext == "txt":
    text = data.decode("utf-8", errors="replace").strip()
    return ({text_language: [text]} if text else {}), {}, None, []
  try:
    meta = json.loads(data.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise BadSample("bad_caption_json", f"{key}: {e}") from e
  if not isinstance(meta, dict):
    raise BadSample("bad_caption_json", f"{key}: not a JSON object")

  def lang_lists(field: str) -> dict[str, list[str]]:
    value = meta.get(field) or {}
    if isinstance(value, str):  # img2dataset's {"caption": "..."} convenience
      return {text_language: [value]}
    if not isinstance(value, dict):
      raise BadSample("bad_caption_json", f"{key}: '{field}' must map language -> [str]")
    return {lang: [c for c in ([caps] if isinstance(caps, str) else caps)
                   if isinstance(c, str)] for lang, caps in value.items()}

  captions = lang_lists("captions")
  if not captions and isinstance(meta.get("caption"), str):
    captions = {text_language: [meta["caption"]]}
  label = meta.get("label")
  try:
    regions = regions_lib.parse(meta.get("regions"), key)
  except ValueError as e:
    raise BadSample("bad_regions", str(e)) from e
  return (captions, lang_lists("long_captions"), label if isinstance(label, int) else None,
          regions)


def _open(path: str, mode: str = "rb") -> BinaryIO:
  return fileio.open_file(path, mode)


def _size(path: str) -> int:
  return fileio.size(path)


# ---------------------------------------------------------------------------------------
# Writing.
# ---------------------------------------------------------------------------------------
def write_shards(examples: Iterable[RawExample], out_prefix: str, fmt: str,
                 per_shard: int) -> list[str]:
  """Writes `examples` into `{out_prefix}-00000.{tar|tfrecord}`, ... `per_shard` each."""
  if fmt not in ("tar", "tfrecord"):
    raise ValueError(f"Unknown shard format {fmt!r}; allowed: tar, tfrecord.")
  if per_shard < 1:
    raise ValueError(f"per_shard={per_shard} must be >= 1.")
  folder = os.path.dirname(out_prefix)
  if folder:
    fileio.makedirs(folder)
  paths: list[str] = []
  writer = None
  for n, ex in enumerate(examples):
    if n % per_shard == 0:
      if writer is not None:
        writer.close()
      paths.append(f"{out_prefix}-{len(paths):05d}.{fmt}")
      writer = _TarWriter(paths[-1]) if fmt == "tar" else tf.io.TFRecordWriter(paths[-1])
    if fmt == "tar":
      writer.add(ex)
    else:
      writer.write(_to_tf_example(ex).SerializeToString())
  if writer is not None:
    writer.close()
  return paths


class _TarWriter:

  def __init__(self, path: str):
    self._file = _open(path, "wb")
    # Stream mode ("w|") never asks the file for its position, which not every filesystem
    # tells (TensorFlow's ram://); the bytes are the same as mode "w".
    self._tar = tarfile.open(fileobj=self._file, mode="w|", format=tarfile.USTAR_FORMAT)

  def add(self, ex: RawExample) -> None:
    for name, data in ((f"{ex.key}.{ex.image_ext}", ex.image), (f"{ex.key}.json",
                                                                 ex.meta_json())):
      info = tarfile.TarInfo(name)
      info.size, info.mtime, info.mode = len(data), 0, 0o644  # reproducible bytes
      self._tar.addfile(info, _BytesReader(data))

  def close(self) -> None:
    self._tar.close()
    self._file.close()


class _BytesReader:

  def __init__(self, data: bytes):
    self._data, self._pos = data, 0

  def read(self, n: int = -1) -> bytes:
    end = len(self._data) if n < 0 else self._pos + n
    out = self._data[self._pos:end]
    self._pos += len(out)
    return out


def _to_tf_example(ex: RawExample) -> tf.train.Example:
  def feature(data: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[data]))

  return tf.train.Example(features=tf.train.Features(feature={
      "key": feature(ex.key.encode()), "image": feature(ex.image),
      "image_ext": feature(ex.image_ext.encode()), "meta": feature(ex.meta_json())}))


# ---------------------------------------------------------------------------------------
# Random-access reading.
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Entry:
  """Where one example lives in its shard: (offset, size) spans and file extensions."""
  key: str
  image: tuple[int, int] | None
  image_ext: str
  meta: tuple[int, int] | None
  meta_ext: str


def index_shard(path: str) -> tuple[list[Entry], dict[str, int]]:
  """(entries, skipped counts) of a .tar or .tfrecord shard; reads headers only."""
  if path.endswith(".tar"):
    return _index_tar(path)
  if path.endswith((".tfrecord", ".tfrec")) or ".tfrecord-" in path:
    return _index_tfrecord(path)
  raise ValueError(f"Shard {path!r}: unknown format; shards must end in .tar or .tfrecord.")


def _index_tar(path: str) -> tuple[list[Entry], dict[str, int]]:
  size = _size(path)
  spans: dict[str, dict[str, tuple[int, int]]] = {}
  order: list[str] = []
  skipped: dict[str, int] = {}
  with _open(path) as f:
    try:
      with tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
          if not member.isfile():
            continue
          if member.offset_data + member.size > size:  # cut off mid-file
            skipped["truncated_shard"] = skipped.get("truncated_shard", 0) + 1
            break
          base = os.path.basename(member.name)
          key, _, ext = base.partition(".")
          key = os.path.join(os.path.dirname(member.name), key)
          if key not in spans:
            spans[key] = {}
            order.append(key)
          spans[key][ext.lower()] = (member.offset_data, member.size)
    except tarfile.TarError:  # a header cut off or garbled: keep what came before
      skipped["truncated_shard"] = skipped.get("truncated_shard", 0) + 1
  entries = []
  for key in order:
    parts = spans[key]
    image_ext = next((e for e in IMAGE_EXTS if e in parts), "")
    meta_ext = next((e for e in CAPTION_EXTS if e in parts), "")
    entries.append(Entry(key, parts.get(image_ext), image_ext, parts.get(meta_ext), meta_ext))
  return entries, skipped


def _index_tfrecord(path: str) -> tuple[list[Entry], dict[str, int]]:
  """Record i is `uint64 length, uint32 crc, data[length], uint32 crc` (TFRecord format)."""
  size = _size(path)
  entries, skipped, offset = [], {}, 0
  with _open(path) as f:
    while offset < size:
      f.seek(offset)
      header = f.read(8)
      length = struct.unpack("<Q", header)[0] if len(header) == 8 else None
      if length is None or offset + 16 + length > size:
        skipped["truncated_shard"] = 1
        break
      entries.append(Entry(f"{os.path.basename(path)}#{len(entries)}", (offset + 12, length),
                           "tfrecord", None, ""))
      offset += 16 + length
  return entries, skipped


def _read_span(f: BinaryIO, span: tuple[int, int]) -> bytes:
  f.seek(span[0])
  return f.read(span[1])


def read_entry(path: str, entry: Entry, text_language: str) -> RawExample:
  """The example at `entry` of shard `path`; raises BadSample for missing parts."""
  with _open(path) as f:
    if entry.image_ext == "tfrecord":
      return _from_tf_example(_read_span(f, entry.image), entry.key, text_language)
    if entry.image is None:
      raise BadSample("missing_image", f"{path}: {entry.key} has no .jpg/.png/.webp")
    if entry.meta is None:
      raise BadSample("missing_caption", f"{path}: {entry.key} has no .json/.txt")
    image, meta = _read_span(f, entry.image), _read_span(f, entry.meta)
  captions, long_captions, label, regions = parse_meta(meta, entry.meta_ext, entry.key,
                                                       text_language)
  return RawExample(entry.key, image, entry.image_ext, captions, long_captions, label, regions)


def _from_tf_example(record: bytes, where: str, text_language: str) -> RawExample:
  try:
    feats = tf.train.Example.FromString(record).features.feature
  except Exception as e:  # protobuf's DecodeError
    raise BadSample("bad_record", f"{where}: {e}") from e
  get = lambda name: feats[name].bytes_list.value[0] if feats[name].bytes_list.value else b""
  key = get("key").decode() or where
  captions, long_captions, label, regions = parse_meta(get("meta"), "json", key,
                                                       text_language)
  return RawExample(key, get("image"), get("image_ext").decode() or "jpg", captions,
                    long_captions, label, regions)


def read_all(path: str, text_language: str = "en") -> Iterator[RawExample]:
  """Every readable example of a shard in file order (tests, inspection)."""
  entries, _ = index_shard(path)
  for entry in entries:
    yield read_entry(path, entry, text_language)
