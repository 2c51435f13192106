r"""Expected FLOPs per step and memory per chip for CLIP ViT-B/16 and ViT-L/14 on a v5e-256 pod.

    python -m benchmarks.pod_plan

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

import jax

from benchmarks import flops
from big_clip.models import two_tower
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
  from flax import nnx
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


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--global_batch", type=int, default=32768)
  p.add_argument("--chips", type=int, default=256)
  args = p.parse_args(argv)
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


if __name__ == "__main__":
  main()
