r"""Input pipeline throughput against the train step it feeds, on this machine.

Builds tar shards from the shared Flickr8k/Multi30K photos (repeated to have enough), trains a
sentencepiece model on their captions, then measures

  pipeline_examples_per_s: batches of 224 px images (random-resized crop, normalized) with
      tokenized captions (8 languages, max_len 77) from `shards:` through big_clip.data;
  step_examples_per_s: the clip_vit_b32 train step (configs/clip_vit_b32.py, float32 on CPU)
      at the same batch, after compilation;

and reports ratio = pipeline / step (>= 3 means the input never starves the step).

  python benchmarks/input_pipeline.py --json /tmp/input_pipeline.json

`--live` measures instead what the real train loop waits for: `big_clip.train.train` runs the
Flickr recipe (configs/flickr_multi30k.py) and the embedded default (configs/default.py) for
`--live_steps` steps each, with no evals or checkpoints in between, and reports the means the
loop logged, first window excluded (threads still starting): `data_wait_fraction` (the share
of wall time the loop blocked on input with no step queued on the device: training waiting
for data) and `input_block_fraction` (all its blocking on input, most of it while queued
steps run). Each recipe runs a second time on its first batch repeated, so the pipeline's
whole cost shows as `pipeline_cost` = 1 - examples/s with the pipeline / without it (on a
CPU host the pipeline's threads share the cores with the step).

  python benchmarks/input_pipeline.py --live --json /tmp/live_wait.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from big_clip import config as config_lib  # noqa: E402
from big_clip import sharding, steps, train  # noqa: E402
from big_clip.data import pipeline, shards, tokenizers  # noqa: E402

DEFAULT_MANIFEST = os.path.join(ROOT, "..", "shared", "data", "flickr8k_multi30k",
                                "manifest.json")


def _make_shards_module():
  spec = importlib.util.spec_from_file_location(
      "make_shards", os.path.join(ROOT, "tools", "make_shards.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _load_config(name: str, arg: str | None = None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def recipe(batch: int) -> config_lib.ml_collections.ConfigDict:
  c = _load_config("clip_vit_b32")
  c.data.global_batch = batch
  c.model.dtype = "float32"  # CPU has no fast bfloat16 matmul; float32 is the faster step
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  return c


def pipeline_rate(manifest: str, work: str, c, repeat: int, batches: int) -> float:
  make_shards = _make_shards_module()
  items = make_shards.from_manifest(manifest, None)
  paths = shards.write_shards(make_shards.examples(items, repeat), os.path.join(work, "s"),
                              "tar", 250)
  texts = [t for _, caps, _ in items for v in caps.values() for t in v]
  spm_path = tokenizers.train_spm(texts, os.path.join(work, "spm.model"), 8000, 0.9995)
  langs = sorted({lang for _, caps, _ in items for lang, v in caps.items() if v})
  data = c.data
  data.source = f"shards:{work}/s-*.tar"
  data.languages = {lang: 1.0 for lang in langs}
  data.tokenizer.path = spm_path
  print(f"{len(items) * repeat} examples in {len(paths)} tar shards, {len(langs)} languages, "
        f"{data.image_size} px, max_len {data.max_len}")
  it = pipeline.make(data, 0, 1, tokenizer=tokenizers.load(spm_path, data.max_len), seed=0)
  for _ in range(3):  # warm-up: tf.data threads, first file opens
    next(it)
  t0 = time.perf_counter()
  for _ in range(batches):
    batch = next(it)
  seconds = time.perf_counter() - t0
  it.close()
  assert batch["image"].shape == (data.global_batch, data.image_size, data.image_size, 3)
  print(f"skipped: {it.skipped()}")
  return batches * data.global_batch / seconds


def step_rate(c, steps: int) -> float:
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  setup = steps.build(c, mesh)
  gb, size = c.data.global_batch, c.data.image_size
  rng = np.random.default_rng(0)
  batch = {"image": rng.standard_normal((gb, size, size, 3), np.float32),
           "text": rng.integers(4, 1000, (gb, c.data.max_len)).astype(np.int32)}
  state = setup.state
  placed = sharding.place_batch(batch, mesh)
  state, metrics = setup.step(state, placed)  # first run: allocation, caches
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = setup.step(state, sharding.place_batch(batch, mesh))
  jax.block_until_ready(metrics)
  return steps * gb / (time.perf_counter() - t0)


class _RepeatFirst:
  """The real iterator's first batch, forever: the same loop without the pipeline's work."""

  def __init__(self, it):
    self._it, self._batch = it, next(it)

  def __next__(self):
    return self._batch

  def __getattr__(self, name):
    return getattr(self._it, name)


def live_wait(name: str, steps: int, log_every: int, constant: bool = False) -> dict:
  """Runs recipe `name` for `steps` steps in the real loop; the logged input-wait shares.

  With `constant`, the loop gets the pipeline's first batch again and again: the steps/s
  the loop reaches when the pipeline costs nothing."""
  c = _load_config(name)
  c.total_steps, c.log_every = steps, log_every
  c.evals = ()
  c.eval.every_steps = c.checkpoint.every_steps = 10 * steps  # only the final ones
  make = pipeline.make
  if constant:
    pipeline.make = lambda *a, **k: _RepeatFirst(make(*a, **k))
  try:
    with tempfile.TemporaryDirectory() as work:
      t0 = time.perf_counter()
      train.train(c, work)
      seconds = time.perf_counter() - t0
      with open(os.path.join(work, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if "data_wait_fraction" in r]
  finally:
    pipeline.make = make
  rows = rows[1:]  # the first window holds the start of the pipeline's threads
  return {"recipe": name, "steps": steps, "global_batch": c.data.global_batch,
          "input": "first batch repeated" if constant else "pipeline",
          "data_wait_fraction": float(np.mean([r["data_wait_fraction"] for r in rows])),
          "max_window": float(np.max([r["data_wait_fraction"] for r in rows])),
          "input_block_fraction": float(np.mean([r["input_block_fraction"] for r in rows])),
          "examples_per_s": float(np.mean([r["examples_per_s"] for r in rows])),
          "wall_seconds": seconds}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--manifest", default=os.environ.get("BIG_CLIP_FLICKR_MANIFEST",
                                                           DEFAULT_MANIFEST))
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--repeat", type=int, default=2, help="copies of the 937 photos")
  parser.add_argument("--batches", type=int, default=40, help="pipeline batches timed")
  parser.add_argument("--steps", type=int, default=3, help="train steps timed")
  parser.add_argument("--json", default=None, help="write the numbers here")
  parser.add_argument("--live", action="store_true",
                      help="measure data_wait_fraction in the real train loop instead")
  parser.add_argument("--live_steps", type=int, default=120)
  parser.add_argument("--live_recipes", default="flickr_multi30k,default")
  args = parser.parse_args()
  if args.live:
    rows = []
    for name in args.live_recipes.split(","):
      real = live_wait(name, args.live_steps, max(1, args.live_steps // 6))
      free = live_wait(name, args.live_steps, max(1, args.live_steps // 6), constant=True)
      real["pipeline_cost"] = 1 - real["examples_per_s"] / free["examples_per_s"]
      rows += [real, free]
      print(f"{name}: data_wait_fraction {real['data_wait_fraction']:.3f} (worst window "
            f"{real['max_window']:.3f}; target <= 0.05), loop blocked on input "
            f"{real['input_block_fraction']:.3f}; {real['examples_per_s']:.1f} examples/s vs "
            f"{free['examples_per_s']:.1f} with the first batch repeated (pipeline cost "
            f"{100 * real['pipeline_cost']:.1f}%), batch {real['global_batch']}, "
            f"{real['steps']} steps", flush=True)
    if args.json:
      with open(args.json, "w") as f:
        json.dump(rows, f, indent=2)
    return
  if not os.path.exists(args.manifest):
    sys.exit(f"No Flickr manifest at {os.path.normpath(args.manifest)}; put flickr8k_multi30k "
             "in ../shared/data/ or pass --manifest (BIG_CLIP_FLICKR_MANIFEST).")
  c = recipe(args.batch)
  with tempfile.TemporaryDirectory() as work:
    pipe = pipeline_rate(args.manifest, work, c, args.repeat, args.batches)
  print(f"pipeline: {pipe:.1f} examples/s")
  step = step_rate(recipe(args.batch), args.steps)
  print(f"clip_vit_b32 train step (batch {args.batch}): {step:.2f} examples/s")
  result = {"pipeline_examples_per_s": pipe, "step_examples_per_s": step,
            "ratio": pipe / step, "batch": args.batch, "image_size": c.data.image_size,
            "cpu_cores": os.cpu_count(), "devices": str(jax.devices()[0].platform)}
  print(f"ratio (pipeline / step): {pipe / step:.1f}  (target >= 3)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
