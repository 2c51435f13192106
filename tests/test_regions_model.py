"""Region embeddings and the fine-grained losses: box weights against a pixel count, the
region-text loss and the hard-negative loss against float64 NumPy on 1 and 8 devices, and
the train step with both on 8 devices equal to 1 device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from big_clip import config as config_lib
from big_clip import sharding
from big_clip.convert import pretrained
from big_clip.losses import hard_negatives, region
from big_clip.models import region as region_model
from big_clip.models import two_tower

from tests.test_caption import first_step_grads
from tests.test_losses import _softmax_reference

DIM, SCALE = 16, 7.0


def test_box_weights_are_the_covered_share_of_each_patch_cell():
  grid, fine = 4, 64  # count covered pixels of a 64 x 64 raster of the 4 x 4 grid
  rng = np.random.default_rng(0)
  for _ in range(20):
    x0, x1 = np.sort(rng.integers(0, fine + 1, 2))
    y0, y1 = np.sort(rng.integers(0, fine + 1, 2))
    raster = np.zeros((fine, fine))
    raster[y0:y1, x0:x1] = 1
    cell = fine // grid
    expected = raster.reshape(grid, cell, grid, cell).mean((1, 3)).reshape(-1)
    got = region_model.box_weights(jnp.array([x0, y0, x1, y1], jnp.float32) / fine, grid)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def _normalized(rng, n):
  x = rng.normal(size=(n, DIM))
  return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("mesh_shape", [None, (8, 1, 1), (2, 2, 2)])
def test_region_loss_is_the_softmax_loss_over_the_valid_regions(mesh_shape):
  rng = np.random.default_rng(1)
  n = 48  # 16 images x 3 regions
  regions, texts = _normalized(rng, n), _normalized(rng, n)
  valid = rng.random(n) < 0.6
  valid[:8] = False  # a whole device block of padding on the 8-way mesh
  mesh = None if mesh_shape is None else sharding.make_mesh(
      dict(zip(sharding.MESH_AXES, mesh_shape)))
  args = [regions.astype(np.float32), texts.astype(np.float32), valid]
  if mesh is not None:
    args = [jax.device_put(a, sharding.batch_sharding(mesh)) for a in args]
  fn = lambda r, t, v, s: region.loss(r, t, v, s, mesh=mesh)
  value, (d_reg, d_txt, d_scale) = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 3)))(
      *args, jnp.float32(SCALE))
  ref_value, (ref_reg, ref_txt, ref_scale, _) = _softmax_reference(
      regions[valid], texts[valid], SCALE, 0.0)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(d_reg)[valid], ref_reg, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(d_txt)[valid], ref_txt, rtol=1e-4, atol=1e-6)
  assert not np.asarray(d_reg)[~valid].any() and not np.asarray(d_txt)[~valid].any()
  np.testing.assert_allclose(d_scale, ref_scale, rtol=1e-4)


def test_region_loss_without_any_valid_region_is_zero():
  z = np.zeros((8, DIM), np.float32)
  z[:, 0] = 1
  assert float(region.loss(z, z, np.zeros(8, bool), jnp.float32(SCALE))) == 0.0


@pytest.mark.parametrize("mesh_shape", [None, (8, 1, 1)])
def test_hard_negative_loss_matches_float64(mesh_shape):
  rng = np.random.default_rng(2)
  b, k = 16, 3
  img, txt = _normalized(rng, b), _normalized(rng, b)
  neg = _normalized(rng, b * k).reshape(b, k, DIM)
  valid = rng.random((b, k)) < 0.7
  # Reference: per image, -log softmax of its caption among it and its valid negatives.
  expected = 0.0
  for i in range(b):
    logits = SCALE * np.concatenate([[img[i] @ txt[i]], neg[i][valid[i]] @ img[i]])
    expected += np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[0]
  expected /= b
  args = [img.astype(np.float32), txt.astype(np.float32), neg.astype(np.float32), valid]
  if mesh_shape is not None:
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape)))
    args = [jax.device_put(a, sharding.batch_sharding(mesh)) for a in args]
  value = jax.jit(hard_negatives.loss)(*args, jnp.float32(SCALE))
  np.testing.assert_allclose(value, expected, rtol=1e-5)


def step_config():
  c = config_lib.base()
  c.model.embed_dim = 16
  c.model.image.update(image_size=16, patch_size=4, width=16, depth=1, heads=2, mlp_dim=32)
  c.model.text.update(vocab_size=64, max_len=8, width=16, depth=1, heads=2, mlp_dim=32)
  c.model.region.depth = 1
  c.loss.update(region_weight=0.5, hard_negatives=2, hard_negative_weight=0.25)
  c.data.update(global_batch=16, image_size=16, max_len=8, max_regions=3)
  c.optim.update(warmup_steps=1, clip_norm=0.0)
  return c


def fine_batch(c, seed=0):
  rng = np.random.default_rng(seed)
  b, l, r, k = c.data.global_batch, c.data.max_len, c.data.max_regions, c.loss.hard_negatives
  tokens = lambda *shape: rng.integers(4, 64, size=(*shape, l)).astype(np.int32)
  corners = np.sort(rng.random((b, r, 2, 2)), axis=2)
  return {"image": rng.normal(size=(b, 16, 16, 3)).astype(np.float32), "text": tokens(b),
          "region_boxes": corners.reshape(b, r, 4).astype(np.float32),
          "region_mask": rng.random((b, r)) < 0.7, "region_text": tokens(b, r),
          "negative_text": tokens(b, k), "negative_mask": rng.random((b, k)) < 0.8}


@pytest.mark.slow  # ~40 s: compiles the step twice
def test_region_and_hard_negative_train_step_on_8_devices_equals_1_device():
  c = step_config()
  batch = fine_batch(c)
  one = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  eight = sharding.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
  m1, g1 = first_step_grads(c, one, batch)
  m8, g8 = first_step_grads(c, eight, batch)
  for key in ("loss", "loss/contrastive", "loss/region", "loss/hard_negatives"):
    np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5)
  np.testing.assert_allclose(m1["loss"], m1["loss/contrastive"] + 0.5 * m1["loss/region"]
                             + 0.25 * m1["loss/hard_negatives"], rtol=1e-6)
  atol = 1e-6 * max(np.abs(g).max() for g in jax.tree.leaves(g1))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=atol), g8, g1)
  assert np.abs(g1["region"]["proj"]["kernel"]).max() > 0  # the prompter is trained


def test_prompter_is_absent_by_default_and_padding_boxes_stay_finite():
  c = step_config().model
  off = config_lib.base().model
  assert nnx.eval_shape(two_tower.init_fn(off)).region is None
  assert "region" not in two_tower.abstract_params(off)[1]  # checkpoints keep their layout
  model = two_tower.TwoTower(c, rngs=nnx.Rngs(params=0))
  images = jnp.ones((2, 16, 16, 3))
  boxes = jnp.array([[[0, 0, .5, .5], [0, 0, 0, 0]], [[.25, .25, 1, 1], [0, 0, 1, 1]]])
  emb = model.encode_image_regions(images, boxes)
  assert emb.shape == (2, 2, 16) and np.isfinite(np.asarray(emb)).all()
  np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("change, message", [
    (dict(loss=dict(region_weight=1.0)), "go together"),
    (dict(loss=dict(hard_negatives=2), data=dict(source="manifest:x.json")), "embedded"),
    (dict(loss=dict(region_weight=1.0), data=dict(max_regions=2), model=dict(
        region=dict(depth=1), image=dict(patch_dropout=0.5))), "not supported yet"),
])
def test_bad_region_configs_name_the_key(change, message):
  c = config_lib.base()
  c.update_from_flattened_dict({f"{s}.{k}": v for s, d in change.items()
                                for k, v in _flat(d).items()})
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c)


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def test_export_leaves_the_prompter_out_and_says_so(caplog):
  params = {"image": {}, "text": {}, "logit_scale": 0.0, "region": {"proj": {}}}
  with caplog.at_level("WARNING"):
    towers = pretrained.towers_only(params, "transformers")
  assert "region" not in towers and set(towers) == {"image", "text", "logit_scale"}
  assert "no region prompter" in caplog.text
