"""CLIP's symmetric InfoNCE loss (Radford et al. 2021, "Learning Transferable Visual Models
From Natural Language Supervision", Fig. 3), exact on any device mesh.

Each device scores its local images against all texts and its local texts against all
images: O(B_local x B_global) logits per device, never the B_global x B_global matrix.
With `group_size` the "global" batch is the group's (grouped.py, M2-Encoder).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from big_clip import losses


def loss(img_emb: jax.Array, txt_emb: jax.Array, scale: jax.Array,
         bias: jax.Array | None = None, *, mesh: Mesh | None = None,
         group_size: int | None = None) -> jax.Array:
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

  Returns:
    The float32 scalar loss, replicated.
  """
  losses.check_inputs("softmax", img_emb, txt_emb, scale, bias, mesh)
  # The bias cancels inside every cross-entropy: leave it out of the computation, so its
  # gradient is exactly 0 (not float32 rounding noise) and a model's logit_bias stays put.
  return losses.on_batch_shards(_summed_cross_entropies, mesh,
                                *losses.as_float32(img_emb, txt_emb, scale, None),
                                group_size=group_size)


def _summed_cross_entropies(img: jax.Array, txt: jax.Array, scale: jax.Array,
                            bias: jax.Array, *, exchange: losses.Exchange) -> jax.Array:
  """The loss from one device's `[b, D]` blocks, over the devices of its `exchange` group;
  summed over groups."""
  # Gathering the features (B x D) is far cheaper than gathering logits (B x B). The
  # transpose of all_gather is a reduce-scatter, so each device gets back the summed
  # gradient of its own rows from every device's logits.
  img_all = exchange.all_gather(img)  # [B, D], B = the group's batch
  txt_all = exchange.all_gather(txt)  # [B, D]
  local_batch, global_batch = img.shape[0], img_all.shape[0]

  img_to_txt = losses.logits_block(img, txt_all, scale, bias)  # [b, B]: rows of z
  txt_to_img = losses.logits_block(txt, img_all, scale, bias)  # [b, B]: columns of z
  chex.assert_shape([img_to_txt, txt_to_img], (local_batch, global_batch))
  # z_ii of the local pairs, computed directly rather than sliced out of the blocks at
  # this device's batch offset.
  positives = scale * jnp.sum(img * txt, axis=-1) + bias  # [b]

  cross_entropies = (jax.nn.logsumexp(img_to_txt, axis=-1) - positives
                     + jax.nn.logsumexp(txt_to_img, axis=-1) - positives)  # [b]
  return exchange.psum(jnp.sum(cross_entropies)) / (2 * global_batch)
