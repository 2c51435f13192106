"""Embedding cache of a frozen LLM's pooled caption features (LLM2CLIP trains this way).

With the LLM frozen and no LoRA, a caption's pooled feature never changes, so it is computed
once (`tools/cache_text_embeddings.py`) and training runs only the adapter on it. A cache is a
folder:

  index.json              {"format", "key", "dim", "count", "shards": [{features, captions,
                           count}]}
  features-00000.npy      float32 [count, dim], row i = pooled feature of captions[i]
  captions-00000.json     the captions of that shard, in order

`key` says what produced the features: the model (hash of config.json + the weight files'
names and sizes), the weights' identity (the sha256 of the weights that big_clip recorded in
config.json when it exported a CC-tuned, LoRA-merged LLM, convert/llm_export.py; else the
files' names and sizes), the attention (causal / bidirectional), the tokenizer (hash of
tokenizer.json), the pooling, max_len and the compute dtype. A cache whose key differs from the run's is refused, naming what changed,
instead of silently feeding features of another model.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from big_clip import sharding
from big_clip.data import tokenizers
# The one place where data reads a model: an LLM tower's tokenizer needs the LLM's config
# (EOS id, vocabulary size, its pad id) and its cache needs the LLM to compute features.
from big_clip.models import llm
from big_clip.errors import UserError

FORMAT = "big_clip.text_cache.v1"
INDEX = "index.json"


class StaleCacheError(UserError, ValueError):
  """The cache was made by another model, tokenizer, pooling or max_len."""


def _sha256(chunks: Iterable[bytes]) -> str:
  h = hashlib.sha256()
  for chunk in chunks:
    h.update(chunk)
  return h.hexdigest()


def cache_key(llm_path: str, pooling: str, max_len: int, dtype: str,
              attention: str = "causal") -> dict[str, Any]:
  """What the cached features depend on. Weight files are identified by name and size, not
  content (hashing 16 GB per run would take minutes), unless big_clip exported them with the
  sha256 of their content (a CC-tuned LLM: same names and sizes as its base)."""
  files = sorted(set(llm.weight_files(llm_path).values()))
  with open(os.path.join(llm_path, llm.CONFIG_FILE), "rb") as f:
    config_bytes = f.read()
  sizes = [f"{os.path.basename(p)}:{os.path.getsize(p)}".encode() for p in files]
  model = _sha256([config_bytes] + sizes)
  exported = json.loads(config_bytes).get(llm.BIG_CLIP_SECTION, {}).get("weights_sha256")
  weights = f"sha256:{exported}" if exported else f"sizes:{_sha256(sizes)}"
  with open(os.path.join(llm_path, "tokenizer.json"), "rb") as f:
    tokenizer = _sha256([f.read()])
  return {"model": model, "weights": weights, "attention": attention, "tokenizer": tokenizer,
          "pooling": pooling, "max_len": int(max_len), "dtype": dtype}


def write(cache_dir: str, captions: Sequence[str], features: np.ndarray, key: Mapping[str, Any],
          shard_size: int = 100_000) -> str:
  """Writes `features` [N, dim] of `captions` (N distinct texts) as a cache; returns the index
  path. The index is written last, so a half-written cache has no index and is not used."""
  features = np.asarray(features, np.float32)
  if features.ndim != 2 or len(features) != len(captions):
    raise ValueError(f"features {features.shape} do not match {len(captions)} captions.")
  if len(set(captions)) != len(captions):
    raise ValueError("captions must be distinct (one row per text); deduplicate them first.")
  os.makedirs(cache_dir, exist_ok=True)
  shards = []
  for i, start in enumerate(range(0, len(captions), shard_size)):
    names = {"features": f"features-{i:05d}.npy", "captions": f"captions-{i:05d}.json"}
    np.save(os.path.join(cache_dir, names["features"]), features[start:start + shard_size])
    with open(os.path.join(cache_dir, names["captions"]), "w") as f:
      json.dump(list(captions[start:start + shard_size]), f, ensure_ascii=False)
    shards.append({**names, "count": len(captions[start:start + shard_size])})
  index = {"format": FORMAT, "key": dict(key), "dim": int(features.shape[1]),
           "count": len(captions), "shards": shards}
  path = os.path.join(cache_dir, INDEX)
  with open(path + ".tmp", "w") as f:
    json.dump(index, f, indent=1)
  os.replace(path + ".tmp", path)
  return path


def llm_tokenizer(model_cfg: Any, max_len: int) -> tokenizers.HfTokenizer:
  """The HfTokenizer of the LLM folder `config.model.text.llm.path` (EOS from config.json,
  appended for pooling='eos'; padding with the tower's `llm.PAD_ID`)."""
  llm_cfg = model_cfg.text.llm
  spec = llm.LlmSpec.from_folder(llm_cfg.path)
  tokenizer = tokenizers.HfTokenizer(os.path.join(llm_cfg.path, "tokenizer.json"), max_len,
                                     pad_id=llm.PAD_ID, eos_id=spec.eos_id,
                                     append_eos=llm_cfg.pooling == "eos")
  if tokenizer.vocab_size > spec.vocab_size:
    raise ValueError(f"{tokenizer.path} has {tokenizer.vocab_size} tokens but the LLM's "
                     f"config.json vocab_size is {spec.vocab_size}; they are from different "
                     "models.")
  return tokenizer


def for_llm(model_cfg: Any, max_len: int) -> tokenizers.HfTokenizer | CachedFeatures:
  """The text encoder of an LLM tower: its HfTokenizer, or (with `llm.cache_dir`) the
  embedding cache, checked against the LLM folder, tokenizer, pooling, max_len and dtype."""
  llm_cfg = model_cfg.text.llm
  tokenizer = llm_tokenizer(model_cfg, max_len)
  if llm_cfg.cache_dir:
    return CachedFeatures(llm_cfg.cache_dir, cache_key(llm_cfg.path, llm_cfg.pooling, max_len,
                                                       llm_cfg.dtype, llm_cfg.attention))
  return tokenizer


class CachedFeatures:
  """Looks captions up in a cache; the pipeline uses it in place of a tokenizer:
  `encode(texts)` -> float32 [N, dim] instead of int32 tokens."""

  def __init__(self, cache_dir: str, expected_key: Mapping[str, Any]):
    path = os.path.join(cache_dir, INDEX)
    if not os.path.exists(path):
      raise FileNotFoundError(
          f"No embedding cache at {cache_dir!r} ({INDEX} missing). Make it with "
          "python tools/cache_text_embeddings.py --llm LLM_FOLDER --out "
          f"{cache_dir} ..., or clear config.model.text.llm.cache_dir to run the LLM live.")
    with open(path) as f:
      index = json.load(f)
    if index.get("format") != FORMAT:
      raise StaleCacheError(f"{path}: format {index.get('format')!r}, expected {FORMAT!r}; "
                            "rebuild it with tools/cache_text_embeddings.py.")
    changed = [k for k in sorted(set(expected_key) | set(index["key"]))
               if index["key"].get(k) != expected_key.get(k)]
    if changed:
      detail = "; ".join(f"{k}: cache {index['key'].get(k)!r} vs run {expected_key.get(k)!r}"
                         for k in changed)
      raise StaleCacheError(
          f"The embedding cache {cache_dir} was made with a different {', '.join(changed)} "
          f"({detail}). Rebuild it with tools/cache_text_embeddings.py for this LLM / "
          "pooling / max_len, or point config.model.text.llm.cache_dir elsewhere.")
    self.cache_dir, self.key = cache_dir, dict(index["key"])
    self.max_len = int(self.key["max_len"])  # the pipeline checks it like a tokenizer's
    self.dim = int(index["dim"])
    self.output_shape = (self.dim,)
    self._features = []
    self._row: dict[str, tuple[int, int]] = {}
    for s, shard in enumerate(index["shards"]):
      self._features.append(np.load(os.path.join(cache_dir, shard["features"]), mmap_mode="r"))
      with open(os.path.join(cache_dir, shard["captions"])) as f:
        for r, text in enumerate(json.load(f)):
          self._row[text] = (s, r)

  def __len__(self) -> int:
    return len(self._row)

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """float32 [len(texts), dim]; a caption that is not in the cache is an error."""
    if isinstance(texts, str):
      raise TypeError("encode() takes a sequence of texts; wrap a single text in a list.")
    out = np.empty((len(texts), self.dim), np.float32)
    for i, text in enumerate(texts):
      where = self._row.get(text)
      if where is None:
        raise KeyError(f"Caption {text!r} is not in the embedding cache {self.cache_dir} "
                       f"({len(self)} captions); rebuild the cache over this source.")
      out[i] = self._features[where[0]][where[1]]
    return out


def compute_features(model_cfg: Any, captions: Sequence[str], max_len: int, mesh: Any,
                     batch_size: int = 256) -> np.ndarray:
  """float32 [N, hidden]: pooled features of the frozen LLM of `model_cfg.text.llm.path`,
  its weights sharded over `mesh` by the logical rules, captions over the batch axes."""
  tokenizer = llm_tokenizer(model_cfg, max_len)
  if model_cfg.text.llm.cache_dir:  # a training config: run its LLM, not the cache
    model_cfg = ml_collections.ConfigDict(model_cfg.to_dict())
    model_cfg.text.llm.cache_dir = ""
  make = lambda: llm.LlmTextTower(model_cfg, rngs=nnx.Rngs(params=0))
  graphdef, abstract = nnx.split(nnx.eval_shape(make))
  shardings = nnx.to_pure_dict(sharding.state_shardings(abstract, mesh))
  with jax.set_mesh(mesh):
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(make())), out_shardings=shardings)()
    llm.load_weights(params["decoder"], model_cfg.text.llm.path, shardings["decoder"])
    features_fn = jax.jit(lambda p, t: nnx.merge(graphdef, p).features(t))
    return sharding.embed_batched(features_fn, params, tokenizer.encode(captions), mesh,
                                  batch_size)


def build(model_cfg: Any, captions: Sequence[str], max_len: int, cache_dir: str, mesh: Any,
          batch_size: int = 256, shard_size: int = 100_000) -> str:
  """Computes and writes the cache of `captions` (deduplicated, order kept); the index path."""
  captions = list(dict.fromkeys(captions))
  features = compute_features(model_cfg, captions, max_len, mesh, batch_size)
  llm_cfg = model_cfg.text.llm
  key = cache_key(llm_cfg.path, llm_cfg.pooling, max_len, llm_cfg.dtype, llm_cfg.attention)
  return write(cache_dir, captions, features, key, shard_size)
