"""Tokenizers: sentencepiece (train one from text, load it) or a Hugging Face `tokenizer.json`
(through the `tokenizers` library); both encode captions to fixed-length int32 rows.

Ids: pad 0, unk 1, bos 2, eos 3 (the text tower pools at the EOS token, CLIP style, and
masks padding by id 0). Byte fallback means no text ever becomes <unk>: a character the
model has not seen is spelled as its UTF-8 bytes.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence

import ml_collections
import numpy as np
import sentencepiece as spm
from absl import logging
from tokenizers import Tokenizer

from big_clip import fileio
from big_clip import workdir as workdir_lib

# The ids of every sentencepiece model big_clip trains (CLIP text towers pool at EOS and
# mask padding by id 0); an LLM tower's tokenizer pads with models.llm.PAD_ID instead.
SPM_PAD_ID, SPM_UNK_ID, SPM_BOS_ID, SPM_EOS_ID = 0, 1, 2, 3


def train_spm(texts: Iterable[str], model_path: str, vocab_size: int,
              character_coverage: float = 1.0) -> str:
  """Trains a unigram sentencepiece model on `texts` and writes it atomically to `model_path`.

  `vocab_size` is an upper bound: a small corpus supports fewer pieces, and then the model
  gets as many as the corpus supports (a warning says so) instead of sentencepiece's
  "Vocabulary size too high" failure. `character_coverage=1.0` keeps every character of
  the corpus (right for our caption corpora; use ~0.9995 for large web text, where byte
  fallback spells the rare characters).
  """
  model_path = fileio.absolute(model_path)
  # Train in a local temporary folder, then write the files whole (fileio.write): a reader
  # (or a second host) never sees a half-written model, a crash leaves no broken cache
  # behind, and the model may go to gs://.
  tmp_dir = tempfile.mkdtemp(prefix="big_clip_spm_")
  prefix = os.path.join(tmp_dir, "spm")
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=prefix, vocab_size=vocab_size,
        model_type="unigram", character_coverage=character_coverage, byte_fallback=True,
        pad_id=SPM_PAD_ID, unk_id=SPM_UNK_ID, bos_id=SPM_BOS_ID, eos_id=SPM_EOS_ID,
        # NFKC folds full-width/compatibility forms (common in CJK text) to one spelling.
        normalization_rule_name="nmt_nfkc",
        hard_vocab_limit=False,  # vocab_size is a ceiling, see the docstring
        num_threads=min(4, os.cpu_count() or 1), minloglevel=2)
    for ext in (".vocab", ".model"):  # the model last: its presence means "trained"
      with open(prefix + ext, "rb") as f:  # our own local temporary file
        fileio.write(os.path.splitext(model_path)[0] + ext, f.read())
  except RuntimeError as e:
    raise _explain_training_error(e, vocab_size) from e
  finally:
    shutil.rmtree(tmp_dir, ignore_errors=True)
  pieces = spm.SentencePieceProcessor(model_proto=fileio.read_bytes(model_path)).get_piece_size()
  if pieces < vocab_size:
    logging.warning("The corpus supports only %d sentencepiece pieces; trained %d instead of "
                    "the requested vocab_size=%d (%s).", pieces, pieces, vocab_size, model_path)
  return model_path


def _explain_training_error(error: RuntimeError, vocab_size: int) -> Exception:
  """Sentencepiece's messages name C++ source lines; say what to change instead."""
  too_small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", str(error))
  if too_small:
    return ValueError(
        f"vocab_size={vocab_size} is too small: the corpus needs {too_small.group(2)} pieces "
        "(its characters + 256 byte-fallback pieces + 4 special ids). Raise "
        f"config.data.tokenizer.vocab_size to at least {too_small.group(2)}.")
  return RuntimeError(f"sentencepiece training failed: {error}")


class SpmTokenizer:
  """Encodes texts to int32 [N, max_len]: pieces, then EOS, then padding with 0."""

  def __init__(self, model_path: str, max_len: int):
    if not fileio.exists(model_path):
      raise FileNotFoundError(
          f"No sentencepiece model at {model_path!r}. Set config.data.tokenizer.path to an "
          "existing .model file, or leave it empty ('') to train one on the captions at "
          "first use (cached as <workdir>/tokenizer/spm.model).")
    if max_len < 2:
      raise ValueError(f"max_len={max_len} leaves no room for a token and EOS; "
                       "set config.data.max_len >= 2.")
    self.model_path, self.max_len = model_path, max_len
    self._sp = spm.SentencePieceProcessor(model_proto=fileio.read_bytes(model_path))
    if self._sp.pad_id() != SPM_PAD_ID or self._sp.eos_id() < 0:
      raise ValueError(
          f"{model_path}: pad_id={self._sp.pad_id()}, eos_id={self._sp.eos_id()}; big_clip "
          f"needs pad_id={SPM_PAD_ID} and an EOS id. Retrain it with big_clip.data.tokenizers."
          "train_spm (or tools/train_spm.py).")

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """int32 [len(texts), max_len]; too-long texts are cut so EOS is always kept last."""
    if isinstance(texts, str):
      raise TypeError("encode() takes a sequence of texts; wrap a single text in a list.")
    tokens = np.full((len(texts), self.max_len), self.pad_id, np.int32)
    for row, ids in enumerate(self._sp.encode(list(texts))):
      ids = ids[:self.max_len - 1] + [self.eos_id]
      tokens[row, :len(ids)] = ids
    return tokens

  def decode(self, ids: np.ndarray | Sequence[int] | Sequence[Sequence[int]]
             ) -> str | list[str]:
    """Text of one row of ids (str) or of each row of a 2-D batch (list[str]); stops at
    EOS and ignores padding."""
    ids = np.asarray(ids)
    if ids.ndim == 2:
      return [self.decode(row) for row in ids]
    row = ids.tolist()
    if self.eos_id in row:
      row = row[:row.index(self.eos_id)]
    return self._sp.decode([i for i in row if i != self.pad_id])


