r"""Train-step throughput and MFU of big_clip against the same model in PyTorch, one run.

    python -m benchmarks.train_step --model clip_vit_b32 --global_batch 32 \
        --patch_dropout 0,0.5,0.75 --dtype float32,bfloat16 --json /tmp/b32.json

One row per (dtype, patch_dropout, attention_impl) configuration, written to --json as a
list as soon as it is measured.

big_clip side: the real step from `big_clip.steps.build` (AOT-compiled, state donated),
synthetic batches already on the device, no host sync in the timed loop except the final
`block_until_ready`. PyTorch side: Hugging Face `transformers.CLIPModel` built from a
`CLIPConfig` with the same widths, depths, heads, MLP, activation, LayerNorm eps, positions
and projection, with `torch.optim.AdamW` (same lr, betas, eps, decay on matrices only) and
global-norm clipping, forward + CLIP loss + backward + step. The parameter counts must match
(ours has one more: the logit bias) or the run stops before timing.

Patch dropout (FLIP): our step drops patches itself (`model.image.patch_dropout`); HF
`CLIPVisionModel` has none, so the peer gets open_clip's `PatchDropout` as a forward hook on
`vision_model.embeddings`: per image the class token plus `max(1, int(N (1 - r)))` patches
picked by `torch.rand(B, N).topk`, before `pre_layrnorm`, i.e. the same tokens count at the
same place. bfloat16: our compute dtype with float32 parameters; the peer runs its forward
under `torch.autocast('cpu', torch.bfloat16)`, the same mixed precision.

Measurements alternate (peak matmul, big_clip, PyTorch) x rounds and report medians, so slow
phases of a shared machine hit both sides. MFU = analytic model FLOP/s (benchmarks/flops.py)
divided by the peak measured in the same run: a large jnp matmul in the compute dtype.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import flops
from big_clip import sharding, steps
from big_clip.models import layers
from configs import clip_vit_b32

MODELS = ("clip_vit_b32", "small")


def model_config(name: str, global_batch: int, dtype: str, scan_layers: bool, remat: bool,
                 patch_dropout: float = 0.0, attention_impl: str = "auto"):
  """configs/clip_vit_b32.py at `global_batch` on this host ('small' shrinks the towers)."""
  if name not in MODELS:
    raise ValueError(f"--model={name!r}; allowed: {', '.join(MODELS)}.")
  c = clip_vit_b32.get_config()
  c.model.update(dtype=dtype, scan_layers=scan_layers, remat=remat,
                 attention_impl=attention_impl)
  c.model.image.patch_dropout = patch_dropout
  if name == "small":  # a 4-layer, 256-wide pair on 64 px / 32 tokens
    c.model.update(embed_dim=256)
    c.model.image.update(image_size=64, patch_size=8, width=256, depth=4, heads=4, mlp_dim=1024)
    c.model.text.update(max_len=32, width=256, depth=4, heads=4, mlp_dim=1024)
  c.data.update(source="embedded", global_batch=global_batch,
                image_size=c.model.image.image_size, max_len=c.model.text.max_len)
  c.mesh.update(data=-1, fsdp=1, tensor=1, multihost="false")
  return c


def synthetic_batch(config, mesh, seed: int = 0) -> dict[str, jax.Array]:
  """Images ~ N(0, 1) and token rows ending in EOS at a random position, on the device."""
  rng = np.random.default_rng(seed)
  gb, size, length = config.data.global_batch, config.data.image_size, config.data.max_len
  t = config.model.text
  tokens = rng.integers(t.eos_id + 1, t.vocab_size, (gb, length)).astype(np.int32)
  eos_at = rng.integers(length // 2, length, gb)
  tokens[np.arange(gb), eos_at] = t.eos_id
  tokens[np.arange(length)[None] > eos_at[:, None]] = t.pad_id
  images = rng.standard_normal((gb, size, size, 3)).astype(np.float32)
  return sharding.place_batch({"image": images, "text": tokens}, mesh)


def peak_matmul_flops(dtype: str, n: int = 2048, reps: int = 4) -> float:
  """FLOP/s of the best of `reps` n x n x n matmuls in `dtype` on the default device."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best


