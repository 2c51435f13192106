"""The device mesh, logical-axis rules, and placement of parameters and batches.

Only this file and `big_clip/losses/` know about the mesh. Models name their axes logically
(MaxText style): weights use bare names (`embed`, `mlp`, `heads`, `kv`, `vocab`), activations
use `activation_*` names; `RULES` maps both onto the mesh axes `data`, `fsdp`, `tensor`,
`expert`.

`expert` shards the experts of mixture-of-experts MLPs (models/moe.py). Like MaxText's, it is
also a data axis: the batch is split over it too, so outside the expert MLPs (attention, dense
MLPs, the loss) it adds data parallelism, and without MoE layers `expert=k` is `data=k`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from big_clip.errors import UserError

# `expert` is last: a mesh given as (data, fsdp, tensor) sizes keeps its meaning.
MESH_AXES = ("data", "fsdp", "tensor", "expert")
# The batch is split over every data-parallel axis; FSDP is data parallelism whose
# parameters are also sharded; `expert` is data parallelism whose MoE experts are sharded.
BATCH_AXES = ("data", "fsdp", "expert")
# Inside an MoE layer the tokens are exchanged so that each device holds its experts' tokens
# (GShard): the expert dimension goes to `expert`, the batch keeps the other data axes.
BATCH_AXES_NO_EXPERT = ("data", "fsdp")

# logical name -> mesh axis (or tuple of axes, or None = replicated).
RULES: tuple[tuple[str, Any], ...] = (
    # Weights.
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("kv_heads", "tensor"),  # grouped-query key/value heads of an LLM (llm.py)
    ("lora", None),  # the rank of LoRA factors
    ("vocab", "tensor"),
    ("joint", None),  # the joint image-text embedding dimension
    ("patch", None),  # flattened patch pixels of the patch embedding
    ("length", None),  # positions of a position table
    ("layers", None),  # the stacked-layers axis of nnx.scan
    ("expert", "expert"),  # the leading axis of MoE expert weights
    # Activations.
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_kv_heads", "tensor"),
    ("activation_vocab", "tensor"),
    ("activation_exp", "expert"),  # tokens grouped by expert inside an MoE layer
    ("activation_batch_no_exp", BATCH_AXES_NO_EXPERT),
)


class MeshError(UserError, ValueError):
  """The requested mesh does not fit the devices."""


def mesh_shape(requested: Mapping[str, int], device_count: int) -> dict[str, int]:
  """Resolves `{data: -1, fsdp: 1, tensor: 1, expert: 1}` against `device_count` (-1 = the rest)."""
  unknown = set(requested) - set(MESH_AXES)
  if unknown:
    raise MeshError(f"config.mesh has unknown axes {sorted(unknown)}; allowed: {MESH_AXES}.")
  sizes = {a: int(requested.get(a, 1)) for a in MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise MeshError(f"config.mesh: at most one axis may be -1, got {free}.")
  bad = [a for a, s in sizes.items() if s == 0 or s < -1]
  if bad:
    raise MeshError(f"config.mesh.{bad[0]}={sizes[bad[0]]}: sizes are positive or -1.")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if device_count % fixed:
      raise MeshError(
          f"config.mesh {sizes}: the fixed axes multiply to {fixed}, which does not divide "
          f"the {device_count} devices; choose sizes whose product divides {device_count}.")
    sizes[free[0]] = device_count // fixed
  elif fixed != device_count:
    raise MeshError(
        f"config.mesh {sizes} needs {fixed} devices but {device_count} are present; "
        f"set one axis to -1 to take the rest, e.g. --config.mesh.data=-1.")
  return sizes


def make_mesh(requested: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over all (or the given) devices with axes `MESH_AXES` (GSPMD / Auto); axes the
  request leaves out have size 1."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(requested, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  if devices == list(jax.devices()):
    # jax.make_mesh orders devices for the physical topology (ICI rings on TPU).
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))


def mesh_from_config(mesh_cfg: Mapping[str, Any]) -> Mesh:
  """The mesh of `config.mesh` over all devices."""
  return make_mesh({a: mesh_cfg[a] for a in MESH_AXES if a in mesh_cfg})


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def maybe_initialize_distributed(multihost: str | bool) -> None:
  """Calls `jax.distributed.initialize()` for multi-host runs.

  `multihost='auto'` initializes when the environment names a coordinator
  (JAX_COORDINATOR_ADDRESS) or a job of several processes that JAX auto-detects (a TPU pod
  or multi-slice, SLURM or Open MPI with more than one task); True always initializes;
  False never does. Elsewhere, set
  JAX_COORDINATOR_ADDRESS=host0:port, JAX_NUM_PROCESSES=N and JAX_PROCESS_ID=i (0..N-1)
  on every process.
  """
  if multihost == "auto":
    multihost = environment_is_multihost(os.environ)
  if multihost:
    # Where no cluster is auto-detected (plain multi-node GPU, or CPU processes on one
    # machine) each process names its rank: JAX_NUM_PROCESSES and JAX_PROCESS_ID.
    ranks = {key: int(os.environ[env]) for key, env in (("num_processes", "JAX_NUM_PROCESSES"),
                                                        ("process_id", "JAX_PROCESS_ID"))
             if env in os.environ}
    if os.environ.get("JAX_PLATFORMS", "").lower() == "cpu":
      # CPU collectives across processes need gloo (the default only works in-process).
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**ranks)
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())


def environment_is_multihost(env: Mapping[str, str]) -> bool:
  """Whether `env` describes a run of more than one process: a coordinator address, a
  multi-slice TPU, or a SLURM / Open MPI / TPU-pod job of more than one task or host. A
  one-task SLURM job or a one-host TPU VM is a single process: initializing there fails."""
  if env.get("JAX_COORDINATOR_ADDRESS") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return True

  def more_than_one(name: str) -> bool:
    try:
      return int(env.get(name, "1")) > 1
    except ValueError:
      return False

  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  return (len(hosts) > 1 or more_than_one("SLURM_NTASKS") or more_than_one("SLURM_NPROCS")
          or more_than_one("OMPI_COMM_WORLD_SIZE"))


def logical_to_mesh(logical: Sequence[str | None] | None,
                    rules: Sequence[tuple[str, Any]] = RULES) -> P:
  """Maps logical axis names to a mesh PartitionSpec with `rules`."""
  if logical is None:
    return P()
  table = dict(rules)
  out = []
  for name in logical:
    if name is None:
      out.append(None)
    elif name in table:
      out.append(table[name])
    else:
      raise KeyError(f"logical axis {name!r} has no rule in big_clip.sharding.RULES; "
                     f"known: {sorted(table)}.")
  return P(*out)


def _fit_spec(spec: P, shape: Sequence[int], mesh_sizes: Mapping[str, int]) -> P:
  """Drops mesh axes from dims they do not divide (e.g. a width-96 weight on fsdp=64)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      fitted.append(None)
      continue
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    keep = tuple(a for a in names if mesh_sizes[a] > 1)
    if dim % math.prod(mesh_sizes[a] for a in keep):
      keep = ()
    fitted.append(None if not keep else keep[0] if len(keep) == 1 else keep)
  return P(*fitted)


