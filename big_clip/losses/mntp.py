"""Masked next-token prediction (MNTP; BehnamGhader et al. 2024, LLM2Vec §2.2).

A decoder made bidirectional is taught to use its right context: a share of the input tokens
is replaced by a mask token, and the token at each masked position i is predicted from the
output at position i - 1 (the position that predicts token i in the causal LM, so the LM head
keeps its meaning). The loss is the cross-entropy over the masked positions only. LLM2Vec
masks every selected token ("full masking", no 80/10/10 split); so does this.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MNTP_STREAM = 0x4D4E  # the random stream of the masks, next to the seed


def mask_tokens(key: jax.Array, tokens: jax.Array, valid: jax.Array, prob: float,
                mask_id: int) -> tuple[jax.Array, jax.Array]:
  """(tokens with the selected positions set to `mask_id`, selected bool [B, T]).

  Each real token except the first of its text (no position predicts it) is selected with
  probability `prob`; padding never is. Draws are over the global batch from `key`, so every
  mesh masks the same tokens.
  """
  first = jnp.cumsum(valid, axis=-1) == 1
  selected = (jax.random.uniform(key, tokens.shape) < prob) & valid & ~first
  return jnp.where(selected, mask_id, tokens).astype(tokens.dtype), selected


def loss(logits: jax.Array, tokens: jax.Array, selected: jax.Array) -> jax.Array:
  """Mean cross-entropy of the original `tokens` at the `selected` positions, each predicted
  by `logits` [B, T, V] of the previous position; 0 when nothing is selected."""
  logits = logits[:, :-1].astype(jnp.float32)  # position i - 1 predicts token i
  targets, weight = tokens[:, 1:], selected[:, 1:].astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(log_probs, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
  return -jnp.sum(picked * weight) / jnp.maximum(jnp.sum(weight), 1.0)
