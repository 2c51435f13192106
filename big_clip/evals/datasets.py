"""Images for evaluation: labelled sets for zero-shot classification, captioned sets for
retrieval, read lazily so that only the rows of a batch are decoded, in threads.

An image that fails to decode is a counted skip: `ImageSet.failed` names it, the evaluator
drops its row, warns, and lists it in the result record.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from collections.abc import Callable, Sequence

import numpy as np
from absl import logging

from big_clip import fileio
from big_clip.data import manifest as manifest_lib
from big_clip.evals.specs import EvalSpec

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_THREADS = min(16, os.cpu_count() or 1)


class ImageSet:
  """`len()` images read by `load(i) -> uint8 [S, S, 3]`, indexed by an int array.

  A failed decode gives a black image and records the index in `failed` (index -> message).
  """

  def __init__(self, names: Sequence[str], load: Callable[[int], np.ndarray], image_size: int):
    self.names, self._load, self.image_size = list(names), load, image_size
    self.failed: dict[int, str] = {}

  def __len__(self) -> int:
    return len(self.names)

  def _one(self, i: int) -> np.ndarray:
    try:
      return self._load(i)
    except ValueError as e:  # manifest.read_image / decode_image name the file
      self.failed[i] = str(e)
      return np.zeros((self.image_size, self.image_size, 3), np.uint8)

  def __getitem__(self, index: np.ndarray) -> np.ndarray | list[np.ndarray]:
    """uint8 [n, S, S, 3]; a list when the loader keeps each image's own size (NaFlex)."""
    index = np.asarray(index).reshape(-1)
    # Each image once: a padded batch repeats its last row, and two threads decoding one
    # lazily opened PIL image at the same time break it.
    unique, inverse = np.unique(index, return_inverse=True)
    with concurrent.futures.ThreadPoolExecutor(_THREADS) as pool:
      decoded = list(pool.map(self._one, unique.tolist()))
    images = [decoded[i] for i in inverse.reshape(-1)]
    return np.stack(images) if len({x.shape for x in images}) <= 1 else images


def array_set(images: np.ndarray, name: str) -> ImageSet:
  """An ImageSet over images already in memory (the embedded data)."""
  return ImageSet([f"{name}[{i}]" for i in range(len(images))], lambda i: images[i],
                  images.shape[1])


@dataclasses.dataclass
class LabelledSet:
  name: str
  images: ImageSet
  labels: np.ndarray                              # int32 [N]
  num_classes: int | None                        # None: the class-name file says
  classnames: dict[str, list[str | None]] | None  # the dataset's own names, if it has them


def _limit(n: int, spec: EvalSpec) -> int:
  return min(n, spec.limit) if spec.limit else n


def _from_manifest(spec: EvalSpec, image_size: int, crop: bool) -> LabelledSet:
  m = manifest_lib.load(spec.location, spec.split)
  items = [it for it in m.items if it.label is not None]
  if not items:
    raise ValueError(f"eval {spec.text!r}: manifest {spec.location!r} has no item with a "
                     "'label' (zero-shot classification needs labels; use retrieval:... for "
                     "captions).")
  if len(items) < len(m.items):
    logging.warning("eval %r: %d of %d manifest items have no 'label' and are left out.",
                    spec.text, len(m.items) - len(items), len(m.items))
  items = items[:_limit(len(items), spec)]
  labels = np.asarray([it.label for it in items], np.int32)
  paths = [it.image for it in items]
  images = ImageSet(paths, lambda i: manifest_lib.read_image(paths[i], image_size, crop),
                    image_size)
  return LabelledSet(m.name, images, labels, None, None)


