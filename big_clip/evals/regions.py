"""Region retrieval per language (CLOC §4's region-text retrieval, on the embedded data):
every object box of the held-out images against every region caption.

A query is right when its top hit describes / shows the same object (shape, colour and
size): the objects of one image are identical, so "which box is 'a small red circle'?" has
every small red circle among the candidates as a right answer. `chance` is the mean share
of right candidates per query (what a random ranking scores at R@1).
"""

from __future__ import annotations

import ml_collections
import numpy as np

from big_clip.data import embedded
from big_clip.evals import records, specs
from big_clip.evals import towers as towers_lib

TASK = "region_retrieval"


class Evaluator:
  """Box <-> caption retrieval over the embedded test split's objects, per language."""

  SOURCES = ("embedded",)
  OPTIONS = ("languages", "limit", "name")

  @classmethod
  def build(cls, spec: specs.EvalSpec, config: ml_collections.ConfigDict,
            towers: towers_lib.Towers, model_name: str) -> list[Evaluator]:
    return [cls(spec, config, towers, model_name)]

  def __init__(self, spec: specs.EvalSpec, config: ml_collections.ConfigDict,
               towers: towers_lib.Towers, model_name: str):
    if towers.region_fn is None:
      raise ValueError(f"eval {spec.text!r} needs a model with a region prompter: train with "
                       "config.model.region.depth > 0 and config.loss.region_weight > 0.")
    self.towers, self.model_name = towers, model_name
    self.name = spec.options.get("name", "embedded_regions")
    n = spec.limit or config.eval.num_images // 4
    self.images, boxes, attrs = embedded.region_set(n, config.seed, config.data.image_size)
    r = max(len(b) for b in boxes)
    self.boxes = np.zeros((n, r, 4), np.float32)
    self.valid = np.zeros((n, r), bool)
    for i, b in enumerate(boxes):
      self.boxes[i, :len(b)], self.valid[i, :len(b)] = b, True
    # The object of every valid box, as (shape, colour, size).
    self.keys = np.array([(a["shape"], a["colour"], a["size"]) for a, b in zip(attrs, boxes)
                          for _ in b])
    self.languages = spec.languages or list(config.data.languages)
    self.tokens = {}
    for lang in self.languages:  # one caption per box, its template drawn per image
      texts = []
      for i, (a, b) in enumerate(zip(attrs, boxes)):
        options = embedded.region_captions(a, lang)
        pick = np.random.default_rng([config.seed, 0x4E6, i]).integers(len(options), size=len(b))
        texts += [options[k] for k in pick]
      self.tokens[lang] = towers.tokenizer.encode(texts)

  def run(self, params) -> list[dict]:
    region_emb = self.towers.regions(params, self.images, self.boxes,
                                     desc=f"{self.name}: regions")[self.valid]  # [M, D]
    same = (self.keys[:, None] == self.keys[None, :]).all(-1)  # [M, M] right answers
    rows = []
    for lang in self.languages:
      txt_emb = self.towers.texts(params, self.tokens[lang], desc=f"{self.name}: {lang}")
      scores = txt_emb @ region_emb.T  # [texts, boxes]
      metrics = {"text_to_region_acc1": float(same[np.arange(len(same)),
                                                   scores.argmax(1)].mean()),
                 "region_to_text_acc1": float(same[np.arange(len(same)),
                                                   scores.argmax(0)].mean()),
                 "chance": float(same.mean(1).mean())}
      rows.append(records.record(self.name, self.model_name, TASK, lang, metrics,
                                 num_images=len(self.images), num_regions=len(same)))
    return rows + records.aggregates(rows, None)
