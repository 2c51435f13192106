"""Hard fine-grained negatives (FG-CLIP, Xie et al. 2025 §3.3; FG-CLIP 2): each image against
its own caption and K captions of the same form with one attribute swapped.

    loss = 1/B sum_i [logsumexp(z_ii, z_i1 .. z_iK over the valid negatives) - z_ii]

with z = scale * <image, caption>. Each term reads only its own example's embeddings, so
on a mesh the plain array code is exact: the batch stays sharded and only the final mean
sums over devices.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def loss(img_emb: jax.Array, txt_emb: jax.Array, neg_emb: jax.Array, neg_valid: jax.Array,
         scale: jax.Array) -> jax.Array:
  """img_emb, txt_emb [B, D] L2-normalized (row i a pair); neg_emb [B, K, D] L2-normalized
  swapped captions of image i, neg_valid [B, K] bool (False: padding); scalar `scale`."""
  b, k, d = neg_emb.shape
  chex.assert_shape([img_emb, txt_emb], (b, d))
  chex.assert_shape(neg_valid, (b, k))
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  img, txt, neg, scale = f32(img_emb), f32(txt_emb), f32(neg_emb), f32(scale)
  positive = scale * jnp.einsum("bd,bd->b", img, txt, precision=jax.lax.Precision.HIGHEST)
  negative = scale * jnp.einsum("bd,bkd->bk", img, neg, precision=jax.lax.Precision.HIGHEST)
  negative = jnp.where(neg_valid, negative, -jnp.inf)
  logits = jnp.concatenate([positive[:, None], negative], axis=1)  # [B, 1 + K]
  return jnp.mean(jax.nn.logsumexp(logits, axis=1) - positive)