# ---------------------------------------------------------------------------------------------
# big_clip
# ---------------------------------------------------------------------------------------------
class BigClipRunner:

  def __init__(self, config):
    self.config = config
    self.mesh = sharding.make_mesh({a: config.mesh[a] for a in sharding.MESH_AXES})
    self.setup = steps.build(config, self.mesh)
    self.state = self.setup.state
    self.batch = synthetic_batch(config, self.mesh)
    self.n_params = sum(x.size for x in jax.tree.leaves(self.state["params"]))
    cost = self.setup.step.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    self.xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    self.run(1)  # first call: allocations, thread pools

  def run(self, steps: int) -> float:
    """Seconds for `steps` steps; the only host sync is the final block_until_ready."""
    t0 = time.perf_counter()
    state = self.state
    with jax.transfer_guard("disallow"):
      for _ in range(steps):
        state, _ = self.setup.step(state, self.batch)
    jax.block_until_ready(state)
    self.state = state
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# PyTorch peer
# ---------------------------------------------------------------------------------------------
def hf_clip_config(model_cfg):
  from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

  im, tx = model_cfg.image, model_cfg.text
  if model_cfg.activation != "gelu" or im.pool != "cls" or tx.pool != "eos":
    raise ValueError("The PyTorch peer is HF CLIPModel: it needs activation='gelu', "
                     "image.pool='cls' and text.pool='eos'.")
  text = CLIPTextConfig(vocab_size=tx.vocab_size, hidden_size=tx.width,
                        intermediate_size=tx.mlp_dim, num_hidden_layers=tx.depth,
                        num_attention_heads=tx.heads, max_position_embeddings=tx.max_len,
                        hidden_act="gelu", layer_norm_eps=1e-5, eos_token_id=tx.eos_id, bos_token_id=1,
                        pad_token_id=tx.pad_id, projection_dim=model_cfg.embed_dim)
  vision = CLIPVisionConfig(hidden_size=im.width, intermediate_size=im.mlp_dim,
                            num_hidden_layers=im.depth, num_attention_heads=im.heads,
                            image_size=im.image_size, patch_size=im.patch_size,
                            hidden_act="gelu", layer_norm_eps=1e-5,
                            projection_dim=model_cfg.embed_dim)
  return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                    projection_dim=model_cfg.embed_dim)


def torch_patch_dropout(rate: float):
  """open_clip's PatchDropout as a forward hook on HF `CLIPVisionEmbeddings`: keeps the class
  token and a random `max(1, int(N (1 - rate)))` of the N patch tokens per image."""
  import torch

  def hook(module, inputs, tokens):  # tokens [B, 1 + N, W], positions already added
    del module, inputs
    b, n = tokens.shape[0], tokens.shape[1] - 1
    keep = max(1, int(n * (1.0 - rate)))
    idx = torch.rand(b, n).topk(keep, dim=-1).indices + 1
    patches = torch.gather(tokens, 1, idx[..., None].expand(-1, -1, tokens.shape[-1]))
    return torch.cat([tokens[:, :1], patches], dim=1)

  return hook


