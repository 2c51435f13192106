"""Contrastive image-text losses, picked by name: `get(config.loss.name)`.

Every loss module exposes

    loss(img_emb, txt_emb, scale, bias, *, mesh=None) -> float32 scalar

with `img_emb`, `txt_emb` the global `[B, D]` L2-normalized embeddings (row i of each is a
pair), `scale` the logit multiplier (already exponentiated, e.g. `exp(log_scale)`) and
`bias` the logit bias. `mesh=None` computes the full batch on one device; with a mesh the
loss runs under `jax.shard_map` on each device's batch block (split over `BATCH_AXES`)
and exchanges only what it needs, giving the same value and gradients as the full batch.

The devices whose blocks form one contrastive batch are the *exchange domain*
(`Exchange`): all devices on the batch axes for softmax and sigmoid, groups of
`group_size` consecutive devices for the grouped loss (M2-Encoder), which runs the very
same softmax / sigmoid body with a smaller domain.

This file is the registry (`get`, `from_config`); what the losses share (input checks, the
float32 similarity block, the exchange domain, the shard_map wrapper) is in `shared.py`.
"""

from __future__ import annotations

import functools
import importlib
from typing import Protocol

import jax
import ml_collections
from jax.sharding import Mesh

from big_clip import config as config_lib

NAMES = config_lib.LOSS_NAMES


class LossFn(Protocol):

  def __call__(self, img_emb: jax.Array, txt_emb: jax.Array, scale: jax.Array,
               bias: jax.Array | None, *, mesh: Mesh | None = None) -> jax.Array:
    ...


def get(name: str) -> LossFn:
  """The `loss` function of the module `big_clip.losses.<name>`."""
  if name not in NAMES:
    raise ValueError(f"config.loss.name={name!r} is not a known loss; allowed: {NAMES}.")
  return importlib.import_module(f"big_clip.losses.{name}").loss


def from_config(loss_cfg: ml_collections.ConfigDict) -> LossFn:
  """The loss of `config.loss`, with the grouped loss's `group_size` / `group_base` bound."""
  fn = get(loss_cfg.name)
  if loss_cfg.name == "grouped":
    fn = functools.partial(fn, group_size=loss_cfg.group_size or None,
                           base=loss_cfg.group_base)
  return fn
