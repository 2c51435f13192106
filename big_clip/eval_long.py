"""Long-caption retrieval on held-out embedded images (issue 8, Long-CLIP's Urban-1k-style
test on data we make): each image has one long caption whose colour and shape come after
the first 77 tokens (`sources.long_caption`); report image <-> text recall@1/5.

Captions are tokenized by the run's tokenizer at `config.data.max_len`, so a 77-token model
sees them truncated, exactly as it would in use. Records follow CLIP_benchmark's retrieval
names: `image_retrieval_recall@k` (text -> image), `text_retrieval_recall@k` (image -> text).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

DATASET = "embedded_long_captions"


def retrieval_metrics(img_emb: np.ndarray, txt_emb: np.ndarray,
                      ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
  """Recall@k both ways for paired rows (row i of each is a pair); ties count against."""
  sim = img_emb @ txt_emb.T  # [N images, N texts]
  true = np.diag(sim)[:, None]
  # Rank of the true partner = how many candidates score strictly higher (or equal, other).
  others_img = (sim > true) | ((sim == true) & ~np.eye(len(sim), dtype=bool))
  text_rank = others_img.sum(axis=1)  # image -> text
  others_txt = (sim > true.T) | ((sim == true.T) & ~np.eye(len(sim), dtype=bool))
  image_rank = others_txt.sum(axis=0)  # text -> image
  out = {}
  for k in ks:
    out[f"image_retrieval_recall@{k}"] = float(np.mean(image_rank < k))
    out[f"text_retrieval_recall@{k}"] = float(np.mean(text_rank < k))
  return out


class LongCaptionRetrieval:
  """Image <-> long-caption retrieval on `config.eval.long_caption_images` test images."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer, mesh: jax.sharding.Mesh,
               image_fn: Callable, text_fn: Callable, model_name: str):
    from big_clip.data import pipeline, sources

    n = int(config.eval.long_caption_images)
    images, captions = sources.long_caption_set(n, seed=config.seed,
                                                image_size=config.data.image_size)
    self.images = pipeline.normalize(images, config.data.mean, config.data.std)
    self.tokens = tokenizer.encode(captions)
    self.mesh, self.image_fn, self.text_fn = mesh, image_fn, text_fn
    self.batch_size, self.model_name = int(config.eval.batch_size), model_name

  def run(self, params: Any) -> list[dict]:
    from big_clip import evaluate

    img = evaluate.embed_batched(self.image_fn, params, self.images, self.mesh, self.batch_size)
    txt = evaluate.embed_batched(self.text_fn, params, self.tokens, self.mesh, self.batch_size)
    metrics = retrieval_metrics(img, txt)
    if jax.process_index() == 0:
      print(f"long-caption retrieval ({len(img)} images, {self.tokens.shape[1]} tokens, "
            f"chance@1 {100 / len(img):.1f}%): "
            + "  ".join(f"{k} {100 * v:.1f}%" for k, v in metrics.items()), flush=True)
    return [{"dataset": DATASET, "model": self.model_name, "task": "zeroshot_retrieval",
             "language": "en", "metrics": metrics}]
