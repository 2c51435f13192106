"""LLM2CLIP's caption-contrastive (CC) stage (Huang et al. 2024, §3.2): before an LLM can be
CLIP's text tower, its pooled features are made to tell captions apart. Text only: the two
captions of one image (or a caption and its translation: multilingual CC) are positives, all
other captions of the global batch negatives, with CLIP's symmetric InfoNCE on the
L2-normalized pooled LLM features (LLM2Vec's supervised SimCSE, BehnamGhader et al. 2024
§2.3). The softmax loss (softmax.py) makes it exact on any mesh. Optionally + MNTP (mntp.py).

The adapter and the image tower are not used; the next stage (docs/llm-towers.md) takes the
LLM with its LoRA merged (big_clip.convert.llm_export).
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh

from big_clip.losses import mntp, softmax
from big_clip.models import two_tower


def mntp_inputs(config: Any, step: jax.Array, tokens: jax.Array, pad_id: int
                ) -> dict[str, jax.Array]:
  """The batch entries of MNTP at train step `step`: masked tokens and the selected positions,
  from (config.seed, step) alone, so a resumed run masks as the uninterrupted one."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), mntp.MNTP_STREAM),
                           step)
  masked, selected = mntp.mask_tokens(key, tokens, tokens != pad_id,
                                      float(config.loss.mntp_mask_prob),
                                      int(config.loss.mntp_mask_id))
  return {"text_mntp": masked, "mntp_selected": selected}


def caption_loss(feat_a: jax.Array, feat_b: jax.Array, scale: jax.Array, *,
                 mesh: Mesh | None) -> jax.Array:
  """Symmetric InfoNCE between the L2-normalized pooled features [B, H] of paired captions."""
  return softmax.loss(two_tower.l2_normalize(feat_a), two_tower.l2_normalize(feat_b), scale,
                      None, mesh=mesh)


def loss(tower: Any, batch: dict, scale: jax.Array, *, mesh: Mesh | None,
         mntp_weight: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(CC loss + mntp_weight * MNTP, {metric: term}) of an `LlmTextTower` on a batch with
  'text', 'text_pair' (and, for MNTP, `mntp_inputs`' entries)."""
  contrastive = caption_loss(tower.features(batch["text"]), tower.features(batch["text_pair"]),
                             scale, mesh=mesh)
  parts = {"loss/caption_contrast": contrastive}
  total = contrastive
  if mntp_weight > 0:
    hidden, _ = tower.hidden_states(batch["text_mntp"])
    parts["loss/mntp"] = mntp.loss(tower.token_logits(hidden), batch["text"],
                                   batch["mntp_selected"])
    total = total + mntp_weight * parts["loss/mntp"]
  return total, parts
