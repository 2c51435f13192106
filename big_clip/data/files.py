"""Real sources -> host-local batches: tfds, tar/TFRecord shards, manifests.

Order. Each host owns a fixed list of examples: whole files (`shards:` with at least one file
per host) or every P-th example (fewer files than hosts, `manifest:`). Epoch `e` visits them
in `np.random.default_rng([seed, e]).permutation(n)` order (tfds: its seeded file shuffle +
a seeded shuffle buffer). The iterator's state is (epoch, position in that order); a resumed
run starts the same order at the same position, so it sees exactly the batches an
uninterrupted run would have.

Randomness per example (crop, caption language and caption) comes from an rng keyed on
(seed, epoch, file, item), never from a running generator, so it too is reproduced on resume.

Bad examples (zero-byte or undecodable image, no caption, captions only in languages the
config does not sample, a truncated shard...) are skipped and counted by reason; the counts of
the examples behind the handed-out batches are `skipped()`. An epoch in which nothing at all
decodes is an error naming the source.

tf.data runs the per-example work (read, decode, crop, caption choice) on its thread pool
(PIL releases the GIL while it decodes and resizes), in order, with prefetch; a background
thread tokenizes and normalizes whole batches `prefetch` steps ahead.
"""

from __future__ import annotations

import bisect
import dataclasses
import io
import json
import math
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging
from PIL import Image

from big_clip.data import languages as languages_lib
from big_clip.data import manifest as manifest_lib
from big_clip.data import naflex as naflex_lib
from big_clip.data import regions as regions_lib
from big_clip.data import shards
from big_clip.errors import UserError

_CROP_STREAM, _CAPTION_STREAM, _FLIP_STREAM, _PAIR_STREAM = 1, 2, 3, 4  # independent draws
_REGION_STREAM = 5
_TFDS_LABEL_TEMPLATE = "a photo of a {}."
_TFDS_FILE = -1  # the 'file' part of a tfds example's rng key


class SourceError(UserError, ValueError):
  """A source that cannot be read or yields nothing; the message names it."""


def naflex_setting(data_cfg: ml_collections.ConfigDict) -> tuple[int, int] | None:
  """(patch_size, max_patches) when the config turns NaFlex inputs on, else None."""
  if data_cfg.max_patches > 0:
    return int(data_cfg.patch_size), int(data_cfg.max_patches)
  return None


# ---------------------------------------------------------------------------------------
# Per-example processing: decode + crop, caption choice. Pure functions of (bytes, rng).
# ---------------------------------------------------------------------------------------
def decode_and_crop(data: bytes, size: int, rng: np.random.Generator | None,
                    min_scale: float, naflex: tuple[int, int] | None = None) -> np.ndarray:
  """uint8 [size, size, 3]; `decode_crop_box` without the box."""
  return decode_crop_box(data, size, rng, min_scale, naflex)[0]


def decode_crop_box(data: bytes, size: int, rng: np.random.Generator | None,
                    min_scale: float, naflex: tuple[int, int] | None = None
                    ) -> tuple[np.ndarray, tuple[float, float, float, float], tuple[int, int]]:
  """(image, the crop (left, top, right, bottom) in pixels of the decoded image, its
  (width, height)); image uint8 [size, size, 3]. With `rng`: Inception-style random-resized crop (area fraction
  in [min_scale, 1], aspect ratio in [3/4, 4/3], as torchvision / open_clip); without:
  the centred square of the shorter side (CLIP's eval transform). Bicubic resize.

  With `naflex` = (patch_size, max_patches): the crop (or, without `rng`, the whole image)
  keeps its aspect ratio and is resized to its NaFlex patch grid (data/naflex.py)."""
  if not data:
    raise shards.BadSample("empty_image")
  try:
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (size, size))  # JPEG: decode at 1/2, 1/4, 1/8 scale when big enough
    img = img.convert("RGB")  # forces the full decode; a truncated file raises here
  except Exception as e:  # PIL raises several types for broken files
    raise shards.BadSample("corrupt_image", f"{type(e).__name__}: {e}") from e
  w, h = img.size
  box = _crop_box(w, h, rng, min_scale) if rng is not None else None
  if naflex is not None:
    box = box or (0, 0, w, h)
    p, max_patches = naflex
    rows, cols = naflex_lib.grid_size(box[3] - box[1], box[2] - box[0], p, max_patches)
    return (np.asarray(img.resize((cols * p, rows * p), Image.Resampling.BILINEAR, box=box),
                       np.uint8), box, (w, h))
  if box is None:
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
  return (np.asarray(img.resize((size, size), Image.Resampling.BICUBIC, box=box), np.uint8),
          box, (w, h))


