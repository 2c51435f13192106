"""Grouped aggregation of the contrastive loss, from M2-Encoder (Guo et al. 2024,
"M2-Encoder: Advancing Bilingual Image-Text Understanding by Large-scale Efficient
Pretraining", arXiv 2401.15896).

The devices on the batch axes (data x fsdp x expert, in that order) form groups of `group_size`
consecutive devices. Embeddings are exchanged only inside a group, each group computes
the contrastive loss of its own `group_size * B_local` examples, and the step loss is the
mean over groups. Communication per device drops from O(B_global x D) to
O(group_size x B_local x D) and no collective spans more than one group, at the price of
fewer negatives per example (each group is one contrastive batch). With
`group_size` = all devices it is exactly the global softmax / sigmoid loss.

The per-group computation *is* softmax.py / sigmoid.py: their shard_map bodies take the
group as their exchange domain (`shared.Exchange`), so there is one implementation of each.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh

from big_clip.losses import sigmoid, softmax

BASES = {"softmax": softmax.loss, "sigmoid": sigmoid.loss}


def loss(img_emb: jax.Array, txt_emb: jax.Array, scale: jax.Array,
         bias: jax.Array | None = None, *, mesh: Mesh | None = None,
         group_size: int | None = None, base: str = "softmax") -> jax.Array:
  """Mean over device groups of the `base` contrastive loss of each group's batch.

  Args:
    img_emb, txt_emb: `[B, D]` L2-normalized embeddings, batch split over ('data', 'fsdp').
    scale, bias: scalar logit scale and bias (bias required for base='sigmoid').
    mesh: the device mesh, or None for one device (then the only group is the batch).
    group_size: data-parallel devices per group; must divide data x fsdp x expert. None = all.
    base: 'softmax' (CLIP) or 'sigmoid' (SigLIP), the loss computed inside each group.

  Returns:
    The float32 scalar loss, replicated.
  """
  if base not in BASES:
    raise ValueError(f"config.loss.group_base={base!r} is not a known loss; allowed: "
                     f"{tuple(BASES)}.")
  return BASES[base](img_emb, txt_emb, scale, bias, mesh=mesh, group_size=group_size)
