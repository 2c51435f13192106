"""NaFlex (SigLIP 2 §2.4.2): the input pipeline's patch sequences and the ViT that reads them,
checked against the fixed-resolution ViT, NumPy loops and torch's antialiased resize."""

import math

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import big_clip  # noqa: F401  (flax config)
from big_clip import config as config_lib
from big_clip.data import naflex
from big_clip.data import pipeline
from big_clip.models import layers, vit
from big_clip.models.two_tower import TwoTower

P = 4  # patch size of the tiny towers; base grid 16 / 4 = 4 x 4


def tiny_model(naflex_on: bool, pool: str = "map", attention: str = "xla") -> TwoTower:
  cfg = config_lib.base().model
  cfg.update(embed_dim=16, activation="gelu_tanh", ln_eps=1e-6, attention_impl=attention)
  cfg.image.update(image_size=16, patch_size=P, width=16, depth=2, heads=2, mlp_dim=32,
                   pool=pool, ln_pre=False, proj=False, naflex=naflex_on)
  cfg.text.update(vocab_size=16, max_len=8, width=16, depth=1, heads=2, mlp_dim=32)
  return TwoTower(cfg, rngs=nnx.Rngs(0))  # same seed: same params with or without NaFlex


encode = nnx.jit(lambda m, x: m.encode_image(x))


def sequences(images: np.ndarray, max_patches: int) -> np.ndarray:
  """Float images already at their grid -> NaFlex input, as the pipeline writes it."""
  return np.stack([naflex.patchify(x, P, max_patches) for x in images])


@pytest.mark.parametrize("pool,attention", [("map", "xla"), ("gap", "einsum")])
def test_naflex_vit_equals_fixed_vit_on_square_images_at_the_base_grid(pool, attention):
  fixed, flex = tiny_model(False, pool, attention), tiny_model(True, pool, attention)
  images = np.random.default_rng(0).normal(size=(3, 16, 16, 3)).astype(np.float32)
  want = np.asarray(encode(fixed, images))
  for max_patches in (16, 23) if attention == "xla" else (23,):  # no padding, then 7 rows
    got = np.asarray(encode(flex, sequences(images, max_patches)))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_embedding_does_not_depend_on_the_amount_of_padding():
  flex = tiny_model(True)
  rng = np.random.default_rng(1)
  image = rng.normal(size=(5 * P, 9 * P, 3)).astype(np.float32)  # a 5 x 9 grid, 45 patches
  other = rng.normal(size=(7 * P, 3 * P, 3)).astype(np.float32)  # 21 patches
  small = encode(flex, np.stack([naflex.patchify(image, P, 64), naflex.patchify(other, P, 64)]))
  big = encode(flex, np.stack([naflex.patchify(image, P, 100),
                               naflex.patchify(other, P, 100)]))
  np.testing.assert_allclose(np.asarray(small), np.asarray(big), atol=1e-5)
  # and the position table is used: the same pixels on a transposed grid embed differently
  moved = naflex.patchify(image.transpose(1, 0, 2), P, 64)
  assert np.abs(np.asarray(encode(flex, moved[None]))[0] - np.asarray(small)[0]).max() > 1e-3


@pytest.mark.parametrize("grid", [(4, 4), (2, 7), (5, 9), (1, 16), (3, 3)])
def test_position_table_resize_matches_torch_bilinear_antialiased_interpolate(grid):
  table = np.random.default_rng(2).normal(size=(4, 4, 8)).astype(np.float32)
  rows, cols = grid
  coords = np.stack(np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij"), -1)
  coords = np.concatenate([coords.reshape(-1, 2), -np.ones((3, 2), int)])  # + padding
  got = np.asarray(vit.naflex_positions(table, coords))[:rows * cols]
  want = torch.nn.functional.interpolate(  # HF Siglip2 resize_positional_embeddings
      torch.from_numpy(table).permute(2, 0, 1)[None], size=grid, mode="bilinear",
      align_corners=False, antialias=True)[0].permute(1, 2, 0).reshape(rows * cols, -1)
  np.testing.assert_allclose(got, want.numpy(), atol=1e-5)


def test_masked_einsum_attention_equals_attention_over_the_valid_keys_with_gradients():
  q, k, v = (jax.random.normal(jax.random.key(i), (1, 6, 2, 4)) for i in range(3))
  mask = np.array([[True] * 4 + [False] * 2])

  def loss(q, k, v, n):  # masked over 6 keys, or plain over the first n
    if n is None:
      out = layers.einsum_attention(q, k, v, False, mask)
    else:
      out = layers.einsum_attention(q, k[:, :n], v[:, :n])
    return (out * np.arange(8.0).reshape(2, 4)).sum(), out

  (_, got), got_g = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v, None)
  (_, want), want_g = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v, 4)
  np.testing.assert_allclose(got, want, atol=1e-6)
  for g, w in zip(got_g, want_g):
    np.testing.assert_allclose(g, w, atol=1e-6)


