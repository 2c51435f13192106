"""The embedded dataset, its captions, the sentencepiece tokenizer and the host-local iterator."""

import json
import os
import re
import unicodedata

import ml_collections
import numpy as np
import pytest

from big_clip import config as config_lib
from big_clip.data import pipeline, embedded, tokenizers

SIZE = 64
SATURATED = 60  # max - min over RGB: objects are > 120, the grey background < 15


def _object_mask(image: np.ndarray) -> np.ndarray:
  rgb = image.astype(np.int16)
  return rgb.max(-1) - rgb.min(-1) > SATURATED


def _components(mask: np.ndarray) -> list[np.ndarray]:
  """4-connected components of a boolean mask, each as an [n, 2] array of (y, x): a tiny
  flood fill, independent of the renderer."""
  seen = np.zeros_like(mask)
  found = []
  for y0, x0 in zip(*np.nonzero(mask)):
    if seen[y0, x0]:
      continue
    seen[y0, x0] = True
    stack, pixels = [(y0, x0)], []
    while stack:
      y, x = stack.pop()
      pixels.append((y, x))
      for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
        if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] \
            and not seen[ny, nx]:
          seen[ny, nx] = True
          stack.append((ny, nx))
    found.append(np.array(pixels))
  return found


@pytest.fixture(scope="module")
def examples():
  return [embedded.render_example(7, "train", i, SIZE) for i in range(150)]


# ---------------------------------------------------------------------------------------
# Images match their attributes.
# ---------------------------------------------------------------------------------------
def test_dominant_object_colour_is_the_labelled_colour(examples):
  for image, attrs in examples:
    mask = _object_mask(image)
    mean_rgb = image[mask].astype(np.float32).mean(0)
    nearest = np.argmin(((embedded.PALETTE - mean_rgb) ** 2).sum(-1))
    assert nearest == attrs["colour"], embedded.attribute_names(attrs)


def test_background_is_unsaturated_grey(examples):
  for image, _ in examples:
    mask = _object_mask(image)
    rgb = image[~mask].astype(np.int16)
    assert (rgb.max(-1) - rgb.min(-1)).max() < 20


def test_every_object_has_a_dark_outline(examples):
  for image, _ in examples:
    mask = _object_mask(image)
    ring = np.zeros_like(mask)  # pixels next to an object that are not part of it
    ring[1:] |= mask[:-1]
    ring[:-1] |= mask[1:]
    ring[:, 1:] |= mask[:, :-1]
    ring[:, :-1] |= mask[:, 1:]
    ring &= ~mask
    assert image[ring].max() < 60


def test_number_of_connected_objects_equals_count(examples):
  for image, attrs in examples:
    assert len(_components(_object_mask(image))) == attrs["count"], embedded.attribute_names(attrs)


def test_single_object_centroid_is_on_the_labelled_side(examples):
  singles = [(im, a) for im, a in examples if a["count"] == 1]
  assert len(singles) > 20
  for image, attrs in singles:
    y, x = np.nonzero(_object_mask(image))
    dy, dx = y.mean() + 0.5 - SIZE / 2, x.mean() + 0.5 - SIZE / 2
    side = SIZE / 8
    expected = {"left": dx < -side and abs(dx) > abs(dy),
                "right": dx > side and abs(dx) > abs(dy),
                "top": dy < -side and abs(dy) > abs(dx),
                "bottom": dy > side and abs(dy) > abs(dx),
                "centre": abs(dx) < side and abs(dy) < side}
    assert expected[embedded.POSITIONS[attrs["position"]]], (embedded.attribute_names(attrs), dy, dx)


def test_large_objects_have_more_pixels_than_small_ones_of_the_same_shape(examples):
  pixels = {}  # (shape, size) -> pixels per object
  for image, attrs in examples:
    per_object = _object_mask(image).sum() / attrs["count"]
    pixels.setdefault((attrs["shape"], attrs["size"]), []).append(per_object)
  for shape in range(len(embedded.SHAPES)):
    small, large = pixels[(shape, 0)], pixels[(shape, 1)]
    assert max(small) * 1.5 < min(large), embedded.SHAPES[shape]


