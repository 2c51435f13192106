"""Real sources: shards (tar, TFRecord), manifests, tfds; host sharding, exact resume, bad
samples, caption and language sampling, tokenizers.

Every example image is a PNG whose red channel is 4 * its id everywhere (so any crop of it,
resized, still reads back as its id) and whose blue channel is noise (so crops differ).
"""

import importlib.util
import io
import json
import os
import tarfile

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from big_clip import config as config_lib
from big_clip.data import files, pipeline, shards, tokenizers
from big_clip.data import languages as languages_lib

SIZE = 8
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pixels(i: int, side: int = 20) -> np.ndarray:
  rng = np.random.default_rng(i)
  img = np.zeros((side, side, 3), np.uint8)
  img[..., 0] = 4 * i
  img[..., 1] = 128
  img[..., 2] = rng.integers(0, 256, (side, side))
  return img


def _png(i: int) -> bytes:
  out = io.BytesIO()
  Image.fromarray(_pixels(i)).save(out, format="PNG")
  return out.getvalue()


def _example(i: int, captions=None) -> shards.RawExample:
  captions = captions or {"en": [f"photo {i}"], "de": [f"foto {i}", f"bild {i}"]}
  return shards.RawExample(f"ex{i:03d}", _png(i), "png", captions, {}, i % 3)


def _ids(batch: dict) -> list[int]:
  """Example ids of a normalized batch, from the red channel."""
  mean, std = np.array(config_lib.CLIP_MEAN), np.array(config_lib.CLIP_STD)
  red = (batch["image"][..., 0] * std[0] + mean[0]) * 255  # [b, H, W]
  return [int(round(float(np.median(r)) / 4)) for r in red]


class CharTokenizer:
  """Characters -> code points: a tokenizer whose ids can be read back without a model."""
  max_len = 16

  def encode(self, texts):
    out = np.zeros((len(texts), self.max_len), np.int32)
    for row, text in enumerate(texts):
      ids = [ord(c) for c in text][:self.max_len]
      out[row, :len(ids)] = ids
    return out


def _text(row: np.ndarray) -> str:
  return "".join(chr(i) for i in row if i)


def _cfg(source: str, **overrides) -> ml_collections.ConfigDict:
  c = config_lib.base().data
  c.update(source=source, global_batch=4, image_size=SIZE, max_len=16, crop_min_scale=0.5)
  c.languages = overrides.pop("languages", {"en": 1.0, "de": 1.0})  # replace, not merge
  c.update(overrides)
  return c


def _iterator(source: str, p: int = 0, n: int = 1, seed: int = 0, **overrides):
  return pipeline.make(_cfg(source, **overrides), p, n, tokenizer=CharTokenizer(), seed=seed)


def _take(it, n):
  return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def tar_shards(tmp_path_factory):
  """30 examples in 5 tar shards of 6."""
  prefix = str(tmp_path_factory.mktemp("tar") / "part")
  shards.write_shards((_example(i) for i in range(30)), prefix, "tar", 6)
  return prefix + "-*.tar"


