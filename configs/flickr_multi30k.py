r"""A small multilingual CLIP on real photos: Flickr8k images with Multi30K captions.

Trains on the 'train' split of `../shared/data/flickr8k_multi30k/manifest.json` (872 photos,
captions in English, German, French, Czech and machine-translated Spanish, Ukrainian,
Chinese, Arabic), every language sampled equally; per image one caption is drawn from the
chosen language's captions. A sentencepiece model is trained on the split's captions at
first use and cached in the workdir (or name one made by tools/train_spm.py in
config.data.tokenizer.path).

What makes a from-scratch model generalize on 872 photos (benchmarks/RESULTS.md, chosen on
the val split): caption pairs -- each caption is also contrasted with another English
caption of its image (data.pair_language='en', loss.text_pair_weight=1), which ties the
six languages that have one caption per image to English's five -- lifted val R@5 from
25-26% to 30-33%; mirror flips and a wider crop range helped a little; an early-convolution
stem (model.image.stem='conv'), mean pooling, a weight EMA (optim.ema_decay=0.99), a
captioning decoder (loss.caption.weight=1), heavier caption pairs, twice the steps, twice
the batch, weight decay 0.5, patch dropout 0.5, 96-px input and the sigmoid loss did not
(val within noise; benchmarks/RESULTS.md).

  python -m big_clip.train --config configs/flickr_multi30k.py --workdir /tmp/big_clip_flickr
  python -m big_clip.evaluate --config configs/flickr_multi30k.py --workdir /tmp/big_clip_flickr

The manifest is looked up next to the repository (`../shared/data/flickr8k_multi30k/`); set
BIG_CLIP_FLICKR_MANIFEST=/path/to/manifest.json to read it from elsewhere. If it is absent
the run stops with the path it looked at (the folder is built by its `build.py` from the
Flickr8k images and the Multi30K / Multiscript30K caption files; see its README.md).
`--config configs/flickr_multi30k.py:local` is a 20-step smoke run.
"""

import os

from absl import logging

from big_clip import config as config_lib

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MANIFEST = os.path.join(_REPO, "..", "shared", "data", "flickr8k_multi30k",
                                "manifest.json")
LANGUAGES = ("en", "de", "fr", "cs", "es", "uk", "zh-Hans", "ar")


def manifest_path() -> str:
  path = os.path.normpath(os.environ.get("BIG_CLIP_FLICKR_MANIFEST", DEFAULT_MANIFEST))
  if not os.path.exists(path):
    logging.warning("configs/flickr_multi30k.py: no manifest at %s; put the flickr8k_multi30k "
                    "folder in ../shared/data/ next to the repository or set "
                    "BIG_CLIP_FLICKR_MANIFEST=/path/to/manifest.json.", path)
  return path


ARGS = ("local",)  # what get_config(arg) takes besides None


def get_config(arg: str | None = None):
  c = config_lib.base()
  c.seed = 0
  c.total_steps = 800  # 59 epochs; ~11 min on 2 CPU cores
  c.log_every = 25

  # 1.78M parameters, 64 px.
  c.model.embed_dim = 128
  c.model.image.update(image_size=64, patch_size=8, width=128, depth=3, heads=4, mlp_dim=512,
                       pool="cls")
  c.model.text.update(vocab_size=4096, max_len=32, width=128, depth=3, heads=4, mlp_dim=512,
                      pool="eos")

  c.loss.name = "softmax"
  c.data.update(source=f"manifest:{manifest_path()}", split="train", global_batch=64,
                image_size=64, max_len=32, crop_min_scale=0.35, flip_prob=0.5)
  c.data.languages = {lang: 1.0 for lang in LANGUAGES}
  # Caption pairs: + the contrastive loss between each caption and another English caption
  # of its image (English has ~5 per image; fr, cs and the MT languages have one).
  c.data.pair_language = "en"
  c.loss.text_pair_weight = 1.0
  # Unigram, byte fallback; 8 scripts incl. Chinese need a few thousand pieces.
  c.data.tokenizer.update(path="", vocab_size=4096)

  c.optim.update(lr=5e-4, warmup_steps=30, weight_decay=0.1, b2=0.98, clip_norm=1.0)
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  c.checkpoint.update(every_steps=200, keep=2)
  c.eval.update(every_steps=10_000)  # retrieval eval on the val/test splits: evaluate.py
  # `python -m big_clip.evaluate --config configs/flickr_multi30k.py --workdir ...`: per-language
  # image <-> caption retrieval on the held-out splits (31 test and 34 val photos).
  c.evals = tuple(f"retrieval:manifest:{manifest_path()}:{split},name=flickr8k_multi30k_{split}"
                  for split in ("test", "val"))

  if arg == "local":
    c.total_steps = 20
    c.log_every = 5
    c.data.global_batch = 16
    c.checkpoint.every_steps = 20
  elif arg:
    raise ValueError(f"configs/flickr_multi30k.py: unknown argument {arg!r}; allowed: {', '.join(ARGS)}.")
  return c
