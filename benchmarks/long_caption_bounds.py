r"""The best text -> image R@1 a model can reach on the long-caption retrieval set
(big_clip/evals/long_captions.py) when it reads only part of each caption.

  python -m benchmarks.long_caption_bounds [--images 200] [--seed 0]

Each embedded test image has one long caption (`embedded.long_caption`) that names the count,
size and position of its objects within the first 77 tokens and the colour and shape only
after them. A model that reads a set of attributes perfectly can still not tell apart the
images that share them: for a caption whose image shares those attributes with m images
(itself included), guessing among them gives R@1 = 1/m in expectation. The bound is the mean
of 1/m over the captions, exact from the images' attributes (no model involved):
- cut at 77 tokens: count, size, position;
- + colour (read past token 77);
- + colour + shape (the whole caption).
Prints a table; benchmarks/RESULTS.md ("Long captions") cites it.
"""

from __future__ import annotations

import argparse
import collections

import numpy as np

from big_clip.data import embedded

READS = {
    "77 tokens (count, size, position)": ("count", "size", "position"),
    "+ colour": ("count", "size", "position", "colour"),
    "+ colour + shape (whole caption)": ("count", "size", "position", "colour", "shape"),
}


def test_attributes(n: int, seed: int) -> list[dict]:
  """The attributes of the long-caption evaluator's n test images (the same draw as embedded.long_caption_set;
  the attributes do not depend on the image size)."""
  return [embedded.render_example(seed, "test", index, 16)[1] for index in range(n)]


def r1_bound(attrs: list[dict], keys: tuple[str, ...]) -> float:
  """The best expected T->I R@1 reading `keys`: the mean over captions of 1/m."""
  groups = collections.Counter(tuple(a[k] for k in keys) for a in attrs)
  sizes = np.array([groups[tuple(a[k] for k in keys)] for a in attrs], np.float64)
  return float(np.mean(1 / sizes))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--images", type=int, default=200)  # configs/longclip_finetune.py
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  attrs = test_attributes(args.images, args.seed)
  print(f"| reads ({args.images} test images, seed {args.seed}) | equally good images "
        "(harmonic mean of m) | T->I R@1 at most |")
  print("| --- | --- | --- |")
  for name, keys in READS.items():
    bound = r1_bound(attrs, keys)
    print(f"| {name} | {1 / bound:.1f} | {100 * bound:.1f}% |")


if __name__ == "__main__":
  main()
