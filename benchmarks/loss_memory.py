r"""Per-device memory and time of the contrastive losses against a naive all-gather baseline,
and the memory of a train step with batch accumulation.

  python benchmarks/loss_memory.py --json /tmp/loss_memory.json   # sets 8 fake CPU devices

Part 1: for each global batch (default 4096, 8192, 16384, 32768) and embedding width 512 on
8 devices (mesh data=8), loss + gradients w.r.t. both embeddings of

  naive        every device all-gathers both sides and computes the full B x B logits and
               the whole loss (open_clip's `gather_with_grad` pattern); the result is
               averaged over devices, so the gradients are exact but every device holds B^2
  softmax      big_clip's softmax: local rows against the gathered other side, b x B
  sigmoid      big_clip's SigLIP loss: text blocks passed around a ppermute ring, b x b
  grouped:G    M2-Encoder grouped aggregation (softmax in groups of G devices)

Memory is XLA's `memory_analysis().temp_size_in_bytes` of the compiled program (per device:
the program is SPMD). Seconds are one execution of the AOT-compiled program on random unit
embeddings after compilation (the 8 "devices" share this host's cores, so they add up to
the work of all devices); a case whose buffers would not fit this host
(`--max_run_gib`) is compiled but not run, and its seconds are null. Before timing, the
naive loss is checked equal (value and gradients) to the softmax loss at a small batch.

Part 2 (`--accum`, default on) compiles the train step of configs/default.py with
loss.accum_steps = 1, 2, 4 (same global batch) and prints its temporaries per device.

`--json PATH` writes Part 1's rows: a list of objects with keys `loss`, `global_batch`,
`devices`, `temp_bytes`, `seconds` (and `group_size`, `dim`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from big_clip import losses, sharding, steps  # noqa: E402
from big_clip.losses import grouped  # noqa: E402

MiB = 2**20
GiB = 2**30


def naive_loss(img, txt, scale, bias=None, *, mesh):
  """The baseline: all-gather both sides, the full B x B softmax loss on every device."""
  del bias

  def body(i, t, s):
    i_all = jax.lax.all_gather(i, sharding.BATCH_AXES, tiled=True)  # [B, D]
    t_all = jax.lax.all_gather(t, sharding.BATCH_AXES, tiled=True)
    logits = losses.logits_block(i_all, t_all, s, jnp.float32(0.0))  # [B, B]
    diag = jnp.diagonal(logits)
    per_device = 0.5 * (jnp.mean(jax.nn.logsumexp(logits, axis=1) - diag)
                        + jnp.mean(jax.nn.logsumexp(logits, axis=0) - diag))
    # Every device holds the same value; the mean keeps the gradients exact (each device's
    # share of the reduce-scattered gradient is 1/n of the full one).
    return jax.lax.pmean(per_device, sharding.BATCH_AXES)

  block = P(sharding.BATCH_AXES, None)
  return jax.shard_map(body, mesh=mesh, in_specs=(block, block, P()), out_specs=P())(
      img, txt, jnp.asarray(scale, jnp.float32))


def cases() -> list[tuple[str, int | None, Any]]:
  """(name, group_size, loss_fn(img, txt, scale, bias, mesh=))."""
  return [
      ("naive", None, naive_loss),
      ("softmax", None, losses.get("softmax")),
      ("sigmoid", None, losses.get("sigmoid")),
  ] + [(f"grouped:{g}", g, functools.partial(grouped.loss, group_size=g, base="softmax"))
       for g in (2, 4)]


def _inputs(global_batch: int, dim: int, mesh, seed: int = 0):
  rng = np.random.default_rng(seed)
  emb = rng.standard_normal((2, global_batch, dim)).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
  place = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))
  rep = lambda x: jax.device_put(jnp.float32(x), sharding.replicated(mesh))
  return place(emb[0]), place(emb[1]), rep(10.0), rep(-10.0)


def compile_case(loss_fn, mesh, global_batch: int, dim: int):
  emb = jax.ShapeDtypeStruct((global_batch, dim), jnp.float32,
                             sharding=sharding.batch_sharding(mesh))
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh))
  fn = jax.value_and_grad(lambda i, t, s, b: loss_fn(i, t, s, b, mesh=mesh), argnums=(0, 1))
  return jax.jit(fn).lower(emb, emb, scalar, scalar).compile()


def check_naive_is_exact(mesh, global_batch: int = 64, dim: int = 16) -> None:
  """The baseline must be the same loss: value and gradients equal big_clip's softmax."""
  args = _inputs(global_batch, dim, mesh, seed=1)
  fns = {name: fn for name, _, fn in cases()}
  out = {name: jax.device_get(compile_case(fns[name], mesh, global_batch, dim)(*args))
         for name in ("naive", "softmax")}
  np.testing.assert_allclose(out["naive"][0], out["softmax"][0], rtol=1e-5)
  for a, b in zip(out["naive"][1], out["softmax"][1]):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def host_memory_bytes() -> int:
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def run(batches, dim: int, max_run_bytes: float) -> list[dict[str, Any]]:
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  n = sharding.data_parallel_size(mesh)
  check_naive_is_exact(mesh)
  rows = []
  for global_batch in batches:
    for name, group, fn in cases():
      compiled = compile_case(fn, mesh, global_batch, dim)
      temp = int(compiled.memory_analysis().temp_size_in_bytes)
      # Everything the n devices hold at once on this host: temporaries + inputs + grads.
      need = n * temp + 4 * global_batch * dim * 4
      seconds = None
      if need <= max_run_bytes:
        args = _inputs(global_batch, dim, mesh)
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        seconds = time.perf_counter() - t0
        del args
      row = dict(loss=name, global_batch=global_batch, devices=n, temp_bytes=temp,
                 seconds=seconds, group_size=group, dim=dim)
      rows.append(row)
      shown = "not run (needs %.1f GiB here)" % (need / GiB) if seconds is None \
          else f"{seconds:.2f} s"
      print(f"  {name:10s} B={global_batch:6d}  temp {temp / MiB:10.1f} MiB/device  {shown}")
      del compiled
  return rows


