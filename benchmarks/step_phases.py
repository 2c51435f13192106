r"""Where a train step's time goes: forward, backward and optimizer, big_clip vs PyTorch.

    python -m benchmarks.step_phases --model clip_vit_b32 --global_batch 32 --json /tmp/p.json

The model and peer of benchmarks/train_step.py (same config, same synthetic batch, same
AdamW), timed in three nested programs per side:

  forward     loss of the batch (big_clip: jitted model + loss; PyTorch: `CLIPModel(...,
              return_loss=True)` with autograd recording, as in training)
  fwd+bwd     the loss and its gradients (big_clip: `jax.value_and_grad`; PyTorch:
              `.backward()` after zeroing the gradients)
  step        the whole train step (big_clip: `steps.build`'s compiled step, state donated;
              PyTorch: fwd+bwd + grad-norm clipping + `AdamW.step`)

so backward = fwd+bwd - forward and optimizer = step - fwd+bwd on each side. Each phase's
GFLOP/s uses the analytic matmul FLOPs (benchmarks/flops.py: the forward is 1/3 of the
step's). Rounds alternate the sides; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import jax
from flax import nnx

from benchmarks import flops
from benchmarks import train_step as ts
from big_clip import losses

PHASES = ("forward", "fwd+bwd", "step")


def big_clip_programs(runner: ts.BigClipRunner) -> dict[str, Any]:
  """Phase name -> a no-argument callable that runs it once and waits."""
  config, setup, batch = runner.config, runner.setup, runner.batch
  loss_fn = losses.from_config(config.loss)

  def loss(params):
    model = nnx.merge(setup.graphdef, params)
    img, txt, _ = model.forward(batch["image"], batch["text"], None)
    scale, bias = model.scale_and_bias()
    return loss_fn(img, txt, scale, bias, mesh=runner.mesh)

  fwd = jax.jit(loss)
  fwd_bwd = jax.jit(jax.value_and_grad(loss))
  # The step donates the state: read the params anew at each call.
  return {"forward": lambda: jax.block_until_ready(fwd(runner.state["params"])),
          "fwd+bwd": lambda: jax.block_until_ready(fwd_bwd(runner.state["params"])),
          "step": lambda: runner.run(1)}


def torch_programs(peer: ts.TorchRunner) -> dict[str, Any]:
  model, opt = peer.model, peer.opt

  def forward():
    return model(input_ids=peer.ids, pixel_values=peer.pixels, return_loss=True).loss

  def fwd_bwd():
    opt.zero_grad(set_to_none=True)
    forward().backward()

  return {"forward": forward, "fwd+bwd": fwd_bwd, "step": lambda: peer.run(1)}


def timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def measure(args) -> dict[str, Any]:
  config = ts.model_config(args.model, args.global_batch, "float32", args.scan_layers, False)
  runner = ts.BigClipRunner(config)
  peer = ts.TorchRunner(config, runner.batch, args.threads)
  ts.check_same_size(runner.n_params, peer.n_params)
  sides = {"big_clip": big_clip_programs(runner), "torch": torch_programs(peer)}
  for progs in sides.values():  # compile / warm up every program once
    for fn in progs.values():
      fn()
  seconds = {s: {p: [] for p in PHASES} for s in sides}
  peaks = []
  for _ in range(args.rounds):
    peaks.append(ts.peak_matmul_flops("float32"))
    for phase in PHASES:  # the two sides back to back per phase: same machine weather
      for side, progs in sides.items():
        seconds[side][phase].append(timed(progs[phase]))
  step_flops = flops.train_step_flops(config.model, args.global_batch)
  forward_flops = step_flops / 3
  row = {"model": args.model, "global_batch": args.global_batch, "scan_layers": args.scan_layers,
         "peak_flops": statistics.median(peaks), "model_flops_per_step": step_flops,
         "seconds": seconds}
  for side in sides:
    med = {p: statistics.median(v) for p, v in seconds[side].items()}
    row[side] = {
        "forward_s": med["forward"], "backward_s": med["fwd+bwd"] - med["forward"],
        "optimizer_s": med["step"] - med["fwd+bwd"], "step_s": med["step"],
        "forward_gflops": forward_flops / med["forward"] / 1e9,
        "backward_gflops": 2 * forward_flops / (med["fwd+bwd"] - med["forward"]) / 1e9,
    }
  return row


def print_row(r: dict[str, Any]) -> None:
  print(f"{r['model']} batch {r['global_batch']} fp32, scan_layers={r['scan_layers']}; matmul peak "
        f"{r['peak_flops'] / 1e9:.0f} GFLOP/s; model {r['model_flops_per_step'] / 1e9:.0f} "
        "GFLOP/step (forward 1/3, backward 2/3)")
  print("| side | forward s (GFLOP/s) | backward s (GFLOP/s) | optimizer s | step s |")
  print("|---|---|---|---|---|")
  for side in ("big_clip", "torch"):
    s = r[side]
    print(f"| {side} | {s['forward_s']:.2f} ({s['forward_gflops']:.0f}) | "
          f"{s['backward_s']:.2f} ({s['backward_gflops']:.0f}) | {s['optimizer_s']:.2f} | "
          f"{s['step_s']:.2f} |")
  b, t = r["big_clip"], r["torch"]
  print(f"big_clip / torch time: forward {b['forward_s'] / t['forward_s']:.2f}x, backward "
        f"{b['backward_s'] / t['backward_s']:.2f}x, optimizer "
        f"{b['optimizer_s'] / max(t['optimizer_s'], 1e-9):.2f}x, step "
        f"{b['step_s'] / t['step_s']:.2f}x", flush=True)


def main(argv=None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="clip_vit_b32", choices=ts.MODELS)
  p.add_argument("--global_batch", type=int, default=32)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--scan_layers", action=argparse.BooleanOptionalAction, default=True)
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
  p.add_argument("--json", default=None, help="write the row here")
  args = p.parse_args(argv)
  row = measure(args)
  print_row(row)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(row, f, indent=2)
  return row


if __name__ == "__main__":
  main()