def _crop_box(w: int, h: int, rng: np.random.Generator, min_scale: float
              ) -> tuple[float, float, float, float] | None:
  """torchvision RandomResizedCrop.get_params: 10 tries, else None (centre crop)."""
  log_ratio = (math.log(3 / 4), math.log(4 / 3))
  for _ in range(10):
    area = w * h * rng.uniform(min_scale, 1.0)
    ratio = math.exp(rng.uniform(*log_ratio))
    cw, ch = math.sqrt(area * ratio), math.sqrt(area / ratio)
    if cw <= w and ch <= h:
      left, top = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
      return left, top, left + cw, top + ch
  return None


def choose_caption(captions: Mapping[str, Sequence[str]], languages: Sequence[str],
                   weights: np.ndarray, rng: np.random.Generator) -> tuple[str, str]:
  """(language, caption): a language by `weights` among those this image has captions in
  (the others renormalised away), then one of its captions in that language, uniformly."""
  if not any(c.strip() for caps in captions.values() for c in caps):
    raise shards.BadSample("missing_caption")
  pools = [[c for c in captions.get(lang, ()) if c.strip()] for lang in languages]
  have = np.array([bool(p) for p in pools])
  if not have.any():
    raise shards.BadSample("unknown_language",
                           f"captions in {sorted(captions)}, sampling {list(languages)}")
  cumulative = np.cumsum(np.where(have, weights, 0.0))
  pick = min(bisect.bisect_right(cumulative, rng.random() * cumulative[-1]),
             len(languages) - 1)
  while not have[pick]:  # rng.random() * total == a boundary exactly; vanishingly rare
    pick -= 1
  pool = pools[pick]
  return languages[pick], pool[int(rng.integers(len(pool)))]


def pair_caption(captions: Mapping[str, Sequence[str]], language: str, drawn: str,
                 rng: np.random.Generator) -> str:
  """A caption of the same image in `language` (config.data.pair_language) other than the
  `drawn` one, uniformly; the drawn caption itself when the image has no other (a pair that
  teaches nothing but keeps the example)."""
  pool = [c for c in captions.get(language, ()) if c.strip() and c != drawn]
  return pool[int(rng.integers(len(pool)))] if pool else drawn


def short_caption(captions: Mapping[str, Sequence[str]], language: str, drawn: str,
                  rng: np.random.Generator) -> str:
  """The short caption that Long-CLIP §3.2 pairs with an image's (long) caption: one of the
  image's short captions in the drawn caption's language, else the drawn caption's first
  sentence (the release's `caption.split('. ')[0]`, for sets with long captions only)."""
  pool = [c for c in captions.get(language, ()) if c.strip()]
  if pool:
    return pool[int(rng.integers(len(pool)))]
  return drawn.split(". ")[0]