def table(rows: list[dict[str, Any]]) -> str:
  """Markdown: one line per (batch, loss), with memory and time relative to the naive and
  the global softmax rows of the same batch."""
  lines = ["| global batch | loss | temp MiB / device | vs naive | seconds (loss + grads) "
           "| speed vs softmax |", "| --- | --- | --- | --- | --- | --- |"]
  by = {(r["global_batch"], r["loss"]): r for r in rows}
  for r in rows:
    naive = by[(r["global_batch"], "naive")]
    soft = by[(r["global_batch"], "softmax")]
    ratio = naive["temp_bytes"] / max(r["temp_bytes"], 1)
    sec = "—" if r["seconds"] is None else f"{r['seconds']:.2f}"
    speed = ("—" if r["seconds"] is None or soft["seconds"] is None
             else f"{soft['seconds'] / r['seconds']:.2f}×")
    lines.append(f"| {r['global_batch']} | {r['loss']} | {r['temp_bytes'] / MiB:.1f} | "
                 f"1/{ratio:.1f} | {sec} | {speed} |")
  return "\n".join(lines)


def accumulation_table() -> str:
  from configs import default
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  lines = ["| loss.accum_steps | micro-batch | temp MiB / device |", "| --- | --- | --- |"]
  for k in (1, 2, 4):
    config = default.get_config()
    config.loss.accum_steps = k
    setup = steps.build(config, mesh)
    del setup.state
    temp = setup.step.memory_analysis().temp_size_in_bytes / MiB
    lines.append(f"| {k} | {config.data.global_batch // k} | {temp:.1f} |")
  return "\n".join(lines)


def main(argv=None) -> list[dict[str, Any]]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batches", default="4096,8192,16384,32768",
                 help="comma-separated global batch sizes")
  p.add_argument("--dim", type=int, default=512, help="embedding width")
  p.add_argument("--max_run_gib", type=float, default=0.4 * host_memory_bytes() / GiB,
                 help="run (time) a case only if its buffers on all devices fit in this")
  p.add_argument("--accum", action=argparse.BooleanOptionalAction, default=True,
                 help="Part 2: train-step memory with loss.accum_steps 1, 2, 4")
  p.add_argument("--json", default=None, help="write Part 1's rows here")
  args = p.parse_args(argv)
  logging.set_verbosity(logging.WARNING)
  batches = [int(b) for b in args.batches.split(",")]
  print(f"Part 1: loss + gradients, dim {args.dim}, {jax.device_count()} devices, "
        f"batches {batches}")
  rows = run(batches, args.dim, args.max_run_gib * GiB)
  print(table(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
    print(f"wrote {args.json}")
  if args.accum:
    print("\nPart 2: train step of configs/default.py, temporaries per device")
    print(accumulation_table())
  return rows


if __name__ == "__main__":
  main()
