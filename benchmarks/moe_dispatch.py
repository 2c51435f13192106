r"""MoE dispatch: `moe.dispatch='einsum'` (GSPMD) vs 'all_to_all' (shard_map), models/moe.py.

One MoE MLP layer, forward + backward, on a (data x expert) mesh: the compiled per-device
temporary memory, the collectives in the optimized HLO, and the time per call.
'einsum' lets XLA insert the exchange from the sharding constraints of the expert buffers;
'all_to_all' routes each device's examples and exchanges the expert buffers with explicit
`jax.lax.all_to_all` over `expert`; 'dense' is the dense MLP of the same width for scale.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.moe_dispatch
"""

from __future__ import annotations

import argparse
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from big_clip import sharding
from big_clip.models import layers, moe


COLLECTIVES = ("all-to-all", "all-gather", "all-reduce", "collective-permute")


def measure(kind: str, mesh, args) -> dict:
  cfg = layers.TransformerConfig(width=args.width, depth=12, heads=4, mlp_dim=args.mlp_dim)
  moe_cfg = moe.MoeConfig(experts=args.experts, top_k=args.top_k,
                          capacity_factor=args.capacity_factor,
                          dispatch="einsum" if kind == "dense" else kind)
  module = (layers.MLP(cfg, rngs=nnx.Rngs(0)) if kind == "dense"
            else moe.MoeMLP(cfg, moe_cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(module)
  shardings = sharding.state_shardings(state, mesh)
  state = jax.device_put(state, shardings)
  x = jax.device_put(
      jnp.asarray(np.random.default_rng(0).normal(size=(args.batch, args.tokens, args.width)),
                  jnp.float32), NamedSharding(mesh, P(sharding.BATCH_AXES)))
  loss = lambda s, x: jnp.sum(nnx.merge(graphdef, s)(x) ** 2)
  with jax.set_mesh(mesh):
    fn = jax.jit(jax.grad(loss))
    compiled = fn.lower(state, x).compile()
    hlo = compiled.as_text()
    jax.block_until_ready(compiled(state, x))
    t0 = time.perf_counter()
    for _ in range(args.repeats):
      jax.block_until_ready(compiled(state, x))
  mem = compiled.memory_analysis()
  return {"kind": kind, "temp_MiB": mem.temp_size_in_bytes / 2**20,
          **{op: len(re.findall(rf" {op}(-start)?\(", hlo)) for op in COLLECTIVES},
          "ms": 1e3 * (time.perf_counter() - t0) / args.repeats}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--tokens", type=int, default=64)
  p.add_argument("--width", type=int, default=128)
  p.add_argument("--mlp_dim", type=int, default=512)
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--top_k", type=int, default=2)
  p.add_argument("--capacity_factor", type=float, default=1.25)
  p.add_argument("--expert_axis", type=int, default=2)
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args()
  mesh = sharding.make_mesh({"data": -1, "expert": args.expert_axis})
  print(f"mesh {dict(mesh.shape)}; batch {args.batch} x {args.tokens} tokens, width "
        f"{args.width}, mlp {args.mlp_dim}, {args.experts} experts, top-{args.top_k}, "
        f"capacity factor {args.capacity_factor}")
  print(f"{'kind':10s} {'temp MiB':>9s} {'ms/call':>8s} " + " ".join(COLLECTIVES))
  for kind in ("dense", "einsum", "all_to_all"):
    r = measure(kind, mesh, args)
    print(f"{r['kind']:10s} {r['temp_MiB']:9.2f} {r['ms']:8.1f} "
          + " ".join(f"{r[op]:{len(op)}d}" for op in COLLECTIVES))


if __name__ == "__main__":
  main()
