r"""Expected FLOPs per step and memory per chip for CLIP ViT-B/16 and ViT-L/14 on a v5e-256 pod.

    python -m benchmarks.pod_plan                      # the formulas below
    python -m benchmarks.pod_plan --compiled A.json ...  # next to big_clip.plan reports
    python -m benchmarks.pod_plan --compile --recipes siglip_vit_b16 --topology v5e:16x16

The compiled side comes from the TPU compiler (`python -m big_clip.plan --json`, which needs
libtpu): per-chip memory from XLA's buffer assignment and the collectives of the optimized
HLO, per step. Each recipe's formula is printed next to it:

  state       trainable: 16 bytes per parameter (fp32 weights, gradients, Adam mu/nu),
              frozen: its storage dtype; sharded over the fsdp x tensor chips
  all-gather  FSDP gathers every weight for the forward and again for the backward:
              2 passes x P x 2 bytes (bf16) per chip; the compiled/formula ratio says how
              many passes (and in which dtype) the compiler really made
  reduce-scatter  the fp32 gradients, 4 P / fsdp bytes per chip (the scattered result)

Global batch 32k, FSDP over all 256 chips (config.mesh fsdp=-1), bfloat16 compute,
float32 parameters, gradients and Adam moments. FLOPs come from benchmarks/flops.py, the
parameter count from the real model (`jax.eval_shape` of big_clip's TwoTower), memory
from the formulas below (bytes per chip):

  state       (4 params + 4 grads + 8 Adam mu/nu) * P / chips
  gathered    FSDP all-gathers one layer's bf16 weights at a time (x2: the next one is
              prefetched): 2 * 2 * P_layer_max
  act, no remat  per layer and token the backward keeps ~(8 W + 2 M) bf16 values (LN
              inputs/outputs, q, k, v, attention output, residual, fc1 and GELU outputs)
              plus the float32 attention probabilities H * T (XLA attention on TPU; a
              flash kernel keeps only a logsumexp per head): b * T * L * (2 (8W + 2M) + 4 H T)
  act, remat  full-block remat keeps only each block's bf16 input, 2 * W per token and
              layer, plus one block's activations while it is recomputed
  loss        softmax as implemented (local [b, B] logit blocks against all-gathered
              features): 2 * B * E * 4 (gathered features) + 2 * 2 * b * B * 4 (logits and
              their softmax); a naive gathered [B, B] float32 logit matrix would be B^2 * 4;
              sigmoid ring: a [b, b] chunk + send/receive text blocks, 2 * b * b * 4 + 3 b E 4
"""

from __future__ import annotations

import argparse
import importlib
import json

import jax
from flax import nnx

from benchmarks import flops
from big_clip import optim, planning
from big_clip.models import moe, two_tower
from configs import clip_vit_b32

GiB = 2 ** 30
V5E_PEAK_BF16 = 197e12  # FLOP/s per chip
V5E_HBM = 16 * GiB

MODELS = {
    # name: (image tower, text tower, embed_dim); text towers as open_clip's ViT-B-16 / ViT-L-14.
    "ViT-B/16": (dict(patch_size=16, width=768, depth=12, heads=12, mlp_dim=3072),
                 dict(width=512, depth=12, heads=8, mlp_dim=2048), 512),
    "ViT-L/14": (dict(patch_size=14, width=1024, depth=24, heads=16, mlp_dim=4096),
                 dict(width=768, depth=12, heads=12, mlp_dim=3072), 768),
}


def model_config(name: str):
  image, text, embed_dim = MODELS[name]
  c = clip_vit_b32.get_config()
  c.model.update(embed_dim=embed_dim, dtype="bfloat16")
  c.model.image.update(image_size=224, **image)
  c.model.text.update(max_len=77, **text)
  return c


def count_params(config) -> int:
  abstract = jax.eval_shape(two_tower.init_fn(config.model, config.seed))
  return sum(x.size for x in jax.tree.leaves(nnx.state(abstract)))


def plan(name: str, global_batch: int, chips: int) -> dict[str, float]:
  c = model_config(name)
  b = global_batch // chips
  n_params = count_params(c)
  image, text = flops.towers(c.model)
  e = c.model.embed_dim
  step_flops = flops.train_step_flops(c.model, global_batch)

  def act(tower, heads, remat):
    t, w, m, depth = tower.tokens, tower.width, tower.mlp_dim, tower.depth
    one_layer = b * t * (2 * (8 * w + 2 * m) + 4 * heads * t)
    return (b * t * depth * 2 * w + one_layer) if remat else depth * one_layer

  heads = (c.model.image.heads, c.model.text.heads)
  layer_params = max(12 * tw.width ** 2 for tw in (image, text))  # 4 W^2 + 2 W M, M = 4 W
  return {
      "params_M": n_params / 1e6,
      "tflop_per_step": step_flops / 1e12,
      "step_s_at_50pct": step_flops / (chips * V5E_PEAK_BF16 * 0.5),
      "state_GiB": 16 * n_params / chips / GiB,
      "gathered_GiB": 2 * 2 * layer_params / GiB,
      "act_GiB": sum(act(t, h, False) for t, h in zip((image, text), heads)) / GiB,
      "act_remat_GiB": sum(act(t, h, True) for t, h in zip((image, text), heads)) / GiB,
      "loss_softmax_GiB": (2 * global_batch * e * 4 + 2 * 2 * b * global_batch * 4) / GiB,
      "loss_gathered_BxB_GiB": global_batch ** 2 * 4 / GiB,
      "loss_sigmoid_ring_GiB": (2 * b * b * 4 + 3 * b * e * 4) / GiB,
  }


