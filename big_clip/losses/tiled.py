"""The tiled ring that softmax.py and sigmoid.py run on: the logits of a contrastive batch
visited one fixed-size tile at a time, on every device, forward and backward.

Inf-CL (Cheng et al. 2024, "Breaking the Memory Barrier: Near Infinite Batch Size Scaling
for Contrastive Loss", arXiv 2410.17243) tiles the loss at two levels ("multi-level
tiling"): across devices the key blocks travel around a ring (as in SigLIP §3.3), and inside
a device the `b x b` block of one ring step is cut into `tile x tile` pieces, so no device
ever holds more than one tile of logits, nor the gathered keys: a few `[b, D]` blocks (its
own, the visiting one in flight, their gradients), O(tile^2 + b D) per device, independent
of the global batch.

Orientation: each device keeps its text block (the *staying* side, the logits' columns) and
its image block travels around the ring of its exchange group (the *moving* side, the rows).
Per-row results (softmax's running row logsumexp, the image gradients) travel with their
rows and arrive home with them after the `n`-th hop; per-column results stay.

A loss supplies a `tile_fn` for its forward statistics and a `dz_fn` for `dL/dz` of one
tile (and, where it needs no statistic of the whole batch, the tile's loss); `ring_grads`
then forms the gradients w.r.t. both embeddings, the scale and the bias tile by tile
(a custom VJP: autodiff through the ring would save every visiting block for
the backward pass, the `B x D` keys this module exists to avoid).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from big_clip.losses import shared

# Rows (and columns) per logits tile. A device forms `[TILE, TILE]` float32 logits at a time
# (16 MiB, a few such temporaries in the backward pass); big enough that each tile's
# matmuls run at full speed, small enough to leave a 2 GiB budget for the embedding blocks
# at a 1M global batch on 8 devices (benchmarks/loss_memory.py).
TILE = 2048

Tree = Any
# tile_fn(moving_in, moving_out, staying_in, staying_out, totals, valid, positive)
#   -> (moving_out, staying_out, totals), each `*_in/*_out` a tree of this tile's rows.
TileFn = Callable[..., tuple[Tree, Tree, Tree]]
# dz_fn(z, dots, moving_in, staying_in, valid, positive) -> (dL/dz of the tile, 0 where
#   invalid; a scalar summed over the tiles, e.g. the loss where it needs no global statistic)
DzFn = Callable[..., tuple[jax.Array, jax.Array]]


def tile_rows(n_rows: int, tile: int | None) -> int:
  """The tile edge for blocks of `n_rows`: `tile` (default TILE), at most the block."""
  tile = TILE if tile is None else tile
  if tile < 1:
    raise ValueError(f"loss tile={tile} must be >= 1 (rows per logits tile).")
  return min(tile, n_rows)


def pad_rows(x: jax.Array, tile: int) -> jax.Array:
  """`x` padded with zero rows to a multiple of `tile` rows (the ragged last tile)."""
  pad = -x.shape[0] % tile
  return x if pad == 0 else jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))


def ring(exchange: shared.Exchange, tile_fn: TileFn, *, moving_in: Tree, moving_out: Tree,
         staying_in: Tree, staying_out: Tree, totals: Tree, n_rows: int,
         tile: int) -> tuple[Tree, Tree, Tree]:
  """Runs `tile_fn` on every (moving tile, staying tile) pair of every ring step.

  All `*_in` / `*_out` leaves are `[n_tiles * tile, ...]` (padded: rows from `n_rows` on
  are padding). Ring step `r` scores the moving block of the device `r` places back in the
  group against this device's staying block, tile pair by tile pair; `valid` masks the
  padding and `positive` marks the pairs (i, i) of the own block (step 0). Then
  `moving_in` and `moving_out` hop one device along the ring; after `n` hops they are home.

  Returns `(moving_out, staying_out, totals)`, each now over the whole group.
  """
  n_tiles = jax.tree.leaves(moving_in)[0].shape[0] // tile
  take = lambda tree, t: jax.tree.map(
      lambda x: jax.lax.dynamic_slice_in_dim(x, t * tile, tile), tree)
  put = lambda tree, t, new: jax.tree.map(
      lambda x, y: jax.lax.dynamic_update_slice_in_dim(x, y, t * tile, 0), tree, new)
  index = jax.lax.iota(jnp.int32, tile)

  def one_step(carry, step):
    moving_in, moving_out, staying_out, totals = carry

    def one_pair(k, acc):
      moving_out, staying_out, totals = acc
      i, j = k // n_tiles, k % n_tiles
      rows, cols = i * tile + index, j * tile + index
      valid = (rows < n_rows)[:, None] & (cols < n_rows)[None, :]
      positive = (step == 0) & (rows[:, None] == cols[None, :])
      mo, so, totals = tile_fn(take(moving_in, i), take(moving_out, i),
                               take(staying_in, j), take(staying_out, j), totals, valid,
                               positive)
      return put(moving_out, i, mo), put(staying_out, j, so), totals

    moving_out, staying_out, totals = jax.lax.fori_loop(
        0, n_tiles * n_tiles, one_pair, (moving_out, staying_out, totals))
    if exchange.size > 1:
      moving_in, moving_out = jax.tree.map(exchange.ppermute, (moving_in, moving_out))
    return (moving_in, moving_out, staying_out, totals), None

  start = (moving_in, *exchange.varying((moving_out, staying_out, totals)))
  (_, moving_out, staying_out, totals), _ = jax.lax.scan(
      one_step, start, jax.lax.iota(jnp.int32, exchange.size))
  return moving_out, staying_out, totals


def dots_tile(rows: jax.Array, cols: jax.Array) -> jax.Array:
  """`rows @ cols.T` in full float32 (see `shared.logits_block`)."""
  return jnp.einsum("id,jd->ij", rows, cols, precision=jax.lax.Precision.HIGHEST)


def ring_grads(exchange: shared.Exchange, dz_fn: DzFn, img: jax.Array, txt: jax.Array,
               scale: jax.Array, bias: jax.Array, *, moving: Tree = (), staying: Tree = (),
               tile: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
  """Gradients of a loss over `z = scale * img @ txt.T + bias` (rows: this device's group),
  from `dz_fn`, tile by tile: `(value, d_img, d_txt, d_scale, d_bias)` of this device's
  blocks, `value` the sum of the second output of `dz_fn` over the tiles.

  With `G = dL/dz`: `d_img = scale G txt`, `d_txt = scale G^T img`, `d_scale = <G, img txt^T>`,
  `d_bias = sum G`. `moving` (per image row) and `staying` (per text row) are the extra
  `[b]` inputs `dz_fn` reads, e.g. softmax's logsumexps. The image gradients travel with
  their rows and arrive home after the ring's last hop.
  """
  n_rows, dim = img.shape
  pad = lambda tree: jax.tree.map(lambda x: pad_rows(x, tile), tree)
  hi = jax.lax.Precision.HIGHEST

  def tile_fn(moving_in, d_img, staying_in, d_txt, totals, valid, positive):
    (img_t, moving_t), (txt_t, staying_t) = moving_in, staying_in
    dots = dots_tile(img_t, txt_t)
    dz, value = dz_fn(scale * dots + bias, dots, moving_t, staying_t, valid, positive)
    total, d_scale, d_bias = totals
    d_img = d_img + scale * jnp.einsum("ij,jd->id", dz, txt_t, precision=hi)
    d_txt = d_txt + scale * jnp.einsum("ij,id->jd", dz, img_t, precision=hi)
    return d_img, d_txt, (total + value, d_scale + jnp.sum(dz * dots), d_bias + jnp.sum(dz))

  zeros_rows = jnp.zeros((-(-n_rows // tile) * tile, dim), jnp.float32)
  zero = jnp.zeros((), jnp.float32)
  d_img, d_txt, (total, d_scale, d_bias) = ring(
      exchange, tile_fn, moving_in=pad((img, moving)), moving_out=zeros_rows,
      staying_in=pad((txt, staying)), staying_out=zeros_rows, totals=(zero, zero, zero),
      n_rows=n_rows, tile=tile)
  return total, d_img[:n_rows], d_txt[:n_rows], d_scale, d_bias
