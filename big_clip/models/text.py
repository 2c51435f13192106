"""CLIP text transformer (Radford et al. 2021, §2.4): a causal pre-LN transformer whose
feature is the final-LN activation at one pooled position, linearly projected.

token_embedding + positional_embedding[:L] -> blocks (causal) -> pool -> ln_final -> proj.
Layout as OpenAI/HF CLIP: `token_embedding.embedding` is `[vocab, width]`,
`positional_embedding` is `[max_len, width]`, `proj.kernel` is `[width, embed_dim]`
(= OpenAI `text_projection`; HF `text_projection.weight` is its transpose).
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from big_clip import sharding
from big_clip.models import layers

POOLS = ("eos", "last", "argmax", "final")


def pool_index(tokens: jax.Array, pool: str, *, eos_id: int, pad_id: int) -> jax.Array:
  """The position [B] whose feature represents each sequence of `tokens` [B, L].

  'eos': the first token == eos_id (HF CLIPTextTransformer with eos_token_id; 0 if none).
  'last': the last token != pad_id (right-padded captions, e.g. SigLIP-style tokenizers).
  'argmax': the largest token id (OpenAI CLIP: EOT has the largest id in its vocabulary).
  'final': position L-1 whatever the token (big_vision pool_type='last', HF SiglipTextModel,
    open_clip pool_type='last'): with padding to max_len and `causal=False`, a pad token that
    attends to the whole caption.
  """
  if pool == "eos":
    return jnp.argmax(tokens == eos_id, axis=-1)
  if pool == "last":
    length = tokens.shape[-1]
    return length - 1 - jnp.argmax((tokens != pad_id)[:, ::-1], axis=-1)
  if pool == "argmax":
    return jnp.argmax(tokens, axis=-1)
  if pool == "final":
    return jnp.full(tokens.shape[:1], tokens.shape[-1] - 1, jnp.int32)
  raise ValueError(f"config.model.text.pool={pool!r}; allowed: {', '.join(POOLS)}.")


class TextTransformer(nnx.Module):
  """Text tower: int32 `[B, L]` tokens (L <= max_len) -> unnormalized float32 `[B, embed_dim]`."""

  def __init__(self, model_cfg: Any, *, rngs: nnx.Rngs):
    c = model_cfg.text
    self.cfg = cfg = layers.TransformerConfig.from_config(model_cfg, "text")
    self.pool = layers.choose(c.pool, POOLS, "config.model.text.pool")
    self.max_len, self.eos_id, self.pad_id = int(c.max_len), int(c.eos_id), int(c.pad_id)
    # CLIP's text tower is causal; SigLIP's attends both ways (`text.causal=False`).
    self.causal = bool(c.get("causal", True))
    w = cfg.width
    # open_clip init: token_embedding std 0.02, positional_embedding std 0.01.
    self.token_embedding = nnx.Embed(
        int(c.vocab_size), w, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed")),
        rngs=rngs)
    self.positional_embedding = layers.param(rngs, nnx.initializers.normal(0.01),
                                             (self.max_len, w), ("length", "embed"),
                                             cfg.param_dtype)
    self.blocks = layers.make_blocks(cfg, rngs=rngs)
    self.ln_final = layers.LayerNorm(w, cfg)
    # SigLIP's text head has a bias (`text.proj_bias=True`); CLIP's projection has none.
    self.proj = layers.dense(w, int(model_cfg.embed_dim), ("embed", "joint"), std=w ** -0.5,
                             cfg=cfg, rngs=rngs, use_bias=bool(c.get("proj_bias", False)))

  def __call__(self, tokens: jax.Array) -> jax.Array:
    chex.assert_rank(tokens, 2)
    b, length = tokens.shape
    if length > self.max_len:
      raise ValueError(f"text of length {length} exceeds config.model.text.max_len="
                       f"{self.max_len}; truncate in the tokenizer or raise max_len.")
    # Shorter sequences use the first `length` positions.
    x = self.token_embedding(tokens) + self.positional_embedding[:length].astype(self.cfg.dtype)
    x = sharding.constrain(x, layers.ACT_EMBED)
    x = layers.apply_blocks(self.blocks, x, remat=self.cfg.remat, causal=self.causal)
    # LayerNorm is per token, so pooling before ln_final equals CLIP's ln_final-then-pool.
    idx = pool_index(tokens, self.pool, eos_id=self.eos_id, pad_id=self.pad_id)
    pooled = self.ln_final(x[jnp.arange(b), idx])
    return self.proj(pooled).astype(jnp.float32)
