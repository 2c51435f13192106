"""Distillation loss (losses/distill.py) against float64 NumPy, value and gradients, on one
device and on 8; the frozen teacher loaded from a big_clip checkpoint; config selection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_clip import sharding
from big_clip import config as config_lib
from big_clip.losses import auxiliary, distill


def numpy_distill(s_img, s_txt, t_img, t_txt, feature, feature_weight, kl_weight, tau):
  """float64, straight from the definitions (ProCLIP stage 1 / DC-CLIP)."""
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  if feature == "cosine":
    f = lambda s, t: np.mean(1 - np.sum(unit(s) * unit(t), axis=1))
  else:
    f = lambda s, t: np.mean((s - t) ** 2)

  def kl_rows(teacher_logits, student_logits):
    log_softmax = lambda z: z - z.max(1, keepdims=True) - np.log(
        np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
    p = np.exp(log_softmax(teacher_logits))
    return np.mean(np.sum(p * (log_softmax(teacher_logits) - log_softmax(student_logits)), 1))

  t_sim, s_sim = t_img @ t_txt.T / tau, s_img @ s_txt.T / tau
  kl = 0.5 * (kl_rows(t_sim, s_sim) + kl_rows(t_sim.T, s_sim.T))
  return feature_weight * 0.5 * (f(s_img, t_img) + f(s_txt, t_txt)) + kl_weight * kl


def numeric_grad(fn, args, which, eps=1e-6):
  grad = np.zeros_like(args[which])
  for idx in np.ndindex(grad.shape):
    hi, lo = [a.copy() for a in args], [a.copy() for a in args]
    hi[which][idx] += eps
    lo[which][idx] -= eps
    grad[idx] = (fn(*hi) - fn(*lo)) / (2 * eps)
  return grad


@pytest.mark.parametrize("feature,use_mesh", [("cosine", False), ("mse", True)],
                         ids=["cosine_1_device", "mse_8_devices"])
def test_distill_loss_matches_float64_numpy_value_and_gradients(feature, use_mesh):
  rng = np.random.default_rng(0)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  args = [unit(rng.standard_normal((16, 5))) for _ in range(4)]
  hyper = dict(feature=feature, feature_weight=0.6, kl_weight=1.3, temperature=0.2)
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1)) if use_mesh else None
  fn = lambda *a: distill.loss(*a, **hyper, mesh=mesh)
  with jax.set_mesh(mesh) if mesh else jax.default_device(jax.devices()[0]):
    value, grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))(
        *(jnp.float32(a) for a in args))
  ref = lambda *a: numpy_distill(*a, feature, 0.6, 1.3, 0.2)
  np.testing.assert_allclose(value, ref(*args), rtol=1e-5)
  for which in (0, 1):
    np.testing.assert_allclose(grads[which], numeric_grad(ref, args, which), atol=2e-5)
  for which in (2, 3):  # the teacher is frozen
    np.testing.assert_array_equal(grads[which], 0.0)


def test_distill_loss_is_zero_when_the_student_is_the_teacher_and_checks_inputs():
  x = jnp.asarray(np.eye(4, 6), jnp.float32)
  y = jnp.asarray(np.roll(np.eye(4, 6), 1, axis=1), jnp.float32)
  assert float(distill.loss(x, y, x, y)) == pytest.approx(0.0, abs=1e-6)
  with pytest.raises(ValueError, match="feature='l1'"):
    distill.loss(x, y, x, y, feature="l1")
  with pytest.raises(ValueError, match="teacher embeddings of the student's shape"):
    distill.loss(x, y, x[:, :3], y[:, :3])
  assert np.isfinite(float(distill.loss(x, y, x[:, :3], y[:, :3], feature_weight=0.0)))


def test_distill_is_selected_by_config_and_validated():
  c = config_lib.base()
  assert auxiliary.make(c) is None and auxiliary.batch_entries(c) == {}
  c.loss.distill.update(enabled=True, teacher="big_clip:/tmp/teacher")
  config_lib.validate(c)
  assert auxiliary.batch_entries(c, teacher_dim=32) == {
      "teacher_image": ((32,), "float32"), "teacher_text": ((32,), "float32")}
  c.loss.distill.teacher = "hf:openai/clip-vit-base-patch32"
  with pytest.raises(config_lib.ConfigError, match="config.loss.distill.teacher"):
    config_lib.validate(c)
  c.loss.distill.update(teacher="big_clip:/tmp/t", feature="l2")
  with pytest.raises(config_lib.ConfigError, match="loss.distill.feature"):
    config_lib.validate(c)
