"""CLOC's prompter (Chen et al. 2024, "Contrastive Localized Language-Image Pre-training",
§3.2): a box and the image tower's patch tokens -> a region embedding in the joint space.

    box [x0, y0, x1, y1] -> weights of the patch grid (the share of each patch cell the box
    covers: RoI average pooling of the piecewise-constant patch map, RoIAlign's limit)
    query = RoI-pooled tokens + box prompt embedding (a linear map of the box's corners,
            centre and size)
    `depth` blocks: query += attention over the box's patch tokens; query += MLP
    -> LayerNorm -> projection to embed_dim

One pass of the image tower serves the image embedding and every box of the image.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from big_clip.models import layers

BOX_FEATURES = 8  # x0, y0, x1, y1, centre x, centre y, width, height


def box_weights(boxes: jax.Array, grid: int) -> jax.Array:
  """boxes [..., 4] relative [x0, y0, x1, y1] -> [..., grid * grid] float32: the area of
  each patch cell (row-major, as the ViT's tokens) covered by the box, in cell units."""
  edges = jnp.arange(grid + 1, dtype=jnp.float32) / grid
  lo, hi = edges[:-1], edges[1:]

  def cover(a, b):  # [..., grid]: the share of each cell's side inside [a, b]
    return jnp.clip(jnp.minimum(b[..., None], hi) - jnp.maximum(a[..., None], lo), 0.0) * grid

  boxes = boxes.astype(jnp.float32)
  wx = cover(boxes[..., 0], boxes[..., 2])
  wy = cover(boxes[..., 1], boxes[..., 3])
  return (wy[..., :, None] * wx[..., None, :]).reshape(*boxes.shape[:-1], grid * grid)


def box_features(boxes: jax.Array) -> jax.Array:
  """[..., 4] -> [..., BOX_FEATURES]: corners, centre and size, centred on 0."""
  boxes = boxes.astype(jnp.float32)
  centre = (boxes[..., :2] + boxes[..., 2:]) / 2
  size = boxes[..., 2:] - boxes[..., :2]
  return jnp.concatenate([boxes, centre, size], axis=-1) * 2 - 1


class _Block(nnx.Module):
  """Pre-LN cross-attention of the queries to the tokens, then a residual MLP."""

  def __init__(self, cfg: layers.TransformerConfig, *, rngs: nnx.Rngs):
    self.ln_q = layers.LayerNorm(cfg.width, cfg)
    self.attn = layers.Attention(cfg, rngs=rngs)
    self.ln_mlp = layers.LayerNorm(cfg.width, cfg)
    self.mlp = layers.MLP(cfg, rngs=rngs)

  def __call__(self, q: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    q = q + self.attn(self.ln_q(q).astype(tokens.dtype), tokens, mask=mask).astype(q.dtype)
    return q + self.mlp(self.ln_mlp(q).astype(tokens.dtype)).astype(q.dtype)


class RegionPrompter(nnx.Module):
  """Patch tokens [B, N, W] (the square grid, N = g * g) and boxes [B, R, 4] -> unnormalized
  float32 region embeddings [B, R, embed_dim]."""

  def __init__(self, model_cfg: Any, *, rngs: nnx.Rngs):
    image_cfg = layers.TransformerConfig.from_config(model_cfg, "image")
    self.cfg = cfg = dataclasses.replace(image_cfg, depth=int(model_cfg.region.depth))
    self.grid = int(model_cfg.image.image_size) // int(model_cfg.image.patch_size)
    w = cfg.width
    self.ln_tokens = layers.LayerNorm(w, cfg)
    self.box_embed = layers.dense(BOX_FEATURES, w, (None, "embed"), std=BOX_FEATURES ** -0.5,
                                  cfg=cfg, rngs=rngs)
    self.blocks = nnx.List([_Block(cfg, rngs=rngs) for _ in range(cfg.depth)])
    self.ln_out = layers.LayerNorm(w, cfg)
    self.proj = layers.dense(w, int(model_cfg.embed_dim), ("embed", "joint"), std=w ** -0.5,
                             cfg=cfg, rngs=rngs, use_bias=False)

  def __call__(self, patch_tokens: jax.Array, boxes: jax.Array) -> jax.Array:
    b, n, w = patch_tokens.shape
    r = boxes.shape[1]
    chex.assert_shape(boxes, (b, r, 4))
    if n != self.grid ** 2:
      raise ValueError(f"The region prompter needs the full {self.grid}x{self.grid} patch "
                       f"grid, got {n} tokens (patch dropout and NaFlex are not supported).")
    tokens = self.ln_tokens(patch_tokens).astype(self.cfg.dtype)  # [B, N, W]
    weights = box_weights(boxes, self.grid)  # [B, R, N]
    total = weights.sum(-1, keepdims=True)
    roi = jnp.einsum("brn,bnw->brw", weights / jnp.maximum(total, 1e-6),
                     tokens.astype(jnp.float32))
    q = roi + self.box_embed(box_features(boxes)).astype(jnp.float32)  # [B, R, W]
    # Each query attends to the patches its box touches (all of them for a padding box,
    # which has none, so that its softmax stays finite; its embedding is masked later).
    inside = (weights > 0) | (total <= 0)
    mask = inside[:, None]  # [B, 1 (heads), R, N]
    for block in self.blocks:
      q = block(q, tokens, mask)
    return self.proj(self.ln_out(q).astype(self.cfg.dtype)).astype(jnp.float32)