class TorchRunner:

  def __init__(self, config, batch: dict[str, jax.Array], threads: int):
    import torch
    from transformers import CLIPModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    self.torch = torch
    self.model = CLIPModel(hf_clip_config(config.model)).train()
    rate = float(config.model.image.patch_dropout)
    if rate:
      self.model.vision_model.embeddings.register_forward_hook(torch_patch_dropout(rate))
    self.bf16 = config.model.dtype == "bfloat16"
    self.n_params = sum(p.numel() for p in self.model.parameters())
    o = config.optim
    decay = [p for p in self.model.parameters() if p.ndim >= 2]  # as optim.DECAY_LEAF_NAMES
    rest = [p for p in self.model.parameters() if p.ndim < 2]
    self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                  {"params": rest, "weight_decay": 0.0}],
                                 lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
    self.clip_norm = o.clip_norm
    # NCHW images and int64 ids, as a torch data loader would hand them over.
    self.pixels = torch.from_numpy(np.array(batch["image"])).permute(0, 3, 1, 2).contiguous()
    self.ids = torch.from_numpy(np.asarray(batch["text"]).astype(np.int64))
    self.run(1)

  def run(self, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
      self.opt.zero_grad(set_to_none=True)
      with self.torch.autocast("cpu", dtype=self.torch.bfloat16, enabled=self.bf16):
        out = self.model(input_ids=self.ids, pixel_values=self.pixels, return_loss=True)
      out.loss.backward()
      if self.clip_norm > 0:
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
      self.opt.step()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
def check_same_size(ours: int, theirs: int) -> None:
  """Our TwoTower has a logit_bias (1 scalar) that HF CLIPModel lacks; all else must match."""
  if ours - 1 != theirs:
    raise RuntimeError(f"Parameter counts differ: big_clip {ours} (incl. 1 logit_bias) vs "
                       f"HF CLIPModel {theirs}; the peer is not the same model.")


def benchmark(args, dtype: str, patch_dropout: float, attention_impl: str) -> dict[str, Any]:
  """One row: big_clip and the PyTorch peer at one configuration, alternating."""
  config = model_config(args.model, args.global_batch, dtype, args.scan_layers,
                        args.remat, patch_dropout, attention_impl)
  ours = BigClipRunner(config)
  peer = None if args.no_torch else TorchRunner(config, ours.batch, args.threads)
  if peer is not None:
    check_same_size(ours.n_params, peer.n_params)
  model_flops = flops.train_step_flops(config.model, args.global_batch)

  peaks, ours_s, torch_s = [], [], []
  for _ in range(args.rounds):  # A B A B: a slow phase of the shared machine hits both
    peaks.append(peak_matmul_flops(dtype))
    ours_s.append(ours.run(args.steps) / args.steps)
    if peer is not None:
      torch_s.append(peer.run(args.steps) / args.steps)
  sec = statistics.median(ours_s)
  peak = statistics.median(peaks)
  ex_s = args.global_batch / sec
  torch_ex_s = args.global_batch / statistics.median(torch_s) if torch_s else float("nan")
  return {
      "model": args.model, "global_batch": args.global_batch, "dtype": dtype,
      "patch_dropout": patch_dropout,
      "attention_impl": layers.attention_impl(attention_impl),
      "scan_layers": args.scan_layers, "remat": args.remat,
      "params": int(ours.n_params), "compile_s": ours.setup.compile_seconds,
      "steps_per_s": 1 / sec, "big_clip_examples_per_s": ex_s,
      "torch_examples_per_s": torch_ex_s, "ratio": ex_s / torch_ex_s,
      "model_flops_per_step": model_flops, "xla_flops_per_step": ours.xla_flops,
      "achieved_flops": model_flops / sec, "peak_flops": peak, "mfu": model_flops / sec / peak,
      "devices": jax.device_count(), "threads": args.threads,
      "big_clip_seconds": ours_s, "torch_seconds": torch_s,
  }


def floats(text: str) -> list[float]:
  return [float(x) for x in text.split(",") if x]


def print_row(r: dict[str, Any]) -> None:
  print(f"{r['model']} B={r['global_batch']} {r['dtype']} patch_dropout={r['patch_dropout']} "
        f"attention={r['attention_impl']} scan={r['scan_layers']} remat={r['remat']} "
        f"params={r['params'] / 1e6:.2f}M compile {r['compile_s']:.1f}s")
  print(f"  big_clip {r['big_clip_examples_per_s']:.2f} ex/s ({r['steps_per_s']:.3f} steps/s)"
        f"  torch {r['torch_examples_per_s']:.2f} ex/s  ratio {r['ratio']:.2f}")
  print(f"  model FLOPs/step {r['model_flops_per_step'] / 1e9:.1f} G (XLA cost_analysis "
        f"{r['xla_flops_per_step'] / 1e9:.1f} G)  achieved {r['achieved_flops'] / 1e9:.1f} "
        f"GFLOP/s  peak {r['peak_flops'] / 1e9:.1f} GFLOP/s  MFU {100 * r['mfu']:.1f}%",
        flush=True)


def print_table(rows: list[dict[str, Any]]) -> None:
  cols = ("model", "global_batch", "dtype", "patch_dropout", "attention_impl",
          "big_clip_examples_per_s", "torch_examples_per_s", "ratio", "mfu", "peak_flops")
  print("| " + " | ".join(cols) + " |")
  print("|" + "---|" * len(cols))
  for r in rows:
    cells = [f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols]
    print("| " + " | ".join(cells) + " |")


def main(argv=None) -> list[dict[str, Any]]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="clip_vit_b32", choices=MODELS)
  p.add_argument("--global_batch", type=int, default=16)
  p.add_argument("--dtype", default="float32",
                 help="comma-separated compute dtypes: float32, bfloat16")
  p.add_argument("--patch_dropout", default="0", help="comma-separated FLIP rates, e.g. 0,0.5")
  p.add_argument("--attention_impl", default="auto",
                 help="comma-separated config.model.attention_impl values: auto, xla, einsum")
  # nnx.scan over layers: 15-20% more ex/s than unrolled on CPU for B/32 and a 13 s compile
  # instead of 42 s (benchmarks/RESULTS.md); the pod recipes scan too.
  p.add_argument("--scan_layers", action=argparse.BooleanOptionalAction, default=True)
  p.add_argument("--remat", action=argparse.BooleanOptionalAction, default=False)
  p.add_argument("--steps", type=int, default=2, help="steps per timed round")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--threads", type=int, default=os.cpu_count())
  p.add_argument("--no_torch", action="store_true", help="skip the PyTorch peer")
  p.add_argument("--json", default=None, help="write the result here")
  args = p.parse_args(argv)
  dtypes = args.dtype.split(",")
  for d in dtypes:
    layers.choose(d, layers.DTYPES, "--dtype")
  impls = args.attention_impl.split(",")
  for a in impls:
    layers.choose(a, layers.ATTENTION_IMPLS, "--attention_impl")
  rates = floats(args.patch_dropout)
  if not rates or not all(0.0 <= r < 1.0 for r in rates):
    raise ValueError(f"--patch_dropout={args.patch_dropout!r}; give rates in [0, 1), e.g. 0,0.5.")
  rows = []
  for dtype in dtypes:
    for impl in impls:
      for rate in rates:
        rows.append(benchmark(args, dtype, rate, impl))
        print_row(rows[-1])
        if args.json:  # after every row: a long run killed midway keeps what it measured
          with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
        gc.collect()
  print_table(rows)
  return rows


if __name__ == "__main__":
  main()
