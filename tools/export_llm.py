r"""Export the LLM of a caption-contrastive (CC) run, LoRA merged, as a Hugging Face folder:
the hand-over from LLM2CLIP's stage 1 (configs/llm2clip_cc.py) to stage 2 (the embedding
cache and the adapter, configs/llm2clip.py). See big_clip/convert/llm_export.py.

  python tools/export_llm.py --run /tmp/llm2clip_cc_local --out /tmp/llm2clip_cc_llm
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from big_clip.convert import llm_export  # noqa: E402

flags.DEFINE_string("run", None, "Workdir of the CC run.")
flags.DEFINE_string("out", None, "Folder to write (config.json, model.safetensors, "
                    "tokenizer.json).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  del argv
  if not FLAGS.run or not FLAGS.out:
    raise app.UsageError("Give --run CC_WORKDIR and --out FOLDER.")
  section = llm_export.export_cc_llm(FLAGS.run, FLAGS.out, FLAGS.step)
  print(f"wrote {FLAGS.out}: step {section['step']} of {section['run']}, LoRA merged, "
        f"{section['attention']} attention, weights sha256 {section['weights_sha256'][:12]}")


if __name__ == "__main__":
  app.run(main)
