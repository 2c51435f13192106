r"""Per-device memory and time of the contrastive losses against a naive all-gather baseline,
and the memory of a train step with batch accumulation.

  python benchmarks/loss_memory.py --json /tmp/loss_memory.json   # sets 8 fake CPU devices

Part 1: for each global batch (default 4096, 8192, 16384, 32768) and embedding width 512 on
8 devices (mesh data=8), loss + gradients w.r.t. both embeddings of

  naive             every device all-gathers both sides and computes the full B x B logits
                    and the whole loss (open_clip's `gather_with_grad` pattern); the result
                    is averaged over devices, so the gradients are exact but every device
                    holds B^2
  softmax           big_clip's softmax: image blocks around a ppermute ring, logits formed
                    tile x tile inside each device (Inf-CL), custom VJP
  sigmoid           big_clip's SigLIP loss, tiled the same way
  softmax:gathered  the softmax before in-device tiling: all-gathered B x D keys, b x 2048
                    logits blocks (loss_baselines.py)
  sigmoid:block     the sigmoid before in-device tiling: one b x b block per ring step
  grouped:G         M2-Encoder grouped aggregation (softmax in groups of G devices)

Memory is XLA's `memory_analysis().temp_size_in_bytes` of the compiled program (per device:
the program is SPMD). Seconds are one execution of the AOT-compiled program on random unit
embeddings after compilation (the 8 "devices" share this host's cores, so they add up to
the work of all devices). A case is run only up to `--max_run_batch` (the million-example
batches take hours of CPU) and if its buffers fit this host (`--max_run_gib`); otherwise
it is compiled only and its seconds are null. Before timing, every loss is checked equal
(value and gradients) to its peer at a small batch: naive and softmax:gathered to softmax,
sigmoid:block to sigmoid.

Part 2 (`--accum`, default on) compiles the train step of configs/default.py with
loss.accum_steps = 1, 2, 4 (same global batch) and prints its temporaries per device.

`--json PATH` writes Part 1's rows: a list of objects with keys `loss`, `global_batch`,
`devices`, `temp_bytes`, `seconds` (and `group_size`, `dim`).

  python benchmarks/loss_memory.py --batches 131072,524288,1048576 --no-accum   # compile only
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
from benchmarks import loss_baselines  # noqa: E402
from big_clip.losses import grouped, shared  # noqa: E402

MiB = 2**20
GiB = 2**30


def naive_loss(img, txt, scale, bias=None, *, mesh):
  """The baseline: all-gather both sides, the full B x B softmax loss on every device."""
  del bias

  def body(i, t, s):
    i_all = jax.lax.all_gather(i, sharding.BATCH_AXES, tiled=True)  # [B, D]
    t_all = jax.lax.all_gather(t, sharding.BATCH_AXES, tiled=True)
    logits = shared.logits_block(i_all, t_all, s, jnp.float32(0.0))  # [B, B]
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
      ("softmax:gathered", None, loss_baselines.softmax_gathered),
      ("sigmoid", None, losses.get("sigmoid")),
      ("sigmoid:block", None, loss_baselines.sigmoid_block),
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


# Each loss and the loss whose value and gradients it must reproduce.
PEERS = {"naive": "softmax", "softmax:gathered": "softmax", "sigmoid:block": "sigmoid"}


def check_peers_are_exact(mesh, global_batch: int = 64, dim: int = 16) -> None:
  """The baselines must be the same losses: value and gradients equal big_clip's."""
  args = _inputs(global_batch, dim, mesh, seed=1)
  fns = {name: fn for name, _, fn in cases()}
  out = {name: jax.device_get(compile_case(fns[name], mesh, global_batch, dim)(*args))
         for name in {*PEERS, *PEERS.values()}}
  for name, peer in PEERS.items():
    np.testing.assert_allclose(out[name][0], out[peer][0], rtol=1e-5, err_msg=name)
    for a, b in zip(out[name][1], out[peer][1]):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7, err_msg=name)


