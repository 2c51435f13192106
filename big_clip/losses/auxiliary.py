"""Loss terms added to the contrastive loss by config: Long-CLIP's short-caption
term (`config.loss.long_clip`, losses/long_clip.py), distillation from a frozen teacher
(`config.loss.distill`, losses/distill.py), ProCLIP's alignment to a teacher or to the EMA
of the image tower (`config.loss.align`, losses/alignment.py), the caption-pair term
(`config.loss.text_pair_weight`), the captioning decoder's loss (`config.loss.caption`,
losses/caption.py), the region-text loss (`config.loss.region_weight`, losses/region.py) and
hard attribute negatives (`config.loss.hard_negatives`, losses/hard_negatives.py). The train
step calls `make(config)` once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from big_clip import losses
from big_clip.losses import alignment, caption, distill, hard_negatives, long_clip, region

TEACHER_KEYS = ("teacher_image", "teacher_text")


def batch_entries(config: ml_collections.ConfigDict, teacher_dim: int | None = None
                  ) -> dict[str, tuple[tuple[int, ...], str]]:
  """The batch entries beyond 'image' and 'text' that the enabled terms read."""
  out = {}
  if config.loss.long_clip.enabled:
    out["text_short"] = ((config.data.max_len,), "int32")
  if config.loss.text_pair_weight > 0 or config.loss.caption_contrast:
    out["text_pair"] = ((config.data.max_len,), "int32")
  if config.loss.distill.enabled or config.loss.align.target == "teacher_text":
    dim = teacher_dim or config.model.embed_dim
    out.update({k: ((dim,), "float32") for k in TEACHER_KEYS})
  r, k, length = config.data.max_regions, config.loss.hard_negatives, config.data.max_len
  if config.loss.region_weight > 0:
    out.update(region_boxes=((r, 4), "float32"), region_mask=((r,), "bool"),
               region_text=((r, length), "int32"))
  if k:
    out.update(negative_text=((k, length), "int32"), negative_mask=((k,), "bool"))
  return out


def make(config: ml_collections.ConfigDict
         ) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]] | None:
  """`total(contrastive, model, batch, img_emb, txt_emb, scale, bias, *, mesh,
  image_tokens)` -> (the loss with the enabled terms, {metric name: each term before
  weighting}), or None when none is enabled. The names ('loss/contrastive',
  'loss/short_caption', 'loss/text_pair', 'loss/distill', 'loss/instance', 'loss/structure',
  'loss/caption') are logged next to 'loss'. `image_tokens` (the image tower's last-block
  tokens) feed the caption decoder. With `config.loss.align.target='ema_image'` the batch
  holds 'teacher_image' from the EMA weights (steps.make_train_step puts it there)."""
  lc, dist, align = config.loss.long_clip, config.loss.distill, config.loss.align
  pair_weight = float(config.loss.text_pair_weight)
  caption_weight = float(config.loss.caption.weight)
  region_weight = float(config.loss.region_weight)
  negatives = int(config.loss.hard_negatives)
  negative_weight = float(config.loss.hard_negative_weight)
  if not (lc.enabled or dist.enabled or align.target or pair_weight > 0 or caption_weight > 0
          or region_weight > 0 or negatives):
    return None
  base_loss = losses.get(config.loss.name)
  pair_loss = losses.from_config(config.loss)  # the grouped loss keeps its groups

  def total(contrastive: jax.Array, model: Any, batch: dict, img_emb: jax.Array,
            txt_emb: jax.Array, scale: jax.Array, bias: jax.Array, *, mesh,
            image_tokens: jax.Array | None = None
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
    # distill / align.contrastive_weight weigh the contrastive loss alone (ProCLIP stage 1
    # sets it to 0 and keeps the other terms).
    weight = float(dist.contrastive_weight) if dist.enabled else 1.0
    weight *= float(align.contrastive_weight) if align.target else 1.0
    out, parts = weight * contrastive, {"loss/contrastive": contrastive}
    if lc.enabled:  # Long-CLIP §3.2: 'text' holds long captions, 'text_short' short ones
      parts["loss/short_caption"] = long_clip.short_caption_loss(
          img_emb, model.encode_text(batch["text_short"]), scale, bias,
          num_components=int(lc.num_components), base_loss=base_loss, mesh=mesh)
      out = out + float(lc.short_weight) * parts["loss/short_caption"]
    if pair_weight > 0:  # caption <-> another caption of its image in the pivot language
      parts["loss/text_pair"] = pair_loss(txt_emb, model.encode_text(batch["text_pair"]),
                                          scale, bias, mesh=mesh)
      out = out + pair_weight * parts["loss/text_pair"]
    if dist.enabled:
      parts["loss/distill"] = distill.loss(
          img_emb, txt_emb, batch["teacher_image"], batch["teacher_text"],
          feature=dist.feature, feature_weight=float(dist.feature_weight),
          kl_weight=float(dist.kl_weight), temperature=float(dist.temperature), mesh=mesh)
      out = out + parts["loss/distill"]
    if align.target:  # ProCLIP: stage 1 the text tower, stage 2 the image tower
      student, key = ((txt_emb, "teacher_text") if align.target == "teacher_text"
                      else (img_emb, "teacher_image"))
      instance, structure = alignment.terms(student, batch[key], mesh=mesh)
      parts.update({"loss/instance": instance, "loss/structure": structure})
      out = (out + float(align.instance_weight) * instance
             + float(align.structure_weight) * structure)
    if caption_weight > 0:  # CoCa eq. 4: L = L_con + lambda * L_cap
      parts["loss/caption"] = caption.loss(
          model.decoder, image_tokens, batch["text"], pad_id=int(config.model.text.pad_id),
          parallel=batch.get("caption_parallel"))
      out = out + caption_weight * parts["loss/caption"]
    if region_weight > 0:  # CLOC: every valid box of the batch against its caption
      b, r, length = batch["region_text"].shape
      region_emb = model.encode_regions(image_tokens, batch["region_boxes"])
      region_txt = model.encode_text(batch["region_text"].reshape(b * r, length))
      parts["loss/region"] = region.loss(region_emb.reshape(b * r, -1), region_txt,
                                         batch["region_mask"].reshape(b * r), scale, mesh=mesh)
      out = out + region_weight * parts["loss/region"]
    if negatives:  # FG-CLIP: each image against its caption and its attribute swaps
      b, k, length = batch["negative_text"].shape
      neg_emb = model.encode_text(batch["negative_text"].reshape(b * k, length))
      parts["loss/hard_negatives"] = hard_negatives.loss(
          img_emb, txt_emb, neg_emb.reshape(b, k, -1), batch["negative_mask"], scale)
      out = out + negative_weight * parts["loss/hard_negatives"]
    return out, parts

  return total
