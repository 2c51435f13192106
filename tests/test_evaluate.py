"""The eval suite's parts: metrics and prompt ensembling against float64 NumPy references,
the Babel-ImageNet subset protocol, data sources, label files and their errors."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from big_clip import config as config_lib
from big_clip import sharding
from big_clip.evals import datasets, labels, metrics, specs, suite
from big_clip.evals import zeroshot as zeroshot_lib
from big_clip.evals import towers as towers_lib


# ---------------------------------------------------------------------------------------
# NumPy float64 references, written the obvious way: sort each row (stable: ties by index).
# ---------------------------------------------------------------------------------------
def ref_topk(scores, k):
  return np.argsort(-scores.astype(np.float64), axis=1, kind="stable")[:, :k]


def ref_classification(logits, labels_):
  top = ref_topk(logits, 5)
  out = {"acc1": np.mean(top[:, 0] == labels_)}
  if logits.shape[1] > 5:
    out["acc5"] = np.mean([labels_[i] in top[i] for i in range(len(labels_))])
  out["mean_per_class_recall"] = np.mean(
      [np.mean(top[labels_ == c, 0] == c) for c in sorted(set(labels_.tolist()))])
  return out


def ref_retrieval(scores, text_to_image, ks=(1, 5, 10)):
  out = {}
  for k in ks:
    t2i = ref_topk(scores.T, k)
    out[f"image_retrieval_recall@{k}"] = np.mean(
        [text_to_image[t] in t2i[t] for t in range(scores.shape[1])])
    i2t = ref_topk(scores, k)
    out[f"text_retrieval_recall@{k}"] = np.mean(
        [any(text_to_image[t] == i for t in i2t[i]) for i in range(scores.shape[0])])
  return out


def assert_metrics_close(got, want):
  assert set(got) == set(want), (got, want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-12, err_msg=k)


# ---------------------------------------------------------------------------------------
# Metrics.
# ---------------------------------------------------------------------------------------
def test_classification_metrics_on_a_hand_checked_case():
  # 4 images, 3 classes. Image 2 ties classes 0 and 2: the lower index (0) wins -> wrong.
  logits = np.array([[0.9, 0.1, 0.0],   # label 0, right
                     [0.2, 0.7, 0.1],   # label 1, right
                     [0.5, 0.1, 0.5],   # label 2, tie with 0 -> predicted 0, wrong
                     [0.3, 0.6, 0.1]])  # label 2, wrong
  got = metrics.classification_metrics(logits, np.array([0, 1, 2, 2]))
  # acc1 2/4; recalls: class 0 1/1, class 1 1/1, class 2 0/2 -> mean 2/3; K=3: no acc5.
  assert got == {"acc1": 0.5, "mean_per_class_recall": pytest.approx(2 / 3)}


@pytest.mark.parametrize("num_classes", [3, 10, 37])
def test_classification_metrics_match_a_float64_sort_with_ties(num_classes):
  rng = np.random.default_rng(num_classes)
  logits = np.round(rng.normal(size=(200, num_classes)), 1).astype(np.float32)  # many ties
  labels_ = rng.integers(0, num_classes, 200)
  labels_[:3] = 0
  assert_metrics_close(metrics.classification_metrics(logits, labels_),
                       ref_classification(logits, labels_))


def test_retrieval_recall_on_a_hand_checked_case_with_several_captions():
  # 3 images; image 0 has texts 0,1; image 1 text 2; image 2 texts 3,4.
  text_to_image = np.array([0, 0, 1, 2, 2])
  scores = np.array([[0.1, 0.9, 0.8, 0.0, 0.2],
                     [0.5, 0.0, 0.1, 0.6, 0.0],
                     [0.4, 0.3, 0.2, 0.1, 0.0]])
  got = metrics.retrieval_metrics(scores, text_to_image, ks=(1, 2))
  # image->text top1: img0 -> t1 (own) yes; img1 -> t3 no; img2 -> t0 no => 1/3.
  # top2: img1 -> t3, t0: no; img2 -> t0, t1: no => 1/3.
  # text->image top1: t0 -> img1 no; t1 -> img0 yes; t2 -> img0 no; t3 -> img1 no;
  # t4 -> img0 no => 1/5. top2: t0 -> img1, img2 no; t1 yes; t2 -> img0, img2 no;
  # t3 -> img1, img2 yes; t4 -> img0, img2 (0.2 > 0.0 = 0.0, ties by index: img1 < img2) no
  # => 2/5.
  assert got == {"image_retrieval_recall@1": pytest.approx(1 / 5),
                 "text_retrieval_recall@1": pytest.approx(1 / 3),
                 "image_retrieval_recall@2": pytest.approx(2 / 5),
                 "text_retrieval_recall@2": pytest.approx(1 / 3)}


def test_retrieval_recall_matches_a_float64_sort_with_several_captions_and_ties():
  rng = np.random.default_rng(1)
  text_to_image = np.concatenate([np.arange(40), rng.integers(0, 40, 70)])
  scores = np.round(rng.normal(size=(40, 110)), 1)
  assert_metrics_close(metrics.retrieval_metrics(scores, text_to_image),
                       ref_retrieval(scores, text_to_image))


def test_retrieval_needs_a_text_for_every_image():
  with pytest.raises(ValueError, match="every image needs at least one text"):
    metrics.retrieval_metrics(np.zeros((3, 2)), np.array([0, 1]))


# ---------------------------------------------------------------------------------------
# Batched embedding and prompt ensembling on 8 devices.
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})


def linear_towers(mesh, table_seed=0, dim=6, vocab=50):
  """A toy 'model': text = sum of token rows of a table; image = its mean pixel colour
  times a matrix. Same jitted-function interface as the real towers."""
  rng = np.random.default_rng(table_seed)
  params = {"tok": rng.normal(size=(vocab, dim)).astype(np.float32),
            "rgb": rng.normal(size=(3, dim)).astype(np.float32)}

  def text_fn(p, t):
    e = p["tok"][t].sum(axis=1)
    return e / jax.numpy.linalg.norm(e, axis=-1, keepdims=True)

  def image_fn(p, x):
    e = x.mean(axis=(1, 2)) @ p["rgb"]
    return e / jax.numpy.linalg.norm(e, axis=-1, keepdims=True)

  towers = towers_lib.Towers(jax.jit(image_fn), jax.jit(text_fn), mesh, WordTokenizer(vocab),
                           batch_size=16, image_size=8,
                           data_cfg=ml_collections.ConfigDict(dict(
                               mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), max_patches=0,
                               patch_size=0)))
  return towers, params


class WordTokenizer:
  """Each word -> a stable id in [1, vocab); rows padded with 0 (row 0 of the table)."""

  def __init__(self, vocab, max_len=8):
    self.vocab, self.max_len = vocab, max_len

  def encode(self, texts):
    out = np.zeros((len(texts), self.max_len), np.int32)
    for r, text in enumerate(texts):
      ids = [1 + sum(map(ord, w)) * 7919 % (self.vocab - 1) for w in text.split()]
      out[r, :len(ids[:self.max_len])] = ids[:self.max_len]
    return out


def ref_text(params, tokens):
  e = params["tok"].astype(np.float64)[tokens].sum(axis=1)
  return e / np.linalg.norm(e, axis=-1, keepdims=True)


def ref_image(params, images_uint8):
  e = (images_uint8.astype(np.float64) / 255.0).mean(axis=(1, 2)) @ params["rgb"]
  return e / np.linalg.norm(e, axis=-1, keepdims=True)


def ref_ensemble(prompt_emb):
  """CLIP's prompt ensembling, spelled out class by class."""
  out = []
  for per_class in prompt_emb.astype(np.float64):
    unit = [v / np.sqrt(np.sum(v * v)) for v in per_class]
    mean = np.sum(unit, axis=0) / len(unit)
    out.append(mean / np.sqrt(np.sum(mean * mean)))
  return np.stack(out)


