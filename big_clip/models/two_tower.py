"""The dual encoder (CLIP, Radford et al. 2021; SigLIP, Zhai et al. 2023): an image tower
and a text tower mapping into one L2-normalized joint space, plus the learned logit scale
(temperature) and bias of the contrastive loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from big_clip import sharding
from big_clip.models import decoder, llm, region, text, vit


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
    self.eos_id, self.pad_id = int(cfg.text.eos_id), int(cfg.text.pad_id)
    self.image = vit.ViT(cfg, rngs=rngs)
    kind = cfg.text.kind
    if kind == "llm":
      self.text = llm.LlmTextTower(cfg, rngs=rngs)
    elif kind == "clip":
      self.text = text.TextTransformer(cfg, rngs=rngs)
    else:
      raise ValueError(f"config.model.text.kind={kind!r}; allowed: clip, llm.")
    # CLIP: logit_scale = log(1/0.07); SigLIP: log(10) with logit_bias = -10.
    self.logit_scale = nnx.Param(jnp.asarray(cfg.logit_scale_init, jnp.float32))
    self.logit_bias = nnx.Param(jnp.asarray(cfg.logit_bias_init, jnp.float32))
    # CoCa / CapPa caption decoder (config.loss.caption), absent unless decoder.depth > 0.
    dec = cfg.get("decoder")
    self.decoder = decoder.CaptionDecoder(cfg, rngs=rngs) if dec and dec.depth > 0 else None
    # CLOC's region prompter (config.loss.region_weight), absent unless region.depth > 0.
    reg = cfg.get("region")
    self.region = region.RegionPrompter(cfg, rngs=rngs) if reg and reg.depth > 0 else None

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
    return self.forward(images, tokens, patch_noise)[:2]

  def forward(self, images: jax.Array, tokens: jax.Array,
              patch_noise: jax.Array | None = None
              ) -> tuple[jax.Array, jax.Array, dict[str, dict[str, jax.Array]]]:
    """(image embeddings, text embeddings, {tower: MoE routing statistics}) for training:
    a tower without MoE layers has no entry (models/moe.py `aux_loss` weighs them)."""
    img, img_stats = self.image.forward(images, patch_noise)
    if isinstance(self.text, text.TextTransformer):
      txt, txt_stats = self.text.forward(tokens)
    else:
      txt, txt_stats = self.text(tokens), {}
    img_emb, txt_emb = l2_normalize(img), l2_normalize(txt)
    chex.assert_shape(img_emb, (images.shape[0], self.embed_dim))
    chex.assert_shape(txt_emb, (tokens.shape[0], self.embed_dim))
    stats = {name: s for name, s in (("image", img_stats), ("text", txt_stats)) if s}
    return img_emb, txt_emb, stats

  def embed_with_image_tokens(self, images: jax.Array, tokens: jax.Array,
                              patch_noise: jax.Array | None = None
                              ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`__call__` plus the image tower's last-block tokens [B, T', W] (for the decoder)."""
    pooled, image_tokens = self.image.features(images, patch_noise)
    img_emb = l2_normalize(pooled)
    chex.assert_shape(img_emb, (images.shape[0], self.embed_dim))
    return img_emb, self.encode_text(tokens), image_tokens

  def encode_regions(self, image_tokens: jax.Array, boxes: jax.Array) -> jax.Array:
    """The image tower's last-block tokens [B, T', W] (`embed_with_image_tokens`) and boxes
    [B, R, 4] (relative [x0, y0, x1, y1]) -> L2-normalized float32 [B, R, embed_dim]."""
    if self.region is None:
      raise ValueError("This model has no region prompter (config.model.region.depth=0); "
                       "train with config.loss.region_weight > 0.")
    patches = image_tokens[:, 1:] if self.image.pool == "cls" else image_tokens
    emb = l2_normalize(self.region(patches, boxes))
    chex.assert_shape(emb, (*boxes.shape[:2], self.embed_dim))
    return emb

  def encode_image_regions(self, images: jax.Array, boxes: jax.Array) -> jax.Array:
    """[B, H, W, 3] normalized images and their boxes [B, R, 4] -> L2-normalized region
    embeddings [B, R, embed_dim] (evals)."""
    _, image_tokens = self.image.features(images)
    return self.encode_regions(image_tokens, boxes)

  def caption(self, images: jax.Array, length: int, *, parallel: bool = False,
              prefix: jax.Array | None = None) -> jax.Array:
    """Greedy captions int32 [B, length] of [B, H, W, 3] normalized images, optionally
    continuing `prefix` [B, P] (models/decoder.greedy_decode)."""
    if self.decoder is None:
      raise ValueError("This model has no caption decoder (config.model.decoder.depth=0); "
                       "train with config.loss.caption.weight > 0.")
    _, image_tokens = self.image.features(images)
    return decoder.greedy_decode(self.decoder, image_tokens, length, eos_id=self.eos_id,
                                 pad_id=self.pad_id, parallel=parallel, prefix=prefix)

  def scale_and_bias(self) -> tuple[jax.Array, jax.Array]:
    """(exp(logit_scale), logit_bias) as float32 scalars. The cap logit_scale_max is kept
    by `clamp_logit_scale` on the parameter after each update, as open_clip does."""
    scale = jnp.exp(self.logit_scale[...].astype(jnp.float32))
    return scale, self.logit_bias[...].astype(jnp.float32)


def clamp_logit_scale(params: dict, model_cfg: Any) -> dict:
  """`params` (a pure dict) with `logit_scale` clamped to [0, ln(logit_scale_max)].

  Radford et al. 2021 §2.5: the temperature is "clipped to prevent scaling the logits by
  more than 100". open_clip clamps the parameter after each step (`logit_scale.clamp_(0,
  ln 100)`), not the value in the forward pass: clipping the value would zero its gradient
  once past the cap, and the parameter could never come back down.
  """
  if "logit_scale" not in params:  # frozen (not in the trainable part)
    return params
  cap = jnp.log(jnp.float32(model_cfg.logit_scale_max))
  return {**params, "logit_scale": jnp.clip(params["logit_scale"], 0.0, cap).astype(
      params["logit_scale"].dtype)}


def init_fn(model_cfg: Any, seed: int = 0) -> Callable[[], TwoTower]:
  """The model's constructor with its rng; `nnx.eval_shape` of it gives shapes only."""
  return lambda: TwoTower(model_cfg, rngs=nnx.Rngs(params=seed))


def abstract_params(model_cfg: Any, mesh: jax.sharding.Mesh | None = None
                    ) -> tuple[nnx.GraphDef, Any, Any]:
  """(graphdef, abstract params as a pure dict of ShapeDtypeStructs, their NamedShardings on
  `mesh` or None), without allocating anything."""
  abstract_model = nnx.eval_shape(init_fn(model_cfg))
  graphdef, abstract_state = nnx.split(abstract_model)
  shardings = (None if mesh is None
               else nnx.to_pure_dict(sharding.state_shardings(abstract_state, mesh)))
  return graphdef, nnx.to_pure_dict(abstract_state), shardings


def load_tower_weights(params: dict, model_cfg: Any, shardings: Any = None) -> None:
  """Loads the pretrained tower weights that the config names into TwoTower `params` (a pure
  dict, in place): today the LLM of `config.model.text.llm.path`. A no-op otherwise."""
  llm_cfg = model_cfg.text.llm
  if model_cfg.text.kind == "llm" and llm_cfg.path and not llm_cfg.cache_dir:
    llm.load_weights(params["text"]["decoder"], llm_cfg.path,
                     None if shardings is None else shardings["text"]["decoder"])
