"""The manifest reader: the shared Flickr × Multi30K file, and malformed files named clearly."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from big_clip.data import manifest

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "flickr8k_multi30k",
                      "manifest.json")


def _write(tmp_path, obj):
  path = tmp_path / "m.json"
  path.write_text(json.dumps(obj))
  return str(path)


def test_manifest_reads_items_with_paths_relative_to_its_folder(tmp_path):
  Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "a.png")
  path = _write(tmp_path, {"name": "toy", "items": [
      {"image": "a.png", "split": "train", "captions": {"en": ["red"], "de": []}, "label": 2},
      {"image": "a.png", "split": "test", "captions": {"fr": ["rouge"]}}]})
  m = manifest.load(path, split="train")
  assert m.name == "toy" and len(m.items) == 1
  assert m.items[0].image == str(tmp_path / "a.png") and m.items[0].label == 2
  assert m.languages == ["en"]
  img = manifest.read_image(m.items[0].image, 16)
  assert img.shape == (16, 16, 3) and img.dtype == np.uint8
  np.testing.assert_array_equal(img[8, 8], [255, 0, 0])


@pytest.mark.parametrize("obj, message", [
    ({"images": []}, "'items' list"),
    ({"items": [{"captions": {}}]}, "item 0: every item needs an 'image'"),
    ({"items": [{"image": "x", "captions": {"en": "not a list"}}]}, "item 0: 'captions'"),
    ({"items": [{"image": "x", "label": -1}]}, "item 0: 'label'"),
    ({"items": [{"image": "x", "split": "train"}]}, "no items in split 'val'"),
])
def test_malformed_manifest_names_the_problem(tmp_path, obj, message):
  with pytest.raises(manifest.ManifestError, match=message):
    manifest.load(_write(tmp_path, obj), split="val")


def test_missing_manifest_and_broken_image_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.json"):
    manifest.load(str(tmp_path / "nope.json"))
  (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
  with pytest.raises(ValueError, match="bad.jpg"):
    manifest.read_image(str(tmp_path / "bad.jpg"), 8)


@pytest.mark.skipif(not os.path.exists(SHARED), reason="../shared/data is not on this machine")
def test_shared_flickr_multi30k_manifest_loads():
  m = manifest.load(SHARED, split="test")
  assert len(m.items) == 31
  assert {"en", "de", "fr", "cs"} <= set(m.languages)
  assert manifest.read_image(m.items[0].image, 32).shape == (32, 32, 3)
