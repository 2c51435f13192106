"""NaFlex inputs (SigLIP 2 §2.4.2; NaViT, Dehghani et al. 2023): an image at its own aspect
ratio as a padded sequence of patches with their grid coordinates.

Each image is resized, aspect ratio kept up to rounding, to the largest patch grid
(rows, cols) with rows * cols <= max_patches (HF Siglip2ImageProcessor /
big_vision `resize_to_sequence`: the largest scale whose patch-rounded-up grid fits), then
cut into patches. A row of the output is the patch's pixels, (row, col, channel) order as
`models.vit.patchify`, then its (row, col) on the grid; padding rows are 0 pixels and
(-1, -1). `models.vit.ViT` with `image.naflex` reads this layout.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

COORDS = 2  # (row, col) after the pixels; models.vit.NAFLEX_COORDS reads them


def grid_size(height: int, width: int, patch_size: int, max_patches: int
              ) -> tuple[int, int]:
  """(rows, cols) of the largest scale s with ceil(s h / p) * ceil(s w / p) <= max_patches.

  The patch count only grows with s, so a bisection on s finds it (HF Siglip2's
  `get_image_size_for_max_num_patches` bisects the same way); each side is >= 1 patch."""
  if max_patches < 1:
    raise ValueError(f"config.data.max_patches={max_patches}; NaFlex needs at least 1.")

  def grid(scale: float) -> tuple[int, int]:
    return (max(1, int(np.ceil(height * scale / patch_size))),
            max(1, int(np.ceil(width * scale / patch_size))))

  lo, hi = 1e-6, float(max_patches * patch_size)  # hi: beyond any feasible scale
  for _ in range(64):
    mid = (lo + hi) / 2
    rows, cols = grid(mid)
    lo, hi = (mid, hi) if rows * cols <= max_patches else (lo, mid)
  return grid(lo)


def resize(image: np.ndarray, grid: tuple[int, int], patch_size: int) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [rows * p, cols * p, 3], bilinear with antialiasing (PIL)."""
  rows, cols = grid
  size = (cols * patch_size, rows * patch_size)  # PIL: (width, height)
  if image.shape[:2] == size[::-1]:
    return image
  return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR), np.uint8)


def patchify(image: np.ndarray, patch_size: int, max_patches: int) -> np.ndarray:
  """float32 [rows * p, cols * p, C] -> [max_patches, p * p * C + 2]: row-major patches,
  each its pixels (row, col, channel) then (row, col); padding rows 0 then (-1, -1)."""
  h, w, c = image.shape
  p = patch_size
  rows, cols = h // p, w // p
  if rows * p != h or cols * p != w or rows * cols > max_patches:
    raise ValueError(f"A {h}x{w} image is not a grid of at most max_patches={max_patches} "
                     f"patches of {p} pixels; resize it with naflex.resize first.")
  pixels = image.reshape(rows, p, cols, p, c).transpose(0, 2, 1, 3, 4).reshape(rows * cols, -1)
  out = np.zeros((max_patches, p * p * c + COORDS), np.float32)
  out[:, -COORDS:] = -1
  out[:rows * cols, :-COORDS] = pixels
  out[:rows * cols, -2] = np.repeat(np.arange(rows), cols)
  out[:rows * cols, -1] = np.tile(np.arange(cols), rows)
  return out


def encode(images: list[np.ndarray] | np.ndarray, patch_size: int, max_patches: int,
           normalize: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
  """uint8 images [H_i, W_i, 3] of any sizes -> float32 [n, max_patches, p*p*3 + 2]:
  resized to their grid, `normalize`d (uint8 -> float32), patchified."""
  out = []
  for image in images:
    grid = grid_size(image.shape[0], image.shape[1], patch_size, max_patches)
    out.append(patchify(normalize(resize(np.asarray(image), grid, patch_size)), patch_size,
                        max_patches))
  return np.stack(out)
