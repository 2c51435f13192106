"""The caption decoder (CoCa, Yu et al. 2022; CapPa, Tschannen et al. 2023): a pre-LN
transformer decoder that cross-attends to the image tower's last-block tokens and predicts
the caption's tokens.

Each block: x + self_attn(ln_1(x)); x + cross_attn(ln_2(x), image); x + mlp(ln_3(x)).
Two ways to feed it (`config.loss.caption.mode`):
  'ar'        teacher forcing: the input at position t is the caption token t-1 (a learned
              BOS embedding at t = 0), causal self-attention.
  'parallel'  CapPa §3 parallel prediction: every input is the same learned mask embedding
              and self-attention sees all positions, so each token is predicted from the
              image alone; CapPa mixes it with 'ar' per example (`parallel_fraction`).
Like CapPa / LocCa the decoder has its own token embedding (CoCa shares the text tower's
lower layers instead), so the two towers stay exactly the CLIP / SigLIP layout.

`config.model.decoder` sizes it (depth 0: no decoder); `greedy_decode` captions images.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from big_clip import sharding
from big_clip.models import layers

ACT_VOCAB = ("activation_batch", "activation_length", "activation_vocab")
PARALLEL_STREAM = 0x43415050  # a key stream of its own ("CAPP")


class DecoderBlock(nnx.Module):
  """Pre-LN block: causal (or masked) self-attention, cross-attention to the image, MLP."""

  def __init__(self, cfg: layers.TransformerConfig, *, rngs: nnx.Rngs):
    self.ln_1 = layers.LayerNorm(cfg.width, cfg)
    self.self_attn = layers.Attention(cfg, rngs=rngs)
    self.ln_2 = layers.LayerNorm(cfg.width, cfg)
    self.cross_attn = layers.Attention(cfg, rngs=rngs)
    self.ln_3 = layers.LayerNorm(cfg.width, cfg)
    self.mlp = layers.MLP(cfg, rngs=rngs)

  def __call__(self, x: jax.Array, causal: bool = True, *, image: jax.Array,
               mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x [B, L, W]; image [B, S, W] (already in the decoder's width); mask [B, 1, L, L].
    -> (x, {}): no MoE statistics (layers.apply_blocks' block interface)."""
    x = x + self.self_attn(self.ln_1(x), causal=causal, mask=mask)
    x = x + self.cross_attn(self.ln_2(x), image)
    x = x + self.mlp(self.ln_3(x))
    return sharding.constrain(x, layers.ACT_EMBED), {}


class CaptionDecoder(nnx.Module):
  """(image tokens [B, S, W_image], caption tokens [B, L]) -> float32 logits [B, L, vocab]:
  logits[:, t] predict tokens[:, t]."""

  def __init__(self, model_cfg: Any, *, rngs: nnx.Rngs):
    self.cfg = cfg = layers.TransformerConfig.from_config(model_cfg, "decoder")
    w, vocab = cfg.width, int(model_cfg.text.vocab_size)
    self.max_len = int(model_cfg.text.max_len)
    normal = nnx.initializers.normal
    self.token_embedding = nnx.Embed(
        vocab, w, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        embedding_init=nnx.with_partitioning(normal(0.02), ("vocab", "embed")), rngs=rngs)
    self.positional_embedding = layers.param(rngs, normal(0.01), (self.max_len, w),
                                             ("length", "embed"), cfg.param_dtype)
    self.bos_embedding = layers.param(rngs, normal(0.02), (w,), ("embed",), cfg.param_dtype)
    self.mask_embedding = layers.param(rngs, normal(0.02), (w,), ("embed",), cfg.param_dtype)
    # The image tokens leave the image tower un-normalized and in its width.
    image_width = int(model_cfg.image.width)
    self.image_ln = layers.LayerNorm(image_width, cfg)
    self.image_proj = layers.dense(image_width, w, ("embed", None), std=image_width ** -0.5,
                                   cfg=cfg, rngs=rngs)
    self.blocks = layers.make_blocks(cfg, rngs=rngs, block=DecoderBlock)
    self.ln_final = layers.LayerNorm(w, cfg)
    self.head = layers.dense(w, vocab, ("embed", "vocab"), std=w ** -0.5, cfg=cfg, rngs=rngs)

  def __call__(self, image_tokens: jax.Array, tokens: jax.Array,
               parallel: jax.Array | None = None) -> jax.Array:
    """`parallel` [B] bool: True rows use parallel prediction; None = all teacher-forced."""
    chex.assert_rank([image_tokens, tokens], [3, 2])
    b, length = tokens.shape
    if length > self.max_len:
      raise ValueError(f"caption of length {length} exceeds config.model.text.max_len="
                       f"{self.max_len}, the decoder's positions.")
    dt = self.cfg.dtype
    bos = jnp.broadcast_to(self.bos_embedding[...].astype(dt), (b, 1, self.cfg.width))
    x = jnp.concatenate([bos, self.token_embedding(tokens[:, :-1])], axis=1)  # shift right
    causal = jnp.tril(jnp.ones((length, length), bool))
    if parallel is None:
      mask = None
    else:  # CapPa: mask-token inputs that attend to every position
      chex.assert_shape(parallel, (b,))
      x = jnp.where(parallel[:, None, None], self.mask_embedding[...].astype(dt), x)
      mask = causal | parallel[:, None, None, None]  # [B, 1, L, L]
    x = x + self.positional_embedding[:length].astype(dt)
    x = sharding.constrain(x, layers.ACT_EMBED)
    image = self.image_proj(self.image_ln(image_tokens))
    x, _ = layers.apply_blocks(self.blocks, x, remat=self.cfg.remat, causal=True, image=image,
                               mask=mask)
    logits = self.head(self.ln_final(x)).astype(jnp.float32)
    return sharding.constrain(logits, ACT_VOCAB)