def host_memory_bytes() -> int:
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def run(batches, dim: int, max_run_bytes: float, max_run_batch: int,
        only: set[str] | None = None) -> list[dict[str, Any]]:
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  n = sharding.data_parallel_size(mesh)
  check_peers_are_exact(mesh)
  rows = []
  for global_batch in batches:
    for name, group, fn in cases():
      if only and name not in only:
        continue
      compiled = compile_case(fn, mesh, global_batch, dim)
      temp = int(compiled.memory_analysis().temp_size_in_bytes)
      # Everything the n devices hold at once on this host: temporaries + inputs + grads.
      need = n * temp + 4 * global_batch * dim * 4
      seconds = None
      if need <= max_run_bytes and global_batch <= max_run_batch:
        args = _inputs(global_batch, dim, mesh)
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        seconds = time.perf_counter() - t0
        del args
      row = dict(loss=name, global_batch=global_batch, devices=n, temp_bytes=temp,
                 seconds=seconds, group_size=group, dim=dim)
      rows.append(row)
      shown = f"{seconds:.2f} s" if seconds is not None else (
          "not run (needs %.1f GiB here)" % (need / GiB) if need > max_run_bytes
          else f"not run (batch > --max_run_batch {max_run_batch})")
      print(f"  {name:16s} B={global_batch:7d}  temp {temp / MiB:12.1f} MiB/device  {shown}",
            flush=True)
      del compiled
  return rows


def table(rows: list[dict[str, Any]]) -> str:
  """Markdown: one line per (batch, loss), with memory and time relative to the naive and
  the global softmax rows of the same batch."""
  lines = ["| global batch | loss | temp MiB / device | vs naive | seconds (loss + grads) "
           "| speed vs softmax |", "| --- | --- | --- | --- | --- | --- |"]
  by = {(r["global_batch"], r["loss"]): r for r in rows}
  missing = {"temp_bytes": None, "seconds": None}
  for r in rows:
    naive = by.get((r["global_batch"], "naive"), missing)
    soft = by.get((r["global_batch"], "softmax"), missing)
    ratio = ("—" if naive["temp_bytes"] is None
             else f"1/{naive['temp_bytes'] / max(r['temp_bytes'], 1):.1f}")
    sec = "—" if r["seconds"] is None else f"{r['seconds']:.2f}"
    speed = ("—" if r["seconds"] is None or soft["seconds"] is None
             else f"{soft['seconds'] / r['seconds']:.2f}×")
    lines.append(f"| {r['global_batch']} | {r['loss']} | {r['temp_bytes'] / MiB:.1f} | "
                 f"{ratio} | {sec} | {speed} |")
  return "\n".join(lines)


def before_after_table(rows: list[dict[str, Any]]) -> str:
  """Markdown: the tiled losses against their pre-tiling peers of the same run."""
  lines = ["| global batch | loss | temp MiB / device, tiled | before | seconds, tiled | before "
           "| speed-up |", "| --- | --- | --- | --- | --- | --- | --- |"]
  by = {(r["global_batch"], r["loss"]): r for r in rows}
  for (batch, name), r in by.items():
    before = by.get((batch, {"softmax": "softmax:gathered", "sigmoid": "sigmoid:block"}
                     .get(name)))
    if before is None:
      continue
    sec = lambda x: "—" if x["seconds"] is None else f"{x['seconds']:.2f}"
    speed = ("—" if r["seconds"] is None or before["seconds"] is None
             else f"{before['seconds'] / r['seconds']:.2f}×")
    lines.append(f"| {batch} | {name} | {r['temp_bytes'] / MiB:.1f} | "
                 f"{before['temp_bytes'] / MiB:.1f} | {sec(r)} | {sec(before)} | {speed} |")
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
  p.add_argument("--max_run_batch", type=int, default=32768,
                 help="run (time) only batches up to this; larger ones are compiled only")
  p.add_argument("--losses", default="",
                 help="comma-separated subset of the cases (default: all)")
  p.add_argument("--accum", action=argparse.BooleanOptionalAction, default=True,
                 help="Part 2: train-step memory with loss.accum_steps 1, 2, 4")
  p.add_argument("--json", default=None, help="write Part 1's rows here")
  args = p.parse_args(argv)
  logging.set_verbosity(logging.WARNING)
  batches = [int(b) for b in args.batches.split(",")]
  print(f"Part 1: loss + gradients, dim {args.dim}, {jax.device_count()} devices, "
        f"batches {batches}")
  only = {name for name in args.losses.split(",") if name}
  unknown = only - {name for name, _, _ in cases()}
  if unknown:
    p.error(f"--losses {sorted(unknown)} unknown; pick from {[n for n, _, _ in cases()]}")
  rows = run(batches, args.dim, args.max_run_gib * GiB, args.max_run_batch, only)
  print(table(rows))
  print("\nTiled losses vs before (same run)")
  print(before_after_table(rows))
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
