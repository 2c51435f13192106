"""Regions in the data: box transforms against a pixel reference, the embedded generator's
boxes, region captions and hard negatives, and regions through the manifest / shard
pipeline."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from big_clip import config as config_lib
from big_clip.data import embedded, manifest, pipeline, regions, shards



class CharTokenizer:
  """Characters -> code points (as tests/test_data_sources.py, which cannot be imported
  twice: it registers a tfds dataset)."""
  max_len = 16

  def encode(self, texts):
    out = np.zeros((len(texts), self.max_len), np.int32)
    for row, text in enumerate(texts):
      ids = [ord(c) for c in text][:self.max_len]
      out[row, :len(ids)] = ids
    return out


def _text(row: np.ndarray) -> str:
  return "".join(chr(i) for i in row if i)


def _reference_box(box, crop, width, height, flip):
  """The box's pixels painted on a `width` x `height` canvas, cut to the integer `crop`,
  mirrored if `flip`: the bounding box of what is left, relative to the crop (None: gone)."""
  canvas = np.zeros((height, width), bool)
  x0, y0, x1, y1 = box
  canvas[int(round(y0 * height)):int(round(y1 * height)),
         int(round(x0 * width)):int(round(x1 * width))] = True
  left, top, right, bottom = crop
  cut = canvas[top:bottom, left:right]
  if flip:
    cut = cut[:, ::-1]
  ys, xs = np.nonzero(cut)
  if not len(xs):
    return None
  h, w = cut.shape
  return np.array([xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h])


def test_crop_and_flip_move_boxes_like_the_pixels_they_cover():
  rng = np.random.default_rng(0)
  width, height = 200, 160
  kept_total = dropped_total = clipped_total = 0
  for _ in range(40):
    # Boxes on a 1/40 grid, so that each covers whole pixels of the 200 x 160 canvas.
    corners = np.sort(rng.integers(0, 41, (6, 2, 2)), axis=1) / 40
    boxes = [(a[0, 0], a[0, 1], a[1, 0], a[1, 1]) for a in corners
             if a[1, 0] > a[0, 0] and a[1, 1] > a[0, 1]]
    left, top = rng.integers(0, 100), rng.integers(0, 80)
    crop = (left, top, left + rng.integers(20, width - left + 1),
            top + rng.integers(20, height - top + 1))
    flip = bool(rng.integers(2))
    got, kept = regions.crop_boxes(np.array(boxes), crop, width, height)
    if flip:
      got = regions.flip_boxes(got)
    expected = [_reference_box(b, crop, width, height, flip) for b in boxes]
    assert list(kept) == [i for i, e in enumerate(expected) if e is not None]
    for g, i in zip(got, kept):
      np.testing.assert_allclose(g, expected[i], atol=1e-6)
    kept_total += len(kept)
    dropped_total += len(boxes) - len(kept)
    clipped_total += sum(not np.allclose(b, g) for b, g in zip(np.array(boxes)[kept], got))
  assert min(kept_total, dropped_total, clipped_total) > 5  # every case was exercised


def test_pad_keeps_captioned_regions_first_and_masks_the_rest():
  boxes = np.array([[0, 0, .5, .5], [.1, .1, .2, .2], [.5, .5, 1, 1]], np.float32)
  out, mask, texts = regions.pad(boxes, ["a", "", "c"], 3)
  np.testing.assert_array_equal(out, [[0, 0, .5, .5], [.5, .5, 1, 1], [0, 0, 0, 0]])
  assert mask.tolist() == [True, True, False] and texts == ["a", "c", ""]
  assert regions.pad(boxes, ["a", "b", "c"], 1)[2] == ["a"]


@pytest.mark.parametrize("bad, match", [
    ([{"box": [0.5, 0, 0.4, 1]}], "x0 < x1"),
    ([{"box": [0, 0, 1]}], "four numbers"),
    ([{"box": [0, 0, 1, 1], "captions": {"en": "a"}}], "list of strings"),
    ({"box": [0, 0, 1, 1]}, "must be a list"),
])
def test_malformed_regions_name_the_item_and_region(bad, match):
  with pytest.raises(ValueError, match=match):
    regions.parse(bad, "item 3")


def test_embedded_boxes_hold_every_object_and_only_objects():
  for index in range(30):
    image, attrs, boxes = embedded.render_with_boxes(3, "train", index, 64)
    assert boxes.shape == (attrs["count"], 4)
    # Object pixels: saturated colour (the background is grey, the outline dark grey).
    img = image.astype(int)
    saturated = (img.max(-1) - img.min(-1)) > 60
    inside = np.zeros_like(saturated)
    for x0, y0, x1, y1 in boxes * 64:
      part = np.zeros_like(saturated)
      part[int(np.floor(y0)):int(np.ceil(y1)), int(np.floor(x0)):int(np.ceil(x1))] = True
      assert (saturated & part).sum() > 20  # each box holds an object
      inside |= part
    assert not (saturated & ~inside).any()  # no object pixel outside every box


def test_embedded_generator_draws_are_unchanged_by_regions():
  for index in range(5):
    image, attrs = embedded.render_example(0, "train", index, 32)
    image2, attrs2, _ = embedded.render_with_boxes(0, "train", index, 32)
    np.testing.assert_array_equal(image, image2)
    assert attrs == attrs2
  langs, cdf = pipeline.language_cdf({lang: 1.0 for lang in embedded.EMBEDDED_LANGUAGES})
  for index in range(40):
    _, _, text = pipeline.example(0, index, 32, langs, cdf)
    image, text2, (boxes, mask, region_texts), negatives = pipeline.fine_example(
        0, index, 32, langs, cdf, 3, 4)
    assert text2 == text
    attrs = embedded.render_example(0, "train", index, 32)[1]
    assert mask.sum() == attrs["count"]
    lang = next(l for l in langs if text in embedded.all_captions(attrs, l))
    assert all(t in embedded.region_captions(attrs, lang) for t in region_texts[:attrs["count"]])
    assert text not in negatives and len(set(n for n in negatives if n)) == sum(map(bool, negatives))


def test_hard_negatives_swap_exactly_one_attribute():
  scene = embedded._scene(dict(shape=0, colour=0, size=1, count=1, position=2))
  form = embedded._caption_form(embedded._language("en"), scene, np.random.default_rng(5))
  swaps = embedded.swapped_captions(form, scene)
  own = form(scene)
  kinds = {k for k, _ in swaps}
  assert own not in [t for _, t in swaps] and kinds <= set(embedded.SWAP_KINDS)
  for kind, text in swaps:  # every swap is still a caption of some scene, but not this one
    assert text != own
  # A bare shape noun can only change shape or number.
  bare = embedded._language("en").bare_shape
  assert {k for k, _ in embedded.swapped_captions(bare, scene)} == {"shape", "count"}


def test_embedded_batches_carry_padded_regions_and_negatives():
  cfg = config_lib.base().data
  cfg.update(global_batch=4, image_size=32, max_len=16, max_regions=3)
  it = pipeline.make(cfg, 0, 1, tokenizer=CharTokenizer(), seed=0, prefetch=0,
                     hard_negatives=2)
  batch = next(it)
  assert batch["region_boxes"].shape == (4, 3, 4) and batch["region_mask"].shape == (4, 3)
  assert batch["region_text"].shape == (4, 3, 16) and batch["negative_text"].shape == (4, 2, 16)
  for row in range(4):
    attrs = embedded.render_example(0, "train", row, 32)[1]
    assert batch["region_mask"][row].sum() == attrs["count"]
    assert not batch["region_text"][row][~batch["region_mask"][row]].any()


def _png(width, height) -> bytes:
  out = io.BytesIO()
  Image.fromarray(np.full((height, width, 3), 100, np.uint8)).save(out, format="PNG")
  return out.getvalue()


def test_manifest_regions_follow_the_crop_and_flip(tmp_path):
  (tmp_path / "a.png").write_bytes(_png(40, 20))
  boxes = [[0.0, 0.0, 0.2, 1.0], [0.3, 0.25, 0.6, 0.75], [0.7, 0.1, 1.0, 0.5]]
  item = {"image": "a.png", "split": "train", "captions": {"en": ["an image"]},
          "regions": [{"box": b, "captions": {"en": [f"region {i}"]}}
                      for i, b in enumerate(boxes)]}
  path = tmp_path / "m.json"
  path.write_text(json.dumps({"items": [item]}))
  cfg = config_lib.base().data
  cfg.update(source=f"manifest:{path}", global_batch=1, image_size=8, max_len=16,
             crop_min_scale=1.0, flip_prob=1.0, max_regions=3, languages={"en": 1.0})
  it = pipeline.make(cfg, 0, 1, tokenizer=CharTokenizer(), seed=0)
  batch = next(it)
  it.close()
  # Centre crop of the 40 x 20 image: x in [10, 30]; box 0 is cropped out, box 1 kept
  # whole, box 2 clipped at x = 30 (to [0.9, 1] of the crop); then mirrored.
  expected, kept = regions.crop_boxes(np.array(boxes), (10, 0, 30, 20), 40, 20)
  assert kept.tolist() == [1, 2]
  np.testing.assert_allclose(batch["region_boxes"][0, :2], regions.flip_boxes(expected))
  np.testing.assert_allclose(batch["region_boxes"][0, 1], [0.0, 0.1, 0.1, 0.5], atol=1e-6)
  assert batch["region_mask"][0].tolist() == [True, True, False]
  assert [_text(r) for r in batch["region_text"][0]] == ["region 1", "region 2", ""]


def test_manifest_with_a_bad_box_fails_naming_the_item(tmp_path):
  path = tmp_path / "m.json"
  path.write_text(json.dumps({"items": [{"image": "a.png", "regions": [{"box": [1, 0, 0, 1]}]}]}))
  with pytest.raises(manifest.ManifestError, match="item 0, region 0"):
    manifest.load(str(path))


def test_shard_json_round_trips_regions_and_a_bad_one_is_skipped():
  ex = shards.RawExample("k", b"", "png", {"en": ["x"]}, {}, None,
                         [((0.1, 0.2, 0.3, 0.4), {"en": ["a red circle."]})])
  captions, _, _, got = shards.parse_meta(ex.meta_json(), "json", "k", "en")
  assert got == [((0.1, 0.2, 0.3, 0.4), {"en": ["a red circle."]})] and captions == {"en": ["x"]}
  bad = json.dumps({"captions": {"en": ["x"]}, "regions": [{"box": [0, 0, 2, 1]}]}).encode()
  with pytest.raises(shards.BadSample, match="bad_regions"):
    shards.parse_meta(bad, "json", "k", "en")
