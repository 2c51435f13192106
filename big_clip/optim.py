"""AdamW with warmup + cosine decay, CLIP's weight-decay exclusions and global-norm clipping."""

from __future__ import annotations

import re
from typing import Any

import jax
import ml_collections
import optax

from big_clip.errors import UserError

# Weight decay is applied to weight matrices only (Linear kernels, the token embedding) --
# chosen by name, not rank, since scanned layers stack LayerNorm scales into [depth, W].
# Excluded as in CLIP / open_clip: norms, biases, position tables, the class token, the MAP
# probe and the logit scale/bias (decaying the temperature towards 0 would fight the loss).
DECAY_LEAF_NAMES = ("kernel", "embedding")


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  if cfg.schedule == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
        decay_steps=max(total_steps, cfg.warmup_steps + 1), end_value=cfg.lr * cfg.end_lr_ratio)
  if cfg.schedule == "warmup_constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps), optax.constant_schedule(cfg.lr)],
        [cfg.warmup_steps])
  raise ValueError(f"config.optim.schedule={cfg.schedule!r}; allowed: warmup_cosine, "
                   "warmup_constant.")


def decay_mask(params: Any) -> Any:
  """True for the parameters that get weight decay: leaves named in DECAY_LEAF_NAMES."""

  def one(path, leaf) -> bool:
    del leaf
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last))) in DECAY_LEAF_NAMES

  return jax.tree_util.tree_map_with_path(one, params)


def make(cfg: ml_collections.ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                      optax.Schedule]:
  """The optimizer for `config.optim` and its learning-rate schedule (for logging)."""
  schedule = learning_rate_schedule(cfg, total_steps)
  chain = []
  if cfg.clip_norm > 0:
    chain.append(optax.clip_by_global_norm(cfg.clip_norm))
  chain.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask))
  return optax.chain(*chain), schedule


# Frozen weights (e.g. a frozen LLM base, models/llm.py `Frozen`) are nnx Variables that are
# not nnx.Param. The train step differentiates and updates the `trainable` part only, so a
# frozen base gets neither gradients nor optimizer state.
def trainable_mask(model: Any, pattern: str = "", freeze: tuple[str, ...] = ()) -> Any:
  """Pure dict like `nnx.to_pure_dict(nnx.state(model))`: True where the leaf is nnx.Param,
  outside the top-level groups `freeze` (config.optim.freeze, e.g. ('image',)) and, if
  `pattern` (config.optim.trainable) is set, its dotted path matches it (re.search).
  """
  from flax import nnx
  from flax.nnx import traversals

  everything = traversals.flatten_mapping(nnx.to_pure_dict(nnx.state(model)))
  params = traversals.flatten_mapping(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  matches = lambda p: not pattern or re.search(pattern, ".".join(map(str, p))) is not None
  mask = {p: p in params and p[0] not in tuple(freeze) and matches(p) for p in everything}
  if not any(mask.values()):
    frozen = f" outside config.optim.freeze={tuple(freeze)}" if freeze else ""
    raise UserError(f"config.optim.trainable={pattern!r} matches no parameter{frozen}; paths "
                    f"look like {'.'.join(map(str, next(iter(params))))!r}.")
  return traversals.unflatten_mapping(mask)


def partition(tree: Any, mask: Any) -> tuple[Any, Any]:
  """(trainable, frozen) nested dicts of `tree`'s leaves where `mask` is True / False."""
  from flax.nnx import traversals

  flat, flat_mask = traversals.flatten_mapping(tree), traversals.flatten_mapping(mask)
  pick = lambda keep: traversals.unflatten_mapping(
      {p: v for p, v in flat.items() if flat_mask[p] == keep})
  return pick(True), pick(False)


def combine(trainable: Any, frozen: Any) -> Any:
  """The inverse of `partition`."""
  from flax.nnx import traversals

  return traversals.unflatten_mapping({**traversals.flatten_mapping(trainable),
                                       **traversals.flatten_mapping(frozen)})


# ---------------------------------------------------------------------------------------------
# Exponential moving average of the weights (config.optim.ema_decay).
# ---------------------------------------------------------------------------------------------
def ema_update(ema: Any, params: Any, decay: float) -> Any:
  """ema = decay * ema + (1 - decay) * params, leaf by leaf, in the params' dtype. Plain
  Polyak averaging as in timm's ModelEmaV2 with a fixed decay (no warmup of the decay)."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def with_ema(params: Any, ema: Any) -> Any:
  """`params` with every leaf that `ema` holds replaced by its average: the EMA covers the
  trainable weights only, a frozen base is the same in both."""
  return combine(params, ema)
