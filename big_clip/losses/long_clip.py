"""Long-CLIP's primary-component matching (Zhang et al. 2024, arXiv 2403.15378, §3.2).

Fine-tuning on long captions alone makes CLIP's image feature chase every detail and
forget which attributes matter most. Long-CLIP keeps the long-caption loss on the full image
feature and adds a short-caption loss on a *coarse* image feature: the batch of image
features reduced to its top-k principal components and reconstructed (PCE, "primary
component extraction"), so that short captions align with the most salient attributes.

    loss = L(img, txt_long) + short_weight * L(normalize(PCE_k(img)), txt_short)

with L the run's contrastive loss (softmax in the paper) over the global batch.

Difference from the release (`model_longclip.py`): it runs PCA on each GPU's local batch
before gathering, so the coarse features depend on the number of GPUs; here the PCA is over
the global batch (a [D, D] covariance all-reduced across devices), so the loss equals the
single-device full-batch loss on any mesh. The release also uses label smoothing 0.1,
which the base losses here do not.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from big_clip import losses
from big_clip.models.two_tower import l2_normalize


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def top_eigen_projector(sym: jax.Array, k: int) -> jax.Array:
  """`V_k V_k^T`, the orthogonal projector onto the top-k eigenvectors of symmetric `sym`.

  A custom VJP because `jnp.linalg.eigh`'s own derivative divides by every eigenvalue gap,
  and a batch covariance has many equal (zero) eigenvalues, so it would give NaN; the
  projector's derivative only involves gaps between the kept and the dropped eigenvalues
  (finite whenever lambda_k > lambda_{k+1}):
      dP = sum_{i kept, j dropped} (v_i^T dS v_j) / (lambda_i - lambda_j) (v_i v_j^T + v_j v_i^T).
  """
  return _projector_fwd(sym, k)[0]


def _projector_fwd(sym, k):
  w, v = jnp.linalg.eigh(sym)  # ascending eigenvalues
  top = v[:, -k:]
  return jnp.dot(top, top.T, precision=jax.lax.Precision.HIGHEST), (w, v)


def _projector_bwd(k, residuals, g):
  w, v = residuals
  hi = jax.lax.Precision.HIGHEST
  n = w.shape[0]
  kept = jnp.arange(n) >= n - k
  cross = kept[:, None] & ~kept[None, :]  # (kept i, dropped j)
  a = jnp.dot(v.T, jnp.dot(0.5 * (g + g.T), v, precision=hi), precision=hi)
  gap = jnp.where(cross, w[:, None] - w[None, :], 1.0)
  coef = jnp.where(cross, 2.0 * a / gap, 0.0)
  grad = jnp.dot(v, jnp.dot(coef, v.T, precision=hi), precision=hi)
  return (0.5 * (grad + grad.T),)


top_eigen_projector.defvjp(_projector_fwd, _projector_bwd)


def primary_components(img_emb: jax.Array, num_components: int) -> jax.Array:
  """PCE: `[B, D]` features reconstructed from their top `num_components` principal
  components over the batch (mean removed, projected, mean added back), float32."""
  chex.assert_rank(img_emb, 2)
  batch, dim = img_emb.shape
  if not 1 <= num_components < min(batch - 1, dim):
    raise ValueError(f"long_clip loss: num_components={num_components} must be in [1, "
                     f"{min(batch - 1, dim)}) for a global batch of {batch} features of "
                     f"dimension {dim} (a batch of B spans at most B-1 directions); lower "
                     "config.loss.long_clip.num_components or raise the batch.")
  x = img_emb.astype(jnp.float32)
  mean = jnp.mean(x, axis=0, keepdims=True)
  centered = x - mean
  cov = jnp.einsum("bi,bj->ij", centered, centered, precision=jax.lax.Precision.HIGHEST)
  proj = top_eigen_projector(cov, num_components)
  return jnp.dot(centered, proj, precision=jax.lax.Precision.HIGHEST) + mean


def loss(img_emb: jax.Array, txt_long: jax.Array, txt_short: jax.Array, scale: jax.Array,
         bias: jax.Array | None, *, num_components: int, short_weight: float,
         base_loss: losses.LossFn | None = None, mesh: Mesh | None = None) -> jax.Array:
  """Long-CLIP's fine-tuning loss (§3.2, Eq. 4 without label smoothing).

  Args:
    img_emb: `[B, D]` L2-normalized image embeddings.
    txt_long: `[B, D]` L2-normalized embeddings of each image's long caption.
    txt_short: `[B, D]` L2-normalized embeddings of each image's short caption.
    scale, bias: the logit scale and bias of the base loss.
    num_components: k, the principal components kept for the coarse image feature (32).
    short_weight: weight of the short-caption term (1 in the paper).
    base_loss: the contrastive loss (default softmax, as the paper).
    mesh: the device mesh, or None for one device.
  """
  base_loss = base_loss or losses.get("softmax")
  long_term = base_loss(img_emb, txt_long, scale, bias, mesh=mesh)
  if short_weight == 0:
    return long_term
  return long_term + short_weight * short_caption_loss(
      img_emb, txt_short, scale, bias, num_components=num_components, base_loss=base_loss,
      mesh=mesh)


def short_caption_loss(img_emb: jax.Array, txt_short: jax.Array, scale: jax.Array,
                       bias: jax.Array | None, *, num_components: int,
                       base_loss: losses.LossFn, mesh: Mesh | None = None) -> jax.Array:
  """The short-caption term: `base_loss(normalize(PCE_k(img_emb)), txt_short)`."""
  coarse = l2_normalize(primary_components(img_emb, num_components))
  return base_loss(coarse, txt_short, scale, bias, mesh=mesh)
