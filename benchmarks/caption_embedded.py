r"""The caption loss on the embedded data: does the decoder learn to name colour and shape,
and what does the extra loss do to zero-shot accuracy at equal steps?

Trains configs/default.py twice for --steps steps, without and with
`loss.caption.weight` (a 2-layer decoder as wide as the towers), then greedy-decodes
held-out test images with the caption model. The decoder is not told a language: per
language it continues that language's attribute-free opening ("a photo of", "Ein Foto
mit", ...), and once without any prefix. A decoded caption is parsed by looking it up among
every caption the embedded grammar writes (all scenes), which gives the colour and shape it
names (exact match of the whole caption: inflected forms included, nothing else allowed).
Prints a JSON summary:

  python benchmarks/caption_embedded.py --steps 400 --out /tmp/caption_bench
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import itertools
import json
import os

import jax
import numpy as np
from flax import nnx

from big_clip import train
from big_clip import workdir as workdir_lib
from big_clip.data import embedded, pipeline, tokenizers
from big_clip.models import two_tower

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_config(steps: int, caption: bool):
  spec = importlib.util.spec_from_file_location("default", os.path.join(ROOT, "configs",
                                                                        "default.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.total_steps = steps
  c.eval.every_steps = c.checkpoint.every_steps = steps
  if caption:
    c.model.decoder.update(width=96, depth=2, heads=4, mlp_dim=384)
    c.loss.caption.weight = 1.0
  return c


def caption_index() -> dict[str, list[tuple[str, int, int]]]:
  """Every caption the grammar writes -> [(language, colour, shape)] of the scenes it fits."""
  index = collections.defaultdict(list)
  scenes = [dict(shape=s, colour=c, size=z, count=n, position=p)
            for s, c, z in itertools.product(range(len(embedded.SHAPES)),
                                             range(len(embedded.COLOURS)),
                                             range(len(embedded.SIZES)))
            for n in embedded.COUNTS
            for p in (range(len(embedded.POSITIONS)) if n == 1 else [embedded.NO_POSITION])]
  for lang in embedded.EMBEDDED_LANGUAGES:
    for attrs in scenes:
      for text in set(embedded.all_captions(attrs, lang)):
        index[text.strip().lower()].append((lang, attrs["colour"], attrs["shape"]))
  return index


# Each language's opening of its "a photo of ..." (or "on a grey background ...") template:
# it names no attribute, and it tells the decoder which language to continue in.
PREFIXES = {"en": "a photo of", "de": "Ein Foto mit", "fr": "Une photo", "es": "Una foto de",
            "ru": "Фотография с", "zh": "照片里有", "ja": "灰色の背景に", "ar": "في الصورة",
            "hi": "धूसर पृष्ठभूमि पर"}


def decode_scores(config, params, workdir: str, n: int) -> dict:
  """Greedy captions of `n` held-out images, one decode per language (its prefix forced)
  and one without a prefix; a caption scores when the grammar of that language writes
  exactly it for a scene with the image's colour (shape, both)."""
  graphdef, _, _ = two_tower.abstract_params(config.model)
  tok = tokenizers.load(workdir_lib.tokenizer_path(workdir), config.data.max_len)
  examples = [embedded.render_example(config.seed, "test", i, config.data.image_size)
              for i in range(n)]
  images = pipeline.normalize(np.stack([e[0] for e in examples]), config.data.mean,
                              config.data.std)
  decode = jax.jit(lambda p, x, pre: nnx.merge(graphdef, p).caption(
      x, config.data.max_len, prefix=pre))
  index = caption_index()
  out = {}
  for lang in (None, *config.data.languages):
    if lang is None:
      prefix = np.zeros((n, 0), np.int32)
    else:
      ids = [int(t) for t in tok.encode([PREFIXES[lang]])[0] if t not in (tok.pad_id, tok.eos_id)]
      prefix = np.tile(np.asarray(ids, np.int32), (n, 1))
    counts, samples = collections.Counter(), []
    for (_, attrs), row in zip(examples, np.asarray(decode(params, images, prefix))):
      text = tok.decode(row).strip()
      hits = [h for h in index.get(text.lower(), []) if lang is None or h[0] == lang]
      counts["valid"] += bool(hits)
      counts["colour"] += any(h[1] == attrs["colour"] for h in hits)
      counts["shape"] += any(h[2] == attrs["shape"] for h in hits)
      counts["both"] += any(h[1:] == (attrs["colour"], attrs["shape"]) for h in hits)
      counts.update({f"wrote/{h}": 1 for h in {h[0] for h in hits}} if lang is None else {})
      if len(samples) < 3:
        samples.append(f"{embedded.COLOURS[attrs['colour']]} {embedded.SHAPES[attrs['shape']]}"
                       f" -> {text}")
    out[lang or "no prefix"] = {**{k: v / n for k, v in counts.items()}, "samples": samples}
  return out


def zero_shot(results: list[dict]) -> dict[str, float]:
  return {f"{r['dataset']}/{r['language']}": r["metrics"]["acc1"] for r in results
          if "acc1" in r.get("metrics", {})}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--images", type=int, default=300)
  parser.add_argument("--out", default="/tmp/caption_bench")
  parser.add_argument("--variants", default="contrastive,contrastive+caption",
                      help="which runs (two processes can run one each in parallel)")
  args = parser.parse_args()
  summary = {}
  for name in args.variants.split(","):
    caption = name == "contrastive+caption"
    config = default_config(args.steps, caption)
    workdir = os.path.join(args.out, name.replace("+", "_"))
    result = train.train(config, workdir)
    summary[name] = {"metrics": result["metrics"], "zero_shot": zero_shot(result["eval"])}
    if caption:
      summary[name]["decode"] = decode_scores(config, result["params"], workdir, args.images)
    print(json.dumps(summary, indent=1, ensure_ascii=False), flush=True)


if __name__ == "__main__":
  main()
