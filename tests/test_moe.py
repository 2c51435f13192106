"""Mixture-of-experts MLPs: routing against a float64 NumPy reference, identical experts =
the dense MLP, the 8-device (expert x data) step = the 1-device step, upcycling."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from big_clip import config as config_lib
from big_clip import sharding, steps
from big_clip.convert import pretrained
from big_clip.models import adapt, layers, moe, two_tower

WIDTH, MLP_DIM = 8, 16


def transformer_cfg() -> layers.TransformerConfig:
  return layers.TransformerConfig(width=WIDTH, depth=2, heads=2, mlp_dim=MLP_DIM)


def moe_mlp(experts: int, top_k: int, capacity_factor: float, seed: int = 0) -> moe.MoeMLP:
  cfg = moe.MoeConfig(experts=experts, top_k=top_k, capacity_factor=capacity_factor)
  return moe.MoeMLP(transformer_cfg(), cfg, rngs=nnx.Rngs(seed))


def randomize(module: nnx.Module, seed: int) -> None:
  """Every parameter drawn at scale 1 (nonzero biases, a router that is far from uniform)."""
  rng = np.random.default_rng(seed)
  for _, var in nnx.iter_graph(module):
    if isinstance(var, nnx.Param):
      var.set_value(jnp.asarray(rng.normal(size=var.shape), jnp.float32))


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_of_identical_experts_equals_the_dense_mlp(top_k):
  dense = layers.MLP(transformer_cfg(), rngs=nnx.Rngs(1))
  randomize(dense, 1)
  layer = moe_mlp(experts=4, top_k=top_k, capacity_factor=0.0)  # dropless
  randomize(layer, 2)  # the router stays random: routing must not matter
  for name in ("fc1", "fc2"):
    for leaf in ("kernel", "bias"):
      d = getattr(getattr(dense, name), leaf)[...]
      getattr(getattr(layer, name), leaf).set_value(jnp.broadcast_to(d, (4,) + d.shape))
  x = jnp.asarray(np.random.default_rng(3).normal(size=(3, 5, WIDTH)), jnp.float32)
  y, stats = layer.with_stats(x)
  np.testing.assert_allclose(y, dense(x), rtol=1e-5, atol=1e-5)
  assert float(stats["dropped"]) == 0.0


def numpy_moe(x, router, w1, b1, w2, b2, top_k, capacity):
  """Token-by-token float64 reference of `MoeMLP.with_stats` (exact GELU)."""
  from scipy.special import erf

  x, router, w1, b1, w2, b2 = (np.asarray(a, np.float64) for a in (x, router, w1, b1, w2, b2))
  groups, tokens, _ = x.shape
  experts = router.shape[1]
  logits = x @ router
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  y = np.zeros_like(x)
  choices, kept = np.zeros(experts), 0
  for g in range(groups):
    order = np.argsort(-probs[g], axis=-1, kind="stable")[:, :top_k]  # [S, k]
    gates = np.take_along_axis(probs[g], order, -1)
    gates /= gates.sum(-1, keepdims=True)
    used = np.zeros(experts, int)
    for rank in range(top_k):  # every first choice before any second choice
      for s in range(tokens):
        e = order[s, rank]
        choices[e] += 1
        if used[e] < capacity:
          used[e] += 1
          kept += 1
          h = x[g, s] @ w1[e] + b1[e]
          h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
          y[g, s] += gates[s, rank] * (h @ w2[e] + b2[e])
  share = choices / choices.sum()
  lse = np.log(np.exp(logits).sum(-1))
  stats = {"load_balance": experts * np.sum(share * probs.mean((0, 1))),
           "router_z": np.mean(lse ** 2), "max_load": experts * share.max(),
           "dropped": 1 - kept / (groups * tokens * top_k)}
  return y, stats


@pytest.mark.parametrize("top_k,capacity_factor", [(1, 1.0), (2, 0.75), (2, 0.0)])
def test_routing_and_combine_match_a_float64_numpy_reference(top_k, capacity_factor):
  layer = moe_mlp(experts=4, top_k=top_k, capacity_factor=capacity_factor)
  randomize(layer, 4)
  x = np.random.default_rng(5).normal(size=(3, 12, WIDTH)).astype(np.float32)
  y, stats = layer.with_stats(jnp.asarray(x))
  capacity = layer.moe.capacity(12)
  want_y, want_stats = numpy_moe(x, layer.router[...], layer.fc1.kernel[...],
                                 layer.fc1.bias[...], layer.fc2.kernel[...],
                                 layer.fc2.bias[...], top_k, capacity)
  np.testing.assert_allclose(y, want_y, rtol=2e-4, atol=2e-4)
  for key, want in want_stats.items():
    np.testing.assert_allclose(float(stats[key]), want, rtol=1e-5, err_msg=key)
  if capacity_factor:
    assert want_stats["dropped"] > 0  # the capacity limit is exercised
  else:
    assert want_stats["dropped"] == 0


def tiny_moe_config(depth: int = 1, **moe_overrides) -> ml_collections.ConfigDict:
  c = config_lib.base()
  c.model.embed_dim = 16
  c.model.image.update(image_size=16, patch_size=8, width=16, depth=depth, heads=2, mlp_dim=32)
  c.model.text.update(vocab_size=64, max_len=8, width=16, depth=depth, heads=2, mlp_dim=32)
  for tower in ("image", "text"):
    c.model[tower].moe.update(**{**dict(experts=4, top_k=2, every_n_layers=1,
                                        capacity_factor=1.0), **moe_overrides})
  c.data.update(global_batch=8, image_size=16, max_len=8)
  c.optim.update(clip_norm=0.0, warmup_steps=0, lr=1e-3)
  config_lib.validate(c)
  return c


def first_step(config, mesh):
  """(metrics, gradients) of one step: Adam's first moment after it is (1 - b1) * grad."""
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
           "text": rng.integers(1, 64, size=(8, 8)).astype(np.int32)}
  setup = steps.build(config, mesh)
  state, metrics = setup.step(setup.state, sharding.place_batch(batch, mesh))
  adam = [s for s in jax.tree.leaves(state["opt"], is_leaf=lambda s: isinstance(
      s, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)]
  return jax.device_get(metrics), jax.device_get(adam[0].mu), setup


def test_moe_train_step_on_expert_2_x_data_4_equals_the_1_device_step():
  config = tiny_moe_config()
  one = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  eight = sharding.make_mesh({"data": 4, "expert": 2})
  m1, g1, _ = first_step(config, one)
  m8, g8, setup = first_step(config, eight)
  assert m1["loss/moe_aux"] > 0 and 0 < m1["moe/image_dropped"] < 1
  for key in ("loss", "loss/moe_aux", "moe/image_load_balance", "moe/text_router_z"):
    np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5, err_msg=key)
  scale = max(np.abs(g).max() for g in jax.tree.leaves(g1))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * scale),
               g8, g1)
  router_grad = g1["image"]["blocks"][0]["mlp"]["router"]
  assert np.abs(router_grad).max() > 1e-6  # the router learns (gates and aux losses)
  kernel = setup.state_shardings["params"]["image"]["blocks"][0]["mlp"]["fc1"]["kernel"]
  assert kernel.spec[0] == "expert"  # each device holds its experts only