# ---------------------------------------------------------------------------------------
# make_shards.py writes what it read.
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def make_shards_tool():
  spec = importlib.util.spec_from_file_location("make_shards",
                                                os.path.join(REPO, "tools", "make_shards.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  yield module
  module.FLAGS.unparse_flags()


def _tiny_manifest(folder, n=6) -> str:
  os.makedirs(folder / "images", exist_ok=True)
  items = []
  for i in range(n):
    ext = "png" if i % 2 else "jpg"
    Image.fromarray(_pixels(i)).save(folder / "images" / f"{i}.{ext}")
    items.append({"image": f"images/{i}.{ext}", "split": "val" if i == n - 1 else "train",
                  "captions": {"en": [f"photo {i}"], "zh": [f"照片 {i}", f"图片 {i}"]},
                  "label": i})
  (folder / "manifest.json").write_text(json.dumps({"items": items}, ensure_ascii=False))
  return str(folder / "manifest.json")


@pytest.mark.parametrize("fmt", ["tar", "tfrecord"])
def test_make_shards_output_reads_back_identical(make_shards_tool, tmp_path, fmt):
  manifest = _tiny_manifest(tmp_path)
  out = str(tmp_path / "shards" / "train")
  make_shards_tool.FLAGS(["make_shards", f"--manifest={manifest}", "--split=train",
                          f"--out={out}", f"--format={fmt}", "--per_shard=2"])
  make_shards_tool.main([])
  paths = sorted(os.listdir(tmp_path / "shards"))
  assert paths == [f"train-0000{k}.{fmt}" for k in range(3)]  # 5 train items, 2 per shard
  read = [ex for p in paths for ex in shards.read_all(str(tmp_path / "shards" / p))]
  assert [ex.key for ex in read] == ["0", "1", "2", "3", "4"]
  for i, ex in enumerate(read):
    ext = "png" if i % 2 else "jpg"
    assert ex.image == (tmp_path / "images" / f"{i}.{ext}").read_bytes()
    assert ex.image_ext == ext
    assert ex.captions == {"en": [f"photo {i}"], "zh": [f"照片 {i}", f"图片 {i}"]}
    assert ex.label == i


# ---------------------------------------------------------------------------------------
# Order: hosts, epochs, resume.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,n_files", [("tar", 5), ("tfrecord", 5), ("tar", 1)])
def test_two_hosts_cover_every_example_exactly_once_per_epoch(tmp_path, fmt, n_files):
  prefix = str(tmp_path / "part")
  shards.write_shards((_example(i) for i in range(30)), prefix, fmt, 30 // n_files)
  seen = []
  for p in (0, 1):
    it = _iterator(f"shards:{prefix}-*.{fmt}", p, 2, global_batch=2)  # local batch 1
    # by file (5 files: 18 + 12 examples) or by example (1 file: 15 + 15)
    n_host = (18 if p == 0 else 12) if n_files == 5 else 15
    host = [i for b in _take(it, n_host) for i in _ids(b)]
    assert sorted(host) == sorted(set(host)) and len(host) == n_host  # once each
    assert it.get_state()["positions"][p] == [0, n_host]  # the end of epoch 0
    second_epoch = [i for b in _take(it, n_host) for i in _ids(b)]
    it.close()
    assert sorted(second_epoch) == sorted(host) and second_epoch != host  # reshuffled
    seen += host
  assert sorted(seen) == list(range(30))


def test_order_depends_only_on_the_seed(tar_shards):
  runs = []
  for seed in (0, 0, 1):
    it = _iterator(f"shards:{tar_shards}", seed=seed)
    runs.append([b["image"].tobytes() + b["text"].tobytes() for b in _take(it, 4)])
    it.close()
  assert runs[0] == runs[1] and runs[0] != runs[2]


def test_resume_after_k_batches_equals_the_uninterrupted_run(tar_shards):
  # 30 examples, batch 4: batches 7-8 cross into epoch 2, so resume must too.
  it = _iterator(f"shards:{tar_shards}")
  expected = _take(it, 10)
  it.close()
  for k in (3, 7):
    first = _iterator(f"shards:{tar_shards}")
    _take(first, k)
    state = json.loads(json.dumps(first.get_state()))  # as the checkpoint stores it
    first.close()
    resumed = _iterator(f"shards:{tar_shards}")
    resumed.set_state(state)
    for want, got in zip(expected[k:], _take(resumed, 10 - k)):
      assert want["image"].tobytes() == got["image"].tobytes()
      np.testing.assert_array_equal(want["text"], got["text"])
    resumed.close()
  with pytest.raises(ValueError, match="same seed"):
    _iterator(f"shards:{tar_shards}", seed=5).set_state(state)


def test_random_crop_and_caption_vary_by_epoch_but_centre_crop_does_not(tar_shards):
  def by_id(it, n):
    out = {}
    for b in _take(it, n):
      for i, img, txt in zip(_ids(b), b["image"], b["text"]):
        out[i] = (img.tobytes(), _text(txt))
    return out

  it = _iterator(f"shards:{tar_shards}", global_batch=2)
  epoch0, epoch1 = by_id(it, 15), by_id(it, 15)
  it.close()
  assert sum(epoch0[i][0] != epoch1[i][0] for i in range(30)) > 25  # new crops
  assert sum(epoch0[i][1] != epoch1[i][1] for i in range(30)) > 5  # new caption draws
  for i in range(30):
    assert epoch0[i][1] in (f"photo {i}", f"foto {i}", f"bild {i}")
  it = _iterator(f"shards:{tar_shards}", global_batch=2, crop_min_scale=1.0)
  centre0, centre1 = by_id(it, 15), by_id(it, 15)
  it.close()
  assert all(centre0[i][0] == centre1[i][0] for i in range(30))
  # centre crop of a square image = the whole image, bicubic-resized (PIL as reference)
  want = np.asarray(Image.fromarray(_pixels(7)).resize((SIZE, SIZE), Image.Resampling.BICUBIC))
  got = np.frombuffer(centre0[7][0], np.float32).reshape(SIZE, SIZE, 3)
  mean, std = np.array(config_lib.CLIP_MEAN), np.array(config_lib.CLIP_STD)
  np.testing.assert_allclose((got * std + mean) * 255, want, atol=1e-3)


def test_flip_mirrors_about_half_the_images_and_leaves_captions_alone(tar_shards):
  def by_id(**kw):
    it = _iterator(f"shards:{tar_shards}", global_batch=2, crop_min_scale=1.0, **kw)
    out = {}
    for b in _take(it, 15):
      for i, img, txt in zip(_ids(b), b["image"], b["text"]):
        out[i] = (img, _text(txt))
    it.close()
    return out

  plain, flipped, again = by_id(), by_id(flip_prob=0.5), by_id(flip_prob=0.5)
  mirrored = [i for i in range(30) if not np.array_equal(flipped[i][0], plain[i][0])]
  for i in range(30):
    want = plain[i][0][:, ::-1] if i in mirrored else plain[i][0]
    np.testing.assert_array_equal(flipped[i][0], want)  # mirrored exactly, or untouched
    np.testing.assert_array_equal(again[i][0], flipped[i][0])  # the same draw every run
    assert flipped[i][1] == plain[i][1]  # its own rng stream: captions unchanged
  assert 8 <= len(mirrored) <= 22  # Binomial(30, 0.5): outside this with p < 0.01


def test_pair_caption_is_another_caption_of_the_same_image_in_the_pair_language(tar_shards):
  def by_id(**kw):
    it = _iterator(f"shards:{tar_shards}", global_batch=2, **kw)
    out = {}
    for b in _take(it, 15):
      pairs = b.get("text_pair", b["text"])
      for i, img, txt, pair in zip(_ids(b), b["image"], b["text"], pairs):
        out[i] = (img, _text(txt), _text(pair))
    it.close()
    return out

  plain, german, english = by_id(), by_id(pair_language="de"), by_id(pair_language="en")
  for i in range(30):
    np.testing.assert_array_equal(german[i][0], plain[i][0])  # its own rng stream: image
    assert german[i][1] == english[i][1] == plain[i][1]  # and caption draws unchanged
    drawn = plain[i][1]
    # de has two captions: the pair is always the other one (also when 'photo i' was drawn).
    assert german[i][2] in (f"foto {i}", f"bild {i}") and german[i][2] != drawn
    assert english[i][2] == f"photo {i}"  # the only en caption; itself when it was drawn
  assert {plain[i][1] for i in range(30)} & {f"photo {i}" for i in range(30)}  # both cases


# ---------------------------------------------------------------------------------------
# Bad data.
# ---------------------------------------------------------------------------------------
def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def test_each_kind_of_bad_sample_is_skipped_and_counted(tmp_path):
  good = [0, 1, 2, 3, 4, 5]
  meta = lambda caps: json.dumps({"captions": caps}).encode()
  with tarfile.open(tmp_path / "a.tar", "w") as tar:
    for i in good[:3]:
      _add(tar, f"g{i}.png", _png(i))
      _add(tar, f"g{i}.json", meta({"en": [f"photo {i}"]}))
    _add(tar, "zero.jpg", b"")
    _add(tar, "zero.json", meta({"en": ["x"]}))
    _add(tar, "corrupt.jpg", b"\xff\xd8\xff\xe0 this is not a jpeg" * 20)
    _add(tar, "corrupt.json", meta({"en": ["x"]}))
    _add(tar, "cut.png", _png(9)[:60])  # a truncated file
    _add(tar, "cut.json", meta({"en": ["x"]}))
    _add(tar, "nocap.png", _png(10))  # no caption file at all
    _add(tar, "emptycap.png", _png(11))
    _add(tar, "emptycap.json", meta({"en": ["", "  "]}))
    _add(tar, "emptytxt.png", _png(12))
    _add(tar, "emptytxt.txt", b"")
    _add(tar, "lang.png", _png(13))
    _add(tar, "lang.json", meta({"xx": ["unknown language"]}))
    _add(tar, "json.png", _png(14))
    _add(tar, "json.json", b"{not json")
    _add(tar, "noimage.json", meta({"en": ["orphan caption"]}))
  with tarfile.open(tmp_path / "b.tar", "w") as tar:
    for i in good[3:]:
      _add(tar, f"g{i}.png", _png(i))
      _add(tar, f"g{i}.txt", f"photo {i}".encode())
    _add(tar, "lost.png", _png(15))
    _add(tar, "lost.txt", b"never read")
  data = (tmp_path / "b.tar").read_bytes()
  # cut inside lost.png's data: its header survives, its bytes do not
  lost_at = data.index(_png(15)[:64])
  (tmp_path / "b.tar").write_bytes(data[:lost_at + 100])

  it = _iterator(f"shards:{tmp_path}/*.tar", global_batch=2, crop_min_scale=1.0)
  batches = _take(it, 3)  # one epoch: exactly the 6 good examples
  assert sorted(i for b in batches for i in _ids(b)) == good
  assert sorted(_text(t) for b in batches for t in b["text"]) == [f"photo {i}" for i in good]
  assert it.skipped() == {"bad_caption_json": 1, "corrupt_image": 2, "empty_image": 1,
                          "missing_caption": 3, "missing_image": 1, "truncated_shard": 1,
                          "unknown_language": 1}
  it.close()


def test_each_host_restores_its_own_skip_counts(tmp_path):
  # Two simulated hosts of one run skip different numbers of examples; the saved data state
  # (both hosts' entries, as the checkpoint's all-gather assembles them) gives each host
  # back its own counts, not process 0's.
  ex = [_example(i, {"xx": ["unknown"]} if i < 9 else {"en": [f"photo {i}"]})
        for i in range(24)]
  shards.write_shards(ex, str(tmp_path / "s"), "tar", 6)
  source = f"shards:{tmp_path}/s-*.tar"
  hosts = [_iterator(source, p=p, n=2, global_batch=4, languages={"en": 1.0}) for p in (0, 1)]
  for it in hosts:
    _take(it, 3)
  states = [it.get_state() for it in hosts]
  counts = [it.skipped() for it in hosts]
  for it in hosts:
    it.close()
  assert counts[0] != counts[1] and all(counts), counts  # else the test could not fail
  saved = dict(states[0], positions=[s["positions"][p] for p, s in enumerate(states)],
               skipped=[s["skipped"][p] for p, s in enumerate(states)])
  for p in (0, 1):
    restored = _iterator(source, p=p, n=2, global_batch=4, languages={"en": 1.0})
    restored.set_state(saved)
    assert restored.skipped() == counts[p]
    restored.close()


def test_a_source_with_nothing_usable_is_an_error_naming_it(tmp_path):
  with tarfile.open(tmp_path / "bad.tar", "w") as tar:
    _add(tar, "a.jpg", b"")
    _add(tar, "a.txt", b"caption")
  it = _iterator(f"shards:{tmp_path}/bad.tar")
  with pytest.raises(files.SourceError, match=r"bad.tar.*no usable example.*empty_image"):
    next(it)
  with pytest.raises(files.SourceError, match="matches no file"):
    _iterator(f"shards:{tmp_path}/nothing-*.tar")


# ---------------------------------------------------------------------------------------
# Caption sampling.
# ---------------------------------------------------------------------------------------
def test_language_weights_are_respected_and_missing_languages_renormalised():
  languages, weights = languages_lib.language_table({"en": 1.0, "de": 3.0, "zh": 2.0, "fr": 0.0})
  assert languages == ("de", "en", "zh")
  full = {"en": ["e"], "de": ["d"], "zh": ["z"], "fr": ["f"]}
  no_zh = {"en": ["e"], "de": ["d"], "zh": []}
  n = 3000
  for captions, expected in ((full, {"e": 1 / 6, "d": 3 / 6, "z": 2 / 6}),
                             (no_zh, {"e": 1 / 4, "d": 3 / 4})):
    picks = [files.choose_caption(captions, languages, weights,
                                   np.random.default_rng([0, k]))[1] for k in range(n)]
    counts = np.array([picks.count(c) for c in expected])
    want = n * np.array(list(expected.values()))
    chi2 = float(((counts - want) ** 2 / want).sum())
    assert sum(counts) == n and chi2 < 13.8  # chi-square, 2 dof, p = 0.001


def test_caption_is_uniform_among_the_chosen_languages_captions():
  languages, weights = languages_lib.language_table({"en": 1.0})
  captions = {"en": ["a", "b", "c", "d"], "de": ["x"]}
  picks = [files.choose_caption(captions, languages, weights,
                                 np.random.default_rng([1, k]))[1] for k in range(2000)]
  counts = np.array([picks.count(c) for c in "abcd"])
  assert ((counts - 500) ** 2 / 500).sum() < 16.3  # chi-square, 3 dof, p = 0.001


def test_long_captions_are_used_with_their_probability(tmp_path):
  ex = [shards.RawExample(f"k{i}", _png(i), "png", {"en": ["short"]}, {"en": ["long one"]})
        for i in range(40)]
  shards.write_shards(ex, str(tmp_path / "l"), "tar", 40)
  it = _iterator(f"shards:{tmp_path}/l-*.tar", long_caption_prob=0.75)
  texts = [_text(t) for b in _take(it, 50) for t in b["text"]]
  it.close()
  assert set(texts) == {"short", "long one"}
  assert abs(texts.count("long one") / len(texts) - 0.75) < 0.06  # 200 draws, ~3.5 sigma


def test_long_clip_short_captions_come_with_long_ones_from_a_shard_source(tmp_path):
  # Long-CLIP §3.2 on files: 'text' is the long caption (long_caption_prob 1), 'text_short'
  # the image's short caption, or the long one's first sentence when it has none (as the
  # release does for ShareGPT4V).
  ex = [shards.RawExample(f"k{i}", _png(i), "png", {"en": [f"s{i}"]} if i % 2 else {},
                          {"en": [f"long {i}. more"]}) for i in range(8)]
  shards.write_shards(ex, str(tmp_path / "l"), "tar", 8)
  it = pipeline.make(_cfg(f"shards:{tmp_path}/l-*.tar", long_caption_prob=1.0,
                          languages={"en": 1.0}), 0, 1, tokenizer=CharTokenizer(), seed=0,
                     with_short_captions=True)
  batches = _take(it, 4)
  it.close()
  pairs = {(_text(t), _text(s)) for b in batches for t, s in zip(b["text"], b["text_short"])}
  assert pairs == {(f"long {i}. more", f"s{i}" if i % 2 else f"long {i}") for i in range(8)}


# ---------------------------------------------------------------------------------------
# Manifest and tfds sources.
# ---------------------------------------------------------------------------------------
def test_manifest_source_reads_the_chosen_split(tmp_path):
  manifest = _tiny_manifest(tmp_path, n=6)  # items 0-4 train, 5 val
  it = _iterator(f"manifest:{manifest}", global_batch=5, languages={"zh": 1.0})
  batch = next(it)
  it.close()
  assert sorted(_ids(batch)) == [0, 1, 2, 3, 4]
  for i, text in zip(_ids(batch), batch["text"]):
    assert _text(text) in (f"照片 {i}", f"图片 {i}")
  it = _iterator(f"manifest:{manifest}", global_batch=1, split="val")
  assert _ids(next(it)) == [5]
  it.close()


class TinyCaptions(tfds.core.GeneratorBasedBuilder):
  """12 images with one caption each, built in the test (no download)."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(20, 20, 3)), "caption": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(12):
      yield i, {"image": _pixels(i), "caption": f"photo {i}"}


class TinyLabels(tfds.core.GeneratorBasedBuilder):
  """8 images of 2 classes."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(20, 20, 3)),
        "label": tfds.features.ClassLabel(names=["golden_retriever", "tabby_cat"])}))

  def _split_generators(self, dl_manager):
    return {"test": self._generate_examples()}

  def _generate_examples(self):
    for i in range(8):
      yield i, {"image": _pixels(i), "label": i % 2}


