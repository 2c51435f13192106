"""big_clip.load / Model on a tiny random-init checkpoint: its embeddings are the eval binary's
(same checkpoint, same images, same prompts), the three image input kinds agree, zero-shot is
prompt ensembling + softmax recomputed in float64 NumPy, and an hf: / open_clip: export loaded
back embeds like the workdir."""

import os

import numpy as np
import pytest
from flax import nnx
from PIL import Image

import big_clip
from big_clip import checkpoints, evaluate
from big_clip import config as config_lib
from big_clip import workdir as workdir_lib
from big_clip.convert import pretrained
from big_clip.data import embedded, tokenizers
from big_clip.evals import labels
from big_clip.evals import towers as towers_lib
from big_clip.models import adapt, two_tower

COLOURS = {"blue": (30, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}  # folder order


def tiny_config(spm: str):
  c = config_lib.base()
  c.total_steps = 1
  c.model.embed_dim = 32
  c.model.image.update(image_size=32, patch_size=8, width=32, depth=1, heads=2, mlp_dim=64)
  c.model.text.update(vocab_size=768, max_len=16, width=32, depth=1, heads=2, mlp_dim=64)
  c.data.update(global_batch=16, image_size=32, max_len=16, languages={"en": 1.0, "de": 1.0})
  c.data.tokenizer.update(path=spm, vocab_size=768)
  c.eval.update(batch_size=16)
  return c


def write_workdir(tmp, name: str = "work", seed: int = 0):
  """(config, workdir): a tiny model's initial parameters as the step-3 checkpoint, with the
  config.json training writes (no train step is compiled: loading is under test)."""
  spm = str(tmp / "spm.model")
  if not os.path.exists(spm):
    tokenizers.train_spm(embedded.sample_captions(n=1500, seed=0), spm, vocab_size=768)
  config = tiny_config(spm)
  config.seed = seed
  workdir = str(tmp / name)
  os.makedirs(workdir, exist_ok=True)
  workdir_lib.write_config(config, workdir)
  params = nnx.to_pure_dict(nnx.state(two_tower.init_fn(config.model, config.seed)()))
  mngr = checkpoints.manager(workdir_lib.checkpoints_dir(workdir), keep=2, use_async=False)
  checkpoints.save(mngr, 3, {"params": params}, {"next_example": 0})
  mngr.wait_until_finished()
  mngr.close()
  return config, workdir


def write_images(root) -> list[str]:
  """ROOT/CLASS/i.png: noisy colour patches of odd sizes (so resize + crop run)."""
  rng = np.random.default_rng(0)
  paths = []
  for k, (name, rgb) in enumerate(COLOURS.items()):
    os.makedirs(root / name)
    for i in range(2):
      h, w = 40 + 7 * i, 52 - 5 * k
      pixels = np.clip(np.asarray(rgb) + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
      path = str(root / name / f"{i}.png")
      Image.fromarray(pixels).save(path)
      paths.append(path)
  return paths


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("api")
  config, workdir = write_workdir(tmp)
  paths = write_images(tmp / "images")
  return config, workdir, str(tmp / "images"), paths, big_clip.load(workdir)


def test_api_embeddings_equal_the_eval_binarys_on_the_same_checkpoint(run, monkeypatch, tmp_path):
  config, workdir, folder, paths, model = run
  seen = {}
  images_fn, class_fn = towers_lib.Towers.images, towers_lib.class_embeddings

  def images(self, params, image_set, desc):
    seen["names"] = list(image_set.names)
    seen["images"], ok = images_fn(self, params, image_set, desc)
    return seen["images"], ok

  def class_embeddings(towers, params, tokens, num_classes):
    seen["classes"] = class_fn(towers, params, tokens, num_classes)
    return seen["classes"]

  monkeypatch.setattr(towers_lib.Towers, "images", images)
  monkeypatch.setattr(towers_lib, "class_embeddings", class_embeddings)
  records = evaluate.evaluate_checkpoint(config, workdir, evals=[f"zeroshot:folder:{folder}"],
                                         output=str(tmp_path / "results.jsonl"))
  monkeypatch.undo()
  assert seen["names"] == paths  # the folder reader's order: classes sorted, files sorted

  np.testing.assert_allclose(model.encode_image(paths), seen["images"], atol=1e-6, rtol=0)
  templates = labels.load_templates(None, ["en"])["en"]
  np.testing.assert_allclose(model.class_embeddings(list(COLOURS), templates), seen["classes"],
                             atol=1e-6, rtol=0)
  assert model.step == 3 and records[0]["step"] == 3
  # The evaluator's top-1 accuracy is the API's argmax agreement with the folder labels.
  probs = model.zero_shot(paths, sorted(COLOURS))
  acc = np.mean(probs.argmax(1) == np.repeat(np.arange(3), 2))
  en = next(r for r in records if r["language"] == "en")
  assert en["metrics"]["acc1"] == pytest.approx(acc)


def test_paths_pil_images_and_arrays_embed_alike(run):
  _, _, _, paths, model = run
  from_paths = model.encode_image(paths)
  pil = [Image.open(p) for p in paths]
  np.testing.assert_allclose(model.encode_image(pil), from_paths, atol=1e-6, rtol=0)
  # Arrays of another size go through the same resize + crop; at the model's size, as given.
  arrays = [np.asarray(im.convert("RGB")) for im in pil]
  np.testing.assert_allclose(model.encode_image(arrays), from_paths, atol=1e-6, rtol=0)
  square = np.stack([np.asarray(im.convert("RGB").resize((32, 32))) for im in pil])
  np.testing.assert_allclose(model.encode_image(square)[0],
                             model.encode_image([Image.fromarray(square[0])])[0], atol=1e-6)
  assert np.allclose(np.linalg.norm(from_paths, axis=1), 1.0, atol=1e-5)


def test_zero_shot_is_prompt_ensembling_and_softmax_recomputed_in_float64(run):
  _, _, _, paths, model = run
  names = {"en": ["red", "green", "blue"], "de": ["rot", "grün", "blau"]}
  templates = {"en": ["a photo of {c}.", "{c} things."], "de": ["ein Foto von {c}."]}
  probs = model.zero_shot(paths, names, templates)
  img = model.encode_image(paths).astype(np.float64)
  for lang in names:
    prompts = [t.replace("{c}", c) for c in names[lang] for t in templates[lang]]
    emb = model.encode_text(prompts).astype(np.float64).reshape(3, len(templates[lang]), -1)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    cls = emb.mean(1)
    cls /= np.linalg.norm(cls, axis=-1, keepdims=True)
    logits = model.logit_scale * img @ cls.T
    want = np.exp(logits - logits.max(1, keepdims=True))
    want /= want.sum(1, keepdims=True)
    np.testing.assert_allclose(probs[lang], want, atol=2e-5)
  # A list is English; a list of templates applies to every language.
  np.testing.assert_allclose(model.zero_shot(paths, names["en"], templates["en"]),
                             probs["en"], atol=1e-6)


def test_bad_inputs_name_the_input(run, tmp_path):
  _, workdir, _, _, model = run
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"not a png")
  with pytest.raises(ValueError, match="bad.png"):
    model.encode_image([str(bad)])
  with pytest.raises(ValueError, match="missing.png"):
    model.encode_image([str(tmp_path / "missing.png")])
  with pytest.raises(TypeError, match="list of strings"):
    model.encode_text("a red thing")
  with pytest.raises(ValueError, match="not a big_clip workdir"):
    big_clip.load(str(tmp_path))
  with pytest.raises(ValueError, match="step applies to a big_clip workdir"):
    big_clip.load(f"hf:{workdir}", step=3)


@pytest.mark.parametrize("kind", ["hf", "open_clip"])
def test_an_export_loaded_back_embeds_like_the_workdir(run, tmp_path, kind):
  config, workdir, _, paths, model = run
  cfg, params, _ = adapt.read_run(workdir)
  out = str(tmp_path / kind)
  write = pretrained.to_hf if kind == "hf" else pretrained.to_open_clip
  write(params, cfg, out, tokenizer_path=pretrained.tokenizer_of(cfg, workdir))
  loaded = big_clip.load(f"{kind}:{out}")
  texts = ["a red circle.", "zwei blaue Dreiecke.", "три зелёных квадрата."]
  np.testing.assert_allclose(loaded.encode_image(paths), model.encode_image(paths), atol=1e-5)
  np.testing.assert_allclose(loaded.encode_text(texts), model.encode_text(texts), atol=1e-5)
  assert loaded.logit_scale == pytest.approx(model.logit_scale, rel=1e-6)
