"""Host-local input pipeline: deterministic, resumable batches of (image, caption tokens).

Example `e` of the stream is a pure function of (seed, e): its image comes from
`embedded.render_example(seed, 'train', e)`, its caption language and template from an rng
keyed on (seed, e). Step `s` covers examples [s * global_batch, (s + 1) * global_batch);
host `p` of `P` takes the contiguous slice `s * global_batch + p * local_batch + [0,
local_batch)`. So hosts are disjoint, their union is the batch a single host would see, and
the iterator's whole state is the index of the next example.

`make()` serves the other sources (tfds:, shards:, manifest:) through `files.SourceIterator`,
which yields the same batches and has the same get_state / set_state / skipped / close.
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from big_clip import config as config_lib
from big_clip import fileio
from big_clip import workdir as workdir_lib
from big_clip.data import embedded, files, naflex, regions, text_cache, tokenizers
from big_clip.data import languages as languages_lib

CLIP_MEAN, CLIP_STD = config_lib.CLIP_MEAN, config_lib.CLIP_STD
_CAPTION_STREAM = 1  # rng entropy tag: captions get a stream apart from the image's
_LONG_CAPTION_STREAM = 2  # long captions: a stream of their own, short captions unchanged
_PAIR_STREAM = 3  # paired captions (config.data.pair_language): a stream of their own
_REGION_STREAM = 4  # region captions (config.data.max_regions)
_NEGATIVE_STREAM = 5  # hard negatives (config.loss.hard_negatives)


class Tokenizer(Protocol):

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    ...


def normalize(images: np.ndarray, mean: Sequence[float] = CLIP_MEAN,
              std: Sequence[float] = CLIP_STD) -> np.ndarray:
  """uint8 [..., 3] pixels -> float32 (pixel / 255 - mean) / std, per channel."""
  mean, std = _mean_std(mean, std)
  scale = 1.0 / (255.0 * std)
  # One multiply-add over the batch: (x / 255 - m) / s == x * scale - m / s.
  return images.astype(np.float32) * scale - mean / std


def _mean_std(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  if mean.shape != (3,) or std.shape != (3,) or (std <= 0).any():
    raise ValueError(f"config.data.mean / std must be 3 values each (RGB, in [0, 1] pixel "
                     f"units), std > 0; got mean={mean.tolist()}, std={std.tolist()}.")
  return mean, std


def model_images(images: Sequence[np.ndarray] | np.ndarray,
                 data_cfg: ml_collections.ConfigDict) -> np.ndarray:
  """uint8 images -> the image tower's input: normalized float32 [n, H, W, 3], or with
  NaFlex (config.data.max_patches > 0) each at its aspect ratio as a padded patch sequence
  [n, max_patches, p*p*3 + 2] (data/naflex.py). Training, evals and predict all call it."""
  mean, std = _mean_std(data_cfg.mean, data_cfg.std)
  norm = lambda x: normalize(x, mean, std)
  setting = files.naflex_setting(data_cfg)
  if setting:
    return naflex.encode(images, *setting, norm)
  return norm(np.stack(images))


def language_cdf(languages: Mapping[str, float]) -> tuple[tuple[str, ...], np.ndarray]:
  """(languages, cumulative probabilities) of the embedded data, in the canonical order of
  EMBEDDED_LANGUAGES (`languages.language_table`)."""
  names, weights = languages_lib.language_table(languages, order=embedded.EMBEDDED_LANGUAGES)
  return names, np.cumsum(weights / weights.sum())


def example(seed: int, index: int, image_size: int, languages: Sequence[str],
            cumulative: np.ndarray, pair_language: str = ""
            ) -> tuple[np.ndarray, str, str] | tuple[np.ndarray, str, str, str]:
  """(image uint8 [H, W, 3], language, caption) of training example `index`; with
  `pair_language`, + another caption of the same image drawn in that language."""
  image, attrs = embedded.render_example(seed, "train", index, image_size)
  rng = np.random.default_rng([seed, _CAPTION_STREAM, index])
  lang = languages[min(bisect.bisect_right(cumulative, rng.random()), len(languages) - 1)]
  text = embedded.caption(attrs, lang, rng)
  if not pair_language:
    return image, lang, text
  pair = embedded.caption(attrs, pair_language, np.random.default_rng([seed, _PAIR_STREAM, index]))
  return image, lang, text, pair


def fine_example(seed: int, index: int, image_size: int, languages: Sequence[str],
                 cumulative: np.ndarray, max_regions: int, hard_negatives: int
                 ) -> tuple[np.ndarray, str, tuple, list[str]]:
  """`example` (the same image and caption) with its regions, (boxes [R, 4], mask [R],
  captions [R]) in the caption's language, and `hard_negatives` attribute-swapped captions
  ('' pads)."""
  image, attrs, boxes = embedded.render_with_boxes(seed, "train", index, image_size)
  rng = np.random.default_rng([seed, _CAPTION_STREAM, index])
  lang = languages[min(bisect.bisect_right(cumulative, rng.random()), len(languages) - 1)]
  text, negatives = embedded.caption_with_negatives(
      attrs, lang, rng, hard_negatives, np.random.default_rng([seed, _NEGATIVE_STREAM, index]))
  region_rng = np.random.default_rng([seed, _REGION_STREAM, index])
  captions = [{lang: embedded.region_captions(attrs, lang)}] * len(boxes)
  texts = regions.choose_captions(captions, lang, (), region_rng)
  return image, text, regions.pad(boxes, texts, max_regions), negatives


def long_example(seed: int, index: int, image_size: int, long_share: float
                 ) -> tuple[np.ndarray, str, str]:
  """(image, caption, short caption) of training example `index` with long captions on: the
  caption is the long one with probability `long_share`, else the short English one."""
  image, attrs = embedded.render_example(seed, "train", index, image_size)
  short = embedded.caption(attrs, "en", np.random.default_rng([seed, _CAPTION_STREAM, index]))
  rng = np.random.default_rng([seed, _LONG_CAPTION_STREAM, index])
  text = embedded.long_caption(attrs, rng) if rng.random() < long_share else short
  return image, text, short


def fine_fields(fine: Sequence[tuple[tuple, list[str]]], tokenizer: Tokenizer,
                max_regions: int, hard_negatives: int) -> dict[str, np.ndarray]:
  """The region and hard-negative entries of a batch from each example's ((boxes, mask,
  region captions), negatives); captions tokenized like the example captions."""
  out = {}
  b = len(fine)
  if max_regions:
    out["region_boxes"] = np.stack([r[0] for r, _ in fine]).astype(np.float32)
    out["region_mask"] = np.stack([r[1] for r, _ in fine])
    texts = [t for r, _ in fine for t in r[2]]
    out["region_text"] = np.asarray(tokenizer.encode(texts), np.int32).reshape(
        b, max_regions, -1)
  if hard_negatives:
    texts = [t for _, negatives in fine for t in negatives]
    out["negative_text"] = np.asarray(tokenizer.encode(texts), np.int32).reshape(
        b, hard_negatives, -1)
    out["negative_mask"] = np.array([[bool(t) for t in n] for _, n in fine], bool)
  return out


class EmbeddedIterator:
  """Infinite iterator of host-local batches {'image': float32 [b, H, W, 3] normalized,
  'text': int32 [b, max_len]} of the embedded dataset, b = global_batch / process_count.

  Batches are built `prefetch` steps ahead on a background thread; since each batch is a
  pure function of its step, prefetching changes nothing about what is yielded, and
  `get_state` counts batches handed out, not batches built.

  With `data_cfg.long_captions` > 0 that share of captions is long (English only) and,
  with `with_short_captions`, 'text_short' holds every image's short caption as well
  (Long-CLIP §3.2 trains each image with both). With `data_cfg.pair_language`,
  'text_pair' holds another caption of each image in that language. With
  `data_cfg.max_regions` > 0, 'region_boxes' [b, R, 4], 'region_mask' [b, R] and
  'region_text' [b, R, max_len] hold each image's objects (data/regions.py); with
  `hard_negatives` = K > 0, 'negative_text' [b, K, max_len] and 'negative_mask' [b, K]
  hold K captions of each image with one attribute swapped.
  """

  def __init__(self, data_cfg: ml_collections.ConfigDict, process_index: int,
               process_count: int, tokenizer: Tokenizer, seed: int, prefetch: int = 2,
               with_short_captions: bool = False, hard_negatives: int = 0):
    self._global_batch = int(data_cfg.global_batch)
    self._local_batch = self._global_batch // process_count
    self._host_offset = process_index * self._local_batch
    self._image_size = int(data_cfg.image_size)
    self._max_len = int(data_cfg.max_len)
    self._languages, self._cumulative = language_cdf(data_cfg.languages)
    _mean_std(data_cfg.mean, data_cfg.std)  # a bad mean / std fails here, not in a batch
    self._data_cfg = data_cfg
    self._tokenizer, self._seed = tokenizer, int(seed)
    self._long_share = float(data_cfg.long_captions)
    self._with_short = bool(with_short_captions)
    if self._with_short and self._long_share <= 0:
      raise ValueError("with_short_captions needs config.data.long_captions > 0.")
    self._pair_language = str(data_cfg.pair_language)
    if self._pair_language and self._long_share > 0:
      raise ValueError("config.data.pair_language with config.data.long_captions > 0: the "
                       "embedded data pairs short captions only; set one of them to off.")
    if self._pair_language and self._pair_language not in embedded.EMBEDDED_LANGUAGES:
      raise ValueError(f"config.data.pair_language={self._pair_language!r} is not a language "
                       f"of the embedded dataset; available: {embedded.EMBEDDED_LANGUAGES}.")
    self._max_regions, self._negatives = int(data_cfg.max_regions), int(hard_negatives)
    if (self._max_regions or self._negatives) and (self._long_share > 0 or self._pair_language):
      raise ValueError("config.data.max_regions / config.loss.hard_negatives with long "
                       "captions or config.data.pair_language are not supported yet; turn one "
                       "of them off.")
    self._next_example = 0  # first example of the next batch handed out (global index)
    self._prefetch = max(0, int(prefetch))
    self._pool = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="big_clip_data")
                  if self._prefetch else None)
    self._pending: collections.deque[tuple[int, concurrent.futures.Future]] = (
        collections.deque())

  def batch_at(self, first_example: int) -> dict[str, np.ndarray]:
    """This host's part of the global batch that starts at `first_example`."""
    start = first_example + self._host_offset
    images, captions, shorts, pairs, fine = [], [], [], [], []
    for index in range(start, start + self._local_batch):
      if self._max_regions or self._negatives:
        image, text, region, negatives = fine_example(
            self._seed, index, self._image_size, self._languages, self._cumulative,
            self._max_regions, self._negatives)
        fine.append((region, negatives))
      elif self._long_share > 0:
        image, text, short = long_example(self._seed, index, self._image_size,
                                          self._long_share)
        shorts.append(short)
      elif self._pair_language:
        image, _, text, pair = example(self._seed, index, self._image_size, self._languages,
                                       self._cumulative, self._pair_language)
        pairs.append(pair)
      else:
        image, _, text = example(self._seed, index, self._image_size, self._languages,
                                 self._cumulative)
      images.append(image)
      captions.append(text)
    tokens = self._tokenizer.encode(captions)
    # An LLM embedding cache (data/text_cache.py) returns float features [b, dim] instead.
    row_shape = tuple(getattr(self._tokenizer, "output_shape", (self._max_len,)))
    if tokens.shape != (self._local_batch, *row_shape):
      raise ValueError(f"The tokenizer returned {tokens.shape} tokens for "
                       f"{self._local_batch} captions; expected max_len={self._max_len} "
                       "(config.data.max_len must match the tokenizer's max_len).")
    batch = {"image": model_images(images, self._data_cfg),
             "text": tokens if tokens.dtype == np.float32 else tokens.astype(np.int32)}
    if self._with_short:
      batch["text_short"] = self._tokenizer.encode(shorts).astype(np.int32)
    if self._pair_language:
      batch["text_pair"] = self._tokenizer.encode(pairs).astype(np.int32)
    if fine:
      batch.update(fine_fields(fine, self._tokenizer, self._max_regions, self._negatives))
    return batch

  def __iter__(self) -> EmbeddedIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    first = self._next_example
    if self._pool is None:
      batch = self.batch_at(first)
    else:
      if not self._pending or self._pending[0][0] != first:
        self._drop_pending()
      self._fill_queue(first)
      batch = self._pending.popleft()[1].result()
      self._fill_queue(first + self._global_batch)
    self._next_example = first + self._global_batch
    return batch

  def _fill_queue(self, first: int) -> None:
    """Queues the batches starting at `first` up to `prefetch` ahead."""
    next_first = self._pending[-1][0] + self._global_batch if self._pending else first
    while len(self._pending) < self._prefetch:
      self._pending.append((next_first, self._pool.submit(self.batch_at, next_first)))
      next_first += self._global_batch

  def _drop_pending(self) -> None:
    for _, future in self._pending:
      future.cancel()
    self._pending.clear()

  def skipped(self) -> dict[str, int]:
    """Skipped examples by reason: none, the embedded data is generated well-formed."""
    return {}

  def get_state(self) -> dict[str, Any]:
    """JSON-serializable position: resuming from it yields exactly the next batches."""
    return {"next_example": self._next_example, "seed": self._seed}

  def set_state(self, state: Mapping[str, Any]) -> None:
    if "next_example" not in state:
      raise ValueError(f"Not a data-iterator state (no 'next_example'): {dict(state)}.")
    if int(state.get("seed", self._seed)) != self._seed:
      raise ValueError(f"The data state was saved with seed={state['seed']} but this run "
                       f"uses seed={self._seed}; resume with the same config.seed, or the "
                       "data order would silently change.")
    self._drop_pending()
    self._next_example = int(state["next_example"])

  def close(self) -> None:
    """Stops the prefetch thread (batches being built finish first)."""
    self._drop_pending()
    if self._pool is not None:
      self._pool.shutdown(wait=True)
      self._pool = None

  def __del__(self) -> None:
    if getattr(self, "_pool", None) is not None:
      self._pool.shutdown(wait=False)


