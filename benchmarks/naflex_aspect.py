r"""Zero-shot accuracy on held-out embedded images of aspect ratio 1:3 to 3:1 whose object sits
at one end: a square centre-crop model loses it, a NaFlex model (SigLIP 2 §2.4.2) sees the
whole image.

Each held-out 'test' example (a square image) is pasted at one end of a wide or tall canvas
filled with its border colour; the models then see those canvases through `big_clip.load`
(the square model: shorter side resized, centre crop; NaFlex: the whole image at its aspect
ratio). The square images themselves are the baseline.

  python -m benchmarks.naflex_aspect --square /tmp/naflex_proof/square \
      --naflex /tmp/naflex_proof/naflex --n 240 --max_patches 192
"""

from __future__ import annotations

import argparse

import numpy as np

import big_clip
from big_clip.data import embedded

RATIOS = ((1, 3), (1, 2), (2, 1), (3, 1))  # (height, width) in units of the square side


def canvases(squares: np.ndarray) -> list[np.ndarray]:
  """Square i pasted at one end (alternating) of a canvas of ratio RATIOS[i % 4]."""
  out = []
  for i, square in enumerate(squares):
    s = square.shape[0]
    rh, rw = RATIOS[i % len(RATIOS)]
    border = np.concatenate([square[0], square[-1], square[:, 0], square[:, -1]])
    canvas = np.empty((rh * s, rw * s, 3), np.uint8)
    canvas[:] = np.median(border, axis=0).astype(np.uint8)
    y = 0 if (i // len(RATIOS)) % 2 == 0 else rh * s - s  # first or last end
    x = 0 if (i // len(RATIOS)) % 2 == 0 else rw * s - s
    canvas[y:y + s, x:x + s] = square
    out.append(canvas)
  return out


def accuracy(model: big_clip.Model, images, labels: np.ndarray, task: str) -> float:
  probs = model.zero_shot(images, embedded.zeroshot_classnames(task, "en"),
                          embedded.zeroshot_templates(task, "en"))
  return float((probs.argmax(-1) == labels).mean())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--square", required=True, help="workdir of the fixed-resolution model")
  parser.add_argument("--naflex", required=True, help="workdir of the NaFlex model")
  parser.add_argument("--n", type=int, default=240, help="held-out images per task")
  parser.add_argument("--max_patches", default="",
                      help="comma-separated token budgets to also run the NaFlex model at "
                           "(NaFlex takes any budget at inference), e.g. 192")
  args = parser.parse_args()
  models = {"square (centre crop)": big_clip.load(args.square),
            "NaFlex": big_clip.load(args.naflex)}
  trained = models["NaFlex"].config.data.max_patches
  for budget in filter(None, args.max_patches.split(",")):
    model = big_clip.load(args.naflex)
    model.config.data.max_patches = int(budget)  # the towers read this config's data
    models[f"NaFlex at {budget} patches (trained at {trained})"] = model
  size = models["square (centre crop)"].config.data.image_size
  print("| model | task | square images | 1:3..3:1 canvases, object at an end |")
  print("|---|---|---|---|")
  for task in ("colour", "shape"):
    squares, labels = embedded.zeroshot_set(task, args.n, seed=0, image_size=size)
    wide = canvases(squares)
    for name, model in models.items():
      print(f"| {name} | {task} | {accuracy(model, squares, labels, task):.3f} | "
            f"{accuracy(model, wide, labels, task):.3f} |")


if __name__ == "__main__":
  main()
