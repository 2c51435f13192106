"""Image <-> text retrieval per language on a captioned manifest (CLIP_benchmark protocol):
recall@1/5/10 text->image and image->text; an image query is right when any of its captions
is in the top k."""

from __future__ import annotations

import ml_collections
import numpy as np
from absl import logging

from big_clip.evals import datasets
from big_clip.evals import metrics as metrics_lib
from big_clip.evals import records, specs
from big_clip.evals import towers as towers_lib


class Evaluator:
  """Image-text retrieval on a captioned manifest, per language."""

  SOURCES = ("manifest",)  # retrieval needs captions: only manifests have them
  OPTIONS = ("languages", "limit", "name")

  @classmethod
  def build(cls, spec: specs.EvalSpec, config: ml_collections.ConfigDict,
            towers: towers_lib.Towers, model_name: str) -> list[Evaluator]:
    return [cls(spec, towers, model_name)]

  def __init__(self, spec: specs.EvalSpec, towers: towers_lib.Towers, model_name: str):
    self.spec, self.towers, self.model_name = spec, towers, model_name
    data = datasets.captioned_set(spec, towers.image_size, towers.crop)
    self.name = spec.options.get("name", data.name)
    self.images = data.images
    unknown = sorted(set(spec.languages or []) - set(data.languages))
    if unknown:
      raise ValueError(f"eval {spec.text!r}: languages {unknown} have no captions in "
                       f"{spec.location!r}; its languages: {data.languages}.")
    self.languages = spec.languages or data.languages
    # Per language: every caption's tokens and the image it belongs to, tokenized once.
    self.tokens, self.owner = {}, {}
    for lang in self.languages:
      pairs = [(i, c) for i, caps in enumerate(data.captions) for c in caps.get(lang, [])]
      self.owner[lang] = np.asarray([i for i, _ in pairs])
      self.tokens[lang] = towers.tokenizer.encode([c for _, c in pairs])

  def run(self, params) -> list[dict]:
    img_emb, ok = self.towers.images(params, self.images, f"{self.name}: images")
    skipped = [self.images.names[i] for i in np.flatnonzero(~ok)]
    rows = []
    for lang in self.languages:
      owner = self.owner[lang]
      keep_text = ok[owner]
      images = np.unique(owner[keep_text])  # images with a caption in this language
      if not len(images):
        logging.warning("%s/%s: no decodable image has a caption; skipped.", self.name, lang)
        continue
      txt_emb = self.towers.texts(params, self.tokens[lang], desc=f"{self.name}: {lang} texts")
      scores = img_emb[images] @ txt_emb[keep_text].T
      text_to_image = np.searchsorted(images, owner[keep_text])
      extra = {"num_images": len(images), "num_texts": int(keep_text.sum())}
      if skipped:
        extra["skipped_images"] = skipped
      rows.append(records.record(self.name, self.model_name, records.RETRIEVAL, lang,
                                 metrics_lib.retrieval_metrics(scores, text_to_image), **extra))
    return rows + records.aggregates(rows, None)
