"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for Language Image
Pre-Training", Alg. 1), exact on any device mesh with the chunked ring of §3.3, tiled.

Image blocks travel around the ring of batch shards (§3.3) while each device keeps its
texts, and each ring step's `b x b` block is visited in `tile x tile` pieces (as Inf-CL,
Cheng et al. 2024; tiled.py), forward and, through a custom VJP, backward: no device holds
more than one tile of logits, only a few `[b, D]` blocks (embeddings and their gradients),
where big_vision's implementation materializes B_global x B_global. With `group_size` the
ring runs inside each group of devices (grouped.py, M2-Encoder).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from big_clip.losses import shared
from big_clip.losses import tiled


def loss(img_emb: jax.Array, txt_emb: jax.Array, scale: jax.Array, bias: jax.Array, *,
         mesh: Mesh | None = None, group_size: int | None = None,
         tile: int | None = None) -> jax.Array:
  """SigLIP loss: every image-text pair is an independent binary classification.

  With `z_ij = scale * <img_i, txt_j> + bias` and labels `l_ij = +1` if i == j else -1:

      loss = -1/B * sum_ij log_sigmoid(l_ij * z_ij)

  over the global batch B (big_vision's normalization: per image, summed over texts).

  Args:
    img_emb: `[B, D]` L2-normalized image embeddings, batch split over ('data', 'fsdp').
    txt_emb: `[B, D]` L2-normalized text embeddings; row i is the caption of image i.
    scale: scalar logit scale (SigLIP's exp(t'), initialized to 10).
    bias: scalar logit bias (SigLIP's b, initialized to -10).
    mesh: the device mesh (axes data, fsdp, tensor), or None for one device.
    group_size: batch devices per contrastive batch (None: all); the loss is then the
      mean over groups of each group's loss (grouped.py).
    tile: rows and columns per logits tile (default `tiled.TILE`); a device holds
      `tile x tile` logits at a time. Any value gives the same loss.

  Returns:
    The float32 scalar loss, replicated.
  """
  if bias is None:
    raise ValueError("sigmoid loss: bias is required (SigLIP learns it; init -10).")
  shared.check_inputs("sigmoid", img_emb, txt_emb, scale, bias, mesh)
  return shared.on_batch_shards(functools.partial(_ring_sum, tile=tile), mesh,
                                *shared.as_float32(img_emb, txt_emb, scale, bias),
                                group_size=group_size)


def _ring_sum(img: jax.Array, txt: jax.Array, scale: jax.Array, bias: jax.Array, *,
              exchange: shared.Exchange, tile: int | None) -> jax.Array:
  """The loss from one device's `[b, D]` blocks, over the devices of its `exchange` group;
  summed over groups."""
  # Scale and bias become per-device data so that the custom VJP may return this device's
  # share of their gradients; the transpose of that cast sums the shares over devices.
  total = summed_pair_losses(exchange, img, txt, *exchange.varying((scale, bias)), tile=tile)
  return exchange.psum(total) / (img.shape[0] * exchange.size)


def summed_pair_losses(exchange: shared.Exchange, img: jax.Array, txt: jax.Array,
                       scale: jax.Array, bias: jax.Array, *,
                       tile: int | None = None) -> jax.Array:
  """`-sum_ij log_sigmoid(l_ij z_ij)`, `z = scale * img @ txt.T + bias`, over this device's
  texts j and every image i of its `exchange` group (the group's sum is the whole loss).

  Alg. 1's labels `l = 2 eye - 1`: the positives sit on the diagonal of the own block,
  ring step 0. `dz = -l sigmoid(-l z)` needs no statistic of the whole batch, so under
  differentiation one ring forms the loss and its gradients together (custom VJP; the
  backward pass only scales them by the cotangent), three tile matmuls where a separate
  backward ring would recompute the logits for a fourth. Without differentiation a
  forward-only ring sums the loss.
  """
  n_rows = img.shape[0]
  tile = tiled.tile_rows(n_rows, tile)
  labels_of = lambda positive: jnp.where(positive, 1.0, -1.0)

  def summed(img, txt, scale, bias):

    def tile_fn(img_t, moving_out, txt_t, staying_out, total, valid, positive):
      z = scale * tiled.dots_tile(img_t, txt_t) + bias
      pair_losses = -jax.nn.log_sigmoid(labels_of(positive) * z)
      return moving_out, staying_out, total + jnp.sum(jnp.where(valid, pair_losses, 0.0))

    _, _, total = tiled.ring(
        exchange, tile_fn, moving_in=tiled.pad_rows(img, tile), moving_out=(),
        staying_in=tiled.pad_rows(txt, tile), staying_out=(),
        totals=jnp.zeros((), jnp.float32), n_rows=n_rows, tile=tile)
    return total

  def dz_fn(z, dots, moving, staying, valid, positive):
    del dots, moving, staying
    labels = labels_of(positive)
    x = labels * z
    # One exp serves both: -log_sigmoid(x) = log1p(e) - min(x, 0) and
    # sigmoid(-x) = e / (1 + e) for x >= 0, 1 / (1 + e) else, with e = exp(-|x|) <= 1.
    e = jnp.exp(-jnp.abs(x))
    pair_losses = jnp.where(valid, jnp.log1p(e) - jnp.minimum(x, 0.0), 0.0)
    sigmoid_neg = jnp.where(x >= 0, e, 1.0) / (1.0 + e)
    return jnp.where(valid, -labels * sigmoid_neg, 0.0), jnp.sum(pair_losses)

  def forward(img, txt, scale, bias):
    total, *grads = tiled.ring_grads(exchange, dz_fn, img, txt, scale, bias, tile=tile)
    return total, tuple(grads)

  def backward(grads, g):
    return tuple(g * grad for grad in grads)

  fn = jax.custom_vjp(summed)
  fn.defvjp(forward, backward)
  return fn(img, txt, scale, bias)
