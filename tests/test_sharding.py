"""Mesh resolution, logical-axis rules and FSDP placement of parameters."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from big_clip import sharding


def test_minus_one_takes_the_remaining_devices():
  assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == {
      "data": 4, "fsdp": 2, "tensor": 1, "expert": 1}
  assert sharding.mesh_shape({"data": 2, "fsdp": 2, "tensor": 2}, 8) == {
      "data": 2, "fsdp": 2, "tensor": 2, "expert": 1}
  assert sharding.mesh_shape({"data": 2, "expert": -1}, 8) == {
      "data": 2, "fsdp": 1, "tensor": 1, "expert": 4}


@pytest.mark.parametrize("req, match", [
    ({"data": 3, "fsdp": 1, "tensor": 1}, "needs 3 devices but 8"),
    ({"data": -1, "fsdp": 3, "tensor": 1}, "does not divide"),
    ({"data": -1, "fsdp": -1, "tensor": 1}, "at most one axis"),
    ({"data": -1, "model": 2}, "unknown axes"),
])
def test_a_mesh_that_does_not_fit_the_devices_is_named(req, match):
  with pytest.raises(sharding.MeshError, match=match):
    sharding.mesh_shape(req, 8)


def test_make_mesh_uses_all_devices_with_named_axes():
  mesh = sharding.make_mesh({"data": 2, "fsdp": -1, "tensor": 2})
  assert mesh.axis_names == ("data", "fsdp", "tensor", "expert")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}
  assert sharding.data_parallel_size(mesh) == 4


def test_the_expert_axis_is_also_a_data_axis():
  mesh = sharding.make_mesh({"data": 2, "expert": 4})
  assert sharding.data_parallel_size(mesh) == 8
  assert sharding.logical_to_mesh(("expert", "embed", "mlp")) == P("expert", "fsdp", "tensor")


def test_logical_rules_map_weights_and_activations():
  assert sharding.logical_to_mesh(("embed", "mlp")) == P("fsdp", "tensor")
  assert sharding.logical_to_mesh(("activation_batch", None)) == P(("data", "fsdp", "expert"), None)
  with pytest.raises(KeyError, match="no rule"):
    sharding.logical_to_mesh(("embedd",))


class _Tiny(nnx.Module):
  def __init__(self, rngs):
    init = nnx.initializers.lecun_normal()
    self.dense = nnx.Linear(16, 24, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")),
                            rngs=rngs)
    self.odd = nnx.Linear(6, 8, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")),
                          rngs=rngs)


def test_params_are_fsdp_sharded_and_indivisible_dims_fall_back_to_replicated():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  _, abstract = nnx.split(nnx.eval_shape(lambda: _Tiny(nnx.Rngs(0))))
  shardings = nnx.to_pure_dict(sharding.state_shardings(abstract, mesh))
  assert shardings["dense"]["kernel"].spec == P("fsdp", None)  # tensor=1 is dropped
  assert shardings["odd"]["kernel"].spec == P(None, None)  # 6 rows do not split 4 ways
  assert all(a is None for a in shardings["dense"]["bias"].spec)  # replicated
  params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(_Tiny(nnx.Rngs(0)))),
                   out_shardings=shardings)()
  shard_shapes = {s.data.shape for s in params["dense"]["kernel"].addressable_shards}
  assert shard_shapes == {(4, 24)}  # 16 rows over fsdp=4


def test_place_batch_splits_the_batch_over_data_and_fsdp():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  arr = sharding.place_batch({"x": x}, mesh)["x"]
  np.testing.assert_array_equal(np.asarray(arr), x)
  assert {s.data.shape for s in arr.addressable_shards} == {(2, 3)}


@pytest.mark.parametrize("env, multihost", [
    ({}, False),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, False),  # a one-task job (e.g. a CI runner)
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "1"}, False),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, False),  # one TPU VM host
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, True),
    ({"JAX_COORDINATOR_ADDRESS": "host0:1234"}, True),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "host0"}, True),
])
def test_auto_multihost_only_where_the_environment_names_several_processes(env, multihost):
  assert sharding.environment_is_multihost(env) is multihost