def test_prompt_ensembling_matches_the_numpy_formula():
  rng = np.random.default_rng(0)
  prompt_emb = rng.normal(size=(7, 4, 5)) * rng.uniform(0.1, 10, size=(7, 4, 1))
  np.testing.assert_allclose(metrics.ensemble(prompt_emb), ref_ensemble(prompt_emb), atol=1e-12)


def test_class_embeddings_on_8_devices_with_a_padded_last_batch_match_numpy(mesh):
  towers, params = linear_towers(mesh)
  rng = np.random.default_rng(3)
  tokens = rng.integers(1, 50, size=(11 * 3, 8)).astype(np.int32)  # 11 classes x 3 prompts
  got = towers_lib.class_embeddings(towers, params, tokens, 11)  # batches 16 + 16 + 1 (padded)
  want = ref_ensemble(ref_text(params, tokens).reshape(11, 3, -1))
  np.testing.assert_allclose(got, want, atol=2e-6)


def test_embed_batched_reads_only_the_rows_it_needs_and_drops_padding(mesh):
  reads = []

  class Rows:
    def __len__(self):
      return 21

    def __getitem__(self, index):
      reads.append(np.asarray(index).copy())
      return np.asarray(index, np.float32)[:, None] * np.ones((1, 4), np.float32)

  out = sharding.embed_batched(jax.jit(lambda p, x: x * 2), None, Rows(), mesh, 8)
  np.testing.assert_array_equal(out[:, 0], 2 * np.arange(21))
  # 3 batches of 8: the last one repeats row 20 as padding.
  assert np.concatenate(reads).tolist() == list(range(21)) + [20, 20, 20]


