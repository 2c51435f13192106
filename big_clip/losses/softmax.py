"""CLIP's symmetric InfoNCE loss (Radford et al. 2021, "Learning Transferable Visual Models
From Natural Language Supervision", Fig. 3), exact on any device mesh.

Each device scores its local images against all texts and its local texts against all
images, never forming the B_global x B_global matrix; the gathered side is visited in blocks
of KEY_CHUNK keys, so a device holds O(B_local x KEY_CHUNK) logits at a time.
With `group_size` the "global" batch is the group's (grouped.py, M2-Encoder).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from big_clip.losses import shared

# Keys per block of `row_logsumexp`: a device holds `[b, KEY_CHUNK]` logits at a time, not
# `[b, B]`, so its memory stops growing with the global batch B (benchmarks/loss_memory.py).
KEY_CHUNK = 2048


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
  shared.check_inputs("softmax", img_emb, txt_emb, scale, bias, mesh)
  # The bias cancels inside every cross-entropy: leave it out of the computation, so its
  # gradient is exactly 0 (not float32 rounding noise) and a model's logit_bias stays put.
  return shared.on_batch_shards(_summed_cross_entropies, mesh,
                                *shared.as_float32(img_emb, txt_emb, scale, None),
                                group_size=group_size)


def _summed_cross_entropies(img: jax.Array, txt: jax.Array, scale: jax.Array,
                            bias: jax.Array, *, exchange: shared.Exchange) -> jax.Array:
  """The loss from one device's `[b, D]` blocks, over the devices of its `exchange` group;
  summed over groups."""
  # Gathering the features (B x D) is far cheaper than gathering logits (B x B). The
  # transpose of all_gather is a reduce-scatter, so each device gets back the summed
  # gradient of its own rows from every device's logits.
  img_all = exchange.all_gather(img)  # [B, D], B = the group's batch
  txt_all = exchange.all_gather(txt)  # [B, D]
  local_batch, global_batch = img.shape[0], img_all.shape[0]

  lse_rows = row_logsumexp(img, txt_all, scale, bias)  # [b]: rows of z
  lse_cols = row_logsumexp(txt, img_all, scale, bias)  # [b]: columns of z
  chex.assert_shape([lse_rows, lse_cols], (local_batch,))
  # z_ii of the local pairs, computed directly rather than sliced out of the blocks at
  # this device's batch offset.
  positives = scale * jnp.sum(img * txt, axis=-1) + bias  # [b]

  cross_entropies = lse_rows - positives + lse_cols - positives  # [b]
  return exchange.psum(jnp.sum(cross_entropies)) / (2 * global_batch)


def row_logsumexp(queries: jax.Array, keys: jax.Array, scale: jax.Array,
                  bias: jax.Array) -> jax.Array:
  """`logsumexp_j (scale * q_i . k_j + bias)` for each query row: `[b, D] x [B, D] -> [b]`.

  Up to KEY_CHUNK keys this is one `[b, B]` block. Beyond, the keys are visited in blocks of
  KEY_CHUNK with a running maximum and sum (the online logsumexp of flash attention), and
  each block is rematerialized in the backward pass, so neither pass keeps more than one
  `[b, KEY_CHUNK]` block: memory O(b x KEY_CHUNK) for one extra forward matmul. The running
  maximum only shifts the exponent and carries no gradient, so the value and gradients are
  those of the plain logsumexp (tests/test_losses.py, against float64 NumPy).
  """
  n_keys, chunk = keys.shape[0], KEY_CHUNK
  if n_keys <= chunk:
    return jax.nn.logsumexp(shared.logits_block(queries, keys, scale, bias), axis=-1)

  def update(carry, block):
    running_max, total = carry
    keys_c, valid_c = block
    z = jnp.where(valid_c, shared.logits_block(queries, keys_c, scale, bias), -jnp.inf)
    new_max = jax.lax.stop_gradient(jnp.maximum(running_max, jnp.max(z, axis=-1)))
    total = (total * jnp.exp(running_max - new_max)
             + jnp.sum(jnp.exp(z - new_max[:, None]), axis=-1))
    return (new_max, total), None

  # The first block starts the running values (it has no padding: n_keys > chunk); computed
  # from the queries, the carry is per-device data inside shard_map, as the scan needs.
  first = shared.logits_block(queries, keys[:chunk], scale, bias)
  start_max = jax.lax.stop_gradient(jnp.max(first, axis=-1))
  start = (start_max, jnp.sum(jnp.exp(first - start_max[:, None]), axis=-1))
  rest = n_keys - chunk
  n_blocks = -(-rest // chunk)
  pad = n_blocks * chunk - rest
  blocks = jnp.pad(keys[chunk:], ((0, pad), (0, 0))).reshape(n_blocks, chunk, keys.shape[1])
  valid = (jnp.arange(n_blocks * chunk) < rest).reshape(n_blocks, chunk)
  (running_max, total), _ = jax.lax.scan(jax.checkpoint(update, prevent_cse=False), start,
                                         (blocks, valid))
  return running_max + jnp.log(total)