def make(data_cfg: ml_collections.ConfigDict, process_index: int, process_count: int, *,
         tokenizer: Tokenizer, seed: int, prefetch: int = 2,
         with_short_captions: bool = False, hard_negatives: int = 0) -> Any:
  """The iterator of `data_cfg.source` that yields this host's slice of every global batch:
  `EmbeddedIterator` for 'embedded', else `files.SourceIterator` (tfds:, shards:,
  manifest:). Both yield {'image', 'text'} and have get_state/set_state/skipped/close."""
  if data_cfg.source != "embedded" and not data_cfg.source.startswith(
      config_lib.SOURCE_PREFIXES):
    raise ValueError(f"config.data.source={data_cfg.source!r} is not supported; allowed: "
                     f"'embedded' or {', '.join(p + '...' for p in config_lib.SOURCE_PREFIXES)}.")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, {process_count}).")
  if data_cfg.global_batch % process_count:
    raise ValueError(f"config.data.global_batch={data_cfg.global_batch} is not divisible by "
                     f"the {process_count} hosts; use a multiple of {process_count}.")
  tokenizer_len = getattr(tokenizer, "max_len", data_cfg.max_len)
  if tokenizer_len != data_cfg.max_len:
    raise ValueError(f"The tokenizer pads to {tokenizer_len} tokens but config.data.max_len="
                     f"{data_cfg.max_len}; build the tokenizer with the config's max_len.")
  if data_cfg.source != "embedded":
    if hard_negatives:
      raise ValueError("config.loss.hard_negatives needs config.data.source='embedded' "
                       "(attribute swaps for other sources are not supported yet).")
    mean, std = _mean_std(data_cfg.mean, data_cfg.std)
    return files.SourceIterator(data_cfg, process_index, process_count, tokenizer, seed,
                                prefetch, normalize=lambda x: normalize(x, mean, std),
                                with_short_captions=with_short_captions)
  return EmbeddedIterator(data_cfg, process_index, process_count, tokenizer, seed, prefetch,
                          with_short_captions, hard_negatives)