def test_tfds_sources_cover_each_host_split_once_and_resume(tmp_path):
  for builder in (TinyCaptions, TinyLabels):
    builder(data_dir=str(tmp_path)).download_and_prepare()
  cfg = dict(data_dir=str(tmp_path), global_batch=4, shuffle_buffer=4, languages={"en": 1.0})
  seen = []
  for p in (0, 1):  # tfds.even_splits: 6 examples per host
    it = _iterator("tfds:tiny_captions:train", p, 2, **cfg)
    batches = _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    batches += _take(it, 5)
    assert it.get_state()["positions"][p] == [2, 4]  # 6 per epoch: 16 = 2 epochs + 4
    it.close()
    ids = [i for b in batches for i in _ids(b)]
    assert len(set(ids[:6])) == 6 and sorted(ids[6:12]) == sorted(ids[:6])
    for b in batches:
      for i, t in zip(_ids(b), b["text"]):
        assert _text(t) == f"photo {i}"
    seen += ids[:6]
    resumed = _iterator("tfds:tiny_captions:train", p, 2, **cfg)
    resumed.set_state(state)
    for want, got in zip(batches[3:], _take(resumed, 5)):
      assert want["image"].tobytes() == got["image"].tobytes()
    resumed.close()
  assert sorted(seen) == list(range(12))
  it = _iterator("tfds:tiny_labels", split="test", data_dir=str(tmp_path), global_batch=8,
                 languages={"en": 1.0})
  batch = next(it)
  it.close()
  for i, t in zip(_ids(batch), batch["text"]):
    assert _text(t) == ("a photo of a golden retriever." if i % 2 == 0 else
                        "a photo of a tabby cat.")[:16]