@dataclasses.dataclass(frozen=True)
class Processing:
  """What turns a raw example into (image, caption, paired caption or ''); from
  config.data."""
  seed: int
  image_size: int
  crop_min_scale: float  # >= 1: no augmentation (resize + centre crop)
  languages: tuple[str, ...]
  weights: np.ndarray
  long_caption_prob: float
  flip_prob: float = 0.0  # P(mirror the image left-right)
  pair_language: str = ""  # '': no paired caption
  short_caption: bool = False  # the second caption is the image's short one (Long-CLIP)
  naflex: tuple[int, int] | None = None  # (patch_size, max_patches): aspect ratio kept
  max_regions: int = 0  # regions carried per example (data/regions.py)

  @classmethod
  def from_config(cls, data_cfg: ml_collections.ConfigDict, seed: int,
                  short_caption: bool = False) -> Processing:
    languages, weights = languages_lib.language_table(data_cfg.languages)
    return cls(int(seed), int(data_cfg.image_size), float(data_cfg.crop_min_scale),
               languages, weights, float(data_cfg.long_caption_prob),
               float(data_cfg.flip_prob), str(data_cfg.pair_language), bool(short_caption),
               naflex_setting(data_cfg), int(data_cfg.max_regions))

  def __call__(self, raw: shards.RawExample, epoch: int, file: int, item: int
               ) -> tuple[np.ndarray, str, str, tuple]:
    """(image, caption, paired caption or '', regions): regions = (boxes [R, 4], mask [R],
    captions [R]) in the crop's coordinates (R = max_regions; all padding without)."""
    key = [self.seed, epoch, file + 1, item]  # file + 1: tfds's -1 stays non-negative
    crop_rng = (np.random.default_rng(key + [_CROP_STREAM]) if self.crop_min_scale < 1
                else None)
    image, crop, (w, h) = decode_crop_box(raw.image, self.image_size, crop_rng,
                                          self.crop_min_scale, self.naflex)
    boxes, kept = regions_lib.crop_boxes([r[0] for r in raw.regions], crop, w, h)
    flip = (self.flip_prob > 0
            and np.random.default_rng(key + [_FLIP_STREAM]).random() < self.flip_prob)
    if flip:
      image = np.ascontiguousarray(image[:, ::-1])
      boxes = regions_lib.flip_boxes(boxes)
    rng = np.random.default_rng(key + [_CAPTION_STREAM])
    captions = raw.captions
    use_long = rng.random() < self.long_caption_prob  # always drawn: same stream either way
    if use_long and any(c.strip() for caps in raw.long_captions.values() for c in caps):
      captions = raw.long_captions
    language, text = choose_caption(captions, self.languages, self.weights, rng)
    pair = ""
    if self.short_caption:
      pair = short_caption(raw.captions, language, text,
                           np.random.default_rng(key + [_PAIR_STREAM]))
    elif self.pair_language:  # from the short captions, on a stream of its own
      pair = pair_caption(raw.captions, self.pair_language, text,
                          np.random.default_rng(key + [_PAIR_STREAM]))
    region_texts = regions_lib.choose_captions(
        [raw.regions[i][1] for i in kept], language, self.languages,
        np.random.default_rng(key + [_REGION_STREAM]))
    return image, text, pair, regions_lib.pad(boxes, region_texts, self.max_regions)


# ---------------------------------------------------------------------------------------
# Sources: a host's examples, each addressed by (file, item), read at random.
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class FileSource:
  """This host's examples of a `shards:` or `manifest:` source."""
  name: str
  refs: np.ndarray  # int64 [n, 2]: (file, item) of each example this host owns
  read: Callable[[int, int], shards.RawExample]
  index_skipped: dict[str, int]  # examples lost while indexing (truncated shards)


