r"""Write a tiny random-init Llama as a Hugging Face folder (config.json, model.safetensors,
tokenizer.json): the LLM of the CPU runs of LLM2CLIP's stages (configs/llm2clip_cc.py:local,
then tools/export_llm.py, tools/cache_text_embeddings.py, configs/llm2clip.py:local_cc).

  python tools/make_tiny_llm.py --out /tmp/big_clip_tiny_llm

The tokenizer is a byte-pair encoding with `--vocab_size` tokens trained on every caption of
the embedded data ([PAD] 0, [UNK] 1, [BOS] 2 prepended, [EOS] 3); the decoder is big_clip's
own random init (tied embeddings), written with the exporter that tools/export_llm.py uses,
so transformers' LlamaModel loads the folder as-is.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from big_clip import config as config_lib  # noqa: E402
from big_clip.data import embedded  # noqa: E402
from big_clip.models import llm  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags: defined only when run as a program, so that importing
  `write_tiny_llm` (tests) next to other tools with an --out flag does not clash."""
  flags.DEFINE_string("out", None, "Folder to write.")
  flags.DEFINE_integer("vocab_size", 1024, "Tokenizer and embedding rows.")
  flags.DEFINE_integer("width", 64, "hidden_size.")
  flags.DEFINE_integer("depth", 2, "num_hidden_layers.")
  flags.DEFINE_integer("heads", 4, "num_attention_heads (num_key_value_heads = heads / 2).")
  flags.DEFINE_integer("seed", 0, "Init seed.")
SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]


def write_tokenizer(path: str, vocab_size: int) -> int:
  """A BPE tokenizer.json over the embedded captions, Llama-like (BOS prepended); returns its
  size (more than `vocab_size` when the captions' alphabet alone is larger)."""
  from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

  tok = Tokenizer(models.BPE(unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.train_from_iterator(embedded.every_text(embedded.EMBEDDED_LANGUAGES),
                          trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS))
  tok.post_processor = processors.TemplateProcessing(single="[BOS] $A",
                                                     special_tokens=[("[BOS]", 2)])
  tok.save(path)
  return tok.get_vocab_size()


def write_tiny_llm(out: str, vocab_size: int = 1024, width: int = 64, depth: int = 2,
                   heads: int = 4, seed: int = 0) -> str:
  """Writes the folder `out`; returns it."""
  os.makedirs(out, exist_ok=True)
  vocab_size = max(vocab_size, write_tokenizer(os.path.join(out, "tokenizer.json"), vocab_size))
  c = config_lib.base()
  c.model.text.update(kind="llm", vocab_size=vocab_size, width=width, depth=depth, heads=heads,
                      mlp_dim=2 * width, eos_id=SPECIALS.index("[EOS]"))
  c.model.text.llm.update(kv_heads=max(heads // 2, 1), freeze=False)
  tower = llm.LlmTextTower(c.model, rngs=nnx.Rngs(params=seed))
  tensors = llm.to_hf_tensors(nnx.to_pure_dict(nnx.state(tower.decoder)))
  save_file(tensors, os.path.join(out, llm.SINGLE_FILE), metadata={"format": "pt"})
  with open(os.path.join(out, llm.CONFIG_FILE), "w") as f:
    json.dump(dict(tower.spec.to_hf(), bos_token_id=2), f, indent=2)
  return out


def main(argv: list[str]) -> None:
  del argv
  if not FLAGS.out:
    raise app.UsageError("Give --out FOLDER.")
  write_tiny_llm(FLAGS.out, FLAGS.vocab_size, FLAGS.width, FLAGS.depth, FLAGS.heads, FLAGS.seed)
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
