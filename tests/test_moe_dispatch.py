"""MoE dispatch: the shard_map + all_to_all path routes and computes exactly like the GSPMD
einsum path (values, routing statistics and gradients), on 1 device and on expert 2 x data 4."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from big_clip import sharding
from big_clip.models import layers, moe

WIDTH, MLP_DIM, EXPERTS, BATCH, TOKENS = 8, 16, 4, 16, 12


def layer(dispatch: str) -> moe.MoeMLP:
  """The same random layer for either dispatch: every parameter at scale 1, so the router is
  far from uniform and capacity 1.0 drops tokens."""
  cfg = layers.TransformerConfig(width=WIDTH, depth=2, heads=2, mlp_dim=MLP_DIM)
  module = moe.MoeMLP(cfg, moe.MoeConfig(experts=EXPERTS, top_k=2, capacity_factor=1.0,
                                         dispatch=dispatch), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  for _, var in nnx.iter_graph(module):
    if isinstance(var, nnx.Param):
      var.set_value(jnp.asarray(rng.normal(size=var.shape), jnp.float32))
  return module


def value_and_grads(dispatch: str, mesh=None):
  """(y, stats, d loss / d (params, x)) of one layer; `mesh`: jitted on it, sharded."""
  graphdef, state = nnx.split(layer(dispatch))
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(BATCH, TOKENS, WIDTH)), jnp.float32)
  probe = jnp.asarray(rng.normal(size=(BATCH, TOKENS, WIDTH)), jnp.float32)

  def loss(state, x):
    y, stats = nnx.merge(graphdef, state).with_stats(x)
    # Every statistic that has a gradient enters the loss, with weights far from 1.
    return jnp.sum(y * probe) + 3.0 * stats["load_balance"] + 0.5 * stats["router_z"], (
        y, stats)

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  if mesh is None:
    (_, (y, stats)), grads = fn(state, x)
  else:
    with jax.set_mesh(mesh):
      state = jax.device_put(state, sharding.state_shardings(state, mesh))
      x = jax.device_put(x, NamedSharding(mesh, P(sharding.BATCH_AXES)))
      (_, (y, stats)), grads = fn(state, x)
  return jax.device_get((y, stats, nnx.to_pure_dict(grads[0]), grads[1]))


@pytest.fixture(scope="module")
def einsum_one_device():
  return value_and_grads("einsum")


def assert_same(got, want):
  y, stats, param_grads, x_grad = got
  want_y, want_stats, want_param_grads, want_x_grad = want
  assert 0 < want_stats["dropped"] < 1  # the capacity limit is exercised
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
  for key in moe.STATS:
    np.testing.assert_allclose(stats[key], want_stats[key], rtol=1e-5, err_msg=key)
  np.testing.assert_allclose(x_grad, want_x_grad, rtol=1e-4, atol=1e-5)
  flat, want_flat = (dict(nnx.traversals.flatten_mapping(g)) for g in (param_grads,
                                                                          want_param_grads))
  assert flat.keys() == want_flat.keys()
  for key, want in want_flat.items():
    assert np.abs(want).max() > 1e-3, key  # every weight (the router too) gets a gradient
    np.testing.assert_allclose(flat[key], want, rtol=1e-4, atol=1e-5, err_msg=str(key))


@pytest.mark.parametrize("devices", [0, 1])
def test_all_to_all_dispatch_equals_einsum_dispatch_on_one_device(einsum_one_device, devices):
  """devices=0: no mesh (the local path); 1: shard_map on a 1-device mesh."""
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]) if devices else None
  assert_same(value_and_grads("all_to_all", mesh), einsum_one_device)


def test_all_to_all_dispatch_on_expert_2_x_data_4_equals_one_device(einsum_one_device):
  mesh = sharding.make_mesh({"data": 4, "expert": 2})
  assert_same(value_and_grads("all_to_all", mesh), einsum_one_device)
  assert_same(value_and_grads("einsum", mesh), einsum_one_device)


def test_all_to_all_exchanges_expert_buffers_and_gathers_nothing():
  """The compiled 8-device layer moves tokens with all-to-alls only. (GSPMD's einsum
  dispatch of the same layer all-gathers its router logits and slot masks over the batch:
  at pod scale, the global batch's.)"""
  mesh = sharding.make_mesh({"data": 4, "expert": 2})
  graphdef, state = nnx.split(layer("all_to_all"))
  x = jax.ShapeDtypeStruct((BATCH, TOKENS, WIDTH), jnp.float32,
                           sharding=NamedSharding(mesh, P(sharding.BATCH_AXES)))
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state,
                       sharding.state_shardings(state, mesh))
  grad = jax.grad(lambda s, x: jnp.sum(nnx.merge(graphdef, s)(x) ** 2))
  with jax.set_mesh(mesh):
    hlo = jax.jit(grad).lower(state, x).compile().as_text()
  assert len(re.findall(r" all-to-all\(", hlo)) >= 2  # to the experts and back
  assert not re.findall(r" all-gather(-start)?\(", hlo)
