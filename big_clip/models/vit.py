"""ViT image tower (Dosovitskiy et al. 2021) in the CLIP layout (Radford et al. 2021).

patches -> patch_embed (a bias-free linear map, i.e. CLIP's stride-p conv) -> [class token]
-> + positional_embedding -> ln_pre -> blocks -> pool -> ln_post -> proj.

`image.stem='conv'` replaces the patchify step by early convolutions (Xiao et al. 2021,
"Early Convolutions Help Transformers See Better"): log2(p) 3x3 stride-2 convolutions, each
followed by a LayerNorm over channels and the activation, bring the image to the patch grid;
`patch_embed` is then their 1x1 projection to the width. It trains better from scratch on
small data; HF CLIPModel and open_clip have no such stem, so it does not export.

`image.patch_dropout = r` (FLIP, Li et al. 2023 §3; open_clip `PatchDropout`) keeps a random
`max(1, int(N (1 - r)))` of the N patch tokens per image in training, after the positional
embeddings and before ln_pre; the class token always stays. Which ones is decided by
per-image uniform noise that the train step draws from its step key (`patch_noise`), so the
same example gets the same mask on any mesh and after a resume. Without noise (eval,
export, predict) every token is used.

`image.naflex=True` (NaFlex, SigLIP 2 §2.4.2 = NaViT + FlexiViT) takes each image at its own
aspect ratio as a padded patch sequence (data/naflex.py writes it): `[B, N, p*p*3 + 2]`, each
row the patch pixels then its (row, col) on the image's patch grid, row = col = -1 on
padding. The learned position table, stored at the base grid `image_size / patch_size`
square, is resized bilinearly (antialiased) to each example's grid (big_vision naflex_vit,
HF Siglip2 `resize_positional_embeddings`); attention and pooling see the valid tokens only.

Export note: `patch_embed.kernel` is `[p*p*3, width]` with patch pixels flattened in
(row, column, channel) order, so the torch conv weight `[width, 3, p, p]` is
`kernel.reshape(p, p, 3, width).transpose(3, 2, 0, 1)`.
"""

from __future__ import annotations

import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from big_clip import sharding
from big_clip.models import layers, moe

POOLS = ("cls", "map", "gap")
STEMS = ("patch", "conv")