def parallel_rows(config: Any, step: jax.Array, batch_size: int) -> jax.Array:
  """[B] bool: the examples decoded in parallel at train step `step` (`state['step']`).

  All of them in 'parallel' mode with fraction 1, a Bernoulli(parallel_fraction) draw per
  example otherwise (CapPa mixes 75% parallel with 25% teacher forcing); none in 'ar'. From
  (config.seed, step) alone and for the global batch, so every mesh and a resumed run draw
  the same rows (as vit.patch_noise).
  """
  cap = config.loss.caption
  if cap.mode == "ar":
    return jnp.zeros((batch_size,), bool)
  if cap.parallel_fraction >= 1.0:
    return jnp.ones((batch_size,), bool)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), PARALLEL_STREAM),
                           step)
  rows = jax.random.bernoulli(key, cap.parallel_fraction, (batch_size,))
  return sharding.constrain(rows, ("activation_batch",))


def greedy_decode(decoder: CaptionDecoder, image_tokens: jax.Array, length: int, *,
                  eos_id: int, pad_id: int, parallel: bool = False,
                  prefix: jax.Array | None = None) -> jax.Array:
  """Greedy captions int32 [B, length] (pad after the first EOS) for image tokens [B, S, W].

  'ar': one pass per position, each taking the argmax there (no KV cache: the caption is
  short and this is for evaluation); `prefix` [B, P] int32 forces the first P tokens (e.g.
  a language's opening words). `parallel`: one pass from mask tokens.
  """
  b = image_tokens.shape[0]
  tokens = jnp.full((b, length), pad_id, jnp.int32)
  start = 0
  if prefix is not None:
    if parallel:
      raise ValueError("greedy_decode: a prefix needs autoregressive decoding "
                       "(parallel=False).")
    start = prefix.shape[1]
    tokens = tokens.at[:, :start].set(prefix.astype(jnp.int32))
  if parallel:
    tokens = jnp.argmax(decoder(image_tokens, tokens, jnp.ones((b,), bool)), -1)
  else:
    # The weights ride in the carry: a scanned stack (nnx.scan) may not close over them.
    graphdef, state = nnx.split(decoder)

    def body(t, carry):  # positions < t are decided; the input at t reads tokens[t - 1]
      tokens, state = carry
      logits = nnx.merge(graphdef, state)(image_tokens, tokens)
      next_token = jnp.argmax(logits[:, t], -1).astype(jnp.int32)
      return tokens.at[:, t].set(next_token), state
    tokens, _ = jax.lax.fori_loop(start, length, body, (tokens, state))
  after_eos = jnp.cumsum(tokens == eos_id, axis=1) - (tokens == eos_id) > 0
  return jnp.where(after_eos, pad_id, tokens).astype(jnp.int32)
