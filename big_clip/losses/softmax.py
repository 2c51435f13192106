"""CLIP's symmetric InfoNCE loss (Radford et al. 2021, "Learning Transferable Visual Models
From Natural Language Supervision", Fig. 3), exact on any device mesh.

Tiled as Inf-CL (Cheng et al. 2024, arXiv 2410.17243; tiled.py): image blocks travel around
the ring of batch shards while each device keeps its texts, and every `tile x tile` piece of
logits feeds both cross-entropies at once, an online logsumexp over its rows (per image,
travelling with the images) and over its columns (per text, staying). A custom VJP forms
the gradients tile by tile from the saved logsumexps. No device holds more than one tile of
logits nor the gathered embeddings, only a few `[b, D]` blocks (embeddings and their
gradients), however large the global batch. With `group_size` the "global" batch is the group's (grouped.py, M2-Encoder).
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from big_clip.losses import shared
from big_clip.losses import tiled


def loss(img_emb: jax.Array, txt_emb: jax.Array, scale: jax.Array,
         bias: jax.Array | None = None, *, mesh: Mesh | None = None,
         group_size: int | None = None, tile: int | None = None) -> jax.Array:
  """CLIP loss: mean cross-entropy image->text and text->image, averaged.

  With `z = scale * img_emb @ txt_emb.T (+ bias)`, pair i's targets are the diagonal:

      loss = 1/(2B) * sum_i [(logsumexp_j z_ij - z_ii) + (logsumexp_j z_ji - z_ii)]

  over the global batch B. A bias adds the same constant to every logit, so it leaves the
  loss unchanged; it is accepted (and not used) so every loss shares one signature.

  Args:
    img_emb: `[B, D]` L2-normalized image embeddings, batch split over ('data', 'fsdp').
    txt_emb: `[B, D]` L2-normalized text embeddings; row i is the caption of image i.
    scale: scalar logit scale (CLIP's exp(t)).
    bias: optional scalar logit bias.
    mesh: the device mesh (axes data, fsdp, tensor), or None for one device.
    group_size: batch devices per contrastive batch (None: all); the loss is then the
      mean over groups of each group's loss (grouped.py).
    tile: rows and columns per logits tile (default `tiled.TILE`); a device holds
      `tile x tile` logits at a time. Any value gives the same loss.

  Returns:
    The float32 scalar loss, replicated.
  """
  shared.check_inputs("softmax", img_emb, txt_emb, scale, bias, mesh)
  # The bias cancels inside every cross-entropy: leave it out of the computation, so its
  # gradient is exactly 0 (not float32 rounding noise) and a model's logit_bias stays put.
  body = functools.partial(_summed_cross_entropies, tile=tile)
  return shared.on_batch_shards(body, mesh, *shared.as_float32(img_emb, txt_emb, scale, None),
                                group_size=group_size)


def _summed_cross_entropies(img: jax.Array, txt: jax.Array, scale: jax.Array,
                            bias: jax.Array, *, exchange: shared.Exchange,
                            tile: int | None) -> jax.Array:
  """The loss from one device's `[b, D]` blocks, over the devices of its `exchange` group;
  summed over groups."""
  del bias  # zero: see `loss`
  local_batch = img.shape[0]
  global_batch = local_batch * exchange.size  # the group's batch
  # The scale becomes per-device data so that the custom VJP may return this device's
  # share of its gradient; the transpose of that cast sums the shares over devices.
  lse_sum = summed_logsumexps(exchange, img, txt, exchange.varying(scale), tile=tile)
  # z_ii of the local pairs, computed directly rather than picked out of the tiles.
  positives = scale * jnp.sum(img * txt, axis=-1)  # [b]
  cross_entropies = lse_sum - 2 * jnp.sum(positives)
  return exchange.psum(cross_entropies) / (2 * global_batch)


def summed_logsumexps(exchange: shared.Exchange, img: jax.Array, txt: jax.Array,
                      scale: jax.Array, *, tile: int | None = None) -> jax.Array:
  """`sum_i logsumexp_j z_ij + sum_j logsumexp_i z_ij`, `z = scale * img @ txt.T`, for this
  device's images i and texts j against every text / image of its `exchange` group.

  Forward: one ring of tiles, each updating a running maximum and sum for its rows and its
  columns (the online logsumexp of flash attention). Backward (custom VJP): with the saved
  logsumexps, `dz_ij = g (exp(z_ij - lse_i) + exp(z_ij - lse_j))` is formed tile by tile on
  a second ring (`tiled.ring_grads`), so neither pass keeps more than one tile of logits.
  """
  n_rows = img.shape[0]
  tile = tiled.tile_rows(n_rows, tile)

  def forward(img, txt, scale):
    lse_img, lse_txt = _logsumexps(exchange, img, txt, scale, tile)
    chex.assert_shape([lse_img, lse_txt], (n_rows,))
    return jnp.sum(lse_img) + jnp.sum(lse_txt), (img, txt, scale, lse_img, lse_txt)

  def backward(saved, g):
    img, txt, scale, lse_img, lse_txt = saved

    def dz_fn(z, dots, lse_rows, lse_cols, valid, positive):
      del dots, positive
      p = jnp.exp(z - lse_rows[:, None]) + jnp.exp(z - lse_cols[None, :])
      return jnp.where(valid, g * p, 0.0), 0.0

    zero_bias = jnp.zeros((), jnp.float32)
    _, d_img, d_txt, d_scale, _ = tiled.ring_grads(exchange, dz_fn, img, txt, scale, zero_bias,
                                                moving=lse_img, staying=lse_txt, tile=tile)
    return d_img, d_txt, d_scale

  fn = jax.custom_vjp(lambda img, txt, scale: forward(img, txt, scale)[0])
  fn.defvjp(forward, backward)
  return fn(img, txt, scale)


def _logsumexps(exchange: shared.Exchange, img: jax.Array, txt: jax.Array,
                scale: jax.Array, tile: int) -> tuple[jax.Array, jax.Array]:
  """(per image over the group's texts, per text over the group's images), each `[b]`."""
  n_rows = img.shape[0]

  def tile_fn(img_t, row_stats, txt_t, col_stats, totals, valid, positive):
    del positive
    z = jnp.where(valid, scale * tiled.dots_tile(img_t, txt_t), -jnp.inf)
    return _online_logsumexp(row_stats, z, 1), _online_logsumexp(col_stats, z, 0), totals

  padded = -(-n_rows // tile) * tile
  start = (jnp.full((padded,), -jnp.inf, jnp.float32), jnp.zeros((padded,), jnp.float32))
  row_stats, col_stats, _ = tiled.ring(
      exchange, tile_fn, moving_in=tiled.pad_rows(img, tile), moving_out=start,
      staying_in=tiled.pad_rows(txt, tile), staying_out=start, totals=(), n_rows=n_rows,
      tile=tile)
  lse = lambda stats: (stats[0] + jnp.log(stats[1]))[:n_rows]
  return lse(row_stats), lse(col_stats)


def _online_logsumexp(stats: tuple[jax.Array, jax.Array], z: jax.Array,
                      axis: int) -> tuple[jax.Array, jax.Array]:
  """(running max m, running sum of exp(z - m)) updated with the tile `z` along `axis`
  (Milakov & Gimelshein 2018, the online softmax of flash attention)."""
  running_max, total = stats
  new_max = jnp.maximum(running_max, jnp.max(z, axis=axis))
  # Padding rows see only -inf: shift by 0 there so that exp(-inf - -inf) never forms.
  shift = jnp.where(jnp.isneginf(new_max), 0.0, new_max)
  total = (total * jnp.exp(running_max - shift)
           + jnp.sum(jnp.exp(z - jnp.expand_dims(shift, axis)), axis=axis))
  return new_max, total