class MAPHead(nnx.Module):
  """Multihead attention pooling (big_vision MAPHead; Zhai et al. 2022, SigLIP):
  a learned probe attends to the tokens, then a residual MLP (HF SiglipMultiheadAttention-
  PoolingHead: probe, attention, layernorm, mlp)."""

  def __init__(self, cfg: layers.TransformerConfig, *, rngs: nnx.Rngs):
    self.probe = layers.param(rngs, nnx.initializers.normal(cfg.width ** -0.5),
                              (1, 1, cfg.width), (None, None, "embed"), cfg.param_dtype)
    self.attn = layers.Attention(cfg, rngs=rngs)
    self.ln = layers.LayerNorm(cfg.width, cfg)
    self.mlp = layers.MLP(cfg, rngs=rngs)

  def __call__(self, x: jax.Array, kv_mask: jax.Array | None = None) -> jax.Array:
    """[B, N, W] tokens (those with `kv_mask` [B, N] True, default all) -> [B, W]."""
    probe = jnp.broadcast_to(self.probe[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    y = self.attn(probe, x, kv_mask=kv_mask)
    y = y + self.mlp(self.ln(y))
    return y[:, 0]


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/p)(W/p), p*p*C], patches row-major, pixels (row, col, channel)."""
  b, h, w, c = images.shape
  p = patch_size
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


NAFLEX_COORDS = 2  # (row, col) after the pixels of each NaFlex patch; -1 on padding


def resize_matrix(size: jax.Array, base: int, rows: int) -> jax.Array:
  """[rows, base] weights of a bilinear antialiased resize from `base` to `size` (traced int)
  samples: row r < size holds the weights of output sample r (half-pixel centres, as torch
  `interpolate(mode='bilinear', align_corners=False, antialias=True)`); rows past `size`
  are never read. Resizing the identity gives the weights, so the shape stays static."""
  scale = (size / base).astype(jnp.float32)
  return jax.image.scale_and_translate(
      jnp.eye(base, dtype=jnp.float32), (rows, base), (0,), scale[None],
      jnp.zeros((1,), jnp.float32), method="linear", antialias=True)


def naflex_positions(table: jax.Array, coords: jax.Array) -> jax.Array:
  """Position embeddings of one image's patches: `table` [g, g, W] resized bilinearly to
  the image's grid (rows, cols) = max(coords) + 1, read at `coords` [N, 2] (-1 on padding,
  which reads garbage that attention masks out) -> float32 [N, W].

  Bilinear resizing is separable, so the [rows, cols, W] resized table is never built:
  each patch mixes the table with its row weights times its column weights."""
  g = table.shape[0]
  n = coords.shape[0]
  grid = jnp.max(coords, axis=0) + 1  # [2]
  safe = jnp.maximum(coords, 0)
  w_row = resize_matrix(grid[0], g, n)[safe[:, 0]]  # [N, g]
  w_col = resize_matrix(grid[1], g, n)[safe[:, 1]]  # [N, g]
  return jnp.einsum("ni,ijd,nj->nd", w_row, table.astype(jnp.float32), w_col,
                    precision=jax.lax.Precision.HIGHEST)


def conv_stem_channels(patch_size: int, width: int) -> tuple[int, ...]:
  """Output channels of the stem's stride-2 convolutions: log2(p) of them, doubling up to
  width / 2 (Xiao et al.: 24-48-96-192 before a 384-wide ViT), at least 8."""
  n = int(round(math.log2(patch_size))) if patch_size > 1 else 0
  if n < 1 or 2 ** n != patch_size:
    raise ValueError(f"config.model.image.stem='conv' needs a power-of-two patch_size >= 2 "
                     f"(one stride-2 convolution per halving); got patch_size={patch_size}.")
  return tuple(max(8, width >> (n - i)) for i in range(n))


class ConvStem(nnx.Module):
  """`[B, H, W, 3]` -> `[B, H/p, W/p, C]`: 3x3 stride-2 convolutions (padding 1, as torch
  `Conv2d(k=3, s=2, p=1)`), each followed by a LayerNorm over channels and the activation."""

  def __init__(self, patch_size: int, cfg: layers.TransformerConfig, *, rngs: nnx.Rngs):
    chans = (3,) + conv_stem_channels(patch_size, cfg.width)
    init, dt = nnx.initializers, cfg.param_dtype
    # He init: each conv feeds an activation (torch's kaiming_normal_, fan_in = 9 * c_in).
    # Small and replicated: channels use the 'patch' axis name, which maps to no mesh axis.
    self.kernels = nnx.List([
        layers.param(rngs, init.normal((2 / (9 * cin)) ** 0.5), (3, 3, cin, cout),
                     (None, None, None, "patch"), dt)
        for cin, cout in zip(chans[:-1], chans[1:])])
    self.scales = nnx.List([layers.param(rngs, init.ones, (c,), ("patch",), dt)
                            for c in chans[1:]])
    self.biases = nnx.List([layers.param(rngs, init.zeros, (c,), ("patch",), dt)
                            for c in chans[1:]])
    self.out_channels = chans[-1]
    self.eps, self.dtype = cfg.ln_eps, cfg.dtype
    self.activation = layers.ACTIVATIONS[cfg.activation]

  def __call__(self, x: jax.Array) -> jax.Array:
    for kernel, scale, bias in zip(self.kernels, self.scales, self.biases):
      x = jax.lax.conv_general_dilated(
          x.astype(self.dtype), kernel[...].astype(self.dtype), window_strides=(2, 2),
          padding=((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
      x = self.activation(layers.layer_norm(x, scale[...], bias[...], self.eps))
      x = x.astype(self.dtype)
    return x


def patches_kept(num_patches: int, rate: float) -> int:
  """Patch tokens left after dropping a `rate` share (open_clip: at least one)."""
  return max(1, int(num_patches * (1.0 - rate)))


PATCH_DROPOUT_STREAM = 0x464C4950  # a key stream of its own ("FLIP")


def patch_noise(config: Any, step: jax.Array, batch_size: int) -> jax.Array:
  """[B, N] uniform draws that pick the kept patches at train step `step` (state['step']).

  From (config.seed, step) alone, so a resumed run masks exactly as the uninterrupted one;
  drawn for the global batch (threefry is partitionable), so every mesh draws the same.
  """
  im = config.model.image
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed),
                                              PATCH_DROPOUT_STREAM), step)
  noise = jax.random.uniform(key, (batch_size, (im.image_size // im.patch_size) ** 2))
  return sharding.constrain(noise, ("activation_batch", None))


def drop_patches(x: jax.Array, noise: jax.Array, keep: int, num_prefix: int) -> jax.Array:
  """Keeps the `keep` patch tokens with the largest `noise` per image.

  x: [B, num_prefix + N, W] tokens (class token first); noise: [B, N] uniform draws.
  Returns [B, num_prefix + keep, W]: the prefix tokens, then the kept patches in descending
  noise order (order is irrelevant after the positional embeddings).
  """
  chex.assert_shape(noise, (x.shape[0], x.shape[1] - num_prefix))
  _, idx = jax.lax.top_k(noise, keep)  # [B, keep]
  patches = jnp.take_along_axis(x[:, num_prefix:], idx[..., None], axis=1)
  return jnp.concatenate([x[:, :num_prefix], patches], axis=1)


class ViT(nnx.Module):
  """Image tower: `[B, H, W, 3]` normalized images -> unnormalized float32 `[B, embed_dim]`."""

  def __init__(self, model_cfg: Any, *, rngs: nnx.Rngs):
    c = model_cfg.image
    self.cfg = cfg = layers.TransformerConfig.from_config(model_cfg, "image")
    self.pool = layers.choose(c.pool, POOLS, "config.model.image.pool")
    if c.image_size % c.patch_size:
      raise ValueError(f"config.model.image.image_size={c.image_size} is not divisible by "
                       f"config.model.image.patch_size={c.patch_size}.")
    self.image_size, self.patch_size = int(c.image_size), int(c.patch_size)
    self.num_patches = (self.image_size // self.patch_size) ** 2
    self.patch_dropout = float(c.patch_dropout)
    if not 0.0 <= self.patch_dropout < 1.0:
      raise ValueError(f"config.model.image.patch_dropout={self.patch_dropout}; the share of "
                       "patch tokens dropped must be in [0, 1).")
    self.stem = layers.choose(c.stem, STEMS, "config.model.image.stem")
    self.naflex = bool(c.naflex)
    if self.naflex and (self.pool == "cls" or self.stem != "patch" or self.patch_dropout):
      raise ValueError("config.model.image.naflex=True needs pool='map' or 'gap', "
                       "stem='patch' and patch_dropout=0 (NaFlex pools its valid tokens, "
                       "patchifies in the input pipeline and has no patch dropout yet).")
    w, patch_dim = cfg.width, self.patch_size ** 2 * 3
    if self.stem == "conv":
      self.conv_stem = ConvStem(self.patch_size, cfg, rngs=rngs)
      patch_dim = self.conv_stem.out_channels
    num_tokens = (self.image_size // self.patch_size) ** 2 + (self.pool == "cls")
    normal = nnx.initializers.normal
    # CLIP's conv1 has no bias; fan-in (LeCun) init as torch's default conv init scale.
    self.patch_embed = layers.dense(patch_dim, w, ("patch", "embed"), std=patch_dim ** -0.5,
                                    cfg=cfg, rngs=rngs, use_bias=False)
    if self.pool == "cls":
      # CLIP: class_embedding and positional_embedding ~ width^-0.5 * randn.
      self.class_embedding = layers.param(rngs, normal(w ** -0.5), (w,), ("embed",),
                                           cfg.param_dtype)
    self.positional_embedding = layers.param(rngs, normal(w ** -0.5), (num_tokens, w),
                                             ("length", "embed"), cfg.param_dtype)
    # SigLIP (big_vision ViT) has no LayerNorm before the blocks: `image.ln_pre=False`.
    self.use_ln_pre = bool(c.ln_pre)
    if self.use_ln_pre:
      self.ln_pre = layers.LayerNorm(w, cfg)
    self.blocks = layers.make_blocks(
        cfg, rngs=rngs, mlp=moe.mlp_factory(cfg, moe.MoeConfig.from_config(model_cfg, "image")))
    self.ln_post = layers.LayerNorm(w, cfg)
    if self.pool == "map":
      self.head = MAPHead(cfg, rngs=rngs)
    # SigLIP's image embedding is the pooled feature itself (no head): `image.proj=False`.
    self.use_proj = bool(c.proj)
    if self.use_proj:
      self.proj = layers.dense(w, int(model_cfg.embed_dim), ("embed", "joint"), std=w ** -0.5,
                               cfg=cfg, rngs=rngs, use_bias=False)
    elif w != int(model_cfg.embed_dim):
      raise ValueError(f"config.model.image.proj=False needs config.model.embed_dim="
                       f"{model_cfg.embed_dim} equal to config.model.image.width={w}; "
                       "set them equal or enable the projection.")

  def __call__(self, images: jax.Array, patch_noise: jax.Array | None = None) -> jax.Array:
    """`patch_noise` [B, N] uniform draws turn on patch dropout (training only). With
    `naflex`, `images` are NaFlex patch sequences [B, N, p*p*3 + 2] (module docstring)."""
    return self.forward(images, patch_noise)[0]

  def forward(self, images: jax.Array, patch_noise: jax.Array | None = None
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """As `__call__`, and the MoE layers' routing statistics ({} without MoE)."""
    x, valid = self.embed_any(images, patch_noise)
    tokens, stats = self.transform(x, valid)
    return self.pool_tokens(tokens, valid), stats

  def features(self, images: jax.Array, patch_noise: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """(the `__call__` output, the last block's tokens [B, T', W]): one pass for the
    contrastive embedding and the caption decoder's cross-attention."""
    x, valid = self.embed_any(images, patch_noise)
    tokens, _ = self.transform(x, valid)
    return self.pool_tokens(tokens, valid), tokens

  def embed_any(self, images: jax.Array, patch_noise: jax.Array | None
                ) -> tuple[jax.Array, jax.Array | None]:
    """(tokens with positional embeddings, valid [B, T'] bool or None = all) of images or,
    with `naflex`, of NaFlex patch sequences."""
    if self.naflex:
      return self.embed_naflex(images)
    return self.drop(self.embed(images), patch_noise), None

  def drop(self, x: jax.Array, patch_noise: jax.Array | None) -> jax.Array:
    """FLIP patch dropout of `embed`'s tokens; identity without noise or at rate 0."""
    if patch_noise is None or self.patch_dropout == 0.0:
      return x
    keep = patches_kept(self.num_patches, self.patch_dropout)
    x = drop_patches(x, patch_noise, keep, num_prefix=int(self.pool == "cls"))
    return sharding.constrain(x, layers.ACT_EMBED)

  def embed(self, images: jax.Array) -> jax.Array:
    """[B, H, W, 3] -> tokens [B, T, W] with class token and positional embeddings."""
    b = images.shape[0]
    chex.assert_shape(images, (b, self.image_size, self.image_size, 3))
    if self.stem == "conv":
      x = self.conv_stem(images)
      x = self.patch_embed(x.reshape(b, -1, x.shape[-1]))  # [B, N, W]
    else:
      x = self.patch_embed(patchify(images, self.patch_size))  # [B, N, W]
    if self.pool == "cls":
      cls = self.class_embedding[...].astype(x.dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, x.shape[-1])), x], axis=1)
    x = x + self.positional_embedding[...].astype(x.dtype)
    return sharding.constrain(x, layers.ACT_EMBED)

  def embed_naflex(self, patches: jax.Array) -> tuple[jax.Array, jax.Array]:
    """NaFlex patches [B, N, p*p*3 + 2] -> (tokens [B, N, W] with positional embeddings,
    valid [B, N] bool)."""
    b, n = patches.shape[:2]
    patch_dim = self.patch_size ** 2 * 3
    chex.assert_shape(patches, (b, n, patch_dim + NAFLEX_COORDS))
    coords = patches[..., patch_dim:].astype(jnp.int32)  # [B, N, 2]
    valid = coords[..., 0] >= 0
    x = self.patch_embed(patches[..., :patch_dim])  # [B, N, W]
    g = self.image_size // self.patch_size
    table = self.positional_embedding[...].reshape(g, g, -1)
    pos = jax.vmap(naflex_positions, in_axes=(None, 0))(table, coords)
    x = x + pos.astype(x.dtype)
    return sharding.constrain(x, layers.ACT_EMBED), valid

  def encode_tokens(self, x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Tokens [B, T', W] (all or the kept ones; `valid` [B, T'] bool marks the real ones,
    default all) -> unnormalized float32 [B, embed_dim]."""
    return self.pool_tokens(self.transform(x, valid)[0], valid)

  def transform(self, x: jax.Array, valid: jax.Array | None = None
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Embedded tokens [B, T', W] -> (the last block's output [B, T', W], the MoE layers'
    routing statistics, {} without MoE)."""
    if self.use_ln_pre:
      x = self.ln_pre(x)
    return layers.apply_blocks(self.blocks, x, remat=self.cfg.remat, kv_mask=valid)

  def pool_tokens(self, x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """The last block's tokens [B, T', W] -> unnormalized float32 [B, embed_dim]."""
    if self.pool == "cls":  # CLIP: ln_post on the class token
      pooled = self.ln_post(x[:, 0])
    elif self.pool == "gap":  # mean of the (valid) patch tokens, then ln_post
      x = x.astype(jnp.float32)
      if valid is None:
        pooled = self.ln_post(x.mean(axis=1))
      else:
        w = valid[..., None].astype(jnp.float32)
        pooled = self.ln_post((x * w).sum(axis=1) / w.sum(axis=1))
    else:  # SigLIP (HF SiglipVisionTransformer): post-LN on all tokens, then the MAP head
      pooled = self.head(self.ln_post(x), valid)
    return (self.proj(pooled) if self.use_proj else pooled).astype(jnp.float32)
