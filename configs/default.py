r"""The embedded default: a tiny multilingual CLIP that learns on a laptop CPU in minutes.

No download. Images of coloured shapes (shape, colour, size, count, position) are rendered
in code, each with captions in 9 languages (5 non-Latin scripts); a sentencepiece model is
trained on those captions at first use and cached in the workdir. After training, zero-shot
classification of colour and shape is reported per language on held-out images.

  python -m big_clip.train --config configs/default.py --workdir /tmp/big_clip_default

`--config configs/default.py:quick` is a shorter run (used by the tests);
`--config configs/default.py:ema` the full run keeping a weight EMA (docs/training.md).
"""

from big_clip import config as config_lib

LANGUAGES = ("en", "de", "fr", "es", "ru", "zh", "ja", "ar", "hi")


ARGS = ("quick", "ema")  # what get_config(arg) takes besides None


def get_config(arg: str | None = None):
  c = config_lib.base()
  c.seed = 0
  c.total_steps = 1000
  c.log_every = 50

  # ~1.2M parameters: sized so 1000 steps take about 6 minutes on 2 CPU cores.
  c.model.embed_dim = 96
  c.model.image.update(image_size=64, patch_size=8, width=96, depth=3, heads=4, mlp_dim=384,
                       pool="cls")
  c.model.text.update(vocab_size=1024, max_len=24, width=96, depth=3, heads=4, mlp_dim=384,
                      pool="eos")

  c.loss.name = "softmax"
  c.data.update(source="embedded", global_batch=128, image_size=64, max_len=24,
                languages={lang: 1.0 for lang in LANGUAGES})
  c.data.tokenizer.update(path="", vocab_size=1024)

  c.optim.update(lr=1e-3, warmup_steps=100, weight_decay=0.1, b2=0.98, clip_norm=1.0)
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  c.checkpoint.update(every_steps=250, keep=2)
  c.eval.update(every_steps=250, zeroshot_tasks=("colour", "shape"), num_images=600)

  if arg == "quick":  # a short run for tests and smoke checks
    c.total_steps = 200
    c.log_every = 20
    c.optim.warmup_steps = 20
    c.checkpoint.every_steps = 100
    c.eval.update(every_steps=200, num_images=300)
  elif arg == "ema":  # evals, exports and big_clip.load then use the average of the weights
    c.optim.ema_decay = 0.99  # ~100-step horizon; 0.99^1000 leaves nothing of the init
  elif arg:
    raise ValueError(f"configs/default.py: unknown argument {arg!r}; allowed: {', '.join(ARGS)}.")
  return c