def caption_corpus(data_cfg: ml_collections.ConfigDict, seed: int) -> list[str]:
  """Text to train the source's sentencepiece model on when config.data.tokenizer.path=''."""
  if data_cfg.source == "embedded":
    return embedded.sample_captions(n=60_000, seed=seed,
                                    long_captions=data_cfg.long_captions > 0)
  return files.read_captions(data_cfg)


def build_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> Any:
  """The run's text encoder: the LLM tower's tokenizer (or its embedding cache); else the
  sentencepiece model of config.data.tokenizer.path, or the one trained in the workdir on
  the source's captions at first use (one process trains it, the others wait and load it)."""
  if config.model.text.kind == "llm" and config.model.text.llm.path:
    return text_cache.for_llm(config.model, config.data.max_len)
  trained = fileio.exists(workdir_lib.tokenizer_path(workdir))
  corpus = lambda: caption_corpus(config.data, config.seed)
  if jax.process_count() > 1 and not config.data.tokenizer.path and not trained:
    if jax.process_index() == 0:
      tokenizers.get_or_train(config.data.tokenizer, workdir, corpus, config.data.max_len)
    multihost_utils.sync_global_devices("tokenizer")
  tok = tokenizers.get_or_train(config.data.tokenizer, workdir, corpus, config.data.max_len)
  if tok.vocab_size > config.model.text.vocab_size:
    raise ValueError(f"The tokenizer has {tok.vocab_size} tokens but "
                     f"config.model.text.vocab_size={config.model.text.vocab_size}; raise it "
                     "to at least the tokenizer's size.")
  return tok
