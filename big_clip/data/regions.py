"""Regions of an image: boxes with captions (CLOC / FG-CLIP 2 region-text pairs).

An example's optional `regions` field, in a manifest item, a shard's JSON and the embedded
data alike, is a list of

    {"box": [x0, y0, x1, y1],                  # relative to the image: 0 <= x0 < x1 <= 1
     "captions": {"en": ["a red circle."], "de": ["Ein roter Kreis."]}}

The pipeline carries up to `config.data.max_regions` of them per example as fixed-size
arrays: `region_boxes` float32 [R, 4], `region_mask` bool [R] (False = padding) and
`region_text` int32 [R, max_len] (one caption per box, in the language drawn for the
example's caption). Boxes follow the image's crop and flip exactly: a box is mapped into
the crop's coordinates and clipped to it, one left with no area is dropped (`crop_boxes`),
a mirrored image mirrors its boxes (`flip_boxes`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

Box = tuple[float, float, float, float]


def parse(value: Any, where: str) -> list[tuple[Box, dict[str, list[str]]]]:
  """The `regions` field -> [(box, {language: captions})]; ValueError naming `where` and
  the region when it is malformed."""
  if value is None:
    return []
  if not isinstance(value, list):
    raise ValueError(f"{where}: 'regions' must be a list of {{'box': [x0, y0, x1, y1], "
                     f"'captions': {{lang: [str]}}}}, got {type(value).__name__}")
  out = []
  for r, region in enumerate(value):
    here = f"{where}, region {r}"
    box = region.get("box") if isinstance(region, dict) else None
    if (not isinstance(box, list) or len(box) != 4
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
      raise ValueError(f"{here}: 'box' must be [x0, y0, x1, y1], four numbers relative to the "
                       "image")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
      raise ValueError(f"{here}: box {box} must satisfy 0 <= x0 < x1 <= 1 and "
                       "0 <= y0 < y1 <= 1 (relative corners, top-left first)")
    captions = region.get("captions", {})
    if not isinstance(captions, dict) or not all(
        isinstance(v, list) and all(isinstance(c, str) for c in v) for v in captions.values()):
      raise ValueError(f"{here}: 'captions' must map a language to a list of strings")
    out.append(((x0, y0, x1, y1), {k: list(v) for k, v in captions.items()}))
  return out


def to_json(regions: Sequence[tuple[Box, Mapping[str, Sequence[str]]]]) -> list[dict]:
  """The inverse of `parse`."""
  return [{"box": [float(v) for v in box], "captions": {k: list(v) for k, v in caps.items()}}
          for box, caps in regions]


def crop_boxes(boxes: np.ndarray, crop: Box, width: float, height: float
               ) -> tuple[np.ndarray, np.ndarray]:
  """Boxes [n, 4] relative to a `width` x `height` image -> (boxes relative to the `crop`
  (left, top, right, bottom, in pixels of that image), clipped to it, [m, 4]; the indices
  [m] of the boxes kept). A box with no area left inside the crop is dropped."""
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  left, top, right, bottom = crop
  scale = np.array([width, height, width, height]) / np.array(
      [right - left, bottom - top, right - left, bottom - top])
  shifted = (boxes - np.array([left / width, top / height] * 2)) * scale
  clipped = np.clip(shifted, 0.0, 1.0)
  kept = np.flatnonzero((clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1]))
  return clipped[kept].astype(np.float32), kept


def flip_boxes(boxes: np.ndarray) -> np.ndarray:
  """Boxes [n, 4] of an image mirrored left-right: x0' = 1 - x1, x1' = 1 - x0."""
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  return np.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], axis=1)


def choose_captions(captions: Sequence[Mapping[str, Sequence[str]]], language: str,
                    fallback: Sequence[str], rng: np.random.Generator) -> list[str]:
  """One caption per region: in `language` (the example caption's) when the region has one,
  else in the first of `fallback` it has; '' when it has none (the region is then dropped)."""
  out = []
  for caps in captions:
    pool = []
    for lang in (language, *fallback):
      pool = [c for c in caps.get(lang, ()) if c.strip()]
      if pool:
        break
    out.append(pool[int(rng.integers(len(pool)))] if pool else "")
  return out


def pad(boxes: np.ndarray, texts: Sequence[str], max_regions: int
        ) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """(boxes float32 [R, 4], mask bool [R], texts [R]) of the first `max_regions` regions
  that have a caption, padded with zero boxes, False and ''."""
  keep = [i for i, t in enumerate(texts) if t][:max_regions]
  out = np.zeros((max_regions, 4), np.float32)
  mask = np.zeros((max_regions,), bool)
  out[:len(keep)] = np.asarray(boxes, np.float32).reshape(-1, 4)[keep]
  mask[:len(keep)] = True
  return out, mask, [texts[i] for i in keep] + [""] * (max_regions - len(keep))
