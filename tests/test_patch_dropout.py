"""FLIP patch dropout (Li et al. 2023): which tokens are kept, that eval and rate 0 are
untouched, and that the masked train step is the same on 8 devices as on 1."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from big_clip import config as config_lib
from big_clip import sharding
from big_clip import steps as steps_lib
from big_clip.models import vit
from tests import test_models, test_train


def image_tower(rate: float, pool: str = "cls", seed: int = 0) -> vit.ViT:
  cfg = test_models.tiny_config(**{"image.pool": pool, "image.patch_size": 2})
  cfg.image.patch_dropout = rate
  return vit.ViT(cfg, rngs=nnx.Rngs(seed))


def numpy_kept(tokens: np.ndarray, noise: np.ndarray, rate: float, prefix: int) -> np.ndarray:
  """Prefix tokens, then each image's patches with the largest noise, largest first."""
  keep = max(1, int(noise.shape[1] * (1 - rate)))
  order = np.argsort(-noise, axis=1, kind="stable")[:, :keep]
  patches = tokens[:, prefix:][np.arange(len(tokens))[:, None], order]
  return np.concatenate([tokens[:, :prefix], patches], axis=1)


@pytest.mark.parametrize("pool,prefix", [("cls", 1), ("map", 0)])
def test_kept_tokens_are_a_numpy_gather_of_the_position_embedded_tokens(pool, prefix):
  m = image_tower(0.75, pool)
  imgs = test_models.images(batch=3)
  noise = jax.random.uniform(jax.random.key(5), (3, m.num_patches))  # 16 patches -> 4 kept
  tokens = nnx.jit(lambda m, x: m.embed(x))(m, imgs)
  kept = nnx.jit(lambda m, t, n: m.drop(t, n))(m, tokens, noise)
  want = numpy_kept(np.asarray(tokens), np.asarray(noise), 0.75, prefix)
  assert kept.shape == (3, prefix + 4, 16)
  np.testing.assert_array_equal(kept, want)
  # The whole tower on the NumPy-gathered tokens gives the masked embedding.
  out = nnx.jit(lambda m, x, n: m(x, n))(m, imgs, noise)
  ref = nnx.jit(lambda m, t: m.encode_tokens(t))(m, jnp.asarray(want))
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


def test_rate_zero_and_no_noise_are_bit_identical_to_the_unmasked_tower():
  imgs = test_models.images(batch=3)
  noise = jax.random.uniform(jax.random.key(5), (3, 16))
  plain, masked = image_tower(0.0), image_tower(0.5)  # same seed: same params
  forward = nnx.jit(lambda m, x, n: m(x, n))
  want = nnx.jit(lambda m, x: m(x))(plain, imgs)
  np.testing.assert_array_equal(forward(plain, imgs, noise), want)  # rate 0 ignores noise
  np.testing.assert_array_equal(nnx.jit(lambda m, x: m(x))(masked, imgs), want)  # eval path
  assert not np.allclose(forward(masked, imgs, noise), want, atol=1e-3)  # and it does mask


def test_patch_noise_depends_on_seed_and_step_only():
  c = test_train.tiny_config()
  a, again = vit.patch_noise(c, 3, 4), vit.patch_noise(c, jnp.int32(3), 4)
  np.testing.assert_array_equal(a, again)
  assert a.shape == (4, 16) and not np.array_equal(a, vit.patch_noise(c, 4, 4))


def masked_config():
  c = test_train.tiny_config(**{"model.image.patch_dropout": 0.5,
                                "model.image.patch_dropout_until_step": 1,
                                "model.scan_layers": True, "model.remat": True})
  # AdamW with eps 1 and lr 1 and no decay or clipping: one step moves each parameter by
  # -g / (|g| + 1), a monotone map of its gradient, so equal moves mean equal gradients.
  c.optim.update(lr=1.0, eps=1.0, weight_decay=0.0, clip_norm=0.0,
                 schedule="warmup_constant", warmup_steps=0)
  return c


def first_moves(config, mesh, batch, steps=(1,)):
  """Parameter moves of the steps compiled for global steps `steps`, each from the init
  (step 1 is masked; from step 2 on, past patch_dropout_until_step=1, unmasked)."""
  setup = steps_lib.build(config, mesh)
  init = jax.device_get(setup.state["params"])
  placed = sharding.place_batch(batch, mesh)
  moves = []
  for step in steps:
    state, _ = setup.step_for(step)(jax.tree.map(jnp.copy, setup.state), placed)
    moves.append(jax.tree.map(np.subtract, jax.device_get(state["params"]), init))
  return moves


@functools.lru_cache(maxsize=None)
def one_device_moves():
  """The 1-device masked and unmasked moves, shared by the tests below (numpy)."""
  config = masked_config()
  one = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  return first_moves(config, one, test_train.random_batch(config), steps=(1, 2))


def test_masked_step_on_8_devices_equals_1_device_and_the_tail_is_unmasked():
  config = masked_config()
  config_lib.validate(config)
  batch = test_train.random_batch(config)
  eight = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  masked_1, unmasked_1 = one_device_moves()
  masked_8, = first_moves(config, eight, batch)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6),
               masked_8, masked_1)
  # Not vacuous: the masked step moved the image tower differently from the unmasked one.
  diff = lambda a, b: np.abs(a - b).max()
  img = jax.tree.leaves(jax.tree.map(diff, masked_1["image"], unmasked_1["image"]))
  assert max(img) > 1e-3


def test_gradient_cache_micro_batches_mask_each_example_as_the_whole_batch_does():
  """The noise is drawn per example of the global batch, so embedding it in 2 micro-batches
  (loss.accum_steps) masks the same patches and gives the same gradients."""
  config = masked_config()
  config.loss.accum_steps = 2
  one = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  accum, = first_moves(config, one, test_train.random_batch(config))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6),
               accum, one_device_moves()[0])


@pytest.mark.parametrize("key,value,message", [
    ("patch_dropout", 1.0, "model.image.patch_dropout=1.0"),
    ("patch_dropout_until_step", -1, "model.image.patch_dropout_until_step=-1"),
])
def test_bad_patch_dropout_names_the_key(key, value, message):
  c = test_train.tiny_config()
  c.model.image[key] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c)
