r"""Transformer blocks forward and forward + backward with each attention implementation.

    python -m benchmarks.attention --tower image --batch 32 --depth 2

Runs `depth` real `layers.Block`s of the ViT-B/32 image tower (50 tokens, width 768, 12
heads) or text tower (77 causal tokens, width 512, 8 heads) with the same parameters under
`config.model.attention_impl` = 'xla' (jax.nn.dot_product_attention) and 'einsum'
(layers.einsum_attention), alternating the two in every round so that a busy machine slows
both alike, and reports medians and GFLOP/s of the block matmuls (benchmarks/flops.py).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks import flops
from big_clip.models import layers

TOWERS = {"image": dict(tokens=50, width=768, heads=12, causal=False),
          "text": dict(tokens=77, width=512, heads=8, causal=True)}


def blocks(impl: str, tower: str, depth: int) -> nnx.List:
  t = TOWERS[tower]
  cfg = layers.TransformerConfig(width=t["width"], depth=depth, heads=t["heads"],
                                 mlp_dim=4 * t["width"], attention=impl)
  return layers.make_blocks(cfg, rngs=nnx.Rngs(0))


def timed(fn, *args, rounds: int) -> list[float]:
  jax.block_until_ready(fn(*args))
  out = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    out.append(time.perf_counter() - t0)
  return out


def main(argv=None) -> dict[str, dict[str, float]]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tower", default="image", choices=tuple(TOWERS))
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--depth", type=int, default=2)
  p.add_argument("--rounds", type=int, default=5)
  args = p.parse_args(argv)
  t = TOWERS[args.tower]
  x = jax.random.normal(jax.random.key(0), (args.batch, t["tokens"], t["width"]))

  def loss(stack, x):
    return jnp.sum(layers.apply_blocks(stack, x, remat=False, causal=t["causal"])[0] * x)

  fns = {}
  for impl in ("xla", "einsum"):
    stack = blocks(impl, args.tower, args.depth)
    fns[impl] = (nnx.jit(loss), nnx.jit(nnx.grad(loss, argnums=(0, 1))), stack)
  times = {impl: {"fwd": [], "fwd_bwd": []} for impl in fns}
  for _ in range(args.rounds):  # alternate: a slow phase of a shared machine hits both
    for impl, (fwd, grad, stack) in fns.items():
      times[impl]["fwd"] += timed(fwd, stack, x, rounds=1)
      times[impl]["fwd_bwd"] += timed(grad, stack, x, rounds=1)
  per_block = args.batch * flops.Tower(tokens=t["tokens"], width=t["width"], depth=1,
                                       mlp_dim=4 * t["width"], extra_forward=0).forward()
  rows = {}
  for impl, ts in times.items():
    fwd, both = statistics.median(ts["fwd"]), statistics.median(ts["fwd_bwd"])
    rows[impl] = dict(fwd_s=fwd, fwd_bwd_s=both,
                      fwd_gflops=args.depth * per_block / fwd / 1e9,
                      fwd_bwd_gflops=3 * args.depth * per_block / both / 1e9)
    print(f"{args.tower} B={args.batch} depth={args.depth} {impl:6s} forward {fwd * 1e3:7.1f} ms "
          f"({rows[impl]['fwd_gflops']:.1f} GFLOP/s)  forward+backward {both * 1e3:7.1f} ms "
          f"({rows[impl]['fwd_bwd_gflops']:.1f} GFLOP/s)", flush=True)
  print(f"einsum / xla forward+backward time: "
        f"{rows['einsum']['fwd_bwd_s'] / rows['xla']['fwd_bwd_s']:.3f}")
  return rows


if __name__ == "__main__":
  main()