def test_all_shapes_of_one_size_cover_the_same_area(examples):
  # Otherwise "how much colour" would tell triangles and crosses from squares, a shortcut
  # a small CLIP took instead of learning outlines.
  for size in (0, 1):
    means = []
    for shape in range(len(embedded.SHAPES)):
      areas = [_object_mask(im).sum() / a["count"] for im, a in examples
               if a["shape"] == shape and a["size"] == size]
      means.append(np.mean(areas))
    assert max(means) / min(means) < 1.1, (size, means)


def test_shape_outline_matches_the_labelled_shape(examples):
  # Width of each large object at 1/4 and 3/4 of its height, as a fraction of its width:
  # an independent signature of each shape's geometry.
  signature = {"circle": (0.87, 0.87), "square": (1.0, 1.0), "triangle": (0.25, 0.75),
               "cross": (0.3, 0.3), "diamond": (0.5, 0.5)}
  names = list(signature)
  checked = 0
  for image, attrs in examples:
    if attrs["size"] != 1:
      continue
    for pixels in _components(_object_mask(image)):
      ys, xs = pixels[:, 0], pixels[:, 1]
      height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
      rows = [ys.min() + round(height * q) for q in (0.25, 0.75)]
      measured = np.array([(ys == row).sum() / width for row in rows])
      distances = [np.abs(measured - np.array(signature[n])).max() for n in names]
      assert names[int(np.argmin(distances))] == embedded.SHAPES[attrs["shape"]], measured
      checked += 1
  assert checked > 50


# ---------------------------------------------------------------------------------------
# Determinism.
# ---------------------------------------------------------------------------------------
def test_same_seed_split_and_index_give_the_same_example_and_caption():
  langs, cumulative = pipeline.language_cdf({lang: 1.0 for lang in embedded.EMBEDDED_LANGUAGES})
  first = pipeline.example(3, 11, SIZE, langs, cumulative)
  again = pipeline.example(3, 11, SIZE, langs, cumulative)
  np.testing.assert_array_equal(first[0], again[0])
  assert first[1:] == again[1:]
  other_seed = pipeline.example(4, 11, SIZE, langs, cumulative)
  assert not np.array_equal(first[0], other_seed[0])


def test_splits_hold_different_images():
  for index in range(5):
    train, _ = embedded.render_example(0, "train", index, SIZE)
    test, _ = embedded.render_example(0, "test", index, SIZE)
    assert not np.array_equal(train, test)
  with pytest.raises(ValueError, match="Unknown split"):
    embedded.render_example(0, "dev", 0, SIZE)


# ---------------------------------------------------------------------------------------
# Captions.
# ---------------------------------------------------------------------------------------
_SCRIPTS = {"en": ("LATIN",), "de": ("LATIN",), "fr": ("LATIN",), "es": ("LATIN",),
            "ru": ("CYRILLIC",), "zh": ("CJK",), "ja": ("CJK", "HIRAGANA", "KATAKANA"),
            "ar": ("ARABIC",), "hi": ("DEVANAGARI",)}


def _captions(lang: str, n: int, seed: int = 0) -> list[str]:
  rng = np.random.default_rng(seed)
  return [embedded.caption(embedded.random_attrs(rng), lang, rng) for _ in range(n)]


def test_at_least_eight_languages_and_three_non_latin_scripts():
  assert set(_SCRIPTS) == set(embedded.EMBEDDED_LANGUAGES)
  non_latin = {s for scripts in _SCRIPTS.values() for s in scripts} - {"LATIN"}
  assert len(embedded.EMBEDDED_LANGUAGES) >= 8 and len(non_latin) >= 3