def brute_force_grid(h: int, w: int, p: int, max_patches: int) -> tuple[int, int]:
  """The grid at the largest feasible scale: the patch count only jumps just after a scale
  k p / h or k p / w, so the supremum of the feasible scales is one of those."""
  grid = lambda s: (max(1, math.ceil(h * s / p - 1e-9)), max(1, math.ceil(w * s / p - 1e-9)))
  scales = sorted({k * p / h for k in range(1, max_patches + 1)}
                  | {k * p / w for k in range(1, max_patches + 1)})
  best = max(s for s in scales if np.prod(grid(s)) <= max_patches)
  return grid(best)


@pytest.mark.parametrize("hw", [(100, 300), (300, 100), (224, 224), (50, 400), (37, 91)])
def test_grid_is_the_largest_that_fits_max_patches_at_the_aspect_ratio(hw):
  rows, cols = naflex.grid_size(*hw, 16, 256)
  assert (rows, cols) == brute_force_grid(*hw, 16, 256)
  assert rows * cols <= 256


def test_patchify_matches_a_numpy_loop_in_order_mask_and_coords():
  rng = np.random.default_rng(3)
  image = rng.normal(size=(3 * P, 5 * P, 3)).astype(np.float32)
  got = naflex.patchify(image, P, 20)
  assert got.shape == (20, P * P * 3 + 2)
  n = 0
  for r in range(3):
    for c in range(5):
      np.testing.assert_array_equal(got[n, :-2], image[r * P:(r + 1) * P, c * P:(c + 1) * P]
                                    .reshape(-1))
      assert tuple(got[n, -2:]) == (r, c)
      n += 1
  np.testing.assert_array_equal(got[n:, :-2], 0)
  np.testing.assert_array_equal(got[n:, -2:], -1)
  # the fixed-resolution patchify orders a square image's patches the same way
  square = rng.normal(size=(2 * P, 2 * P, 3)).astype(np.float32)
  np.testing.assert_array_equal(naflex.patchify(square, P, 4)[:, :-2],
                                np.asarray(vit.patchify(square[None], P))[0])


def test_pipeline_batches_are_patch_sequences_at_the_images_aspect_ratio():
  data = config_lib.base().data
  data.update(max_patches=24, patch_size=P, mean=(0.5,) * 3, std=(0.5,) * 3)
  wide = np.full((10, 40, 3), 255, np.uint8)  # 1:4 -> a 2 x 8 grid (16 <= 24 < 3 x 12)
  batch = pipeline.model_images([wide, np.zeros((30, 30, 3), np.uint8)], data)
  assert batch.shape == (2, 24, P * P * 3 + 2)
  valid = batch[..., -2] >= 0
  assert valid.sum(1).tolist() == [16, 16]  # 2 x 8 and 4 x 4
  assert batch[0, valid[0], -1].max() == 7 and batch[0, valid[0], -2].max() == 1
  np.testing.assert_allclose(batch[0, valid[0], :-2], 1.0)  # (1 - 0.5) / 0.5
  np.testing.assert_allclose(batch[1, valid[1], :-2], -1.0)


def test_naflex_config_mismatch_names_both_keys():
  c = config_lib.base()
  c.model.image.update(naflex=True, pool="map")
  with pytest.raises(config_lib.ConfigError, match="max_patches"):
    config_lib.validate(c)


def test_export_is_a_transformers_siglip2_model_with_equal_outputs_on_any_aspect_ratio(
    tmp_path):
  transformers = pytest.importorskip("transformers")
  from test_export import SIGLIP_TOKENS, big_clip_outputs, random_params, tiny_config
  from big_clip.convert import pretrained

  config = tiny_config("siglip")
  config.model.image.update(image_size=16, naflex=True)  # a 4 x 4 position table
  config.data.update(image_size=16, max_patches=20, patch_size=P)
  config_lib.validate(config)
  params = random_params(config)
  assert pretrained.to_hf(params, config, str(tmp_path)) == "Siglip2Model"
  model = transformers.Siglip2Model.from_pretrained(str(tmp_path)).eval()
  rng = np.random.default_rng(4)
  pixels = [rng.normal(size=(r * P, c * P, 3)).astype(np.float32)
            for r, c in ((2, 9), (4, 4), (5, 3))]  # down-, un- and up-sampled tables
  seqs = np.stack([naflex.patchify(x, P, 20) for x in pixels])
  tokens = np.concatenate([SIGLIP_TOKENS, SIGLIP_TOKENS[:1]])
  ours = big_clip_outputs(config, params, seqs, tokens)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                pixel_values=torch.from_numpy(seqs[..., :-2]),
                pixel_attention_mask=torch.from_numpy(seqs[..., -2] >= 0).long(),
                spatial_shapes=torch.tensor([[2, 9], [4, 4], [5, 3]]))
  theirs = out.image_embeds.numpy(), out.text_embeds.numpy(), out.logits_per_image.numpy()
  for name, a, b in zip(("image embeddings", "text embeddings", "logits"), ours, theirs):
    np.testing.assert_allclose(a, b, atol=1e-4, err_msg=name)


