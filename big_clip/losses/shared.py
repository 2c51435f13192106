"""What the losses share: input checks, the float32 similarity block, the exchange domain
(which devices' blocks form one contrastive batch) and the shard_map wrapper."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from big_clip.sharding import BATCH_AXES, data_parallel_size

# The mesh axes a loss body reduces over; None inside the single-device (mesh=None) path.
Axes = tuple[str, ...] | None

def check_inputs(loss_name: str, img_emb: jax.Array, txt_emb: jax.Array, scale: jax.Array,
                 bias: jax.Array | None, mesh: Mesh | None) -> None:
  """Raises ValueError naming the bad input; shapes are static, so this works under jit."""
  for name, emb in (("img_emb", img_emb), ("txt_emb", txt_emb)):
    if np.ndim(emb) != 2:
      raise ValueError(f"{loss_name} loss: {name} must be [batch, dim], got shape "
                       f"{np.shape(emb)}.")
    if not jnp.issubdtype(jnp.result_type(emb), jnp.floating):
      raise ValueError(f"{loss_name} loss: {name} must be floating point, got "
                       f"{jnp.result_type(emb)}.")
  if np.shape(img_emb) != np.shape(txt_emb):
    raise ValueError(f"{loss_name} loss: img_emb {np.shape(img_emb)} and txt_emb "
                     f"{np.shape(txt_emb)} must have the same [batch, dim] shape: row i of "
                     f"each is the i-th image-text pair.")
  for name, value in (("scale", scale), ("bias", bias)):
    if value is not None and np.size(value) != 1:
      raise ValueError(f"{loss_name} loss: {name} must be a scalar, got shape "
                       f"{np.shape(value)}.")
  if mesh is None:
    return
  missing = [a for a in BATCH_AXES if a not in mesh.axis_names]
  if missing:
    raise ValueError(f"{loss_name} loss: the mesh has axes {mesh.axis_names} but lacks the "
                     f"batch axes {missing}; build it with big_clip.sharding.make_mesh.")
  global_batch, n_shards = np.shape(img_emb)[0], data_parallel_size(mesh)
  if global_batch % n_shards:
    raise ValueError(
        f"{loss_name} loss: the global batch {global_batch} is not divisible by the "
        f"data-parallel size {n_shards} (mesh data={mesh.shape['data']} x "
        f"fsdp={mesh.shape['fsdp']} x expert={mesh.shape['expert']}); make the batch size a multiple of {n_shards}.")


def as_float32(img_emb: jax.Array, txt_emb: jax.Array, scale: jax.Array,
               bias: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Upcasts (bfloat16 towers) to float32; scale and bias become () scalars, bias 0 if None.

  The upcast comes before any collective so that gathered features and, in the backward
  pass, the reduce-scattered gradients are float32 too.
  """
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  bias = jnp.zeros((), jnp.float32) if bias is None else f32(bias).reshape(())
  return f32(img_emb), f32(txt_emb), f32(scale).reshape(()), bias


def logits_block(img: jax.Array, txt: jax.Array, scale: jax.Array,
                 bias: jax.Array) -> jax.Array:
  """`scale * img @ txt.T + bias`, `[n_img, n_txt]`, in full float32.

  HIGHEST precision: TPUs (and TF32 GPUs) would otherwise round the float32 operands of
  the dot to bfloat16 / TF32, and the loss would no longer match the float64 reference.
  """
  chex.assert_rank([img, txt], 2)
  dots = jnp.einsum("id,jd->ij", img, txt, precision=jax.lax.Precision.HIGHEST)
  return scale * dots + bias