def shard_source(pattern: str, text_language: str, process_index: int, process_count: int
                 ) -> FileSource:
  files = sorted(tf.io.gfile.glob(pattern))
  if not files:
    raise SourceError(f"config.data.source='shards:{pattern}' matches no file; give a glob of "
                      ".tar or .tfrecord shards (tools/make_shards.py writes them).")
  by_file = len(files) >= process_count
  mine = range(process_index, len(files), process_count) if by_file else range(len(files))
  entries: dict[int, list[shards.Entry]] = {}
  skipped: dict[str, int] = {}
  for f in mine:
    entries[f], lost = shards.index_shard(files[f])
    for reason, n in lost.items():
      logging.warning("Shard %s: %d example(s) lost (%s).", files[f], n, reason)
      skipped[reason] = skipped.get(reason, 0) + n
  refs = np.array([(f, i) for f in mine for i in range(len(entries[f]))], np.int64
                  ).reshape(-1, 2)
  if not by_file:  # fewer files than hosts: every P-th example
    refs = refs[process_index::process_count]
  read = lambda f, i: shards.read_entry(files[f], entries[f][i], text_language)
  return FileSource(f"shards:{pattern}", refs, read, skipped)


def manifest_source(path: str, split: str, process_index: int, process_count: int
                    ) -> FileSource:
  items = manifest_lib.load(path, split).items

  def read(_: int, i: int) -> shards.RawExample:
    item = items[i]
    try:
      with tf.io.gfile.GFile(item.image, "rb") as f:
        data = f.read()
    except (tf.errors.NotFoundError, OSError) as e:
      raise shards.BadSample("unreadable_file", f"{item.image}: {e}") from e
    ext = item.image.rsplit(".", 1)[-1].lower()
    return shards.RawExample(item.image, data, ext, item.captions, {}, item.label,
                             item.regions)

  refs = np.stack([np.zeros(len(items), np.int64), np.arange(len(items))], 1)
  return FileSource(f"manifest:{path} (split {split!r})", refs[process_index::process_count],
                    read, {})


# ---------------------------------------------------------------------------------------
# One epoch as a tf.data pipeline of processed examples.
# ---------------------------------------------------------------------------------------
_REASONS: list[str] = [""]  # reason code -> name; 0 = good. Grown on first use (threads:
_REASONS_LOCK = threading.Lock()  # under the lock).


def _reason_code(reason: str) -> int:
  with _REASONS_LOCK:
    if reason not in _REASONS:
      _REASONS.append(reason)
    return _REASONS.index(reason)


def _processed(fn: Callable[..., tuple[np.ndarray, str, str, tuple]], size: int,
               max_regions: int) -> Callable[..., tuple]:
  """Wraps `fn` so a BadSample becomes (reason code, blank image, b'', b'', no regions);
  regions travel as (boxes float32 [R, 4], mask bool [R], captions bytes [R])."""
  encode = lambda texts: np.array([t.encode("utf-8") for t in texts], dtype=object
                                  ).reshape(len(texts))

  def run(*args):
    try:
      image, text, pair, (boxes, mask, texts) = fn(*args)
      return (np.int32(0), image, text.encode("utf-8"), pair.encode("utf-8"), boxes, mask,
              encode(texts))
    except shards.BadSample as e:
      return (np.int32(_reason_code(e.reason)), np.zeros((size, size, 3), np.uint8), b"",
              b"", *regions_lib.pad(np.zeros((0, 4)), [], max_regions)[:2],
              encode([""] * max_regions))

  return run


