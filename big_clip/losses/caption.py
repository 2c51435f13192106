"""The captioning loss (CoCa, Yu et al. 2022, eq. 3; CapPa, Tschannen et al. 2023): token-level
cross-entropy of the caption decoder (models/decoder.py), averaged over the caption tokens of
the global batch; padding is ignored, the EOS token is predicted (the decoder learns where a
caption ends).

Under jit the arrays are global (batch-sharded, vocab on 'tensor'): the sums below are the
global batch's, so the value and gradients do not depend on the mesh. No shard_map needed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from big_clip.models import decoder as decoder_lib


def token_loss(logits: jax.Array, targets: jax.Array, valid: jax.Array) -> jax.Array:
  """Mean over valid tokens of -log softmax(logits)[target]: logits float [B, L, V],
  targets int [B, L], valid bool [B, L]. 0 when no token is valid."""
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  valid = valid.astype(jnp.float32)
  return jnp.sum((log_z - picked) * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def loss(decoder: decoder_lib.CaptionDecoder, image_tokens: jax.Array, tokens: jax.Array,
         *, pad_id: int, parallel: jax.Array | None = None) -> jax.Array:
  """The decoder's loss on captions `tokens` [B, L] (int32, right-padded with `pad_id`)."""
  logits = decoder(image_tokens, tokens, parallel)
  return token_loss(logits, tokens, tokens != pad_id)
