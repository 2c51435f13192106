"""Batch accumulation with a gradient cache (Gao et al. 2021, "Scaling Deep Contrastive
Learning Batch Size under Memory Limited Setup", arXiv 2101.06983).

A contrastive loss couples every example of the batch, so it cannot be split into
independent micro-batch losses without shrinking the batch the negatives come from (that
is what `optim.grad_accum_steps` does). Gradient cache splits the *backward pass* instead:

1. embed the k micro-batches one after another, keeping only the embeddings (no
   activations: nothing here is differentiated);
2. compute the loss on all `[B, D]` embeddings and its gradient w.r.t. them (and the
   logit scale / bias): the cache;
3. for each micro-batch, recompute its towers under `jax.vjp` and pull its slice of the
   cached embedding gradients back to the parameters; sum over micro-batches.

The result equals the gradient of the loss on the whole batch (the chain rule, split by
rows), with one micro-batch's activations alive at a time, for the price of a second
forward pass. Works with every loss in this package, on any mesh.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from big_clip import losses
from big_clip.sharding import BATCH_AXES

Params = Any
EmbedFn = Callable[[Params, dict], tuple[jax.Array, jax.Array]]  # -> img, txt [b, D]
HeadFn = Callable[[Params], tuple[jax.Array, jax.Array]]  # -> scale, bias


def split(tree: Any, k: int, mesh: Mesh | None = None) -> Any:
  """`[B, ...]` leaves -> `[k, B / k, ...]`: micro-batch i holds rows i, i + k, i + 2k, ...

  The batch is sharded over the data-parallel devices in contiguous blocks of B / n rows.
  Taking every k-th row (instead of the contiguous block i * B / k + [0, B / k)) gives each
  micro-batch an equal slice, B / (n k) rows, of every device's block: the reshape to
  `[B / k, k]` keeps dimension 0 split over the devices exactly as before, so no rows move
  between devices and every micro-batch still runs on all of them.
  """
  def one(x):
    micro = jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
    return _constrain(micro, mesh, P(None, BATCH_AXES))
  return jax.tree.map(one, tree)


def merge(tree: Any, mesh: Mesh | None = None) -> Any:
  """The inverse of `split`: `[k, B / k, ...]` -> `[B, ...]` in the original row order."""
  def one(x):
    rows = jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])
    return _constrain(rows, mesh, P(BATCH_AXES))
  return jax.tree.map(one, tree)


def _constrain(x: jax.Array, mesh: Mesh | None, spec: P) -> jax.Array:
  return x if mesh is None else jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def value_and_grad(embed: EmbedFn, head: HeadFn, loss_fn: losses.LossFn, params: Params,
                   batch: dict, *, accum_steps: int, mesh: Mesh | None = None
                   ) -> tuple[tuple[jax.Array, tuple[jax.Array, jax.Array]], Params]:
  """((loss, (scale, bias)), d loss / d params) of the whole batch, k micro-batches at a time.

  Args:
    embed: `(params, micro_batch) -> (img_emb, txt_emb)`, the two towers.
    head: `params -> (scale, bias)`, the logit scale and bias.
    loss_fn: a contrastive loss, `loss_fn(img, txt, scale, bias, mesh=mesh)`.
    params: the parameters (a pytree).
    batch: the global batch, leaves `[B, ...]` sharded over the batch axes.
    accum_steps: k, the number of micro-batches; B / k must still split over the devices.
    mesh: the device mesh, or None for one device.
  """
  micro = split(batch, accum_steps, mesh)

  # 1. Embeddings only: not differentiated, so the scan keeps no activations.
  def embed_one(_, micro_batch):
    return None, embed(params, micro_batch)

  _, (img_micro, txt_micro) = jax.lax.scan(embed_one, None, micro)
  img_emb, txt_emb = merge((img_micro, txt_micro), mesh)  # [B, D]

  # 2. The cache: the loss of the whole batch and its gradient w.r.t. its inputs.
  (scale, bias), head_vjp = jax.vjp(head, params)
  loss_of = lambda i, t, s, b: loss_fn(i, t, s, b, mesh=mesh)
  loss, (d_img, d_txt, d_scale, d_bias) = jax.value_and_grad(loss_of, argnums=(0, 1, 2, 3))(
      img_emb, txt_emb, scale, bias)
  (head_grads,) = head_vjp((d_scale, d_bias))

  # 3. Recompute each micro-batch under vjp and back-propagate its cached gradients; the
  #    scan holds one micro-batch's activations at a time.
  def backprop_one(grads, inputs):
    micro_batch, d_emb = inputs
    _, embed_vjp = jax.vjp(lambda p: embed(p, micro_batch), params)
    (micro_grads,) = embed_vjp(d_emb)
    return jax.tree.map(jnp.add, grads, micro_grads), None

  d_micro = split((d_img.astype(img_emb.dtype), d_txt.astype(txt_emb.dtype)), accum_steps,
                  mesh)
  grads, _ = jax.lax.scan(backprop_one, head_grads, (micro, d_micro))
  return (loss, (scale, bias)), grads
