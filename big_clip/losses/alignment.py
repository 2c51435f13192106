"""ProCLIP's alignment terms (Hu et al. 2025, "ProCLIP: Progressive Vision-Language Alignment
via LLM-based Embedder", Fig. 2; github.com/VisionXLab/ProCLIP training/train.py): one tower's
embeddings s_i follow a teacher's t_i of the same examples, each embedding ("instance
semantic alignment") and the batch's geometry ("embedding structure alignment"):

    instance  = 1/B sum_i ||s_i - t_i||^2
    structure = 1/(B (B-1)) sum_{i != j} smooth_l1(||s_i - s_j|| - ||t_i - t_j||)

smooth_l1(x) = x^2 / 2 for |x| < 1, else |x| - 1/2 (PyTorch's default beta = 1), over the
Euclidean pair distances as `F.pdist`. Stage 1 aligns the LLM embedder (with its adapter)
to CLIP's text encoder, stage 2 the image tower to the EMA of itself (self-distillation).
The release sums both terms over the local batch (`reduction='sum'`); means over the global
batch keep the weights independent of the batch size and the mesh.

The teacher carries no gradient. Exact on any mesh: each device takes the distances of its
rows to the gathered batch (O(B_local x B) memory), as the softmax loss does.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from big_clip.losses import shared
from big_clip.sharding import BATCH_AXES


def terms(student: jax.Array, teacher: jax.Array, *, mesh: Mesh | None = None
          ) -> tuple[jax.Array, jax.Array]:
  """(instance, structure) above: float32 scalars, replicated.

  Args:
    student: `[B, D]` embeddings that get gradients (row i: example i).
    teacher: `[B, D]` embeddings of the same examples (no gradient).
    mesh: the device mesh, or None for one device.
  """
  if jnp.shape(student) != jnp.shape(teacher):
    raise ValueError(f"alignment loss: the student's embeddings {jnp.shape(student)} and the "
                     f"teacher's {jnp.shape(teacher)} differ; set config.model.embed_dim to "
                     "the teacher's.")
  shared.check_inputs("alignment", student, teacher, 1.0, None, mesh)
  if student.shape[0] < 2:
    raise ValueError("alignment loss: the structure term needs a batch of at least 2.")
  s = jnp.asarray(student, jnp.float32)
  t = jax.lax.stop_gradient(jnp.asarray(teacher, jnp.float32))
  if mesh is None:
    return _summed_terms(s, t, exchange=shared.Exchange(None))
  block = P(BATCH_AXES, None)
  exchange = shared.Exchange(BATCH_AXES)
  out = jax.shard_map(lambda a, b: _summed_terms(a, b, exchange=exchange), mesh=mesh,
                      in_specs=(block, block), out_specs=(P(), P()))(s, t)
  chex.assert_shape(out, ((), ()))
  return out


def _distances(rows: jax.Array, cols: jax.Array, off_diagonal: jax.Array) -> jax.Array:
  """||rows_i - cols_j|| `[b, B]`, 0 on the diagonal (finite gradient there)."""
  dots = shared.logits_block(rows, cols, jnp.float32(1.0), jnp.float32(0.0))
  sq = (jnp.sum(rows * rows, -1)[:, None] + jnp.sum(cols * cols, -1)[None, :] - 2.0 * dots)
  # sqrt has an infinite slope at 0: the diagonal, and float32 rounding just above it.
  return jnp.where(off_diagonal, jnp.sqrt(jnp.maximum(sq, 1e-12)), 0.0)


def _smooth_l1(x: jax.Array) -> jax.Array:
  ax = jnp.abs(x)
  return jnp.where(ax < 1.0, 0.5 * x * x, ax - 0.5)


def _summed_terms(s: jax.Array, t: jax.Array, *, exchange: shared.Exchange
                  ) -> tuple[jax.Array, jax.Array]:
  """Both terms from one device's `[b, D]` blocks, exchanged over all batch devices."""
  b = s.shape[0]
  global_batch = b * exchange.size
  first_row = 0 if exchange.axes is None else jax.lax.axis_index(exchange.axes) * b
  rows = first_row + jnp.arange(b)[:, None]
  off_diagonal = rows != jnp.arange(global_batch)[None, :]
  d_s = _distances(s, exchange.all_gather(s), off_diagonal)
  d_t = _distances(t, exchange.all_gather(t), off_diagonal)
  instance = exchange.psum(jnp.sum(jnp.square(s - t))) / global_batch
  structure = exchange.psum(jnp.sum(jnp.where(off_diagonal, _smooth_l1(d_s - d_t), 0.0)))
  return instance, structure / (global_batch * (global_batch - 1))