# ---------------------------------------------------------------------------------------
# Zero-shot classification on a manifest: Babel-ImageNet protocol, groups, skips.
# ---------------------------------------------------------------------------------------
COLOURS = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200], [200, 200, 30]], np.uint8)


def write_json(path, obj):
  with open(path, "w") as f:
    json.dump(obj, f, ensure_ascii=False)
  return str(path)


def solid_png(path, rgb, seed):
  rng = np.random.default_rng(seed)
  pixels = np.clip(rgb.astype(int) + rng.integers(-40, 40, (8, 8, 3)), 0, 255).astype(np.uint8)
  Image.fromarray(pixels).save(path)
  return pixels


@pytest.fixture
def labelled_manifest(tmp_path):
  """12 images of 4 classes (3 each) and one file that is not an image."""
  items = []
  for i in range(12):
    solid_png(tmp_path / f"{i}.png", COLOURS[i % 4], i)
    items.append({"image": f"{i}.png", "split": "test", "label": i % 4})
  (tmp_path / "broken.png").write_bytes(b"not a png")
  items.append({"image": "broken.png", "split": "test", "label": 1})
  items.append({"image": "0.png", "split": "train", "label": 0})
  return write_json(tmp_path / "manifest.json", {"items": items})


def zeroshot(spec_text, mesh, seed=0):
  towers, params = linear_towers(mesh, seed)
  return zeroshot_lib.Evaluator(specs.parse(spec_text), config_lib.base(), towers, "toy"), params