def test_naflex_does_not_export_as_siglip_or_clip():
  from test_export import random_params, tiny_config
  from big_clip.convert import pretrained

  config = tiny_config("clip")
  config.model.image.update(naflex=True, pool="map")
  with pytest.raises(pretrained.ExportError, match="image.naflex"):
    pretrained.to_hf(random_params(config), config, "/nonexistent")


def test_eval_and_api_path_embeds_whole_images_at_their_aspect_ratio():
  """Towers.images (every evaluator, big_clip.load's encode_image, predict) on images of
  mixed shapes that api.to_pixels leaves uncropped equals the tower on naflex.encode."""
  from big_clip import api, sharding
  from big_clip.evals import datasets
  from big_clip.evals import towers as towers_lib

  config = config_lib.base()
  model = tiny_model(True)
  config.data.update(image_size=16, max_patches=20, patch_size=P)
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  towers = towers_lib.Towers.build(config, None, graphdef, mesh)
  rng = np.random.default_rng(5)
  raw = [rng.integers(0, 256, size=s, dtype=np.uint8) for s in ((12, 40, 3), (30, 10, 3))]
  pixels = [api.to_pixels(x, 16, crop=False) for x in raw]
  assert [x.shape for x in pixels] == [x.shape for x in raw]  # not centre-cropped
  image_set = datasets.ImageSet(["wide", "tall"], lambda i: pixels[i], 16)
  got, ok = towers.images(params, image_set, desc=None)
  want = encode(model, pipeline.model_images(raw, config.data))
  assert ok.all()
  np.testing.assert_allclose(got, np.asarray(want), atol=1e-5)


def test_file_sources_keep_the_whole_image_at_its_aspect_ratio(tmp_path):
  import json
  from PIL import Image

  class Chars:
    max_len = 8

    def encode(self, texts):
      return np.array([[ord(c) for c in t[:8].ljust(8, "\0")] for t in texts], np.int32)

  rng = np.random.default_rng(6)
  wide = [rng.integers(0, 256, size=(20, 60, 3), dtype=np.uint8) for _ in range(2)]
  items = []
  for i, x in enumerate(wide):
    Image.fromarray(x).save(tmp_path / f"{i}.png")
    items.append({"image": f"{i}.png", "split": "train", "captions": {"en": [f"p{i}"]}})
  (tmp_path / "manifest.json").write_text(json.dumps({"items": items}))
  data = config_lib.base().data
  data.update(source=f"manifest:{tmp_path / 'manifest.json'}", global_batch=2, max_len=8,
              crop_min_scale=1.0, max_patches=12, patch_size=P)
  it = pipeline.make(data, 0, 1, tokenizer=Chars(), seed=0, prefetch=0)
  batch = next(it)
  it.close()
  order = [int(chr(int(t[1]))) for t in batch["text"]]  # "p0" / "p1"
  # 1:3 at 12 patches: a 2 x 6 grid of the whole (uncropped) image, resized bilinearly
  want = pipeline.model_images([np.asarray(Image.fromarray(wide[i]).resize(
      (6 * P, 2 * P), Image.Resampling.BILINEAR)) for i in order], data)
  np.testing.assert_allclose(batch["image"], want, atol=1e-6)
  assert batch["image"][0, :, -1].max() == 5 and batch["image"][0, :, -2].max() == 1


def test_evaluators_read_file_images_whole_for_naflex_and_cropped_otherwise(tmp_path):
  """The zeroshot (folder) and retrieval (manifest) evaluators of a NaFlex model read each
  1:3 image whole at its own size; those of a fixed-resolution model, centre-cropped
  squares."""
  import json
  from PIL import Image
  from big_clip import sharding
  from big_clip.evals import retrieval, specs, zeroshot
  from big_clip.evals import towers as towers_lib

  class Chars:
    max_len = 8

    def encode(self, texts):
      return np.array([[ord(c) % 16 for c in t[:8].ljust(8, "\0")] for t in texts], np.int32)

  rng = np.random.default_rng(7)
  items = []
  for i, cls in enumerate(("cat", "dog")):
    (tmp_path / cls).mkdir()
    Image.fromarray(rng.integers(0, 256, (20, 60, 3), np.uint8)).save(tmp_path / cls / "a.png")
    items.append({"image": f"{cls}/a.png", "split": "test", "captions": {"en": [f"a {cls}"]}})
  (tmp_path / "manifest.json").write_text(json.dumps({"items": items}))
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  for naflex_on, shape in ((True, (20, 60, 3)), (False, (16, 16, 3))):
    config = config_lib.base()
    config.data.update(image_size=16, patch_size=P, max_patches=20 if naflex_on else 0)
    graphdef = nnx.graphdef(tiny_model(naflex_on))
    towers = towers_lib.Towers.build(config, Chars(), graphdef, mesh)
    evaluators = (
        zeroshot.Evaluator(specs.parse(f"zeroshot:folder:{tmp_path}"), config, towers, "m"),
        retrieval.Evaluator(specs.parse(f"retrieval:manifest:{tmp_path / 'manifest.json'}:test"),
                            towers, "m"))
    for evaluator in evaluators:
      got = evaluator.images[np.arange(2)]
      assert [x.shape for x in got] == [shape, shape], (type(evaluator), naflex_on)
