"""The softmax and sigmoid losses as big_clip computed them before they were tiled inside
each device, kept as the peers that benchmarks/loss_memory.py measures the tiled losses
against in the same run (memory and seconds). Same values and gradients (checked there).

  softmax:gathered  all-gather both embeddings (`B x D` per device), then this device's rows
                    and columns of the logits, `b x 2048` at a time (online logsumexp over
                    key blocks, each block rematerialized in the backward pass)
  sigmoid:block     text blocks passed around the ppermute ring, one `b x b` logits block
                    per ring step (rematerialized), autodiff through the ring
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from big_clip.losses import shared

KEY_CHUNK = 2048


def softmax_gathered(img_emb, txt_emb, scale, bias=None, *, mesh=None):
  def body(img, txt, scale, bias, *, exchange):
    img_all, txt_all = exchange.all_gather(img), exchange.all_gather(txt)  # [B, D]
    lse_rows = _row_logsumexp(img, txt_all, scale, bias)
    lse_cols = _row_logsumexp(txt, img_all, scale, bias)
    positives = scale * jnp.sum(img * txt, axis=-1) + bias
    total = jnp.sum(lse_rows - positives + lse_cols - positives)
    return exchange.psum(total) / (2 * img_all.shape[0])

  return shared.on_batch_shards(body, mesh,
                                *shared.as_float32(img_emb, txt_emb, scale, None))


def _row_logsumexp(queries, keys, scale, bias):
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


def sigmoid_block(img_emb, txt_emb, scale, bias, *, mesh=None):
  def body(img, txt, scale, bias, *, exchange):
    @jax.checkpoint
    def block_loss(txt_block, labels):
      logits = shared.logits_block(img, txt_block, scale, bias)  # [b, b]
      return -jnp.sum(jax.nn.log_sigmoid(labels * logits))

    local_batch, n_shards = img.shape[0], exchange.size
    own = block_loss(txt, 2 * jnp.eye(local_batch, dtype=jnp.float32) - 1)
    if n_shards == 1:
      return exchange.psum(own) / local_batch
    negative = -jnp.ones((), jnp.float32)

    def hop(txt_block, _):
      return exchange.ppermute(txt_block), block_loss(txt_block, negative)

    last, negatives = jax.lax.scan(hop, exchange.ppermute(txt), length=n_shards - 2)
    total = own + jnp.sum(negatives) + block_loss(last, negative)
    return exchange.psum(total) / (local_batch * n_shards)

  return shared.on_batch_shards(body, mesh,
                                *shared.as_float32(img_emb, txt_emb, scale, bias))
