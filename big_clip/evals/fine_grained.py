"""Fine-grained zero-shot per language (FG-CLIP's hard-negative test, on the embedded data):
each held-out image against one full caption of it and every caption of the same form with
one attribute (colour, shape, size, count, position) swapped.

`acc1`: the right caption scores highest among all its siblings; `acc_KIND`: it beats
every sibling of that kind (pairwise 'which colour?' etc.); `chance` is the mean
1 / (1 + siblings).
"""

from __future__ import annotations

import ml_collections
import numpy as np

from big_clip.data import embedded
from big_clip.evals import datasets, records, specs
from big_clip.evals import towers as towers_lib

TASK = "fine_grained"


class Evaluator:
  """The right caption among its attribute-swapped siblings, per language."""

  SOURCES = ("embedded",)
  OPTIONS = ("languages", "limit", "name")

  @classmethod
  def build(cls, spec: specs.EvalSpec, config: ml_collections.ConfigDict,
            towers: towers_lib.Towers, model_name: str) -> list[Evaluator]:
    return [cls(spec, config, towers, model_name)]

  def __init__(self, spec: specs.EvalSpec, config: ml_collections.ConfigDict,
               towers: towers_lib.Towers, model_name: str):
    self.towers, self.model_name = towers, model_name
    self.name = spec.options.get("name", "embedded_fine_grained")
    n = spec.limit or config.eval.num_images // 2
    self.languages = spec.languages or list(config.data.languages)
    self.sets = {}
    for lang in self.languages:
      images, positives, siblings = embedded.fine_grained_set(
          n, config.seed, config.data.image_size, lang)
      texts = [t for p, sib in zip(positives, siblings) for t in [p] + [s for _, s in sib]]
      owner = np.repeat(np.arange(n), [1 + len(s) for s in siblings])
      kinds = np.array([k for sib in siblings for k in ["", *(k for k, _ in sib)]])
      self.sets[lang] = (towers.tokenizer.encode(texts), owner, kinds)
    self.images = images  # the same images in every language

  def run(self, params) -> list[dict]:
    img_emb, _ = self.towers.images(params, datasets.array_set(self.images, self.name),
                                    f"{self.name}: images")
    rows = []
    for lang in self.languages:
      tokens, owner, kinds = self.sets[lang]
      txt_emb = self.towers.texts(params, tokens, desc=f"{self.name}: {lang}")
      scores = np.sum(img_emb[owner] * txt_emb, axis=-1)  # each caption with its image
      positive = scores[kinds == ""][owner]  # the right caption's score, per caption
      beaten = (scores < positive) | (kinds == "")  # the right caption wins against it
      n = len(self.images)
      won = lambda keep: np.array([beaten[(owner == i) & keep].all() for i in range(n)])
      metrics = {"acc1": float(won(np.ones_like(beaten)).mean()),
                 "chance": float(np.mean(1 / np.bincount(owner, minlength=n)))}
      for kind in embedded.SWAP_KINDS:
        has = np.bincount(owner[kinds == kind], minlength=n) > 0
        if has.any():
          metrics[f"acc_{kind}"] = float(won(kinds == kind)[has].mean())
      rows.append(records.record(self.name, self.model_name, TASK, lang, metrics,
                                 num_images=n, num_captions=len(tokens)))
    return rows + records.aggregates(rows, None)