@dataclasses.dataclass(frozen=True)
class Exchange:
  """The devices that form one contrastive batch, seen from inside a loss body.

  `axes` are the batch-sharded mesh axes (None: one device holds the whole batch).
  `groups` partitions the flat device indices over `axes` into exchange groups; None means
  one group of every device. Collectives stay inside a group, except `psum`, which sums
  over *all* devices so that the loss body's final reduction adds up every group's loss.
  """
  axes: Axes
  groups: tuple[tuple[int, ...], ...] | None = None

  @property
  def size(self) -> int:
    """Devices per group: the number of batch blocks that one contrastive batch has."""
    if self.groups is not None:
      return len(self.groups[0])
    return 1 if self.axes is None else jax.lax.axis_size(self.axes)

  def all_gather(self, x: jax.Array) -> jax.Array:
    """The blocks of `x` from every device of this device's group, in batch order."""
    if self.axes is None:
      return x
    return jax.lax.all_gather(x, self.axes, tiled=True,
                              axis_index_groups=None if self.groups is None
                              else [list(g) for g in self.groups])

  def ring(self) -> list[tuple[int, int]]:
    """ppermute pairs: each device sends to the next one of its group (wrapping around)."""
    groups = self.groups or (tuple(range(self.size)),)
    return [(g[k], g[(k + 1) % len(g)]) for g in groups for k in range(len(g))]

  def ppermute(self, x: jax.Array) -> jax.Array:
    """`x` handed one step along `ring()`."""
    return x if self.axes is None else jax.lax.ppermute(x, self.axes, self.ring())

  def varying(self, tree):
    """`tree` typed as differing per device. Fresh constants (zeros) are typed as the same on
    every device; a loop that carries per-device values in them needs this under
    shard_map's replication checking. Its transpose sums the cotangents over `axes`."""
    if self.axes is None:
      return tree
    return jax.tree.map(lambda x: jax.lax.pcast(x, self.axes, to="varying"), tree)

  def psum(self, x: jax.Array) -> jax.Array:
    """The sum over every device on `axes` (all groups)."""
    return x if self.axes is None else jax.lax.psum(x, self.axes)


def exchange_groups(data_parallel: int, group_size: int | None
                    ) -> tuple[tuple[int, ...], ...] | None:
  """Groups of `group_size` consecutive batch devices; None (one group) for all of them."""
  if group_size is None or group_size == data_parallel:
    return None
  if group_size < 1 or data_parallel % group_size:
    raise ValueError(
        f"config.loss.group_size={group_size} must divide the {data_parallel} data-parallel "
        f"devices (mesh data x fsdp x expert); use a divisor of {data_parallel}, or 0 for all.")
  return tuple(tuple(range(start, start + group_size))
               for start in range(0, data_parallel, group_size))


def on_batch_shards(body: Callable[..., jax.Array], mesh: Mesh | None, img: jax.Array,
                    txt: jax.Array, scale: jax.Array, bias: jax.Array, *,
                    group_size: int | None = None) -> jax.Array:
  """Runs `body(img_block, txt_block, scale, bias, exchange=...)`, mean over groups.

  With a mesh, each device gets its `[B / n_shards, D]` block of both embeddings (the
  batch is split over `BATCH_AXES` and replicated over `tensor`, so the tensor replicas
  compute identical values). `body` computes its group's loss with the collectives of
  `exchange` and ends in `exchange.psum`, so its result is the sum over groups, replicated
  (`out_specs=P()`); dividing by the number of groups gives their mean. shard_map's
  default replication checking (check_vma) makes autodiff transpose each collective
  correctly: an all_gather into a reduce-scatter (within the same groups), a ppermute into
  the reverse ppermute, the implicit broadcast of the replicated scale/bias into a psum.
  Without a mesh, `body` gets the whole batch and an `Exchange` of one device.
  """
  if mesh is None:
    if group_size not in (None, 1):
      raise ValueError(f"config.loss.group_size={group_size} needs a mesh with at least "
                       f"{group_size} data-parallel devices; without a mesh it must be 1.")
    out = body(img, txt, scale, bias, exchange=Exchange(None))
  else:
    groups = exchange_groups(data_parallel_size(mesh), group_size)
    exchange = Exchange(BATCH_AXES, groups)
    batch_block = P(BATCH_AXES, None)
    sharded = jax.shard_map(lambda *args: body(*args, exchange=exchange), mesh=mesh,
                            in_specs=(batch_block, batch_block, P(), P()), out_specs=P())
    out = sharded(img, txt, scale, bias) / (1 if groups is None else len(groups))
  chex.assert_shape(out, ())
  return out
