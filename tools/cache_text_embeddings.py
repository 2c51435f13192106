r"""Precompute a frozen LLM's pooled caption features once (LLM2CLIP): training with
`config.model.text.llm.cache_dir` then runs only the adapter on them.

  python tools/cache_text_embeddings.py --llm /models/Meta-Llama-3-8B --pooling mean \
      --max_len 64 --source embedded --languages en,de --out /data/cache/llama3_mean_64

  python tools/cache_text_embeddings.py --llm /models/Qwen2-0.5B --captions captions.txt \
      --out /data/cache/qwen --mesh_fsdp 1 --mesh_tensor 8

`--captions` is a text file with one caption per line. The cache is keyed by the LLM
(config.json + weight files, and the weights' sha256 of an LLM exported from a CC run),
attention, tokenizer.json, pooling and max_len; training refuses a cache
whose key does not match its config. Weights are sharded over the mesh (fsdp x tensor) like
in training, captions over the data axes.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from big_clip import config as config_lib  # noqa: E402
from big_clip import fileio  # noqa: E402
from big_clip import sharding  # noqa: E402
from big_clip.data import embedded, text_cache  # noqa: E402

flags.DEFINE_string("llm", None, "Hugging Face Llama/Qwen2 folder (config.json, "
                    "*.safetensors, tokenizer.json).")
flags.DEFINE_string("out", None, "Cache folder to write (index.json + shards).")
flags.DEFINE_enum("pooling", "mean", ["mean", "last", "eos"], "Pooling of the last hidden "
                  "states (must match config.model.text.llm.pooling).")
flags.DEFINE_integer("max_len", 64, "Tokens per caption (must match config.data.max_len).")
flags.DEFINE_string("captions", None, "Text file, one caption per line.")
flags.DEFINE_string("source", None, "'embedded': every caption of the embedded dataset and "
                    "its zero-shot prompts.")
flags.DEFINE_list("languages", ["en"], "Languages of --source embedded.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of the LLM "
                  "(must match config.model.text.llm.dtype; bfloat16 for an 8B LLM).")
flags.DEFINE_enum("attention", "causal", ["causal", "bidirectional"], "Attention of the LLM "
                  "(must match config.model.text.llm.attention; 'bidirectional' for an LLM "
                  "exported from a CC run, tools/export_llm.py).")
flags.DEFINE_integer("batch_size", 256, "Captions per forward pass (global).")
flags.DEFINE_integer("mesh_fsdp", 1, "Mesh fsdp size (weights sharded); data takes the rest.")
flags.DEFINE_integer("mesh_tensor", 1, "Mesh tensor size.")
flags.DEFINE_integer("shard_size", 100_000, "Captions per cache shard file.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  del argv
  if not FLAGS.llm or not FLAGS.out or bool(FLAGS.captions) == bool(FLAGS.source):
    raise app.UsageError("Give --llm, --out and exactly one of --captions FILE or "
                         "--source embedded.")
  if FLAGS.source and FLAGS.source != "embedded":
    raise app.UsageError(f"--source={FLAGS.source!r}: only 'embedded' is built in; write "
                         "other captions to a file and pass --captions.")
  if FLAGS.captions:
    captions = [line for line in fileio.read_text(FLAGS.captions).splitlines() if line.strip()]
  else:
    captions = embedded.every_text(FLAGS.languages)
  c = config_lib.base()
  c.model.text.update(kind="llm", max_len=FLAGS.max_len)
  c.model.text.llm.update(path=FLAGS.llm, pooling=FLAGS.pooling, dtype=FLAGS.dtype,
                          attention=FLAGS.attention)
  mesh = sharding.make_mesh({"data": -1, "fsdp": FLAGS.mesh_fsdp, "tensor": FLAGS.mesh_tensor})
  t0 = time.perf_counter()
  index = text_cache.build(c.model, captions, FLAGS.max_len, FLAGS.out, mesh,
                           batch_size=FLAGS.batch_size, shard_size=FLAGS.shard_size)
  seconds = time.perf_counter() - t0
  logging.info("Cached %d captions in %.1f s (%.0f captions/s): %s", len(set(captions)), seconds,
               len(set(captions)) / seconds, index)
  print(f"wrote {index}: {len(set(captions))} captions in {seconds:.1f} s")


if __name__ == "__main__":
  app.run(main)