def _map_processed(ds: tf.data.Dataset, fn: Callable, size: int, max_regions: int
                   ) -> tf.data.Dataset:
  """(position, *inputs) -> (position, reason code, image uint8, caption, paired caption,
  region boxes, region mask, region captions) in parallel, order kept, with a prefetch
  buffer."""
  wrapped = _processed(fn, size, max_regions)

  def call(position, *inputs):
    outputs = tf.numpy_function(
        wrapped, list(inputs),
        (tf.int32, tf.uint8, tf.string, tf.string, tf.float32, tf.bool, tf.string),
        stateful=False)
    return (position, *outputs)

  ds = ds.map(call, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.prefetch(tf.data.AUTOTUNE)


def file_epoch(source: FileSource, process: Processing, epoch: int, start: int
               ) -> tf.data.Dataset:
  order = np.random.default_rng([process.seed, epoch]).permutation(len(source.refs))

  def one(position: np.int64) -> tuple[np.ndarray, str, str]:
    f, i = (int(x) for x in source.refs[order[position]])
    return process(source.read(f, i), epoch, f, i)

  ds = tf.data.Dataset.range(start, len(order))
  return _map_processed(ds.map(lambda p: (p, p)), one, process.image_size, process.max_regions)


@dataclasses.dataclass
class TfdsSource:
  """This host's part (tfds.even_splits) of a tfds split; read as a seeded stream."""
  name: str
  builder: Any
  split: str
  caption_fn: Callable[[dict], tf.Tensor]  # features -> 1-D tf.string captions
  text_language: str
  shuffle_buffer: int


def tfds_source(spec: str, data_cfg: ml_collections.ConfigDict, process_index: int,
                process_count: int) -> TfdsSource:
  import tensorflow_datasets as tfds

  name, _, split = spec.partition(":")
  split = split or data_cfg.split
  try:
    builder = tfds.builder(name, data_dir=data_cfg.data_dir or None)
  except Exception as e:
    raise SourceError(f"config.data.source='tfds:{spec}': no such tfds dataset ({e}).") from e
  if not builder.is_prepared():
    raise SourceError(f"config.data.source='tfds:{spec}' is not prepared in "
                      f"data_dir={builder.data_dir!r}; run `tfds build {name} --data_dir DIR` "
                      "and set config.data.data_dir.")
  features = builder.info.features
  if "image" not in features:
    raise SourceError(f"tfds:{name} has no 'image' feature (features: {list(features)}).")
  caption_fn = _tfds_caption_fn(name, features)
  host_split = tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]
  return TfdsSource(f"tfds:{name}:{split}", builder, host_split, caption_fn,
                    data_cfg.text_language, int(data_cfg.shuffle_buffer))


def _tfds_caption_fn(name: str, features: Any) -> Callable[[dict], tf.Tensor]:
  """Image-text datasets: a 'caption'/'text' string or a 'captions' sequence (COCO:
  captions/text). Image-label datasets: the class name in a CLIP prompt."""
  for field in ("caption", "captions", "text"):
    if field in features:
      def texts(ex, field=field):
        value = ex[field]
        if isinstance(value, dict):  # e.g. coco_captions: captions = {'id', 'text'}
          value = value["text"]
        return tf.reshape(value, [-1])
      return texts
  if "label" in features and hasattr(features["label"], "names"):
    names = tf.constant([_TFDS_LABEL_TEMPLATE.format(n.replace("_", " "))
                         for n in features["label"].names])
    return lambda ex: tf.reshape(tf.gather(names, ex["label"]), [-1])
  raise SourceError(f"tfds:{name} has neither captions ('caption', 'captions', 'text') nor a "
                    f"ClassLabel 'label'; features: {list(features)}.")


def tfds_epoch(source: TfdsSource, process: Processing, epoch: int, start: int
               ) -> tf.data.Dataset:
  import tensorflow_datasets as tfds

  shuffle_seed = int(np.random.default_rng([process.seed, epoch]).integers(2**31))
  ds = source.builder.as_dataset(
      split=source.split, shuffle_files=True,
      decoders={"image": tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False))
  if source.shuffle_buffer > 1:
    ds = ds.shuffle(source.shuffle_buffer, seed=shuffle_seed)
  ds = ds.enumerate().skip(start)  # resume: the same stream, `start` examples in
  ds = ds.map(lambda p, ex: (p, p, ex["image"], source.caption_fn(ex)))

  def one(position, image, texts) -> tuple[np.ndarray, str, str]:
    caps = [t.decode("utf-8") for t in texts]
    raw = shards.RawExample(str(position), image, "", {source.text_language: caps})
    return process(raw, epoch, _TFDS_FILE, int(position))

  return _map_processed(ds, one, process.image_size, process.max_regions)