# ---------------------------------------------------------------------------------------
# Tokenizers.
# ---------------------------------------------------------------------------------------
def test_sentencepiece_round_trips_non_latin_scripts(tmp_path):
  corpus = ["一个小女孩爬进一个木制的玩具屋。", "两只狗在草地上奔跑。", "Дівчинка забирається в будинок.",
            "Три собаки бігають по траві.", "فتاة صغيرة تتسلق إلى منزل خشبي",
            "कुत्ते घास पर दौड़ रहे हैं।", "A little girl climbing into a wooden playhouse."] * 20
  path = tokenizers.train_spm(corpus, str(tmp_path / "spm.model"), vocab_size=400,
                              character_coverage=0.9995)
  tok = tokenizers.load(path, max_len=48)
  texts = ["两只狗在木制的屋。", "Три собаки забирається.", "فتاة صغيرة", "कुत्ते घास पर",
           "猫在睡觉"]  # the last one has characters the model never saw: byte fallback
  ids = tok.encode(texts)
  assert tok.decode(ids) == texts
  assert (ids != tokenizers.SPM_UNK_ID).all()


def test_hugging_face_tokenizer_json_encodes_with_its_own_ids(tmp_path):
  import tokenizers as hf

  vocab = {"<pad>": 0, "[UNK]": 1, "</s>": 2, "a": 3, "red": 4, "circle": 5, "猫": 6}
  tok = hf.Tokenizer(hf.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = hf.pre_tokenizers.Whitespace()
  tok.post_processor = hf.processors.TemplateProcessing(single="$A </s>",
                                                        special_tokens=[("</s>", 2)])
  tok.save(str(tmp_path / "tokenizer.json"))
  ours = tokenizers.load(str(tmp_path / "tokenizer.json"), max_len=4)
  np.testing.assert_array_equal(ours.encode(["a red circle", "猫", "a blue red circle"]),
                                [[3, 4, 5, 2], [6, 2, 0, 0], [3, 1, 4, 2]])
  assert ours.vocab_size == 7 and ours.pad_id == 0 and ours.eos_id == 2


# ---------------------------------------------------------------------------------------
# Config.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value,match", [
    ("crop_min_scale", 0.0, "crop_min_scale"),
    ("long_caption_prob", 1.5, "long_caption_prob"),
    ("flip_prob", -0.1, "flip_prob"),
    ("source", "shards:", "names no location"),
    ("source", "webdataset:/x", "allowed"),
])
def test_bad_data_keys_are_config_errors(key, value, match):
  c = config_lib.base()
  c.data[key] = value
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(c)


