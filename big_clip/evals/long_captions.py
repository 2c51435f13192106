"""Long-caption retrieval on held-out embedded images (Long-CLIP's Urban-1k-style test, on data
we make): each image has one long caption whose colour and shape come after the first 77
tokens (`embedded.long_caption`); reports image <-> text recall@1/5/10.

    long_captions:embedded,limit=200     (limit: the number of images; default 200)

Captions are tokenized by the run's tokenizer at `config.data.max_len`, so a 77-token model
sees them truncated, exactly as it would in use. Records follow CLIP_benchmark's retrieval
names through `metrics.retrieval_metrics` (one caption per image).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from big_clip import sharding
from big_clip.data import embedded, pipeline
from big_clip.evals import metrics as metrics_lib
from big_clip.evals import records, specs
from big_clip.evals import towers as towers_lib

DATASET = "embedded_long_captions"
DEFAULT_IMAGES = 200


class Evaluator:
  """Image <-> long-caption retrieval on `limit` held-out embedded images (English)."""

  SOURCES = ("embedded",)
  OPTIONS = ("limit", "name")

  @classmethod
  def build(cls, spec: specs.EvalSpec, config: ml_collections.ConfigDict,
            towers: towers_lib.Towers, model_name: str) -> list[Evaluator]:
    return [cls(spec, config, towers, model_name)]

  def __init__(self, spec: specs.EvalSpec, config: ml_collections.ConfigDict,
               towers: towers_lib.Towers, model_name: str):
    n = spec.limit or DEFAULT_IMAGES
    images, captions = embedded.long_caption_set(n, seed=config.seed,
                                                 image_size=config.data.image_size)
    self.name = spec.options.get("name", DATASET)
    self.images = pipeline.normalize(images, config.data.mean, config.data.std)
    self.tokens = towers.tokenizer.encode(captions)
    self.towers, self.model_name = towers, model_name

  def run(self, params: Any) -> list[dict]:
    t = self.towers
    img = sharding.embed_batched(t.image_fn, params, self.images, t.mesh, t.batch_size)
    txt = t.texts(params, self.tokens)
    metrics = metrics_lib.retrieval_metrics(img @ txt.T, np.arange(len(img)))
    if jax.process_index() == 0:
      print(f"long-caption retrieval ({len(img)} images, {self.tokens.shape[1]} tokens, "
            f"chance@1 {100 / len(img):.1f}%): "
            + "  ".join(f"{k} {100 * v:.1f}%" for k, v in metrics.items()), flush=True)
    return [records.record(self.name, self.model_name, records.RETRIEVAL, "en", metrics,
                           num_images=len(img), num_texts=len(img))]
