"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for Language Image
Pre-Training", Alg. 1), exact on any device mesh with the chunked ring of §3.3.

Each device keeps its images and passes text blocks around the ring of batch shards; at
each of the n_shards steps it scores its images against the text block it holds. Only a
B_local x B_local logits block exists at a time (O(B_local^2) memory, where big_vision's
implementation materializes B_global x B_global). With `group_size` the ring runs inside
each group of devices (grouped.py, M2-Encoder).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from big_clip.losses import shared


def loss(img_emb: jax.Array, txt_emb: jax.Array, scale: jax.Array, bias: jax.Array, *,
         mesh: Mesh | None = None, group_size: int | None = None) -> jax.Array:
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

  Returns:
    The float32 scalar loss, replicated.
  """
  if bias is None:
    raise ValueError("sigmoid loss: bias is required (SigLIP learns it; init -10).")
  shared.check_inputs("sigmoid", img_emb, txt_emb, scale, bias, mesh)
  return shared.on_batch_shards(_ring_sum, mesh,
                                *shared.as_float32(img_emb, txt_emb, scale, bias),
                                group_size=group_size)


def _ring_sum(img: jax.Array, txt: jax.Array, scale: jax.Array, bias: jax.Array, *,
              exchange: shared.Exchange) -> jax.Array:
  """The loss from one device's `[b, D]` blocks, over the devices of its `exchange` group;
  summed over groups."""

  # Rematerialized: the backward pass recomputes each b x b block from its inputs instead
  # of the scan stacking all n_shards blocks (b x B floats, the softmax loss's footprint).
  @jax.checkpoint
  def block_loss(txt_block: jax.Array, labels: jax.Array) -> jax.Array:
    logits = shared.logits_block(img, txt_block, scale, bias)  # [b, b]
    chex.assert_shape(logits, (img.shape[0], txt_block.shape[0]))
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits))

  local_batch, n_shards = img.shape[0], exchange.size
  # Alg. 1: labels = 2 * eye(n) - ones(n); the positives all sit in the own text block.
  own = block_loss(txt, 2 * jnp.eye(local_batch, dtype=jnp.float32) - 1)
  if n_shards == 1:
    return exchange.psum(own) / local_batch

  # §3.3: shard k hands its current text block to shard k+1 of its group (flat index over
  # the batch axes); after n_shards - 1 hops every image has met every text of the group
  # once, all as negatives. Each hop sends the block it is scoring, so the transfer
  # overlaps the compute.
  negative = -jnp.ones((), jnp.float32)

  def hop(txt_block: jax.Array, _) -> tuple[jax.Array, jax.Array]:
    return exchange.ppermute(txt_block), block_loss(txt_block, negative)

  received = exchange.ppermute(txt)
  last, negatives = jax.lax.scan(hop, received, length=n_shards - 2)
  total = own + jnp.sum(negatives) + block_loss(last, negative)
  return exchange.psum(total) / (local_batch * n_shards)
