"""Distillation from a frozen teacher's embeddings: feature alignment plus the KL divergence
between the teacher's and the student's image-text similarity distributions.

  * ProCLIP stage 1 (2025): a new text tower (an LLM embedder)
    learns from CLIP's text tower by aligning each embedding ("instance semantic
    alignment") and the structure of the batch's similarities ("embedding structure
    alignment") before any contrastive tuning.
  * DC-CLIP (2024): a student CLIP learns from a teacher CLIP by feature
    distillation plus a KL term on the softened image-text similarity matrix.

With student embeddings s_img, s_txt and teacher embeddings t_img, t_txt (all `[B, D]`,
L2-normalized), S = s_img s_txt^T / tau, T = t_img t_txt^T / tau over the global batch B:

    feature = 1/2 [f(s_img, t_img) + f(s_txt, t_txt)]
              f = mean_i (1 - cos(s_i, t_i))  ('cosine')  or  mean_{i,d} (s_id - t_id)^2  ('mse')
    kl      = 1/2 [1/B sum_i KL(softmax(T_i.) || softmax(S_i.))
                   + 1/B sum_j KL(softmax(T_.j) || softmax(S_.j))]
    loss    = feature_weight * feature + kl_weight * kl

The teacher's values carry no gradient. Exact on any mesh: each device scores its rows and
columns against the gathered features, as the softmax loss does (O(B_local x B) memory).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from big_clip.losses import shared
from big_clip.sharding import BATCH_AXES

FEATURES = ("cosine", "mse")


def loss(img_emb: jax.Array, txt_emb: jax.Array, teacher_img: jax.Array,
         teacher_txt: jax.Array, *, feature: str = "cosine", feature_weight: float = 1.0,
         kl_weight: float = 1.0, temperature: float = 0.05,
         mesh: Mesh | None = None) -> jax.Array:
  """The distillation loss above; float32 scalar, replicated.

  Args:
    img_emb, txt_emb: the student's `[B, D]` L2-normalized embeddings (row i is a pair).
    teacher_img, teacher_txt: the teacher's `[B, D']` embeddings of the same pairs (D' = D
      for the feature term; the KL term works for any D').
    feature: 'cosine' or 'mse'.
    feature_weight, kl_weight: weights of the two terms.
    temperature: tau of the similarity distributions (both sides).
    mesh: the device mesh, or None for one device.
  """
  if feature not in FEATURES:
    raise ValueError(f"distill loss: feature={feature!r}; allowed: {', '.join(FEATURES)} "
                     "(config.loss.distill.feature).")
  if temperature <= 0:
    raise ValueError(f"distill loss: temperature={temperature} must be > 0 "
                     "(config.loss.distill.temperature).")
  shared.check_inputs("distill", img_emb, txt_emb, 1.0, None, mesh)
  shared.check_inputs("distill", teacher_img, teacher_txt, 1.0, None, mesh)
  if feature_weight and teacher_img.shape != img_emb.shape:
    raise ValueError(f"distill loss: the feature term needs teacher embeddings of the "
                     f"student's shape {img_emb.shape}, got {teacher_img.shape}; match "
                     "config.model.embed_dim to the teacher's or set feature_weight=0.")
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  student = (f32(img_emb), f32(txt_emb))
  teacher = tuple(jax.lax.stop_gradient(f32(x)) for x in (teacher_img, teacher_txt))

  def body(s_img, s_txt, t_img, t_txt, *, exchange):
    return _summed_terms(s_img, s_txt, t_img, t_txt, feature=feature,
                         feature_weight=float(feature_weight), kl_weight=float(kl_weight),
                         inv_tau=1.0 / float(temperature), exchange=exchange)

  if mesh is None:
    out = body(*student, *teacher, exchange=shared.Exchange(None))
  else:
    block = P(BATCH_AXES, None)
    exchange = shared.Exchange(BATCH_AXES)
    out = jax.shard_map(lambda *a: body(*a, exchange=exchange), mesh=mesh,
                        in_specs=(block,) * 4, out_specs=P())(*student, *teacher)
  chex.assert_shape(out, ())
  return out


def _feature_sum(s: jax.Array, t: jax.Array, feature: str) -> jax.Array:
  """Sum over the local rows of the per-row feature loss (the mean is taken later)."""
  if feature == "cosine":
    cos = jnp.sum(s * t, -1) * jax.lax.rsqrt(
        jnp.maximum(jnp.sum(s * s, -1) * jnp.sum(t * t, -1), 1e-24))
    return jnp.sum(1.0 - cos)
  return jnp.sum(jnp.square(s - t)) / s.shape[-1]


def _kl_rows_sum(teacher_logits: jax.Array, student_logits: jax.Array) -> jax.Array:
  """sum_i KL(softmax(teacher_i) || softmax(student_i)) over the rows of `[b, B]` blocks."""
  log_p = jax.nn.log_softmax(teacher_logits, axis=-1)
  log_q = jax.nn.log_softmax(student_logits, axis=-1)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q))


def _summed_terms(s_img, s_txt, t_img, t_txt, *, feature, feature_weight, kl_weight, inv_tau,
                  exchange: shared.Exchange):
  """The loss from one device's `[b, D]` blocks, exchanged over all batch devices."""
  gather = exchange.all_gather
  global_batch = s_img.shape[0] * exchange.size
  total = jnp.zeros((), jnp.float32)
  if feature_weight:
    feat = 0.5 * (_feature_sum(s_img, t_img, feature) + _feature_sum(s_txt, t_txt, feature))
    total += feature_weight * feat
  if kl_weight:
    block = lambda a, b: shared.logits_block(a, b, jnp.float32(inv_tau), jnp.float32(0.0))
    rows = _kl_rows_sum(block(t_img, gather(t_txt)), block(s_img, gather(s_txt)))  # i -> t
    cols = _kl_rows_sum(block(t_txt, gather(t_img)), block(s_txt, gather(s_img)))  # t -> i
    total += kl_weight * 0.5 * (rows + cols)
  return exchange.psum(total) / global_batch
