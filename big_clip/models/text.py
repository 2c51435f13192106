"""CLIP text transformer (Radford et al. 2021, §2.4): a causal pre-LN transformer whose
feature is the final-LN activation at one pooled position, linearly projected.

token_embedding + positional_embedding[:L] -> blocks (causal) -> pool -> ln_final -> proj.
Layout as OpenAI/HF CLIP: `token_embedding.embedding` is `[vocab, width]`,
`positional_embedding` is `[max_len, width]`, `proj.kernel` is `[width, embed_dim]`
(= OpenAI `text_projection`; HF `text_projection.weight` is its transpose).

Long captions: `stretch_positional_embedding` lengthens a trained positional table
(Long-CLIP's knowledge-preserved stretching, 77 -> 248), applied when loading parameters
(`big_clip.models.adapt.fit_loaded_params`).
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from big_clip import sharding
from big_clip.models import layers, moe

POOLS = ("eos", "last", "argmax", "final")
LONG_CLIP_KEEP = 20  # Long-CLIP §3.1: the first 20 positions are kept as trained


def stretch_positional_embedding(table: np.ndarray, new_len: int,
                                 keep: int = LONG_CLIP_KEEP) -> np.ndarray:
  """Knowledge-preserved stretching (Long-CLIP, Zhang et al. 2024, §3.1): `[L, D]` -> `[new_len, D]`.

  Rows `0..keep-1` are copied bit for bit (they are well trained: most captions are short);
  rows `keep..L-1` are stretched over positions `keep..new_len-1` by linear interpolation.
  New row j >= keep samples the old table at `p_j = keep + (j - keep) / ratio`, with
  `ratio = (new_len - keep) / (L - keep)`, between old rows floor(p_j) and floor(p_j) + 1;
  the last `ratio - 1` rows lie past row L-1 and continue the last segment's slope. With
  L=77, keep=20, new_len=248 (ratio 4) this is exactly the Long-CLIP release
  (`model_longclip.py`): new[20 + 4i + r] = (1 - r/4) old[20 + i] + r/4 old[21 + i] for
  i < 56, and new[244 + r] = old[76] + r/4 (old[76] - old[75]) for r = 0..3.

  Computed in float64 and returned in the table's dtype.
  """
  table = np.asarray(table)
  if table.ndim != 2:
    raise ValueError(f"stretch_positional_embedding: the table must be [length, width], got "
                     f"shape {table.shape}.")
  length = table.shape[0]
  if not 0 <= keep < length - 1:
    raise ValueError(f"stretch_positional_embedding: keep={keep} must be in [0, {length - 1}) "
                     f"for a table of {length} positions (at least two rows are interpolated); "
                     f"lower keep.")
  if new_len < length:
    raise ValueError(f"stretch_positional_embedding: new_len={new_len} is shorter than the "
                     f"table ({length} positions); stretching only lengthens. Set "
                     f"config.model.text.max_len >= {length}.")
  if new_len == length:
    return table.copy()
  ratio = (new_len - keep) / (length - keep)
  p = keep + (np.arange(keep, new_len, dtype=np.float64) - keep) / ratio  # sample points
  lo = np.minimum(np.floor(p).astype(np.int64), length - 2)  # tail extrapolates segment L-2
  frac = (p - lo)[:, None]
  src = table.astype(np.float64)
  stretched = (1 - frac) * src[lo] + frac * src[lo + 1]
  return np.concatenate([table[:keep], stretched.astype(table.dtype)])


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
    self.freeze_positions = int(c.freeze_positions)
    # CLIP's text tower is causal; SigLIP's attends both ways (`text.causal=False`).
    self.causal = bool(c.causal)
    w = cfg.width
    # open_clip init: token_embedding std 0.02, positional_embedding std 0.01.
    self.token_embedding = nnx.Embed(
        int(c.vocab_size), w, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed")),
        rngs=rngs)
    self.positional_embedding = layers.param(rngs, nnx.initializers.normal(0.01),
                                             (self.max_len, w), ("length", "embed"),
                                             cfg.param_dtype)
    self.blocks = layers.make_blocks(
        cfg, rngs=rngs, mlp=moe.mlp_factory(cfg, moe.MoeConfig.from_config(model_cfg, "text")))
    self.ln_final = layers.LayerNorm(w, cfg)
    # SigLIP's text head has a bias (`text.proj_bias=True`); CLIP's projection has none.
    self.proj = layers.dense(w, int(model_cfg.embed_dim), ("embed", "joint"), std=w ** -0.5,
                             cfg=cfg, rngs=rngs, use_bias=bool(c.proj_bias))

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return self.forward(tokens)[0]

  def forward(self, tokens: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """As `__call__`, and the MoE layers' routing statistics ({} without MoE)."""
    chex.assert_rank(tokens, 2)
    length = tokens.shape[1]
    if length > self.max_len:
      raise ValueError(f"text of length {length} exceeds config.model.text.max_len="
                       f"{self.max_len}; truncate in the tokenizer or raise max_len.")
    # Shorter sequences use the first `length` positions.
    positions = self.positional_embedding[:length]
    if self.freeze_positions:  # Long-CLIP §3.1: rows < N stay as trained (zero gradient)
      n = self.freeze_positions
      positions = jnp.concatenate([jax.lax.stop_gradient(positions[:n]), positions[n:]])
    x = self.token_embedding(tokens) + positions.astype(self.cfg.dtype)
    x = sharding.constrain(x, layers.ACT_EMBED)
    x, stats = layers.apply_blocks(self.blocks, x, remat=self.cfg.remat, causal=self.causal)
    # LayerNorm is per token, so pooling before ln_final equals CLIP's ln_final-then-pool.
    idx = pool_index(tokens, self.pool, eos_id=self.eos_id, pad_id=self.pad_id)
    pooled = self.ln_final(layers.take_positions(x, idx))
    return self.proj(pooled).astype(jnp.float32), stats