@pytest.mark.parametrize("lang", sorted(_SCRIPTS))
def test_captions_are_written_in_the_languages_script(lang):
  for text in _captions(lang, 200):
    letters = [ch for ch in text if ch.isalpha()]
    assert letters, text
    bad = [ch for ch in letters if not unicodedata.name(ch).startswith(_SCRIPTS[lang])]
    assert not bad, (text, bad)


def test_captions_agree_in_gender_number_and_case():
  # Two small red circles; a large orange cross (feminine in fr/es) on the left.
  two = {"shape": 0, "colour": 0, "size": 0, "count": 2, "position": -1}
  three = {"shape": 3, "colour": 1, "size": 1, "count": 3, "position": -1}
  one = {"shape": 3, "colour": 5, "size": 1, "count": 1, "position": 0}
  expected = [
      (two, "en", "two small red circles."), (three, "en", "three large green crosses."),
      (one, "en", "there is a large orange cross on the left."),
      (two, "de", "Zwei kleine rote Kreise."),
      (two, "de", "Ein Foto mit zwei kleinen roten Kreisen."),
      (one, "de", "Links ist ein großes orangefarbenes Kreuz."),
      (two, "fr", "Deux petits cercles rouges."), (three, "fr", "Trois grandes croix vertes."),
      (one, "fr", "La croix est grande et orange."), (one, "fr", "Quelque chose d'orange."),
      (two, "es", "Dos círculos rojos pequeños."), (three, "es", "Tres cruces verdes grandes."),
      (one, "es", "Hay una cruz naranja grande a la izquierda."),
      (two, "ru", "Два маленьких красных круга."),
      (three, "ru", "Фотография с тремя большими зелёными крестами."),
      (one, "ru", "Слева большой оранжевый крест."),
      (two, "zh", "两个红色的小圆形。"), (one, "zh", "左边有一个橙色的大十字形。"),
      (two, "ja", "二つの小さな赤い円。"), (one, "ja", "画像の左側に大きなオレンジ色の十字があります。"),
      (two, "ar", "دائرتان صغيرتان حمراوان."),  # feminine dual
      (three, "ar", "ثلاثة صلبان كبيرة خضراء."),  # polarity + non-human plural
      (two, "hi", "दो छोटे लाल वृत्त।"), (two, "hi", "दो छोटे लाल वृत्तों की तस्वीर।"),
      (one, "hi", "बाईं ओर एक बड़ा नारंगी क्रॉस है।"),
  ]
  for attrs, lang, text in expected:
    options = embedded.all_captions(attrs, lang)
    assert text in options, (lang, text, options)


@pytest.mark.parametrize("lang", sorted(_SCRIPTS))
def test_zeroshot_classnames_appear_in_the_training_captions(lang):
  corpus = " ".join(_captions(lang, 3000)).lower()
  for task in embedded.ZEROSHOT_TASKS:
    names = embedded.zeroshot_classnames(task, lang)
    assert len(names) == len(embedded.COLOURS if task == "colour" else embedded.SHAPES)
    assert len(set(names)) == len(names)
    for name in names:
      assert name.lower() in corpus, (task, name)
    for template in embedded.zeroshot_templates(task, lang):
      assert template.count("{c}") == 1, template


def test_zeroshot_set_comes_from_the_test_split():
  images, labels = embedded.zeroshot_set("shape", 12, seed=5, image_size=SIZE)
  assert images.shape == (12, SIZE, SIZE, 3) and images.dtype == np.uint8
  assert labels.dtype == np.int32 and labels.min() >= 0 and labels.max() < len(embedded.SHAPES)
  test_image, test_attrs = embedded.render_example(5, "test", 3, SIZE)
  np.testing.assert_array_equal(images[3], test_image)
  assert labels[3] == test_attrs["shape"]
  with pytest.raises(ValueError, match="config.eval.zeroshot_tasks"):
    embedded.zeroshot_classnames("size", "en")


# ---------------------------------------------------------------------------------------
# Tokenizer.
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("spm") / "spm.model"
  return tokenizers.train_spm(embedded.sample_captions(3000, seed=0), str(path), vocab_size=1000)