def test_upcycled_model_equals_its_dense_parent_at_init(tmp_path):
  dense_cfg = tiny_moe_config(depth=2, experts=0)
  dense = two_tower.TwoTower(dense_cfg.model, rngs=nnx.Rngs(0))
  randomize(dense, 6)
  pretrained.write_import(dense_cfg, nnx.to_pure_dict(nnx.state(dense)),
                          str(tmp_path / "dense"), "test")
  moe_cfg = tiny_moe_config(depth=2, capacity_factor=0.0)  # dropless: no token skips its MLP
  moe_cfg.model.image.moe.every_n_layers = 2  # a dense and an MoE block in the image tower
  params = adapt.load_big_clip(f"big_clip:{tmp_path / 'dense'}", moe_cfg.model)[1]
  upcycled = two_tower.TwoTower(moe_cfg.model, rngs=nnx.Rngs(1))
  nnx.update(upcycled, nnx.State(jax.tree.map(jnp.asarray, params)))
  kernel = params["text"]["blocks"][1]["mlp"]["fc1"]["kernel"]
  assert kernel.shape[0] == 4 and np.all(kernel == kernel[:1])
  rng = np.random.default_rng(7)
  images = jnp.asarray(rng.normal(size=(4, 16, 16, 3)), jnp.float32)
  tokens = jnp.asarray(rng.integers(1, 64, size=(4, 8)), jnp.int32)
  *embs, stats = upcycled.forward(images, tokens)
  for got, want in zip(embs, dense(images, tokens)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert set(stats) == {"image", "text"}
  # Two runs assemble into alternating experts (CLIP-MoE's diversified multiplet).
  other = jax.tree.map(lambda p: p + 1.0, nnx.to_pure_dict(nnx.state(dense)))
  flat = [adapt.flat_params(p) for p in (nnx.to_pure_dict(nnx.state(dense)), other)]
  assembled = adapt.assemble_experts(flat, moe_cfg.model)
  k = assembled["text.blocks.0.mlp.fc1.kernel"]
  np.testing.assert_array_equal(k[1], k[0] + 1.0)
  np.testing.assert_array_equal(k[2], k[0])


def test_scanned_and_rematerialized_moe_stack_equals_the_layer_loop():
  loop_cfg = tiny_moe_config(depth=2)
  loop = two_tower.TwoTower(loop_cfg.model, rngs=nnx.Rngs(0))
  randomize(loop, 8)
  scan_cfg = tiny_moe_config(depth=2)
  scan_cfg.model.update(scan_layers=True, remat=True)
  scanned = two_tower.TwoTower(scan_cfg.model, rngs=nnx.Rngs(1))
  nnx.update(scanned, layers.stack_layers(nnx.state(loop)))
  rng = np.random.default_rng(9)
  images = jnp.asarray(rng.normal(size=(4, 16, 16, 3)), jnp.float32)
  tokens = jnp.asarray(rng.integers(1, 64, size=(4, 8)), jnp.int32)
  forward = nnx.jit(lambda m: m.forward(images, tokens))
  want, got = forward(loop), forward(scanned)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
  assert 0 < float(want[2]["image"]["dropped"]) < 1  # the capacity limit is exercised
