"""Long-caption retrieval on held-out embedded images (issue 8, Long-CLIP's Urban-1k-style
test on data we make): each image has one long caption whose colour and shape come after
the first 77 tokens (`sources.long_caption`); report image <-> text recall@1/5/10.

Captions are tokenized by the run's tokenizer at `config.data.max_len`, so a 77-token model
sees them truncated, exactly as it would in use. Records follow CLIP_benchmark's retrieval
names through `evals.metrics.retrieval_metrics` (one caption per image).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from big_clip.evals import metrics as metrics_lib

DATASET = "embedded_long_captions"


class LongCaptionRetrieval:
  """Image <-> long-caption retrieval on `config.eval.long_caption_images` test images."""

  def __init__(self, config: ml_collections.ConfigDict, towers, model_name: str):
    from big_clip.data import pipeline, sources

    n = int(config.eval.long_caption_images)
    images, captions = sources.long_caption_set(n, seed=config.seed,
                                                image_size=config.data.image_size)
    self.images = pipeline.normalize(images, config.data.mean, config.data.std)
    self.tokens = towers.tokenizer.encode(captions)
    self.towers, self.model_name = towers, model_name

  def run(self, params: Any) -> list[dict]:
    from big_clip import evaluate

    t = self.towers
    img = evaluate.embed_batched(t.image_fn, params, self.images, t.mesh, t.batch_size)
    txt = t.texts(params, self.tokens)
    metrics = metrics_lib.retrieval_metrics(img @ txt.T, np.arange(len(img)))
    if jax.process_index() == 0:
      print(f"long-caption retrieval ({len(img)} images, {self.tokens.shape[1]} tokens, "
            f"chance@1 {100 / len(img):.1f}%): "
            + "  ".join(f"{k} {100 * v:.1f}%" for k, v in metrics.items()), flush=True)
    return [{"dataset": DATASET, "model": self.model_name, "task": "zeroshot_retrieval",
             "language": "en", "metrics": metrics,
             "num_images": len(img), "num_texts": len(img)}]
