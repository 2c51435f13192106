"""The `manifest:` format: a JSON list of images with per-language captions and optional labels.

    {"items": [{"image": "images/1.jpg",          # relative to the manifest's folder (or absolute)
                "split": "train",                  # any string; filtered by `split=`
                "captions": {"en": ["..."], "de": ["...", "..."]},
                "label": 3,                        # optional, for zero-shot classification
                "regions": [{"box": [0.1, 0.2, 0.5, 0.9],   # optional: boxes [x0, y0, x1, y1]
                             "captions": {"en": ["a dog."]}}]}]}  # relative, with captions

This is the format of `../shared/data/flickr8k_multi30k/manifest.json`. Both the training
pipeline (`data/pipeline.py`) and the eval binary read manifests through `load()`, so a malformed
file fails the same way everywhere, with the item index and the field named.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Mapping, Sequence

import numpy as np
import tensorflow as tf
from PIL import Image

from big_clip import fileio
from big_clip.data import regions as regions_lib
from big_clip.errors import UserError


class ManifestError(UserError, ValueError):
  """A manifest file that does not follow the format above."""


@dataclasses.dataclass(frozen=True)
class Item:
  image: str                                # absolute path (or gs:// URL)
  split: str
  captions: Mapping[str, Sequence[str]]     # language -> captions (may be empty)
  label: int | None = None
  regions: Sequence[tuple] = ()             # (box, {lang: captions}), data/regions.py


@dataclasses.dataclass(frozen=True)
class Manifest:
  path: str
  name: str
  items: tuple[Item, ...]

  @property
  def languages(self) -> list[str]:
    """Languages with at least one caption, in first-seen order."""
    seen = {}
    for item in self.items:
      for lang, caps in item.captions.items():
        if caps:
          seen.setdefault(lang, None)
    return list(seen)


def _join(folder: str, rel: str) -> str:
  if fileio.is_remote(rel) or os.path.isabs(rel):
    return rel
  return os.path.join(folder, rel)


def load(path: str, split: str | None = None) -> Manifest:
  """Reads and validates a manifest; keeps only `split` when given.

  Raises ManifestError naming the file (and the item) when the format is wrong, and
  FileNotFoundError with a hint when the file is absent.
  """
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(
        f"manifest {path!r} does not exist; `manifest:PATH` must name a JSON file with an "
        "'items' list (see big_clip/data/manifest.py for the format)")
  with tf.io.gfile.GFile(path, "r") as f:
    try:
      raw = json.load(f)
    except json.JSONDecodeError as e:
      raise ManifestError(f"manifest {path!r} is not valid JSON: {e}") from e
  if not isinstance(raw, dict) or not isinstance(raw.get("items"), list):
    raise ManifestError(f"manifest {path!r} must be a JSON object with an 'items' list")
  folder = os.path.dirname(path)
  items = []
  for i, entry in enumerate(raw["items"]):
    where = f"manifest {path!r}, item {i}"
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
      raise ManifestError(f"{where}: every item needs an 'image' path string")
    captions = entry.get("captions", {})
    if not isinstance(captions, dict) or not all(
        isinstance(v, list) and all(isinstance(c, str) for c in v) for v in captions.values()):
      raise ManifestError(f"{where}: 'captions' must map a language to a list of strings")
    label = entry.get("label")
    if label is not None and (not isinstance(label, int) or isinstance(label, bool) or label < 0):
      raise ManifestError(f"{where}: 'label' must be a non-negative integer, got {label!r}")
    try:
      regions = regions_lib.parse(entry.get("regions"), where)
    except ValueError as e:
      raise ManifestError(str(e)) from None
    item_split = str(entry.get("split", ""))
    if split is not None and item_split != split:
      continue
    items.append(Item(image=_join(folder, entry["image"]), split=item_split,
                      captions={k: list(v) for k, v in captions.items()}, label=label,
                      regions=tuple(regions)))
  if split is not None and not items:
    splits = sorted({str(e.get("split", "")) for e in raw["items"] if isinstance(e, dict)})
    raise ManifestError(f"manifest {path!r} has no items in split {split!r}; its splits: {splits}")
  name = str(raw.get("name") or os.path.splitext(os.path.basename(path))[0])
  return Manifest(path=path, name=name, items=tuple(items))


def read_image(path: str, size: int, crop: bool = True) -> np.ndarray:
  """Decodes an image file to RGB uint8 [size, size, 3]: shorter side resized, centre crop.

  The eval-time transform of CLIP; `crop=False` keeps the whole image at its own size (NaFlex
  resizes it later). Raises ValueError naming the file when it can't be decoded.
  """
  with tf.io.gfile.GFile(path, "rb") as f:
    data = f.read()
  return decode_image(data, size, path, crop)


def decode_image(data: bytes, size: int, name: str, crop: bool = True) -> np.ndarray:
  """`read_image` of encoded bytes (e.g. a tfds image); `name` says where they came from."""
  try:
    img = Image.open(io.BytesIO(data))
    img = img.convert("RGB")
  except Exception as e:  # PIL raises several types for broken files.
    raise ValueError(f"image {name!r} could not be decoded ({type(e).__name__}: {e}); "
                     "remove it from the manifest or replace the file") from e
  return resize_center_crop(img, size) if crop else np.asarray(img, np.uint8)


def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
  """An RGB PIL image -> uint8 [size, size, 3]: shorter side resized (bicubic), centre crop."""
  w, h = img.size
  scale = size / min(w, h)
  img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                   Image.Resampling.BICUBIC)
  w, h = img.size
  left, top = (w - size) // 2, (h - size) // 2
  return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
