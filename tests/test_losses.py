"""The contrastive losses equal their full-batch float64 definitions on every mesh.

References are written plainly in NumPy (float64) with hand-derived gradients; the JAX
losses run in float32 on the 8 fake CPU devices of conftest.py.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from big_clip import config as config_lib
from big_clip import losses, sharding
from big_clip.losses import grouped, sigmoid, softmax

GLOBAL_BATCH, DIM = 32, 16  # DIM differs from every B_local / B_global used below
SCALE, BIAS = 10.0, -3.0
MESH_SHAPES = {"8x1x1": (8, 1, 1), "2x4x1": (2, 4, 1), "2x2x2": (2, 2, 2)}
# Edge cases: a ring of two shards (no scan step) and of one, the batch on 4 / 8 replicas.
EDGE_MESH_SHAPES = {"1x2x4": (1, 2, 4), "1x1x8": (1, 1, 8)}
LOSSES = {"softmax": softmax.loss, "sigmoid": sigmoid.loss}


def _normalized(rng: np.random.Generator, batch: int = GLOBAL_BATCH) -> np.ndarray:
  x = rng.normal(size=(batch, DIM))
  return x / np.linalg.norm(x, axis=1, keepdims=True)


RNG = np.random.default_rng(0)
IMG, TXT = _normalized(RNG), _normalized(RNG)  # float64 [B, D]


def _mesh(name: str) -> Mesh:
  shape = {**MESH_SHAPES, **EDGE_MESH_SHAPES}[name]
  return sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))


# --------------------------------------------------------------------------------------
# Float64 references: value and analytic gradients w.r.t. (img, txt, scale, bias).
# With z = s * X Y^T + b and G = dL/dz: dX = s G Y, dY = s G^T X, ds = <G, X Y^T>,
# db = sum(G).
# --------------------------------------------------------------------------------------


def _grads_from_dz(x, y, s, g):
  return s * g @ y, s * g.T @ x, np.sum(g * (x @ y.T)), np.sum(g)


def _softmax_reference(x, y, s, b):
  n = len(x)
  z = s * x @ y.T + b
  p_rows = np.exp(z - z.max(1, keepdims=True))
  p_rows /= p_rows.sum(1, keepdims=True)  # softmax over texts, per image
  p_cols = np.exp(z - z.max(0, keepdims=True))
  p_cols /= p_cols.sum(0, keepdims=True)  # softmax over images, per text
  value = -(np.trace(np.log(p_rows)) + np.trace(np.log(p_cols))) / (2 * n)
  eye = np.eye(n)
  dz = ((p_rows - eye) + (p_cols - eye)) / (2 * n)
  return value, _grads_from_dz(x, y, s, dz)


def _sigmoid_reference(x, y, s, b):
  n = len(x)
  labels = 2 * np.eye(n) - 1
  z = s * x @ y.T + b
  value = np.sum(np.logaddexp(0, -labels * z)) / n  # -log_sigmoid(l z) = softplus(-l z)
  dz = -labels / (1 + np.exp(labels * z)) / n  # d softplus(-l z) / dz = -l sigmoid(-l z)
  return value, _grads_from_dz(x, y, s, dz)


REFERENCES = {"softmax": _softmax_reference, "sigmoid": _sigmoid_reference}


def _assert_close(actual, expected):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------
# Value and gradients.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mesh_name", [None, *MESH_SHAPES, *EDGE_MESH_SHAPES])
@pytest.mark.parametrize("loss_name", LOSSES)
def test_value_and_grads_match_float64_full_batch(loss_name, mesh_name):
  mesh = None if mesh_name is None else _mesh(mesh_name)
  img, txt = IMG.astype(np.float32), TXT.astype(np.float32)
  if mesh is not None:
    img, txt = (jax.device_put(e, sharding.batch_sharding(mesh)) for e in (img, txt))
  loss_fn = lambda i, t, s, b: LOSSES[loss_name](i, t, s, b, mesh=mesh)

  value, grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3)))(
      img, txt, jnp.float32(SCALE), jnp.float32(BIAS))

  expected_value, expected_grads = REFERENCES[loss_name](IMG, TXT, SCALE, BIAS)
  assert value.shape == () and value.dtype == jnp.float32
  _assert_close(value, expected_value)
  for name, grad, expected in zip(("img", "txt", "scale", "bias"), grads, expected_grads):
    assert grad.shape == np.shape(expected), name
    _assert_close(grad, expected)
  if mesh is not None:  # the gradient comes back laid out like the embeddings
    assert grads[0].sharding.is_equivalent_to(sharding.batch_sharding(mesh), 2)


def test_softmax_bias_is_optional_and_does_not_change_the_loss():
  mesh = _mesh("2x4x1")
  without = softmax.loss(IMG, TXT, SCALE, mesh=mesh)
  _assert_close(without, _softmax_reference(IMG, TXT, SCALE, 0.0)[0])
  _assert_close(without, _softmax_reference(IMG, TXT, SCALE, BIAS)[0])


@pytest.mark.parametrize("loss_name", LOSSES)
def test_bfloat16_embeddings_are_computed_in_float32(loss_name):
  img, txt = (jnp.asarray(e, jnp.bfloat16) for e in (IMG, TXT))
  value = LOSSES[loss_name](img, txt, SCALE, BIAS, mesh=_mesh("2x2x2"))
  assert value.dtype == jnp.float32
  # Exact up to float32 rounding on the bfloat16 values: no bfloat16 arithmetic inside.
  as_f64 = lambda e: np.asarray(e.astype(jnp.float32), np.float64)
  _assert_close(value, REFERENCES[loss_name](as_f64(img), as_f64(txt), SCALE, BIAS)[0])


# --------------------------------------------------------------------------------------
# Memory: the sharded loss never builds a B_global x B_global array.
# --------------------------------------------------------------------------------------


def _equations(jaxpr, per_device: bool = False):
  """(equation, per_device) for a jaxpr and every jaxpr nested in it (shard_map, scan,
  remat, ...); `per_device` is True inside a shard_map, where shapes are per device."""
  for eqn in jaxpr.eqns:
    yield eqn, per_device
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
        if hasattr(sub, "eqns"):
          yield from _equations(sub, per_device or eqn.primitive.name == "shard_map")


def _logits_and_largest(jaxpr):
  """(shapes of the per-device logits products, elements of the largest per-device array).

  Products with a feature dimension are gradients (`[t, D]`); the rest are logits."""
  eqns = list(_equations(jaxpr))
  dot_shapes = {(v.aval.shape, per_device) for e, per_device in eqns
                if e.primitive.name == "dot_general" for v in e.outvars}
  assert all(per_device for _, per_device in dot_shapes), f"a dot outside shard_map: {dot_shapes}"
  logits = {s for s, _ in dot_shapes if DIM not in s}
  largest = max(np.prod(v.aval.shape) for e, per_device in eqns if per_device
                for v in e.outvars if hasattr(v.aval, "shape"))
  return logits, largest


@pytest.mark.parametrize("mesh_name", MESH_SHAPES)
@pytest.mark.parametrize("loss_name", LOSSES)
def test_sharded_loss_and_grads_hold_one_block_of_keys_never_the_gathered_batch(loss_name,
                                                                               mesh_name):
  """Forward and backward, no device forms more than its `b x b` logits block at a time
  nor holds any array bigger than one `[b, D]` embedding block: the keys travel around the
  ring instead of being gathered (`B x D`), and the backward pass saves no visiting block."""
  mesh = _mesh(mesh_name)
  local_batch = GLOBAL_BATCH // sharding.data_parallel_size(mesh)
  loss_fn = lambda i, t, s, b: LOSSES[loss_name](i, t, s, b, mesh=mesh)
  emb = jax.ShapeDtypeStruct((GLOBAL_BATCH, DIM), jnp.float32)
  scalar = jax.ShapeDtypeStruct((), jnp.float32)
  jaxpr = jax.make_jaxpr(jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3)))(
      emb, emb, scalar, scalar).jaxpr

  assert any(per_device for _, per_device in _equations(jaxpr)), "the loss did not use shard_map"
  assert not [e for e, _ in _equations(jaxpr) if e.primitive.name == "all_gather"]
  logits, largest_per_device = _logits_and_largest(jaxpr)
  assert logits == {(local_batch, local_batch)}, logits
  assert largest_per_device <= local_batch * DIM


@pytest.mark.parametrize("tile", [3, 5, 8])  # 3 and 5: the last tile of a block is padded
@pytest.mark.parametrize("mesh_name", [None, "8x1x1", "2x2x2"])
@pytest.mark.parametrize("loss_name", LOSSES)
def test_tiled_loss_is_exact_and_holds_one_tile_at_a_time(loss_name, mesh_name, tile):
  """Each device visits its logits in `tile x tile` pieces (online logsumexp / running sums,
  custom VJP): value and gradients still equal the float64 full-batch loss, also when the
  last tile of a block is ragged (padded and masked), and the only logits formed, forward
  or backward, are single tiles."""
  mesh = None if mesh_name is None else _mesh(mesh_name)
  img, txt = IMG.astype(np.float32), TXT.astype(np.float32)
  loss_fn = lambda i, t, s, b: LOSSES[loss_name](i, t, s, b, mesh=mesh, tile=tile)
  grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3))
  value, grads = jax.jit(grad_fn)(img, txt, jnp.float32(SCALE), jnp.float32(BIAS))
  expected_value, expected_grads = REFERENCES[loss_name](IMG, TXT, SCALE, BIAS)
  if loss_name == "softmax":  # the bias cancels: exactly 0, not the reference's rounding
    expected_grads = (*expected_grads[:3], 0.0)
  _assert_close(value, expected_value)
  for grad, expected in zip(grads, expected_grads):
    _assert_close(grad, expected)
  # Without differentiation the loss takes its own (forward-only) path.
  _assert_close(jax.jit(loss_fn)(img, txt, SCALE, BIAS), expected_value)

  jaxpr = jax.make_jaxpr(grad_fn)(img, txt, jnp.float32(SCALE), jnp.float32(BIAS)).jaxpr
  local_batch = GLOBAL_BATCH // (1 if mesh is None else sharding.data_parallel_size(mesh))
  edge = min(tile, local_batch)
  logits = {v.aval.shape for e, _ in _equations(jaxpr) if e.primitive.name == "dot_general"
            for v in e.outvars if DIM not in v.aval.shape}
  assert logits == {(edge, edge)}, logits


# --------------------------------------------------------------------------------------
# Errors name the problem.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("img, txt, scale, message", [
    (IMG, TXT[:, :8], SCALE, r"same \[batch, dim\]"),
    (IMG, TXT[:16], SCALE, r"same \[batch, dim\]"),
    (IMG[0], TXT[0], SCALE, r"img_emb must be \[batch, dim\]"),
    (IMG, TXT, np.ones(2), r"scale must be a scalar"),
    (IMG[:30], TXT[:30], SCALE, r"global batch 30 is not divisible by the data-parallel "
     r"size 8"),
])
def test_invalid_inputs_raise_value_errors_naming_the_problem(loss_name, img, txt, scale,
                                                               message):
  with pytest.raises(ValueError, match=message):
    LOSSES[loss_name](img, txt, scale, BIAS, mesh=_mesh("2x4x1"))


def test_mesh_without_batch_axes_is_rejected():
  mesh = Mesh(np.asarray(jax.devices()), ("batch",))
  with pytest.raises(ValueError, match=r"lacks the batch axes \['data', 'fsdp', 'expert'\]"):
    softmax.loss(IMG, TXT, SCALE, mesh=mesh)


def test_sigmoid_requires_a_bias():
  with pytest.raises(ValueError, match="bias is required"):
    sigmoid.loss(IMG, TXT, SCALE, None)


# --------------------------------------------------------------------------------------
# Registry.
# --------------------------------------------------------------------------------------


def test_get_returns_each_loss_by_name():
  assert losses.get("softmax") is softmax.loss
  assert losses.get("sigmoid") is sigmoid.loss
  assert losses.get("grouped") is grouped.loss


def test_get_unknown_name_names_the_config_key_and_the_choices():
  with pytest.raises(ValueError, match=r"config.loss.name='clip'.*'softmax', 'sigmoid'"):
    losses.get("clip")


# --------------------------------------------------------------------------------------
# Grouped aggregation (M2-Encoder): the mean of each device group's own full-batch loss.
# --------------------------------------------------------------------------------------

GROUPED_MESHES = ("8x1x1", "2x4x1")


def _grouped_reference(x, y, s, b, *, base, n_groups):
  """Mean over consecutive row groups of the float64 reference; gradients likewise."""
  rows = len(x) // n_groups
  value, dx, dy, ds, db = 0.0, np.zeros_like(x), np.zeros_like(y), 0.0, 0.0
  for g in range(n_groups):
    part = slice(g * rows, (g + 1) * rows)
    v, (gx, gy, gs, gb) = REFERENCES[base](x[part], y[part], s, b)
    value += v / n_groups
    dx[part], dy[part] = gx / n_groups, gy / n_groups
    ds, db = ds + gs / n_groups, db + gb / n_groups
  return value, (dx, dy, ds, db)


@pytest.mark.parametrize("group_size", [2, 4, 8])
@pytest.mark.parametrize("mesh_name", GROUPED_MESHES)
@pytest.mark.parametrize("base", ["softmax", "sigmoid"])
def test_grouped_value_and_grads_are_the_mean_of_per_group_float64_losses(base, mesh_name,
                                                                          group_size):
  mesh = _mesh(mesh_name)
  img, txt = (jax.device_put(e.astype(np.float32), sharding.batch_sharding(mesh))
              for e in (IMG, TXT))
  loss_fn = lambda i, t, s, b: grouped.loss(i, t, s, b, mesh=mesh, group_size=group_size,
                                            base=base)
  value, grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3)))(
      img, txt, jnp.float32(SCALE), jnp.float32(BIAS))

  n_groups = sharding.data_parallel_size(mesh) // group_size
  expected_value, expected_grads = _grouped_reference(IMG, TXT, SCALE, BIAS, base=base,
                                                      n_groups=n_groups)
  _assert_close(value, expected_value)
  for name, grad, expected in zip(("img", "txt", "scale", "bias"), grads, expected_grads):
    assert grad.shape == np.shape(expected), name
    _assert_close(grad, expected)
  if group_size == 8:  # one group of every device: exactly the global loss
    _assert_close(value, REFERENCES[base](IMG, TXT, SCALE, BIAS)[0])


@pytest.mark.parametrize("base", ["softmax", "sigmoid"])
def test_grouped_loss_exchanges_only_inside_its_groups(base):
  mesh, group_size = _mesh("2x4x1"), 2  # 4 groups: devices {0,1}, {2,3}, {4,5}, {6,7}
  local_batch = GLOBAL_BATCH // sharding.data_parallel_size(mesh)
  loss_fn = lambda i, t, s, b: grouped.loss(i, t, s, b, mesh=mesh, group_size=group_size,
                                            base=base)
  emb = jax.ShapeDtypeStruct((GLOBAL_BATCH, DIM), jnp.float32)
  scalar = jax.ShapeDtypeStruct((), jnp.float32)
  grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3))
  jaxpr = jax.make_jaxpr(grad_fn)(emb, emb, scalar, scalar).jaxpr
  eqns = list(_equations(jaxpr))

  hops = [e for e, _ in eqns if e.primitive.name == "ppermute"]
  assert hops, f"no ppermute in the grouped {base} loss"
  for eqn in hops:  # every ring hop stays inside a group
    assert all(src // group_size == dst // group_size for src, dst in eqn.params["perm"])
  assert not [e for e, _ in eqns if e.primitive.name == "all_gather"]
  logits, largest = _logits_and_largest(jaxpr)
  assert logits == {(local_batch, local_batch)}, logits
  assert largest <= local_batch * DIM
  # The compiled program agrees: each collective-permute pairs devices of one group.
  hlo = jax.jit(grad_fn).lower(emb, emb, scalar, scalar).compile().as_text()
  pairs = re.findall(r"source_target_pairs=\{(.*?)\}\}", hlo)
  assert pairs, "no collective-permute in the compiled program"
  for found in pairs:
    for src, dst in re.findall(r"(\d+),(\d+)", found):
      assert int(src) // group_size == int(dst) // group_size, found


def test_grouped_loss_rejects_a_group_size_that_does_not_divide_the_devices():
  with pytest.raises(ValueError, match=r"config.loss.group_size=3 must divide the 8 "
                     r"data-parallel devices"):
    grouped.loss(IMG, TXT, SCALE, BIAS, mesh=_mesh("8x1x1"), group_size=3)
  with pytest.raises(ValueError, match=r"config.loss.group_base='clip' is not a known"):
    grouped.loss(IMG, TXT, SCALE, BIAS, mesh=_mesh("8x1x1"), base="clip")


def test_grouped_config_is_validated_against_the_mesh():
  c = config_lib.base()
  c.loss.update(name="grouped", group_size=3)
  config_lib.validate(c)
  with pytest.raises(config_lib.ConfigError, match=r"group_size=3 does not divide the "
                     r"data-parallel size 8"):
    config_lib.validate_for_mesh(c, 8, 1)
  c.loss.update(name="softmax")
  with pytest.raises(config_lib.ConfigError, match=r"group_size=3 only applies to "
                     r"config.loss.name='grouped'"):
    config_lib.validate(c)


def test_from_config_binds_the_group_settings():
  c = config_lib.base()
  c.loss.update(name="grouped", group_size=4, group_base="sigmoid")
  fn = losses.from_config(c.loss)
  assert fn.func is grouped.loss and fn.keywords == {"group_size": 4, "base": "sigmoid"}
  c.loss.group_size = 0  # 0 in the config = all devices = None for the loss
  assert losses.from_config(c.loss).keywords["group_size"] is None
  assert losses.from_config(config_lib.base().loss) is softmax.loss
