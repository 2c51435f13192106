"""Analytic model FLOPs of a CLIP two-tower train step (matmuls only, 2 FLOPs per MAC).

Counted as in Kaplan et al. 2020 / the PaLM MFU appendix (Chowdhery et al. 2022, App. B):
only matrix multiplies, forward once, and training = 3 x forward (the backward pass needs
two matmuls per forward matmul: gradient w.r.t. the input and w.r.t. the weight).
LayerNorm, softmax, GELU, the optimizer and the embedding lookup are ignored (< 2%).

Per example, for a transformer tower of depth L, width W, MLP width M over T tokens:
    per layer:  q, k, v, out projections   2 * T * 4 W^2
                attention scores  Q K^T     2 * T^2 * W
                attention values  P V       2 * T^2 * W     (causal text: counted in full,
                                                             as XLA computes it in full)
                MLP fc1 + fc2               2 * T * 2 W M
    image tower adds the patch embedding 2 * N * (p^2 * 3) * W (N patches, T = N + 1 with
    a class token; with FLIP patch dropout at rate r the blocks see T = max(1, int(N (1 - r)))
    + 1 tokens, the patch embedding still all N) and the projection 2 * W * E; the text tower adds the projection
    2 * W * E (the token embedding is a lookup, 0 FLOPs).
Per step, the softmax loss scores each image against every text and each text against
every image: 2 * (2 * B * B * E) (big_clip.losses.softmax computes both [b, B] blocks).
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Tower:
  tokens: int  # sequence length T the blocks run on
  width: int
  depth: int
  mlp_dim: int
  extra_forward: int  # FLOPs per example outside the blocks (patch embed, projection)

  def layer_forward(self) -> int:
    t, w = self.tokens, self.width
    return 2 * t * 4 * w * w + 2 * 2 * t * t * w + 2 * t * 2 * w * self.mlp_dim

  def forward(self) -> int:
    return self.depth * self.layer_forward() + self.extra_forward


def towers(model_cfg: Any, text_len: int | None = None, masked: bool = False
           ) -> tuple[Tower, Tower]:
  """(image, text) towers of `config.model`; `text_len` defaults to model.text.max_len;
  `masked`: the image blocks see the tokens left by model.image.patch_dropout (training)."""
  im, tx, e = model_cfg.image, model_cfg.text, int(model_cfg.embed_dim)
  patches = (im.image_size // im.patch_size) ** 2
  rate = float(im.get("patch_dropout", 0.0)) if masked else 0.0
  kept = max(1, int(patches * (1.0 - rate))) if rate else patches
  image = Tower(tokens=kept + (im.pool == "cls"), width=im.width, depth=im.depth,
                mlp_dim=im.mlp_dim,
                extra_forward=2 * patches * im.patch_size ** 2 * 3 * im.width
                + 2 * im.width * e)
  if im.pool == "map":  # one probe query attending over the patches + the head's MLP
    head = 2 * (2 * im.width ** 2 + 2 * kept * im.width ** 2 + 2 * 2 * kept * im.width
                + 2 * 2 * im.width * im.mlp_dim)
    image = dataclasses.replace(image, extra_forward=image.extra_forward + head)
  text = Tower(tokens=text_len or tx.max_len, width=tx.width, depth=tx.depth,
               mlp_dim=tx.mlp_dim, extra_forward=2 * tx.width * e)
  return image, text


def loss_forward(global_batch: int, embed_dim: int) -> int:
  """The two [B, B] logit matmuls of the contrastive loss (per step, forward)."""
  return 2 * 2 * global_batch * global_batch * embed_dim


def train_step_flops(model_cfg: Any, global_batch: int, text_len: int | None = None) -> int:
  """Model FLOPs of one training step (forward + backward = 3 x forward) at `global_batch`,
  with the image tower on the tokens patch dropout leaves."""
  image, text = towers(model_cfg, text_len, masked=True)
  forward = global_batch * (image.forward() + text.forward())
  forward += loss_forward(global_batch, int(model_cfg.embed_dim))
  return 3 * forward