def test_babel_protocol_scores_each_language_on_its_own_classes(tmp_path, labelled_manifest,
                                                                   mesh):
  names = {"en": ["red", "green", "blue", "yellow"],
           "de": ["rot", None, "blau", "gelb"],       # lacks class 1
           "fr": {"0": "rouge", "3": "jaune"}}        # only classes 0 and 3
  templates = {"en": ["a {c} photo", "{c}", "a photo of {c} things"], "fr": ["une photo {c}"]}
  groups = {"latin": ["en", "de", "fr"], "two": ["de", "fr"]}
  cn = write_json(tmp_path / "cn.json", names)
  tp = write_json(tmp_path / "tp.json", templates)
  gp = write_json(tmp_path / "gp.json", groups)
  ev, params = zeroshot(f"zeroshot:manifest:{labelled_manifest}:test,classnames={cn},"
                        f"templates={tp},groups={gp},name=toy", mesh)
  records = ev.run(params)

  # The reference: decode the good images, embed and score each language in float64.
  pixels = np.stack([np.asarray(Image.open(tmp_path / f"{i}.png")) for i in range(12)])
  labels_ = np.arange(12) % 4
  img = ref_image(params, pixels)
  tok = WordTokenizer(50)
  by_lang = {r["language"]: r for r in records}
  for lang, classes in [("en", [0, 1, 2, 3]), ("de", [0, 2, 3]), ("fr", [0, 3])]:
    full = labels.parse_classnames(names, 4, "test")[lang]
    tmpl = templates.get(lang, templates["en"])  # de falls back to English templates
    prompts = [t.replace("{c}", full[c]) for c in classes for t in tmpl]
    cls = ref_ensemble(ref_text(params, tok.encode(prompts)).reshape(len(classes), len(tmpl), -1))
    keep = np.isin(labels_, classes)
    want = ref_classification(img[keep] @ cls.T, np.searchsorted(classes, labels_[keep]))
    want["chance"] = 1 / len(classes)
    r = by_lang[lang]
    for k in want:
      np.testing.assert_allclose(r["metrics"][k], want[k], atol=1e-6, err_msg=(lang, k))
    assert set(r["metrics"]) == set(want)
    assert r["num_images"] == keep.sum() and r["num_classes"] == len(classes)
    assert r["dataset"] == "toy" and r["task"] == "zeroshot_classification"
    # The broken image is a counted, named skip.
    assert [os.path.basename(p) for p in r["skipped_images"]] == ["broken.png"]
  mean = by_lang["mean"]["metrics"]["acc1"]
  assert mean == pytest.approx(np.mean([by_lang[l]["metrics"]["acc1"] for l in "en de fr".split()]))
  assert by_lang["group:two"]["metrics"]["mean_per_class_recall"] == pytest.approx(
      np.mean([by_lang[l]["metrics"]["mean_per_class_recall"] for l in ("de", "fr")]))
  assert by_lang["group:two"]["languages"] == ["de", "fr"]


def test_a_language_subset_and_the_shipped_default_templates(tmp_path, labelled_manifest, mesh):
  cn = write_json(tmp_path / "cn.json", {"en": ["red", "green", "blue", "yellow"],
                                         "de": ["rot", "grün", "blau", "gelb"]})
  ev, params = zeroshot(f"zeroshot:manifest:{labelled_manifest}:test,classnames={cn},"
                        "languages=de", mesh)
  assert ev.languages == ["de"]
  n_templates = len(json.load(open(labels.DEFAULT_TEMPLATES))["en"])
  assert ev.tokens["de"].shape[0] == 4 * n_templates  # English templates as the fallback


def test_a_manifest_takes_its_number_of_classes_from_the_class_name_file(tmp_path,
                                                                       labelled_manifest, mesh):
  # Labels 0..3 in the data, 6 classes in the file (classes 4, 5 have no test images).
  cn = write_json(tmp_path / "cn.json", {"en": ["r", "g", "b", "y", "c", "m"]})
  ev, params = zeroshot(f"zeroshot:manifest:{labelled_manifest}:test,classnames={cn}", mesh)
  assert ev.classes["en"].tolist() == list(range(6))
  (row,) = ev.run(params)
  assert row["num_classes"] == 6 and row["metrics"]["chance"] == pytest.approx(1 / 6)
  assert "acc5" in row["metrics"]


@pytest.mark.parametrize("files, spec_extra, error", [
    ({"cn": {"en": ["a", "b", "c"]}}, "", "the data has label 3 but the file names 3 classes"),
    ({"cn": {"en": ["a", "b", "c", "d"], "de": ["a", "b", "c"]}}, "",
     r"different numbers of class names \[3, 4\]"),
    ({"cn": {"en": ["a", "b", "c", "d"]}, "tp": {"en": ["{c}"], "xx": ["{c}"]}},
     ",templates={tp}", r"languages \['xx'\] have templates but no class names"),
    ({"cn": {"en": ["a", "b", "c", "d"]}}, ",languages=en+sw",
     r"languages \['sw'\] have no class names"),
    ({"cn": {"en": ["a", "b", "c", "d"]}, "tp": {"en": ["a photo"]}}, ",templates={tp}",
     "'\\{c\\}' slot"),
    ({"cn": {"en": ["a", "b", "c", "d"]}, "gp": {"g": ["en", "de"]}}, ",groups={gp}",
     r"group 'g' names \['de'\]"),
    ({"cn": {"en": ["a", "b", "c", "d"], "de": [None] * 4}}, "", "'de' names no class"),
    ({"cn": {"en": ["a", "b", "c", "d"]}, "tp": {"de": ["{c}"]}}, ",templates={tp}",
     r"languages \['de'\] have templates but no class names"),
])
def test_bad_label_files_are_named_errors(tmp_path, labelled_manifest, mesh, files, spec_extra,
                                          error):
  paths = {k: write_json(tmp_path / f"{k}.json", v) for k, v in files.items()}
  spec = (f"zeroshot:manifest:{labelled_manifest}:test,classnames={paths['cn']}" +
          spec_extra.format(**paths))
  with pytest.raises(ValueError, match=error):
    zeroshot(spec, mesh)