def test_round_trip_in_every_language_without_unknown_pieces(spm_path):
  tok = tokenizers.SpmTokenizer(spm_path, max_len=64)
  for lang in embedded.EMBEDDED_LANGUAGES:
    text = _captions(lang, 1, seed=1)[0]
    ids = tok.encode([text])[0]
    assert tokenizers.SPM_UNK_ID not in ids
    # NFKC normalization folds e.g. the full-width comma; the rest comes back unchanged.
    assert tok.decode(ids) == unicodedata.normalize("NFKC", text)
  unseen = "龘🦜"  # never in the corpus: spelled by byte fallback, still no <unk>
  ids = tok.encode([unseen])[0]
  assert tokenizers.SPM_UNK_ID not in ids and tok.decode(ids) == unseen


def test_captions_of_every_language_fit_in_32_tokens_uncut(spm_path):
  # The word-shuffled corpus copies make words pieces; without them Hindi captions were
  # spelled letter by letter and cut at 32 tokens, losing the shape word at the end.
  tok = tokenizers.SpmTokenizer(spm_path, max_len=64)
  for lang in embedded.EMBEDDED_LANGUAGES:
    lengths = (tok.encode(_captions(lang, 300)) != 0).sum(1)
    assert lengths.max() <= 28, lang


def test_encode_appends_eos_pads_with_zero_and_keeps_eos_when_truncating(spm_path):
  tok = tokenizers.SpmTokenizer(spm_path, max_len=8)
  assert (tok.pad_id, tok.eos_id) == (0, 3) and tok.vocab_size == 1000
  short, long = tok.encode(["a red circle.", "three large purple diamonds " * 5])
  length = int((short != 0).sum())
  assert short[length - 1] == tok.eos_id and (short[length:] == 0).all()
  assert (short[:length - 1] != tok.eos_id).all()
  assert long[-1] == tok.eos_id and (long != 0).all()
  full = tokenizers.SpmTokenizer(spm_path, max_len=64).encode(["three large purple diamonds " * 5])
  np.testing.assert_array_equal(long[:7], full[0, :7])


def test_missing_model_names_the_path_and_the_config_key(tmp_path):
  missing = str(tmp_path / "nope.model")
  with pytest.raises(FileNotFoundError, match=re.escape(missing)) as error:
    tokenizers.SpmTokenizer(missing, max_len=16)
  assert "config.data.tokenizer.path" in str(error.value)


def test_vocab_too_small_is_a_clear_error_and_too_large_is_clamped(tmp_path):
  corpus = embedded.sample_captions(300, seed=0)
  with pytest.raises(ValueError, match="config.data.tokenizer.vocab_size"):
    tokenizers.train_spm(corpus, str(tmp_path / "small.model"), vocab_size=100)
  path = tokenizers.train_spm(corpus, str(tmp_path / "large.model"), vocab_size=100_000)
  assert 300 < tokenizers.SpmTokenizer(path, 16).vocab_size < 100_000
  assert sorted(os.listdir(tmp_path)) == ["large.model", "large.vocab"]  # no temp files left


def test_get_or_train_caches_the_model_in_the_workdir(tmp_path):
  calls = []

  def corpus():
    calls.append(1)
    return embedded.sample_captions(300, seed=0)

  cfg = ml_collections.ConfigDict({"path": "", "vocab_size": 800})
  first = tokenizers.get_or_train(cfg, str(tmp_path), corpus, max_len=16)
  assert first.model_path == str(tmp_path / "tokenizer" / "spm.model")
  mtime = os.path.getmtime(first.model_path)
  second = tokenizers.get_or_train(cfg, str(tmp_path), corpus, max_len=16)
  assert os.path.getmtime(second.model_path) == mtime and len(calls) == 1
  explicit = ml_collections.ConfigDict({"path": str(tmp_path / "missing.model"), "vocab_size": 8})
  with pytest.raises(FileNotFoundError, match="missing.model"):
    tokenizers.get_or_train(explicit, str(tmp_path), corpus, max_len=16)


