r"""Does LLM2CLIP's caption-contrastive (CC) stage help the adapter? Adapter-only training on
the features of the raw LLM against the features of the CC-tuned LLM, at equal steps.

The chain of docs/llm-towers.md on the embedded data, with a tiny random-init Llama
(tools/make_tiny_llm.py) and the image tower of the embedded default run:

  1. CC stage (configs/llm2clip_cc.py:local, `--cc_steps` steps, batch 64): LoRA (rank
     `--cc_lora_rank`, all seven projections) on the frozen LLM, bidirectional attention,
     + MNTP; a caption in any of the nine languages
     against an English caption of the same image (multilingual CC).
  2. tools/export_llm.py: the LLM with its LoRA merged.
  3. tools/cache_text_embeddings.py: mean-pooled features of every embedded caption and
     zero-shot prompt, once from the raw LLM (causal, as released) and once from the CC LLM
     (bidirectional, as trained).
  4. Adapter only (configs/llm2clip.py:local_cc): the default run's image tower loaded and
     frozen (`optim.freeze=('image',)`), a fresh MLP adapter (and logit scale) trained for
     `--adapter_steps` steps on each cache, on English captions only and on all nine
     languages, `--seeds` seeds each; then zero-shot colour / shape per language on 600
     held-out images.

  python -m big_clip.train --config configs/default.py --workdir /tmp/big_clip_default
  python benchmarks/llm2clip_cc_proof.py --clip /tmp/big_clip_default --out /tmp/llm2clip_proof

What a tiny model can show: whether CC makes the frozen LLM's caption features easier for an
adapter to align (more accuracy at equal steps) and whether multilingual CC carries an
English-only adapter to the other languages. Not LLM2CLIP's world knowledge: the LLM is
random-init, so everything it knows it learned in the CC stage from these captions.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from big_clip import train  # noqa: E402
from big_clip.data import embedded  # noqa: E402
from big_clip.evals import records  # noqa: E402

LANGUAGES = embedded.EMBEDDED_LANGUAGES


def _config(name: str, arg: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _run(*command: str) -> None:
  print("+", " ".join(command), flush=True)
  subprocess.run([sys.executable, *command], cwd=ROOT, check=True)


def cc_stage(llm: str, workdir: str, steps: int, batch: int, lora_rank: int) -> None:
  c = _config("llm2clip_cc", "local")
  c.total_steps, c.log_every = steps, max(1, steps // 10)
  # LoRA on all seven projections, as the pod recipe (the :local config trains three).
  c.model.text.llm.update(path=llm, lora_rank=lora_rank, lora_alpha=2.0 * lora_rank,
                          lora_targets=_config("llm2clip_cc", None).model.text.llm.lora_targets)
  c.data.update(global_batch=batch, languages={lang: 1.0 for lang in LANGUAGES})
  c.optim.update(warmup_steps=max(2, steps // 20))
  c.checkpoint.every_steps = steps
  train.train(c, workdir)


def adapter(clip: str, llm: str, cache: str, attention: str, languages: list[str],
            steps: int, batch: int, seed: int, workdir: str) -> dict[str, float]:
  """Adapter-only training on `cache`; zero-shot accuracy per language after `steps`."""
  with open(os.path.join(clip, "config.json")) as f:
    clip_model = json.load(f)["model"]
  c = _config("llm2clip", "local_cc")
  c.model.update(embed_dim=clip_model["embed_dim"], activation=clip_model["activation"])
  c.model.image.update(**{k: clip_model["image"][k] for k in (
      "image_size", "patch_size", "width", "depth", "heads", "mlp_dim", "pool")})
  c.model.text.llm.update(path=llm, cache_dir=cache, attention=attention, lora_rank=0,
                          adapter_hidden=4 * clip_model["embed_dim"])
  c.init_from, c.init_only = f"big_clip:{clip}", ("image",)
  c.optim.freeze = ("image",)
  c.optim.update(lr=1e-3, warmup_steps=max(1, steps // 10))
  c.data.update(global_batch=batch, image_size=clip_model["image"]["image_size"],
                languages={lang: 1.0 for lang in languages})
  c.seed = seed  # the adapter's init and the batches
  c.total_steps, c.log_every = steps, max(1, steps // 5)
  c.eval.update(every_steps=steps, num_images=600)
  c.checkpoint.update(every_steps=steps, use_async=False)
  c.evals = (f"zeroshot:embedded,languages={'+'.join(LANGUAGES)}",)
  out = train.train(c, workdir)
  return records.records_to_scalars(out["eval"])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--clip", required=True, help="the embedded default run (image tower)")
  parser.add_argument("--out", required=True, help="folder for every stage's output")
  parser.add_argument("--cc_steps", type=int, default=1500)
  parser.add_argument("--adapter_steps", type=int, default=300)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--cc_lora_rank", type=int, default=16)
  parser.add_argument("--seeds", type=int, default=3, help="adapter runs per arm")
  parser.add_argument("--json", default=None, help="write the scores here")
  args = parser.parse_args()
  out = lambda *p: os.path.join(args.out, *p)
  os.makedirs(args.out, exist_ok=True)

  llm, llm_cc = out("llm"), out("llm_cc")
  if not os.path.exists(os.path.join(llm, "config.json")):
    _run("tools/make_tiny_llm.py", "--out", llm)
  if not os.path.exists(out("cc", "config.json")):
    cc_stage(llm, out("cc"), args.cc_steps, args.batch, args.cc_lora_rank)
  if not os.path.exists(os.path.join(llm_cc, "config.json")):
    _run("tools/export_llm.py", "--run", out("cc"), "--out", llm_cc)
  arms = {"raw LLM (causal)": (llm, "causal", out("cache_raw")),
          "CC LLM (bidirectional)": (llm_cc, "bidirectional", out("cache_cc"))}
  for folder, attention, cache in arms.values():
    if not os.path.exists(os.path.join(cache, "index.json")):
      _run("tools/cache_text_embeddings.py", "--llm", folder, "--attention", attention,
           "--pooling", "mean", "--max_len", "32", "--source", "embedded", "--languages",
           ",".join(LANGUAGES), "--out", cache)

  rows = []
  for train_languages in (["en"], list(LANGUAGES)):
    for arm, (folder, attention, cache) in arms.items():
      for seed in range(args.seeds):
        tag = (f"{'en' if len(train_languages) == 1 else 'all'}_"
               f"{'cc' if 'CC' in arm else 'raw'}_{seed}")
        scores = adapter(args.clip, folder, cache, attention, train_languages,
                         args.adapter_steps, args.batch, seed, out(f"adapter_{tag}"))
        rows.append({"arm": arm, "adapter_languages": "+".join(train_languages),
                     "seed": seed, "steps": args.adapter_steps, **scores})
        print(json.dumps(rows[-1]), flush=True)

  print(f"\nzero-shot top-1 (%), adapter-only, {args.adapter_steps} steps, batch {args.batch}, "
        f"600 held-out images, mean of {args.seeds} seeds; colour / shape")
  print("| LLM features | adapter trained on | " + " | ".join(LANGUAGES) + " | mean |")
  print("|---|---|" + "---|" * (len(LANGUAGES) + 1))
  for train_languages in ("en", "+".join(LANGUAGES)):
    for arm in arms:
      runs = [r for r in rows if r["arm"] == arm and r["adapter_languages"] == train_languages]
      score = lambda task, lang: 100 * np.mean([r[f"embedded_{task}/{lang}/acc1"] for r in runs])
      cells = [f"{score('colour', l):.0f} / {score('shape', l):.0f}" for l in LANGUAGES]
      spread = lambda task: 100 * np.std([r[f"embedded_{task}/mean/acc1"] for r in runs])
      cells.append(f"{score('colour', 'mean'):.1f}±{spread('colour'):.1f} / "
                   f"{score('shape', 'mean'):.1f}±{spread('shape'):.1f}")
      print(f"| {arm} | {'en' if train_languages == 'en' else 'all nine'} | "
            + " | ".join(cells) + " |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