def state_shardings(abstract_state: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = RULES) -> Any:
  """NamedShardings for an nnx.State (or any pytree of Variables) from their logical axes."""
  logical = nnx.get_partition_spec(abstract_state)  # Variables' `out_sharding` metadata

  def one(var_spec, var_abs):
    logical_axes = tuple(var_spec) if isinstance(var_spec, P) else None
    shape = getattr(var_abs, "shape", ())
    spec = logical_to_mesh(logical_axes, rules) if logical_axes else P()
    return NamedSharding(mesh, _fit_spec(spec, shape, dict(mesh.shape)))

  leaf = lambda x: isinstance(x, (P, jax.ShapeDtypeStruct)) or x is None
  return jax.tree.map(one, logical, abstract_state, is_leaf=leaf)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op when no mesh is set (unit tests, eager)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  spec = _fit_spec(logical_to_mesh(logical_axes), x.shape, dict(mesh.shape))
  return jax.lax.with_sharding_constraint(x, spec)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data-parallel axes, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def place_batch(host_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global arrays sharded on the batch axes (multi-host safe)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in host_batch.items()}


def place_like(params: Any, like: Any) -> Any:
  """Host NumPy `params` as global arrays with the shardings of `like` (any process count:
  each process reads the file and provides its own shards)."""
  return jax.tree.map(
      lambda p, l: jax.make_array_from_callback(l.shape, l.sharding, lambda idx: p[idx]),
      params, like)


def embed_batched(fn: Callable, params: Any, inputs: Any, mesh: Mesh, batch_size: int, *,
                  preprocess: Callable[[np.ndarray], np.ndarray] | None = None,
                  desc: str | None = None) -> np.ndarray:
  """Applies a jitted `fn(params, x)` over `inputs` in sharded batches; numpy [N, D] out.

  `inputs` is anything with `len()` that takes an int index array (a numpy array, or a
  lazy `evals.datasets.ImageSet`): each process reads only its rows of each batch. The last
  batch is padded by repeating the last row (one batch shape, one compilation) and the
  padding is dropped. Every process gets the whole result. `desc` shows a progress bar on a
  terminal.
  """
  dp = data_parallel_size(mesh)
  n = len(inputs)
  per_device = -(-n // dp)  # a small set: the next power of two per device (few compiles)
  batch_size = dp * min(max(1, batch_size // dp), 1 << (per_device - 1).bit_length())
  pc, pi = jax.process_count(), jax.process_index()
  starts = range(0, n, batch_size)
  if len(starts) > 2 and pi == 0 and desc:
    starts = tqdm(starts, desc=desc, unit="batch", leave=False, disable=None)  # None: TTY only
  outs = []
  for start in starts:
    index = np.minimum(np.arange(start, start + batch_size), n - 1)
    local = inputs[index.reshape(pc, -1)[pi]]
    if preprocess is not None:
      local = preprocess(local)
    x = jax.make_array_from_process_local_data(batch_sharding(mesh), local)
    out = multihost_utils.process_allgather(fn(params, x), tiled=True)
    outs.append(np.asarray(out)[:min(batch_size, n - start)])
  return np.concatenate(outs)
