"""The jitted towers of a model and how to feed them: every evaluator embeds through this."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from big_clip import sharding
from big_clip.data import files, pipeline
from big_clip.evals import datasets
from big_clip.evals import metrics as metrics_lib


@dataclasses.dataclass
class Towers:
  """The jitted towers and what feeding them needs."""
  image_fn: Callable
  text_fn: Callable
  mesh: jax.sharding.Mesh
  tokenizer: Any
  batch_size: int
  image_size: int
  data_cfg: ml_collections.ConfigDict  # how images become the tower's input (mean, NaFlex)
  # (params, images, boxes [B, R, 4]) -> region embeddings [B, R, D]; None without a
  # region prompter (config.model.region.depth = 0).
  region_fn: Callable | None = None
  # Eval images are centre-cropped squares, except for NaFlex models (config.data.max_patches
  # > 0), which see each image whole at its own aspect ratio, as in training.
  crop: bool = True

  @classmethod
  def build(cls, config: ml_collections.ConfigDict, tokenizer, graphdef: nnx.GraphDef,
            mesh: jax.sharding.Mesh) -> Towers:
    with jax.set_mesh(mesh):
      image_fn = jax.jit(lambda p, x: nnx.merge(graphdef, p).encode_image(x))
      text_fn = jax.jit(lambda p, t: nnx.merge(graphdef, p).encode_text(t))
      region_fn = (jax.jit(lambda p, x, b: nnx.merge(graphdef, p).encode_image_regions(x, b))
                   if config.model.region.depth > 0 else None)
    return cls(image_fn, text_fn, mesh, tokenizer, config.eval.batch_size,
               config.data.image_size, config.data, region_fn,
               crop=files.naflex_setting(config.data) is None)

  def images(self, params, images: datasets.ImageSet, desc: str) -> tuple[np.ndarray, np.ndarray]:
    """([N, D] embeddings, [N] bool: decoded fine); failed images are warned about by name."""
    emb = sharding.embed_batched(self.image_fn, params, images, self.mesh, self.batch_size, desc=desc,
                        preprocess=lambda x: pipeline.model_images(x, self.data_cfg))
    failed = np.zeros(len(images), np.int32)
    failed[list(images.failed)] = 1
    if jax.process_count() > 1:  # each process decoded its own rows
      failed = np.asarray(multihost_utils.process_allgather(failed)).max(axis=0)
    for i in np.flatnonzero(failed)[:5]:
      logging.warning("%s: skipping %s", desc, images.failed.get(int(i), images.names[i]))
    if failed.any():
      logging.warning("%s: %d of %d images could not be decoded and were skipped.", desc,
                      int(failed.sum()), len(images))
    return emb, failed == 0

  def regions(self, params, images: np.ndarray, boxes: np.ndarray, desc: str | None = None
              ) -> np.ndarray:
    """uint8 images [N, H, W, 3] and their boxes [N, R, 4] -> region embeddings [N, R, D].
    Images and boxes travel as one packed row each through the sharded batching."""
    if self.region_fn is None:
      raise ValueError("Region evals need a model with a region prompter "
                       "(config.model.region.depth > 0, trained with loss.region_weight).")
    n, r = boxes.shape[:2]
    shape, pixels = images.shape[1:], int(np.prod(images.shape[1:]))
    packed = np.concatenate([images.reshape(n, -1).astype(np.float32),
                             boxes.reshape(n, -1).astype(np.float32)], axis=1)
    unpack = lambda x: (pipeline.model_images(x[:, :pixels].reshape(-1, *shape), self.data_cfg)
                        .reshape(len(x), -1))
    prepare = lambda x: np.concatenate([unpack(x), x[:, pixels:]], axis=1)
    fn = lambda p, x: self.region_fn(p, x[:, :pixels].reshape(-1, *shape),
                                     x[:, pixels:].reshape(-1, r, 4)).reshape(x.shape[0], -1)
    emb = sharding.embed_batched(fn, params, packed, self.mesh, self.batch_size, desc=desc,
                                 preprocess=prepare)
    return emb.reshape(n, r, -1)

  def texts(self, params, tokens: np.ndarray, desc: str | None = None) -> np.ndarray:
    return sharding.embed_batched(self.text_fn, params, tokens, self.mesh, self.batch_size, desc=desc)


def class_embeddings(towers: Towers, params, tokens: np.ndarray, num_classes: int
                     ) -> np.ndarray:
  """[K, D] from the [K * T, L] prompt tokens (class-major): prompt ensembling."""
  emb = towers.texts(params, tokens)
  return metrics_lib.ensemble(emb.reshape(num_classes, len(tokens) // num_classes, -1))