def load(path: str, max_len: int) -> SpmTokenizer | HfTokenizer:
  """A `.json` path is a Hugging Face tokenizer; anything else a sentencepiece model."""
  return HfTokenizer(path, max_len) if path.endswith(".json") else SpmTokenizer(path, max_len)


def get_or_train(tok_cfg: ml_collections.ConfigDict, workdir: str,
                 corpus_fn: Callable[[], list[str]], max_len: int) -> SpmTokenizer:
  """The tokenizer at `tok_cfg.path`; or, when that is '', the one cached in the workdir,
  trained on `corpus_fn()` the first time."""
  if tok_cfg.path:
    logging.info("Tokenizer: loading %s", tok_cfg.path)
    return load(tok_cfg.path, max_len)
  path = workdir_lib.tokenizer_path(workdir)
  if fileio.exists(path):
    tokenizer = SpmTokenizer(path, max_len)
    logging.info("Tokenizer: reusing %s (%d pieces; delete it to retrain).", path,
                 tokenizer.vocab_size)
    return tokenizer
  texts = corpus_fn()
  logging.info("Tokenizer: training a sentencepiece model (vocab_size<=%d) on %d texts -> %s",
               tok_cfg.vocab_size, len(texts), path)
  train_spm(texts, path, tok_cfg.vocab_size)
  tokenizer = SpmTokenizer(path, max_len)
  logging.info("Tokenizer: trained %s with %d pieces.", path, tokenizer.vocab_size)
  return tokenizer


# ---------------------------------------------------------------------------------------------
# Hugging Face tokenizers (LLM text towers, models/llm.py).
# ---------------------------------------------------------------------------------------------
class HfTokenizer:
  """A Hugging Face `tokenizer.json` (CLIP's BPE, XLM-R's unigram, a Llama/Qwen tokenizer)
  behind SpmTokenizer's interface: `encode(texts)` -> int32 [N, max_len].

  The tokenizer's own post-processor runs (e.g. CLIP's <|startoftext|> ... <|endoftext|>,
  Llama's BOS). A row longer than max_len is cut keeping its closing EOS; with `append_eos`
  the EOS id is appended after the cut instead (the 'eos' pooling of the LLM tower reads it).
  Padding is `pad_id`: by default the tokenizer's pad token (else 0), which a CLIP text tower
  embeds like any id (set config.model.text.pad_id / eos_id to match); the LLM tower passes
  its own `models.llm.PAD_ID` (-1), so padding is never mistaken for a real token.
  """

  def __init__(self, path: str, max_len: int, *, pad_id: int | None = None,
               eos_id: int | None = None, append_eos: bool = False):
    if not fileio.exists(path):
      raise FileNotFoundError(f"No Hugging Face tokenizer at {path!r}; set "
                              "config.data.tokenizer.path (or the LLM folder of "
                              "config.model.text.llm.path) to a folder/file with tokenizer.json.")
    if max_len < 1 + append_eos:
      raise ValueError(f"max_len={max_len} is too small; set config.data.max_len >= 2.")
    self.path = self.model_path = path
    self.max_len = max_len
    self._tok = Tokenizer.from_str(fileio.read_text(path))
    self._tok.no_truncation()
    self._tok.no_padding()
    if pad_id is None:
      pad = next((t for t in ("<pad>", "[PAD]", "<|pad|>") if self._tok.token_to_id(t)
                  is not None), None)
      pad_id = self._tok.token_to_id(pad) if pad else SPM_PAD_ID
    if eos_id is None:
      eos = next((t for t in ("</s>", "<|endoftext|>", "[SEP]", "<eos>")
                  if self._tok.token_to_id(t) is not None), None)
      eos_id = self._tok.token_to_id(eos) if eos is not None else None
    if append_eos and eos_id is None:
      raise ValueError(f"{path}: pooling='eos' needs an EOS id but the model has no "
                       "eos_token_id; use pooling='mean' or 'last'.")
    self._pad_id, self._eos_id, self._append_eos = pad_id, eos_id, append_eos

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def pad_id(self) -> int:
    return self._pad_id

  @property
  def eos_id(self) -> int | None:
    return self._eos_id

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """int32 [len(texts), max_len]; long texts are cut (a closing or appended EOS is kept)."""
    if isinstance(texts, str):
      raise TypeError("encode() takes a sequence of texts; wrap a single text in a list.")
    tokens = np.full((len(texts), self.max_len), self._pad_id, np.int32)
    for row, enc in enumerate(self._tok.encode_batch(list(texts))):
      ids = enc.ids
      if self._append_eos:
        ids = ids[:self.max_len - 1] + [self._eos_id]
      elif len(ids) > self.max_len:
        ids = (ids[:self.max_len - 1] + ids[-1:] if ids[-1] == self._eos_id
               else ids[:self.max_len])
      tokens[row, :len(ids)] = ids
    return tokens

  def decode(self, ids: np.ndarray | Sequence[int] | Sequence[Sequence[int]]
             ) -> str | list[str]:
    ids = np.asarray(ids)
    if ids.ndim == 2:
      return [self.decode(row) for row in ids]
    return self._tok.decode([int(i) for i in ids if i != self._pad_id])