# ---------------------------------------------------------------------------------------
# The iterator.
# ---------------------------------------------------------------------------------------
class SourceIterator:
  """Infinite iterator of host-local batches {'image': float32 [b, H, W, 3] normalized,
  'text': int32 [b, max_len]} of a real source; b = global_batch / process_count. With
  config.data.pair_language also 'text_pair': int32 [b, max_len], another caption of each
  image in that language; with `with_short_captions` (Long-CLIP's PCM loss) 'text_short',
  each image's short caption (`short_caption`); with config.data.max_regions > 0
  'region_boxes', 'region_mask' and 'region_text', each image's boxes after its crop and
  flip (data/regions.py).

  `get_state()` is the position after the last batch handed out; batches built ahead by
  the prefetch thread are not counted, and `set_state` discards them.
  """

  def __init__(self, data_cfg: ml_collections.ConfigDict, process_index: int,
               process_count: int, tokenizer: Any, seed: int, prefetch: int = 2,
               normalize: Callable[[np.ndarray], np.ndarray] | None = None,
               with_short_captions: bool = False):
    self._process_index, self._process_count = process_index, process_count
    self._local_batch = int(data_cfg.global_batch) // process_count
    self._max_len = int(data_cfg.max_len)
    self._with_short = bool(with_short_captions)
    if self._with_short and data_cfg.pair_language:
      raise ValueError("Long-CLIP's short captions (config.loss.long_clip) and "
                       "config.data.pair_language both need the second caption slot; turn one "
                       "of them off.")
    self._with_pair = bool(data_cfg.pair_language)
    self._tokenizer, self._seed = tokenizer, int(seed)
    self._normalize = normalize
    self._process = Processing.from_config(data_cfg, seed, self._with_short)
    self._source = _make_source(data_cfg, process_index, process_count)
    self._epoch_fn = file_epoch if isinstance(self._source, FileSource) else tfds_epoch
    if isinstance(self._source, FileSource) and not len(self._source.refs):
      raise SourceError(f"{self._source.name} has no examples for host {process_index} of "
                        f"{process_count} (skipped while indexing: "
                        f"{self._source.index_skipped}).")
    self._skipped: dict[str, int] = dict(getattr(self._source, "index_skipped", {}))
    self._epoch, self._position = 0, 0
    self._prefetch = max(1, int(prefetch))
    self._queue: queue.Queue | None = None
    self._stop: threading.Event | None = None
    self._thread: threading.Thread | None = None

  @property
  def source_name(self) -> str:
    return self._source.name

  # -- the producer ---------------------------------------------------------------------
  def _examples(self, epoch: int, position: int
                ) -> Iterator[tuple[int, int, str, np.ndarray, str, str, tuple]]:
    """(epoch, position after it, skip reason or '', image, caption, paired caption,
    regions) from a state on."""
    while True:
      bad: dict[str, int] = {}
      seen = 0
      for pos, code, image, text, pair, *region in self._epoch_fn(
          self._source, self._process, epoch, position).as_numpy_iterator():
        seen += 1
        if code:
          bad[_REASONS[code]] = bad.get(_REASONS[code], 0) + 1
        boxes, mask, region_texts = region
        yield (epoch, int(pos) + 1, _REASONS[code], image, text.decode("utf-8"),
               pair.decode("utf-8"), (boxes, mask, [t.decode("utf-8") for t in region_texts]))
      if position == 0 and sum(bad.values()) == seen:
        raise SourceError(f"{self._source.name} yielded no usable example in a whole epoch "
                          f"(host {self._process_index} of {self._process_count}); skipped: "
                          f"{dict(bad, **self._source_skipped())}. Check the files and "
                          "config.data.languages.")
      epoch, position = epoch + 1, 0

  def _source_skipped(self) -> dict[str, int]:
    return dict(getattr(self._source, "index_skipped", {}))

  def _batches(self, epoch: int, position: int):
    images, texts, pairs, regions, skipped = [], [], [], [], {}
    for epoch, position, reason, image, text, pair, region in self._examples(epoch, position):
      if reason:
        skipped[reason] = skipped.get(reason, 0) + 1
        continue
      images.append(image)
      texts.append(text)
      pairs.append(pair)
      regions.append(region)
      if len(images) == self._local_batch:
        yield self._finish(images, texts, pairs, regions), (epoch, position), skipped
        images, texts, pairs, regions, skipped = [], [], [], [], {}

  def _tokens(self, texts: list[str]) -> np.ndarray:
    tokens = np.asarray(self._tokenizer.encode(texts), np.int32)
    if tokens.shape != (len(texts), self._max_len):
      raise ValueError(f"The tokenizer returned {tokens.shape} tokens for {len(texts)} "
                       f"captions; expected max_len={self._max_len} (config.data.max_len).")
    return tokens

  def _finish(self, images: list[np.ndarray], texts: list[str], pairs: list[str],
              regions: list[tuple]) -> dict[str, np.ndarray]:
    naflex = self._process.naflex
    if naflex:  # images of their own sizes -> padded patch sequences
      stacked = naflex_lib.encode(images, *naflex, self._normalize or (lambda x: x))
    else:
      stacked = np.stack(images)
      stacked = self._normalize(stacked) if self._normalize else stacked
    batch = {"image": stacked, "text": self._tokens(texts)}
    if self._with_pair or self._with_short:
      batch["text_short" if self._with_short else "text_pair"] = self._tokens(pairs)
    r = self._process.max_regions
    if r:  # as the embedded pipeline's (pipeline.fine_fields)
      batch["region_boxes"] = np.stack([b for b, _, _ in regions]).astype(np.float32)
      batch["region_mask"] = np.stack([m for _, m, _ in regions]).astype(bool)
      batch["region_text"] = self._tokens([t for _, _, ts in regions for t in ts]).reshape(
          len(regions), r, self._max_len)
    return batch

  def _produce(self, out: queue.Queue, stop: threading.Event, epoch: int, position: int):
    try:
      for item in self._batches(epoch, position):
        while not stop.is_set():
          try:
            out.put(item, timeout=0.1)
            break
          except queue.Full:
            pass
        if stop.is_set():
          return
    except BaseException as e:  # handed to the consumer, raised by __next__
      out.put(e)

  def _start(self) -> None:
    self._queue, self._stop = queue.Queue(self._prefetch), threading.Event()
    self._thread = threading.Thread(
        target=self._produce, args=(self._queue, self._stop, self._epoch, self._position),
        daemon=True, name="big_clip_data")
    self._thread.start()

  # -- the iterator interface -------------------------------------------------------------
  def __iter__(self) -> SourceIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._thread is None:
      self._start()
    item = self._queue.get()
    if isinstance(item, BaseException):
      self.close()
      raise item
    batch, (self._epoch, self._position), skipped = item
    for reason, n in skipped.items():
      self._skipped[reason] = self._skipped.get(reason, 0) + n
    return batch

  def skipped(self) -> dict[str, int]:
    """Examples skipped so far, by reason (those behind the batches handed out)."""
    return dict(sorted(self._skipped.items()))

  def get_state(self) -> dict[str, Any]:
    """JSON-serializable; with several processes, every host's position (a collective:
    call it on all hosts together, as the checkpoint save does)."""
    mine = [self._epoch, self._position]
    if jax.process_count() > 1 and self._process_count == jax.process_count():
      from jax.experimental import multihost_utils
      positions = np.asarray(multihost_utils.process_allgather(np.array(mine, np.int64)))
      positions = positions.reshape(-1, 2).tolist()
      skipped = _allgather_json(self._skipped)
    else:
      positions = [mine if p == self._process_index else None
                   for p in range(self._process_count)]
      skipped = [self._skipped if p == self._process_index else None
                 for p in range(self._process_count)]
    # Every host's own skip counts, indexed by process like the positions: each host
    # restores its own.
    return {"seed": self._seed, "process_count": self._process_count,
            "positions": positions, "source": self._source.name, "skipped": skipped}

  def set_state(self, state: Mapping[str, Any]) -> None:
    if "positions" not in state:
      raise ValueError(f"Not the state of a {self._source.name} iterator (no 'positions'): "
                       f"{dict(state)}; was the checkpoint written with another "
                       "config.data.source?")
    if int(state["seed"]) != self._seed or int(state["process_count"]) != self._process_count:
      raise ValueError(f"The data state was saved with seed={state['seed']} on "
                       f"{state['process_count']} processes, this run has seed={self._seed} "
                       f"on {self._process_count}; resume with the same seed and host count, "
                       "or the data order would silently change.")
    mine = state["positions"][self._process_index]
    if mine is None:
      raise ValueError(f"The data state has no position for process {self._process_index}.")
    self.close()
    self._epoch, self._position = int(mine[0]), int(mine[1])
    skipped = state.get("skipped") or {}
    if isinstance(skipped, list):
      skipped = skipped[self._process_index] or {}
    self._skipped = {k: int(v) for k, v in dict(skipped).items()}

  def close(self) -> None:
    """Stops the prefetch thread; the next batch restarts it from the current state."""
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None

  def __del__(self) -> None:
    if getattr(self, "_stop", None) is not None:
      self._stop.set()