# ---------------------------------------------------------------------------------------
# Iterator: batches, resume, host sharding.
# ---------------------------------------------------------------------------------------
def _data_cfg(**overrides) -> ml_collections.ConfigDict:
  cfg = dict(source="embedded", global_batch=8, image_size=SIZE, max_len=24,
             languages={"en": 1.0, "zh": 1.0, "ar": 2.0, "hi": 0.5},
             mean=pipeline.CLIP_MEAN, std=pipeline.CLIP_STD)
  cfg.update(overrides)
  data = config_lib.base().data  # every key of the schema, then the test's values
  data.update(cfg)
  return data


@pytest.fixture(scope="module")
def tok(spm_path):
  return tokenizers.SpmTokenizer(spm_path, max_len=24)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_batch_has_the_promised_shapes_and_normalization(tok):
  it = pipeline.make(_data_cfg(), 0, 1, tokenizer=tok, seed=0)
  batch = next(it)
  it.close()
  assert batch["image"].shape == (8, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
  assert batch["text"].shape == (8, 24) and batch["text"].dtype == np.int32
  image, _, _ = pipeline.example(0, 0, SIZE, *pipeline.language_cdf(_data_cfg().languages))
  expected = (image / 255.0 - np.array(pipeline.CLIP_MEAN)) / np.array(pipeline.CLIP_STD)
  np.testing.assert_allclose(batch["image"][0], expected, atol=1e-5)


def test_resumed_iterator_continues_with_identical_batches(tok):
  it = pipeline.make(_data_cfg(), 0, 1, tokenizer=tok, seed=1)
  batches = _take(it, 2)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  batches += _take(it, 3)
  it.close()
  resumed = pipeline.make(_data_cfg(), 0, 1, tokenizer=tok, seed=1, prefetch=0)
  resumed.set_state(state)
  for expected, got in zip(batches[2:], _take(resumed, 3)):
    for key in ("image", "text"):
      assert expected[key].tobytes() == got[key].tobytes()
  assert not np.array_equal(batches[0]["image"], batches[2]["image"])
  with pytest.raises(ValueError, match="config.seed"):
    pipeline.make(_data_cfg(), 0, 1, tokenizer=tok, seed=2).set_state(state)


def test_two_hosts_together_see_exactly_the_single_host_batch(tok):
  single = pipeline.make(_data_cfg(), 0, 1, tokenizer=tok, seed=3, prefetch=0)
  hosts = [pipeline.make(_data_cfg(), p, 2, tokenizer=tok, seed=3, prefetch=0) for p in (0, 1)]
  for _ in range(2):
    whole = next(single)
    parts = [next(h) for h in hosts]
    assert parts[0]["image"].shape[0] == 4
    for key in ("image", "text"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_language_weights_are_respected(tok):
  langs, cumulative = pipeline.language_cdf({"en": 1.0, "ru": 3.0, "ja": 0.0})
  picked = [pipeline.example(0, i, 16, langs, cumulative)[1] for i in range(400)]
  assert "ja" not in picked
  assert 0.65 < picked.count("ru") / len(picked) < 0.85


def test_bad_data_config_errors_name_the_key(tok):
  with pytest.raises(ValueError, match="'xx'.*available"):
    pipeline.make(_data_cfg(languages={"en": 1.0, "xx": 1.0}), 0, 1, tokenizer=tok, seed=0)
  with pytest.raises(ValueError, match="config.data.source"):
    pipeline.make(_data_cfg(source="webdataset:x"), 0, 1, tokenizer=tok, seed=0)
  with pytest.raises(ValueError, match="config.data.global_batch=8 is not divisible"):
    pipeline.make(_data_cfg(), 0, 3, tokenizer=tok, seed=0)
  with pytest.raises(ValueError, match="config.data.max_len"):
    pipeline.make(_data_cfg(max_len=32), 0, 1, tokenizer=tok, seed=0)
