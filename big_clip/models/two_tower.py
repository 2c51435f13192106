"""The dual encoder (CLIP, Radford et al. 2021; SigLIP, Zhai et al. 2023): an image tower
and a text tower mapping into one L2-normalized joint space, plus the learned logit scale
(temperature) and bias of the contrastive loss.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from big_clip.models import llm, text, vit


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) in float32 (as torch F.normalize); finite gradient at x = 0."""
  x = x.astype(jnp.float32)
  sum_sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sum_sq, eps * eps))


class TwoTower(nnx.Module):
  """`image` (ViT) and `text` towers + `logit_scale`, `logit_bias`.

  The text tower is CLIP's TextTransformer (`config.model.text.kind='clip'`) or a decoder
  LLM with an adapter (`'llm'`, models/llm.py), which also takes cached LLM features.
  """

  def __init__(self, cfg: Any, *, rngs: nnx.Rngs):
    self.embed_dim = int(cfg.embed_dim)
    self.image = vit.ViT(cfg, rngs=rngs)
    kind = cfg.text.get("kind", "clip")
    if kind == "llm":
      self.text = llm.LlmTextTower(cfg, rngs=rngs)
    elif kind == "clip":
      self.text = text.TextTransformer(cfg, rngs=rngs)
    else:
      raise ValueError(f"config.model.text.kind={kind!r}; allowed: clip, llm.")
    # CLIP: logit_scale = log(1/0.07); SigLIP: log(10) with logit_bias = -10.
    self.logit_scale = nnx.Param(jnp.asarray(cfg.logit_scale_init, jnp.float32))
    self.logit_bias = nnx.Param(jnp.asarray(cfg.logit_bias_init, jnp.float32))
    self.logit_scale_max = float(cfg.logit_scale_max)

  def encode_image(self, images: jax.Array, patch_noise: jax.Array | None = None
                   ) -> jax.Array:
    """[B, H, W, 3] normalized images -> L2-normalized float32 [B, embed_dim].

    `patch_noise` [B, N] (training only) turns on the image tower's patch dropout."""
    emb = l2_normalize(self.image(images, patch_noise))
    chex.assert_shape(emb, (images.shape[0], self.embed_dim))
    return emb

  def encode_text(self, tokens: jax.Array) -> jax.Array:
    """int32 [B, L] tokens (or cached LLM features [B, hidden]) -> L2-normalized float32
    [B, embed_dim]."""
    emb = l2_normalize(self.text(tokens))
    chex.assert_shape(emb, (tokens.shape[0], self.embed_dim))
    return emb

  def __call__(self, images: jax.Array, tokens: jax.Array,
               patch_noise: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    return self.encode_image(images, patch_noise), self.encode_text(tokens)

  def scale_and_bias(self) -> tuple[jax.Array, jax.Array]:
    """(min(exp(logit_scale), logit_scale_max), logit_bias) as float32 scalars.

    jnp.minimum gives zero gradient once clipped, like open_clip's `logit_scale.clamp_`
    (Radford et al. 2021 §2.5: "clipped to prevent scaling the logits by more than 100").
    """
    scale = jnp.minimum(jnp.exp(self.logit_scale[...].astype(jnp.float32)),
                        self.logit_scale_max)
    return scale, self.logit_bias[...].astype(jnp.float32)


def load_pretrained(params: dict, model_cfg: Any, shardings: Any = None) -> None:
  """Loads pretrained tower weights named by the config into TwoTower `params` (a pure dict,
  in place): today the LLM of `config.model.text.llm.path`. A no-op otherwise."""
  llm_cfg = model_cfg.text.llm
  if model_cfg.text.kind == "llm" and llm_cfg.path and not llm_cfg.cache_dir:
    llm.load_pretrained(params["text"]["decoder"], llm_cfg.path,
                        None if shardings is None else shardings["text"]["decoder"])
