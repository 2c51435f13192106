"""Batch accumulation (gradient cache): k micro-batches give the gradient of one big batch.

The full train step with accumulation (2 processes, grouped loss, 4 micro-batches) is checked
against the single-process step on the whole batch in test_multihost.py, which compiles
the step once per side instead of twice more here.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_clip import config as config_lib
from big_clip import losses, sharding
from big_clip.losses import grad_cache
from test_train import tiny_config

# data 2 x fsdp 4: 8 batch shards, so B = 32 splits into 4 micro-batches of 8 that still
# take one row from every device; grouped runs 2 groups of 4 devices.
MESH_SHAPE = (2, 4, 1)
GLOBAL_BATCH = 32
LOSS_CONFIGS = {
    "softmax": {"loss.name": "softmax"},
    "sigmoid": {"loss.name": "sigmoid"},
    "grouped": {"loss.name": "grouped", "loss.group_size": 4, "loss.group_base": "sigmoid"},
}


def _mesh():
  return sharding.make_mesh(dict(zip(sharding.MESH_AXES, MESH_SHAPE)))


# --------------------------------------------------------------------------------------
# The mechanism, with small plain-JAX towers (cheap to compile) and the real losses.
# --------------------------------------------------------------------------------------


def _towers_and_batch(batch_size: int):
  rng = np.random.default_rng(0)
  params = {"wi": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32),
            "wt": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32),
            "log_scale": jnp.float32(2.0), "bias": jnp.float32(-1.0)}
  batch = {"image": rng.normal(size=(batch_size, 6)).astype(np.float32),
           "text": rng.normal(size=(batch_size, 3)).astype(np.float32)}

  def embed(p, b):
    norm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    return norm(jnp.tanh(b["image"] @ p["wi"])), norm(jnp.tanh(b["text"] @ p["wt"]))

  head = lambda p: (jnp.exp(p["log_scale"]), p["bias"])
  return params, batch, embed, head


@pytest.mark.parametrize("accum_steps", [2, 4])
@pytest.mark.parametrize("loss_name", LOSS_CONFIGS)
def test_grad_cache_equals_the_gradient_of_the_whole_batch_loss_on_8_devices(loss_name,
                                                                           accum_steps):
  mesh = _mesh()
  params, batch, embed, head = _towers_and_batch(GLOBAL_BATCH)
  batch = sharding.place_batch(batch, mesh)
  cfg = config_lib.base().loss
  cfg.update({k.split(".")[1]: v for k, v in LOSS_CONFIGS[loss_name].items()})
  loss_fn = losses.from_config(cfg)

  whole = lambda p: loss_fn(*embed(p, batch), *head(p), mesh=mesh)
  expected_loss, expected = jax.jit(jax.value_and_grad(whole))(params)
  (loss, (scale, _)), grads = jax.jit(functools.partial(
      grad_cache.value_and_grad, embed, head, loss_fn, accum_steps=accum_steps,
      mesh=mesh))(params, batch)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
  np.testing.assert_allclose(scale, np.exp(2.0), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               grads, expected)
  assert float(jnp.abs(grads["wi"]).max()) > 1e-3  # not vacuous


def test_grad_cache_equals_jax_grad_of_an_independent_full_batch_loss_without_a_mesh():
  params, batch, embed, head = _towers_and_batch(12)

  def sigmoid_loss(img, txt, scale, bias, mesh=None):  # written out, not big_clip's
    z = scale * img @ txt.T + bias
    labels = 2 * jnp.eye(len(img)) - 1
    return -jnp.sum(jax.nn.log_sigmoid(labels * z)) / len(img)

  expected = jax.grad(lambda p: sigmoid_loss(*embed(p, batch), *head(p)))(params)
  (_, _), grads = jax.jit(functools.partial(
      grad_cache.value_and_grad, embed, head, sigmoid_loss, accum_steps=3))(params, batch)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               grads, expected)


def test_every_micro_batch_takes_an_equal_slice_of_every_devices_rows():
  mesh = _mesh()  # 8 batch shards: device j holds rows 4j .. 4j + 3
  rows = jax.device_put(np.arange(32), sharding.batch_sharding(mesh))
  micro = jax.jit(lambda x: grad_cache.split(x, 2, mesh))(rows)
  # Micro-batch i holds rows i, i + 2, ...: 2 rows of each device's block of 4.
  np.testing.assert_array_equal(np.asarray(micro), np.arange(32).reshape(16, 2).T)
  for shard in micro.addressable_shards:
    values = np.asarray(shard.data)
    assert values.shape == (2, 2)
    assert len(set((values // 4).ravel())) == 1  # one device's block only: nothing moved
  merged = jax.jit(lambda x: grad_cache.merge(x, mesh))(micro)
  np.testing.assert_array_equal(np.asarray(merged), np.arange(32))
  assert merged.sharding.is_equivalent_to(rows.sharding, 1)


@pytest.mark.parametrize("overrides, message", [
    ({"loss.accum_steps": 2, "optim.grad_accum_steps": 2}, r"both > 1; pick one"),
    ({"loss.accum_steps": 3}, r"global_batch=16 is not divisible by config.loss.accum_steps=3"),
    ({"loss.accum_steps": 0}, r"loss.accum_steps must be >= 1"),
])
def test_bad_accumulation_settings_are_rejected_naming_the_keys(overrides, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(tiny_config(**overrides))


def test_micro_batches_that_do_not_split_over_the_devices_are_rejected():
  config = tiny_config(**{"loss.accum_steps": 4})  # 16 / 4 = 4 rows for 8 devices
  with pytest.raises(config_lib.ConfigError, match=r"4 examples per micro-batch is not "
                     r"divisible by the data-parallel size 8.*multiple of 32"):
    config_lib.validate_for_mesh(config, 8, 1)