def _from_folder(spec: EvalSpec, image_size: int, crop: bool) -> LabelledSet:
  root = spec.location
  if not fileio.isdir(root):
    raise FileNotFoundError(f"eval {spec.text!r}: image folder {root!r} does not exist.")
  classes = sorted(d.rstrip("/") for d in fileio.listdir(root)
                   if fileio.isdir(os.path.join(root, d)))
  if not classes:
    raise ValueError(f"eval {spec.text!r}: folder {root!r} has no class subfolders "
                     "(expected ROOT/CLASS/IMAGE).")
  paths, labels = [], []
  for label, cls in enumerate(classes):
    files = sorted(f for f in fileio.listdir(os.path.join(root, cls))
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    paths += [os.path.join(root, cls, f) for f in files]
    labels += [label] * len(files)
  n = _limit(len(paths), spec)
  paths, labels = paths[:n], np.asarray(labels[:n], np.int32)
  images = ImageSet(paths, lambda i: manifest_lib.read_image(paths[i], image_size, crop),
                    image_size)
  names = {"en": [c.replace("_", " ") for c in classes]}  # folder names as English names
  return LabelledSet(os.path.basename(root.rstrip("/")), images, labels, len(classes),
                     names)


def _from_tfds(spec: EvalSpec, image_size: int, crop: bool) -> LabelledSet:
  """Encoded images are kept in memory and decoded per batch (fine for CIFAR / ImageNet val
  on an eval host; the decoded pixels are never all held at once)."""
  import tensorflow_datasets as tfds

  builder = tfds.builder(spec.location, data_dir=spec.options.get("data_dir"))
  split = spec.split or "test"
  if split.split("[")[0] not in builder.info.splits:
    raise ValueError(f"eval {spec.text!r}: tfds dataset {spec.location!r} has no split "
                     f"{split!r}; its splits: {sorted(builder.info.splits)}.")
  features = builder.info.features
  if "image" not in features or "label" not in features:
    raise ValueError(f"eval {spec.text!r}: tfds dataset {spec.location!r} needs 'image' and "
                     f"'label' features; it has {sorted(features)}.")
  label_feature = features["label"]
  ds = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()},
                          shuffle_files=False)
  if spec.limit:
    ds = ds.take(spec.limit)
  encoded, labels = [], []
  for ex in tfds.as_numpy(ds):
    encoded.append(ex["image"])
    labels.append(int(ex["label"]))
  name = f"{spec.location}/{split}"
  names = [f"{name}[{i}]" for i in range(len(encoded))]
  images = ImageSet(names,
                    lambda i: manifest_lib.decode_image(encoded[i], image_size, names[i], crop),
                    image_size)
  classnames = {"en": [n.replace("_", " ") for n in label_feature.names]}
  return LabelledSet(spec.location, images, np.asarray(labels, np.int32),
                     label_feature.num_classes, classnames)


def labelled_set(spec: EvalSpec, image_size: int, crop: bool = True) -> LabelledSet:
  """The images and labels of a zeroshot spec (not 'embedded', which evaluate.py renders).

  Images are resized and centre-cropped to `image_size` squares; with `crop=False` (NaFlex
  models) each keeps its whole frame at its own size and aspect ratio."""
  load = {"manifest": _from_manifest, "folder": _from_folder, "tfds": _from_tfds}[spec.kind]
  return load(spec, image_size, crop)


@dataclasses.dataclass
class CaptionedSet:
  name: str
  images: ImageSet
  captions: list[dict[str, list[str]]]  # per image: language -> captions
  languages: list[str]                  # languages with captions, first-seen order


def captioned_set(spec: EvalSpec, image_size: int, crop: bool = True) -> CaptionedSet:
  """The images and captions of a retrieval manifest; `crop` as in `labelled_set`."""
  m = manifest_lib.load(spec.location, spec.split)
  items = list(m.items[:_limit(len(m.items), spec)])
  paths = [it.image for it in items]
  images = ImageSet(paths, lambda i: manifest_lib.read_image(paths[i], image_size, crop),
                    image_size)
  return CaptionedSet(m.name, images, [dict(it.captions) for it in items], m.languages)