def moe_plan(name: str, global_batch: int, chips: int, experts: int = 8, top_k: int = 2,
             every_n_layers: int = 2, capacity_factor: float = 1.25,
             expert_axis: int = 8) -> dict[str, float]:
  """Both towers of `name` with MoE MLPs (configs/clip_moe.py's settings). Activated
  parameters: those one token meets (top_k of the experts of each MoE layer, the router);
  all-to-all: the bf16 expert buffers [E, b, C, W] each MoE layer exchanges per chip,
  twice forward (dispatch, combine) and twice backward, the (n-1)/n that leave a chip
  over an expert axis of n."""
  c = model_config(name)
  dense_params = count_params(c)
  c.model.scan_layers = False  # two block types (configs/clip_moe.py)
  for tower in ("image", "text"):
    c.model[tower].moe.update(experts=experts, top_k=top_k, every_n_layers=every_n_layers,
                              capacity_factor=capacity_factor)
  total = count_params(c)
  b = global_batch // chips
  inactive, a2a = 0, 0.0
  for tower in flops.towers(c.model):
    t, w, m = tower.tokens, tower.width, tower.mlp_dim
    layers_moe = tower.depth // every_n_layers
    inactive += layers_moe * (experts - top_k) * (2 * w * m + w + m)
    capacity = moe.MoeConfig(experts=experts, top_k=top_k,
                             capacity_factor=capacity_factor).capacity(t)
    a2a += layers_moe * 4 * experts * capacity * b * w * 2 * (expert_axis - 1) / expert_axis
  return {"dense_params_M": dense_params / 1e6, "total_params_M": total / 1e6,
          "activated_params_M": (total - inactive) / 1e6, "all_to_all_GiB": a2a / GiB,
          "state_GiB": 16 * total / chips / GiB}


RECIPES = ("clip_vit_b32", "siglip_vit_b16", "longclip_finetune", "llm2clip")


def recipe_config(name: str, overrides: list[str] = ()):
  """Recipe `name`'s config (an 8B LLM tower for llm2clip) with KEY=VALUE `overrides`."""
  c = importlib.import_module(f"configs.{name}").get_config()
  if name == "llm2clip":  # a Llama-3-8B-sized tower without the weights folder
    c.model.text.update(width=4096, depth=32, heads=32, mlp_dim=14336, vocab_size=128256)
    c.model.text.llm.update(path="", cache_dir="", kv_heads=8)  # the frozen LLM runs live
  for item in overrides:
    key, _, value = item.partition("=")
    *sections, leaf = key.split(".")
    target = c
    for part in sections:
      target = target[part]
    old = target[leaf]
    target[leaf] = (value.lower() in ("1", "true")) if isinstance(old, bool) else type(old)(value)
  return c


def recipe_formulas(c, chips: int) -> dict[str, float]:
  """The formulas of the module docstring for recipe config `c` on `chips` chips."""
  abstract = jax.eval_shape(two_tower.init_fn(c.model, c.seed))
  state = nnx.to_pure_dict(nnx.state(abstract))
  trainable, frozen = optim.partition(state, optim.trainable_mask(abstract))
  size = lambda t: sum(x.size for x in jax.tree.leaves(t))
  nbytes = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))
  shards = chips // max(1, c.mesh.data if c.mesh.data > 0 else 1)
  p_train = size(trainable)
  return {
      "params_M": size(state) / 1e6,
      "trainable_M": p_train / 1e6,
      "state_GiB": (16 * p_train + nbytes(frozen)) / shards / GiB,
      "all_gather_GiB": 2 * 2 * p_train / GiB,
      "reduce_scatter_GiB": 4 * p_train / shards / GiB,
  }