def _allgather_json(value: Any) -> list[Any]:
  """`value` (JSON-serializable) of every process, in process order (a collective)."""
  from jax.experimental import multihost_utils

  mine = np.frombuffer(json.dumps(value).encode(), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.array([len(mine)], np.int64)))
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:len(mine)] = mine
  every = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
  return [json.loads(row[:int(n)].tobytes()) for row, n in zip(every, lengths.reshape(-1))]


def _make_source(data_cfg: ml_collections.ConfigDict, process_index: int,
                 process_count: int) -> FileSource | TfdsSource:
  kind, _, location = data_cfg.source.partition(":")
  if kind == "shards":
    return shard_source(location, data_cfg.text_language, process_index, process_count)
  if kind == "manifest":
    return manifest_source(location, data_cfg.split, process_index, process_count)
  if kind == "tfds":
    return tfds_source(location, data_cfg, process_index, process_count)
  raise ValueError(f"config.data.source={data_cfg.source!r}: unknown kind {kind!r}; allowed: "
                   "'embedded', 'tfds:NAME[:SPLIT]', 'shards:GLOB', 'manifest:PATH'.")


def read_captions(data_cfg: ml_collections.ConfigDict, limit: int = 200_000) -> list[str]:
  """Every caption (and long caption) of the source, up to `limit`, in file order: the text
  to train its sentencepiece model on (tools/train_spm.py, pipeline.build_tokenizer)."""
  source = _make_source(data_cfg, 0, 1)
  texts: list[str] = []
  if isinstance(source, FileSource):
    for f, i in source.refs:
      try:
        raw = source.read(int(f), int(i))
      except shards.BadSample:
        continue
      texts += [c for caps in (*raw.captions.values(), *raw.long_captions.values())
                for c in caps if c.strip()]
      if len(texts) >= limit:
        break
  else:
    import tensorflow_datasets as tfds

    ds = source.builder.as_dataset(split=source.split, shuffle_files=False,
                                   decoders={"image": tfds.decode.SkipDecoding()})
    for texts_t in ds.map(source.caption_fn).as_numpy_iterator():
      texts += [t.decode("utf-8") for t in texts_t if t.strip()]
      if len(texts) >= limit:
        break
  if not texts:
    raise SourceError(f"{source.name} has no captions to train a tokenizer on.")
  return texts[:limit]