def test_a_class_name_file_must_fit_a_dataset_that_knows_its_classes(tmp_path, mesh):
  for c, name in enumerate(["cat", "dog"]):
    os.makedirs(tmp_path / "imgs" / name)
    solid_png(tmp_path / "imgs" / name / "0.png", COLOURS[c], c)
  for names, error in [({"en": ["a", "b", "c"]}, "has 3 class names but the dataset has 2"),
                       ({"en": {"0": "a", "2": "b"}}, "class index '2' is not an integer in 0..1")]:
    cn = write_json(tmp_path / "cn.json", names)
    with pytest.raises(labels.LabelFileError, match=error):
      zeroshot(f"zeroshot:folder:{tmp_path / 'imgs'},classnames={cn}", mesh)


def test_a_manifest_without_labels_or_without_classnames_is_an_error(tmp_path, mesh):
  solid_png(tmp_path / "a.png", COLOURS[0], 0)
  path = write_json(tmp_path / "m.json", {"items": [{"image": "a.png", "captions": {"en": ["x"]}}]})
  with pytest.raises(ValueError, match="has no item with a 'label'"):
    zeroshot(f"zeroshot:manifest:{path}", mesh)
  path = write_json(tmp_path / "m2.json", {"items": [{"image": "a.png", "label": 0}]})
  with pytest.raises(ValueError, match="add classnames=FILE"):
    zeroshot(f"zeroshot:manifest:{path}", mesh)


# ---------------------------------------------------------------------------------------
# Other sources: an image folder, a tfds dataset built here (no download).
# ---------------------------------------------------------------------------------------
def test_image_folder_classes_are_sorted_subfolders(tmp_path):
  want = {}
  for c, name in enumerate(["b_cat", "a_dog"]):
    os.makedirs(tmp_path / "imgs" / name)
    for j in range(2):
      want[(name, j)] = solid_png(tmp_path / "imgs" / name / f"{j}.png", COLOURS[c], c * 10 + j)
  data = datasets.labelled_set(specs.parse(f"zeroshot:folder:{tmp_path / 'imgs'}"), 8)
  assert data.classnames == {"en": ["a dog", "b cat"]} and data.num_classes == 2
  assert data.labels.tolist() == [0, 0, 1, 1]
  np.testing.assert_array_equal(data.images[np.array([2])][0], want[("b_cat", 0)])


def test_tfds_source_reads_a_dataset_prepared_in_the_test(tmp_path):
  import tensorflow as tf
  import tensorflow_datasets as tfds

  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (6, 8, 8, 3)).astype(np.uint8)
  labels_ = np.array([2, 0, 1, 2, 1, 0])
  builder = tfds.dataset_builders.TfDataBuilder(
      name="tiny_eval_set", version="1.0.0", data_dir=str(tmp_path),
      split_datasets={"test": tf.data.Dataset.from_tensor_slices(
          {"image": images, "label": labels_})},
      features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(8, 8, 3)),
          "label": tfds.features.ClassLabel(names=["air_plane", "bird", "cat"])}))
  builder.download_and_prepare()
  data = datasets.labelled_set(
      specs.parse(f"zeroshot:tfds:tiny_eval_set:test,data_dir={tmp_path}"), 8)
  assert data.num_classes == 3 and data.classnames == {"en": ["air plane", "bird", "cat"]}
  # tfds stores the examples in its own order: compare (image, label) pairs. PNG: lossless.
  got = sorted((im.tobytes(), int(l)) for im, l in zip(data.images[np.arange(6)], data.labels))
  assert got == sorted((im.tobytes(), int(l)) for im, l in zip(images, labels_))
  limited = datasets.labelled_set(
      specs.parse(f"zeroshot:tfds:tiny_eval_set:test,data_dir={tmp_path},limit=4"), 8)
  assert limited.labels.tolist() == data.labels[:4].tolist()
  with pytest.raises(ValueError, match="has no split 'validation'"):
    datasets.labelled_set(
        specs.parse(f"zeroshot:tfds:tiny_eval_set:validation,data_dir={tmp_path}"), 8)