# ---------------------------------------------------------------------------------------
# Through train.py: tokenizer from the source's captions, skip counts in the metrics,
# exact resume of a shards run from its checkpoint.
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_training_on_shards_resumes_exactly_and_logs_skipped_examples(tmp_path):
  from big_clip import train

  examples = [_example(i) for i in range(20)]
  examples[3] = shards.RawExample("broken", b"\x89PNG not really", "png", {"en": ["x"]})
  shards.write_shards(examples, str(tmp_path / "s" / "part"), "tar", 5)
  c = config_lib.base()
  c.total_steps, c.log_every = 4, 1
  c.model.embed_dim = 16
  c.model.image.update(image_size=16, patch_size=8, width=16, depth=1, heads=2, mlp_dim=32)
  c.model.text.update(vocab_size=512, max_len=8, width=16, depth=1, heads=2, mlp_dim=32)
  c.data.update(source=f"shards:{tmp_path}/s/part-*.tar", global_batch=8, image_size=16,
                max_len=8)
  c.data.languages = {"en": 1.0, "de": 1.0}
  c.data.tokenizer.vocab_size = 512
  c.optim.warmup_steps = 1
  c.checkpoint.update(every_steps=2, use_async=False)

  whole = train.train(c, str(tmp_path / "whole"))
  train.train(c, str(tmp_path / "cut"), stop_after=2)
  resumed = train.train(c, str(tmp_path / "cut"))
  for a, b in zip(jax_leaves(whole["params"]), jax_leaves(resumed["params"])):
    np.testing.assert_array_equal(a, b)
  # 19 good examples, batches of 8: step 3 finishes epoch 0, so the broken one was met once
  # (or twice, if epoch 1's order put it among its first 13)
  logged = [json.loads(l) for l in open(tmp_path / "whole" / "metrics.jsonl")]
  logged = [m for m in logged if "loss" in m]  # (the end-of-run eval writes its own line)
  assert logged[-1]["skipped/corrupt_image"] in (1, 2)
  assert resumed["metrics"]["skipped/corrupt_image"] == logged[-1]["skipped/corrupt_image"]
  tok = tokenizers.load(str(tmp_path / "whole" / "tokenizer" / "spm.model"), 8)
  assert tok.decode(tok.encode(["foto 12"]))[0] == "foto 12"


def jax_leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]
