"""Contrastive image-text losses, picked by name: `get(config.loss.name)`.

Every loss module exposes

    loss(img_emb, txt_emb, scale, bias, *, mesh=None) -> float32 scalar

with `img_emb`, `txt_emb` the global `[B, D]` L2-normalized embeddings (row i of each is a
pair), `scale` the logit multiplier (already exponentiated, e.g. `exp(log_scale)`) and
`bias` the logit bias. `mesh=None` computes the full batch on one device; with a mesh the
loss runs under `jax.shard_map` on each device's batch block (split over `BATCH_AXES`)
and exchanges only what it needs, giving the same value and gradients as the full batch.

Besides `get`, this file holds what the losses share: input checks, the float32
similarity block and the shard_map wrapper.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Protocol

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from big_clip.sharding import BATCH_AXES, data_parallel_size

NAMES = ("softmax", "sigmoid")

# The mesh axes a loss body reduces over; None inside the single-device (mesh=None) path.
Axes = tuple[str, ...] | None


class LossFn(Protocol):

  def __call__(self, img_emb: jax.Array, txt_emb: jax.Array, scale: jax.Array,
               bias: jax.Array | None, *, mesh: Mesh | None = None) -> jax.Array:
    ...


def get(name: str) -> LossFn:
  """The `loss` function of the module `big_clip.losses.<name>`."""
  if name not in NAMES:
    raise ValueError(f"config.loss.name={name!r} is not a known loss; allowed: {NAMES}.")
  return importlib.import_module(f"big_clip.losses.{name}").loss


# ---------------------------------------------------------------------------------------
# Shared by the losses.
# ---------------------------------------------------------------------------------------


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
        f"fsdp={mesh.shape['fsdp']}); make the batch size a multiple of {n_shards}.")


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


def on_batch_shards(body: Callable[..., jax.Array], mesh: Mesh | None, img: jax.Array,
                    txt: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
  """Runs `body(img_block, txt_block, scale, bias, axes=...)` and returns its scalar.

  With a mesh, each device gets its `[B / n_shards, D]` block of both embeddings (the
  batch is split over `BATCH_AXES` and replicated over `tensor`, so the tensor replicas
  compute identical values) and `body` reduces over `axes=BATCH_AXES` itself, ending in a
  psum so the result is replicated (`out_specs=P()`). shard_map's default replication
  checking (check_vma) makes autodiff transpose each collective correctly: an all_gather
  into a reduce-scatter, a ppermute into the reverse ppermute, the implicit broadcast of
  the replicated scale/bias into a psum. Without a mesh, `body` gets the whole batch and
  `axes=None`, which its collectives treat as a single device.
  """
  if mesh is None:
    out = body(img, txt, scale, bias, axes=None)
  else:
    batch_block = P(BATCH_AXES, None)
    sharded = jax.shard_map(lambda *args: body(*args, axes=BATCH_AXES), mesh=mesh,
                            in_specs=(batch_block, batch_block, P(), P()), out_specs=P())
    out = sharded(img, txt, scale, bias)
  chex.assert_shape(out, ())
  return out


def all_gather(x: jax.Array, axes: Axes) -> jax.Array:
  """The blocks of `x` from every device on `axes`, concatenated in batch order."""
  return x if axes is None else jax.lax.all_gather(x, axes, tiled=True)


def psum(x: jax.Array, axes: Axes) -> jax.Array:
  return x if axes is None else jax.lax.psum(x, axes)


def axis_size(axes: Axes) -> int:
  return 1 if axes is None else jax.lax.axis_size(axes)
