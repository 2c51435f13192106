r"""Per-device memory of the contrastive losses, and of a train step with batch accumulation.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
      python benchmarks/loss_memory.py

Part 1 compiles loss + gradients w.r.t. the embeddings for a global batch on 8 devices and
prints XLA's temporary memory per device, next to the dense B x B loss on one device and
the embedding rows each device receives per step (its communication). Part 2 compiles the
train step of configs/default.py with loss.accum_steps = 1, 2, 4 (same global batch) and
prints its temporary memory per device. Compile-only: nothing runs, so timings do not
matter and a busy machine gives the same numbers.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import logging  # noqa: E402

from big_clip import losses, sharding, train  # noqa: E402
from big_clip.losses import grouped  # noqa: E402

GLOBAL_BATCH, DIM = 8192, 256
MiB = 2**20


def loss_temp_mib(loss_fn, mesh) -> float:
  emb = jax.ShapeDtypeStruct((GLOBAL_BATCH, DIM), jnp.float32,
                             sharding=None if mesh is None else sharding.batch_sharding(mesh))
  scalar = jax.ShapeDtypeStruct((), jnp.float32)
  fn = jax.value_and_grad(lambda i, t, s, b: loss_fn(i, t, s, b, mesh=mesh), argnums=(0, 1))
  compiled = jax.jit(fn).lower(emb, emb, scalar, scalar).compile()
  return compiled.memory_analysis().temp_size_in_bytes / MiB


def main() -> None:
  logging.set_verbosity(logging.WARNING)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  n = sharding.data_parallel_size(mesh)
  b = GLOBAL_BATCH // n
  print(f"Part 1: loss + grads, global batch {GLOBAL_BATCH}, dim {DIM}, {n} devices "
        f"(B_local {b}); temporaries per device")
  print("| loss | group | temp MiB / device | embedding rows received / device (forward) |")
  print("| --- | --- | --- | --- |")
  cases = [
      ("softmax (1 device, dense B x B)", None, losses.get("softmax"), None, None),
      ("softmax", "all", losses.get("softmax"), mesh, 2 * (GLOBAL_BATCH - b)),
      ("sigmoid", "all", losses.get("sigmoid"), mesh, GLOBAL_BATCH - b),
  ]
  for base in ("softmax", "sigmoid"):
    for group in (2, 4):
      fn = lambda i, t, s, bias, mesh, base=base, group=group: grouped.loss(
          i, t, s, bias, mesh=mesh, group_size=group, base=base)
      rows = (2 if base == "softmax" else 1) * (group - 1) * b
      cases.append((f"grouped ({base})", str(group), fn, mesh, rows))
  for name, group, fn, m, rows in cases:
    print(f"| {name} | {group or '-'} | {loss_temp_mib(fn, m):.1f} | "
          f"{'-' if rows is None else rows} |")

  from configs import default
  print("\nPart 2: train step of configs/default.py (global batch 128), temporaries per device")
  print("| loss.accum_steps | micro-batch | temp MiB / device |")
  print("| --- | --- | --- |")
  for k in (1, 2, 4):
    config = default.get_config()
    config.loss.accum_steps = k
    setup = train.build(config, mesh)
    del setup.state
    temp = setup.step.memory_analysis().temp_size_in_bytes / MiB
    print(f"| {k} | {config.data.global_batch // k} | {temp:.1f} |")


if __name__ == "__main__":
  main()