# ---------------------------------------------------------------------------------------
# Spec strings, config and shipped files.
# ---------------------------------------------------------------------------------------
def test_spec_strings_parse_paths_splits_and_options():
  s = specs.parse("zeroshot:manifest:gs://b/m.json:test,classnames=gs://b/c.json,languages=en+de")
  assert (s.kind, s.location, s.split, s.languages) == ("manifest", "gs://b/m.json", "test",
                                                         ["en", "de"])
  assert s.options["classnames"] == "gs://b/c.json"
  s = specs.parse("retrieval:manifest:/data/m.json")
  assert (s.location, s.split) == ("/data/m.json", None)
  s = specs.parse("zeroshot:tfds:imagenet2012:validation,data_dir=/tfds,limit=100")
  assert (s.location, s.split, s.limit) == ("imagenet2012", "validation", 100)
  assert specs.parse("zeroshot:embedded:colour").location == "colour"


@pytest.mark.parametrize("text, error", [
    ("classify:embedded", "unknown task 'classify'"),
    ("retrieval:tfds:coco", "source 'tfds' is not allowed for retrieval"),
    ("zeroshot:manifest:/m.json,classnames", "bad option 'classnames'"),
    ("zeroshot:manifest:/m.json,colour=red", "bad option 'colour=red'"),
    ("zeroshot:manifest:", "needs a location"),
    ("zeroshot:folder:/x,limit=0", "limit='0' must be a positive integer"),
])
def test_bad_spec_strings_are_config_errors(text, error):
  config = config_lib.base()
  config.evals = (text,)
  with pytest.raises(config_lib.ConfigError, match=f"config.evals: .*{error}"):
    suite.validate(config.evals)


def test_shipped_label_files_are_well_formed():
  names = labels.load_classnames(os.path.join(labels.DATA_DIR, "cifar10_classnames.json"), 10)
  assert names["en"][:3] == ["airplane", "automobile", "bird"]
  assert all(None not in v for v in names.values()) and len(names) >= 5
  langs = list(names)
  cifar = labels.load_templates(os.path.join(labels.DATA_DIR, "cifar10_templates.json"), langs)
  assert len(cifar["en"]) == 18 and all(len(v) >= 1 for v in cifar.values())
  imagenet = labels.load_templates(labels.DEFAULT_TEMPLATES, ["en"])["en"]
  assert len(imagenet) == 80 == len(set(imagenet)) and "a photo of a {c}." in imagenet
  groups = labels.load_groups(os.path.join(labels.DATA_DIR, "cifar10_language_groups.json"),
                              langs)
  assert sorted(l for g in groups.values() for l in g) == sorted(langs)


def test_an_image_set_decodes_each_image_of_a_batch_once():
  """A padded batch repeats its last row; decoding that image once (not in two threads at
  the same time, which breaks a lazily opened PIL image) and handing it out twice."""
  calls = []
  images = datasets.ImageSet(["a", "b"], lambda i: calls.append(i) or np.full((2, 2, 3), i,
                                                                              np.uint8), 2)
  batch = images[np.array([0, 1, 1, 1])]
  assert sorted(calls) == [0, 1]
  assert batch.shape == (4, 2, 2, 3) and batch[:, 0, 0, 0].tolist() == [0, 1, 1, 1]
