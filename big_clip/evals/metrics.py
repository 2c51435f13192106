"""Zero-shot metrics with CLIP_benchmark's names, in NumPy (they run on the host, after
the embeddings are gathered).

Ties are broken by index: of two equal scores the one with the lower index ranks first, as
a stable sort of the scores would order them. So a result never depends on the sort
algorithm, and a model that outputs constant scores gets the lowest-index answer.
"""

from __future__ import annotations

import numpy as np

RECALL_KS = (1, 5, 10)


def _rank_of(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
  """[N] 0-based rank of column `target[n]` in row n (higher score first, ties by index)."""
  rows = np.arange(len(scores))
  own = scores[rows, target][:, None]
  cols = np.arange(scores.shape[1])[None, :]
  return (np.sum(scores > own, axis=1) +
          np.sum((scores == own) & (cols < target[:, None]), axis=1))


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """acc1, acc5 (when there are more than 5 classes) and mean per-class recall.

  logits: [N, K]; labels: [N] in [0, K). Mean per-class recall averages the top-1 recall
  of the classes that have images (sklearn's balanced accuracy, as CLIP_benchmark).
  """
  labels = np.asarray(labels)
  if logits.ndim != 2 or labels.shape != (len(logits),):
    raise ValueError(f"logits [N, K] and labels [N] expected; got {logits.shape}, {labels.shape}")
  if len(labels) == 0:
    raise ValueError("classification_metrics: no images to score.")
  k = logits.shape[1]
  rank = _rank_of(logits, labels)
  metrics = {"acc1": float(np.mean(rank < 1))}
  if k > 5:  # with K <= 5 classes acc5 is 1 by construction
    metrics["acc5"] = float(np.mean(rank < 5))
  recalls = [np.mean(rank[labels == c] < 1) for c in np.unique(labels)]
  metrics["mean_per_class_recall"] = float(np.mean(recalls))
  return metrics


def retrieval_metrics(scores: np.ndarray, text_to_image: np.ndarray,
                      ks: tuple[int, ...] = RECALL_KS) -> dict[str, float]:
  """Recall@k both ways, CLIP_benchmark's protocol and names.

  scores: [N_images, N_texts] similarities; text_to_image: [N_texts] the image of each text
  (an image may have several). `image_retrieval_recall@k`: a text query is correct when its
  image is in the top k images. `text_retrieval_recall@k`: an image query is correct when
  any of its texts is in the top k texts.
  """
  text_to_image = np.asarray(text_to_image)
  n_img, n_txt = scores.shape
  if text_to_image.shape != (n_txt,):
    raise ValueError(f"text_to_image must have one entry per text ({n_txt}); got "
                     f"{text_to_image.shape}")
  if not np.array_equal(np.unique(text_to_image), np.arange(n_img)):
    raise ValueError("retrieval_metrics: every image needs at least one text.")
  text_rank = _rank_of(scores.T, text_to_image)  # text -> image
  # Image -> text: the best-ranked positive is the one with the highest score, and of equal
  # scores the lowest index (the rank is monotone in both); its rank decides top-k.
  positive = text_to_image[None, :] == np.arange(n_img)[:, None]
  best_text = np.argmax(np.where(positive, scores, -np.inf), axis=1)
  image_rank = _rank_of(scores, best_text)
  metrics = {}
  for k in ks:
    metrics[f"image_retrieval_recall@{k}"] = float(np.mean(text_rank < k))
    metrics[f"text_retrieval_recall@{k}"] = float(np.mean(image_rank < k))
  return metrics


def ensemble(prompt_emb: np.ndarray) -> np.ndarray:
  """[K, T, D] prompt embeddings -> [K, D] class embeddings (CLIP §3.1.4 prompt ensembling):
  normalize each prompt embedding, average over the T templates, renormalize."""
  prompt_emb = prompt_emb / np.linalg.norm(prompt_emb, axis=-1, keepdims=True)
  mean = prompt_emb.mean(axis=1)
  return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


def mean_metrics(per_language: list[dict[str, float]]) -> dict[str, float]:
  """The mean of each metric over the languages that report it."""
  keys = dict.fromkeys(k for m in per_language for k in m)
  return {k: float(np.mean([m[k] for m in per_language if k in m])) for k in keys}
