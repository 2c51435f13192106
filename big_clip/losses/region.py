"""Region-text contrastive loss (CLOC, Chen et al. 2024 §3.1; FG-CLIP 2's regional term):
every valid region of every image in the global batch is one contrastive set, its box's
embedding against its caption's.

Exact on any mesh: each device gathers the region and caption embeddings (and the mask) of
the whole batch (a masked all-gather: regions are few per image), forms its own rows'
`[n, N]` logits in both directions and the cross-entropies are summed over devices and
divided by the global number of valid regions, so the value and gradients equal the
single-device computation. Memory per device is O(n_local x N_global).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from big_clip.losses import shared
from big_clip.sharding import BATCH_AXES

# Logit of a padded column: exp(it - max) underflows to 0, and a padded row with only such
# columns keeps a finite logsumexp (its cross-entropy is masked to 0).
_MASKED = -1e9


def loss(region_emb: jax.Array, txt_emb: jax.Array, valid: jax.Array, scale: jax.Array, *,
         mesh: Mesh | None = None) -> jax.Array:
  """Symmetric InfoNCE over the valid regions:

      loss = 1/(2M) sum_{i valid} [(lse_{j valid} z_ij - z_ii) + (lse_{j valid} z_ji - z_ii)]

  with z = scale * region_emb @ txt_emb.T and M the number of valid regions (0 when M = 0).

  Args:
    region_emb: [N, D] L2-normalized region embeddings (the batch's [B, R] regions
      flattened, batch-major, so that the batch sharding carries over).
    txt_emb: [N, D] L2-normalized embeddings of each region's caption.
    valid: [N] bool, False for padding.
    scale: scalar logit scale.
    mesh: the device mesh, or None for one device.
  """
  shared.check_inputs("region", region_emb, txt_emb, scale, None, mesh)
  chex.assert_shape(valid, region_emb.shape[:1])
  img, txt, scale, _ = shared.as_float32(region_emb, txt_emb, scale, None)
  valid = jax.lax.stop_gradient(valid.astype(jnp.float32))
  if mesh is None:
    return _body(img, txt, valid, scale, exchange=shared.Exchange(None))
  exchange = shared.Exchange(BATCH_AXES)
  block = P(BATCH_AXES, None)
  fn = jax.shard_map(lambda *a: _body(*a, exchange=exchange), mesh=mesh,
                     in_specs=(block, block, P(BATCH_AXES), P()), out_specs=P())
  return fn(img, txt, valid, scale)


def _body(img: jax.Array, txt: jax.Array, valid: jax.Array, scale: jax.Array, *,
          exchange: shared.Exchange) -> jax.Array:
  zero = jnp.zeros((), jnp.float32)
  all_img, all_txt = exchange.all_gather(img), exchange.all_gather(txt)
  all_valid = exchange.all_gather(valid) > 0

  def summed_cross_entropy(rows, columns):  # this device's rows against every column
    z = jnp.where(all_valid[None, :], shared.logits_block(rows, columns, scale, zero), _MASKED)
    return jnp.sum(jax.nn.logsumexp(z, axis=1) * valid)

  positives = scale * jnp.sum(img * txt, axis=-1)
  total = (summed_cross_entropy(img, all_txt) + summed_cross_entropy(txt, all_img)
           - 2 * jnp.sum(positives * valid))
  count = exchange.psum(jnp.sum(valid))
  return exchange.psum(total) / jnp.maximum(2 * count, 1.0)