def compiled_table(reports: list[dict]) -> None:
  cols = ("recipe", "topology", "mesh", "batch/chip", "params M (trainable)",
          "args GiB", "temps GiB", "total GiB (HBM)", "state formula GiB",
          "all-gather GiB: compiled / formula", "reduce-scatter GiB: compiled / formula",
          "all-reduce GiB", "TFLOP/chip: HLO / analytic")
  print("| " + " | ".join(cols) + " |")
  print("|---" * len(cols) + "|")
  for r in reports:
    c = recipe_config(r["recipe"], r.get("overrides", ()))
    f = recipe_formulas(c, r["chips"])
    m, coll = r["per_chip_bytes"], r["collectives"]
    dp = r["mesh"]["data"] * r["mesh"]["fsdp"] * r["mesh"].get("expert", 1)
    try:
      analytic = f"{flops.train_step_flops(c.model, r['global_batch']) / r['chips'] / 1e12:.3g}"
    except Exception:  # noqa: BLE001 - an LLM tower has no analytic count here
      analytic = "-"
    g = lambda b: f"{b / GiB:.2f}"
    mesh = "x".join(f"{k[0]}{v}" for k, v in r["mesh"].items() if v > 1)
    recipe = " ".join([r["recipe"], *r.get("overrides", ())])
    print(f"| {recipe} | {r['topology']} | {mesh} | {r['global_batch'] // dp} | "
          f"{f['params_M']:.0f} ({f['trainable_M']:.0f}) | {g(m['arguments'])} | "
          f"{g(m['temporaries'])} | {g(m['total'])} ({r['hbm_bytes'] / GiB:.0f}) | "
          f"{f['state_GiB']:.3f} | {g(coll['all-gather']['bytes'])} / "
          f"{f['all_gather_GiB']:.2f} | {g(coll['reduce-scatter']['bytes'])} / "
          f"{f['reduce_scatter_GiB']:.3f} | {g(coll['all-reduce']['bytes'])} | "
          f"{r['flops_per_chip'] / 1e12:.3g} / {analytic} |")


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--global_batch", type=int, default=32768)
  p.add_argument("--chips", type=int, default=256)
  p.add_argument("--compiled", nargs="*", default=None,
                 help="reports written by --compile --out, to tabulate again")
  p.add_argument("--compile", action="store_true", help="compile --recipes for --topology now")
  p.add_argument("--recipes", default=",".join(RECIPES))
  p.add_argument("--topology", default="v5e:16x16")
  p.add_argument("--out", default=None, help="with --compile: write the reports here (JSON)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="with --compile: override a config key of every recipe (repeatable), "
                      "e.g. --set mesh.data=16 --set mesh.fsdp=16 to compare mesh splits")
  args = p.parse_args(argv)
  if args.compile or args.compiled is not None:
    reports = []
    for path in args.compiled or ():
      with open(path) as fh:
        reports.extend(json.load(fh))
    if args.compile:
      for name in args.recipes.split(","):
        c = recipe_config(name, args.set)
        reports.append({"recipe": name, "overrides": list(args.set), **planning.compile_plan(
            c, args.topology, with_eval=False,
            hlo_path=f"{args.out}.{name}.hlo" if args.out else None)})
        print(planning.describe(reports[-1]), flush=True)
        if args.out:  # after each recipe: a pod recipe takes minutes to compile
          with open(args.out, "w") as fh:
            json.dump(reports, fh, indent=1)
    compiled_table(reports)
    return
  cols = ("params_M", "tflop_per_step", "step_s_at_50pct", "state_GiB", "gathered_GiB",
          "act_GiB", "act_remat_GiB", "loss_softmax_GiB", "loss_gathered_BxB_GiB",
          "loss_sigmoid_ring_GiB")
  print(f"v5e-{args.chips}, global batch {args.global_batch} "
        f"({args.global_batch // args.chips} per chip), FSDP, bf16 compute, fp32 params + Adam;"
        f" {V5E_HBM / GiB:.0f} GiB HBM and {V5E_PEAK_BF16 / 1e12:.0f} TFLOP/s bf16 per chip")
  print("| model | " + " | ".join(cols) + " | total no remat / remat (GiB) |")
  print("|---" * (len(cols) + 2) + "|")
  for name in MODELS:
    r = plan(name, args.global_batch, args.chips)
    base = r["state_GiB"] + r["gathered_GiB"] + r["loss_softmax_GiB"]
    print(f"| {name} | " + " | ".join(f"{r[k]:.3g}" for k in cols)
          + f" | {base + r['act_GiB']:.1f} / {base + r['act_remat_GiB']:.1f} |")
  print(f"\nMoE (configs/clip_moe.py): both towers, 8 experts every 2nd block, top-2, capacity "
        f"1.25, expert axis 8 (fsdp {args.chips // 8}); all-to-all per chip per step")
  cols = ("dense_params_M", "total_params_M", "activated_params_M", "all_to_all_GiB",
          "state_GiB")
  print("| model | " + " | ".join(cols) + " |")
  print("|---" * (len(cols) + 1) + "|")
  r = moe_plan("ViT-B/16", args.global_batch, args.chips)
  print("| ViT-B/16 MoE | " + " | ".join(f"{r[k]:.3g}" for k in cols) + " |")


if __name__ == "__main__":
  main()
