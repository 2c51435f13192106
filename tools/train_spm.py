r"""Trains a multilingual sentencepiece model on the captions of any big_clip source.

  python tools/train_spm.py --source manifest:../shared/data/flickr8k_multi30k/manifest.json \
      --split train --vocab_size 4000 --out /tmp/flickr_spm/spm.model

`--source` takes what config.data.source takes (shards:GLOB, manifest:PATH, tfds:NAME[:SPLIT],
embedded). Unigram model, byte fallback (no caption is ever <unk>), character coverage 0.9995
so that rare CJK characters become bytes instead of wasting pieces. Then set
config.data.tokenizer.path to the written file.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from big_clip import config as config_lib  # noqa: E402
from big_clip.data import pipeline, tokenizers  # noqa: E402

flags.DEFINE_string("source", None, "Like config.data.source.")
flags.DEFINE_string("split", "train", "config.data.split (manifest / tfds).")
flags.DEFINE_string("data_dir", "", "config.data.data_dir (tfds).")
flags.DEFINE_string("text_language", "en", "Language of plain-text captions.")
flags.DEFINE_integer("vocab_size", 8000, "Upper bound on the pieces (see train_spm).")
flags.DEFINE_float("character_coverage", 0.9995, "Share of characters kept as pieces.")
flags.DEFINE_integer("max_texts", 1_000_000, "Captions read from the source at most.")
flags.DEFINE_string("out", None, "Where to write the .model (and .vocab) file.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  del argv
  if not FLAGS.source or not FLAGS.out:
    raise app.UsageError("Usage: train_spm.py --source SOURCE --out PATH.model")
  data_cfg = config_lib.base().data
  data_cfg.update(source=FLAGS.source, split=FLAGS.split, data_dir=FLAGS.data_dir,
                  text_language=FLAGS.text_language)
  texts = pipeline.caption_corpus(data_cfg, seed=0)[:FLAGS.max_texts]
  path = tokenizers.train_spm(texts, FLAGS.out, FLAGS.vocab_size, FLAGS.character_coverage)
  tok = tokenizers.SpmTokenizer(path, max_len=64)
  print(f"Trained {path}: {tok.vocab_size} pieces from {len(texts)} captions.")
  for text in texts[:: max(1, len(texts) // 3)][:3]:
    print(f"  {text!r} -> {tok.encode([text])[0][:12].tolist()}...")


if __name__ == "__main__":
  app.run(main)
