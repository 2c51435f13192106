"""Long-CLIP: positional stretching, loading a shorter table into a longer model,
the primary-component matching loss, and the embedded long captions + their retrieval eval.
References are float64 NumPy written from the paper / the Long-CLIP release, not from our code.
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from big_clip import checkpoints, sharding
from big_clip import config as config_lib
from big_clip.data import pipeline, embedded, tokenizers
from big_clip.losses import long_clip
from big_clip.models import adapt, text
from big_clip.models.two_tower import TwoTower


# ----------------------------------------------------------------------------------------
# Knowledge-preserved stretching (§3.1).
# ----------------------------------------------------------------------------------------
def long_clip_release_stretch(old: np.ndarray, keep: int = 20) -> np.ndarray:
  """The Long-CLIP release's loop (model_longclip.py, 4x), transcribed in float64."""
  length, width = old.shape
  new = np.zeros((4 * length - 3 * keep, width))
  new[:keep] = old[:keep]
  for i in range(length - 1 - keep):
    for r in range(4):
      new[4 * i + keep + r] = (4 - r) / 4 * old[i + keep] + r / 4 * old[i + 1 + keep]
  for r in range(4):
    new[4 * length - 3 * keep - 4 + r] = old[-1] + r * (old[-1] - old[-2]) / 4
  return new


def test_stretch_77_to_248_keeps_20_rows_bit_identical_and_matches_the_release():
  table = np.random.default_rng(0).standard_normal((77, 16)).astype(np.float32)
  out = text.stretch_positional_embedding(table, 248)
  assert out.shape == (248, 16) and out.dtype == np.float32
  np.testing.assert_array_equal(out[:20], table[:20])  # bit-identical
  np.testing.assert_allclose(out, long_clip_release_stretch(table.astype(np.float64)),
                             rtol=0, atol=1e-6)


def test_stretch_to_any_length_interpolates_linearly_between_sample_points():
  table = np.random.default_rng(1).standard_normal((30, 4))
  out = text.stretch_positional_embedding(table, 50, keep=6)  # ratio 44/24, not an integer
  p = 6 + np.arange(44) * 24 / 44  # sample points in the old table; the last is past row 29
  inside = p <= 29
  want = np.stack([np.interp(p[inside], np.arange(30), table[:, d]) for d in range(4)], 1)
  np.testing.assert_allclose(out[6:][inside], want, atol=1e-12)
  # Past the last row: the last segment's line, continued.
  np.testing.assert_allclose(out[-1], table[29] + (p[-1] - 29) * (table[29] - table[28]),
                             atol=1e-12)
  np.testing.assert_array_equal(out[:6], table[:6])


@pytest.mark.parametrize("new_len,keep,match", [(60, 20, "shorter than the table"),
                                                (100, 76, "keep=76"), (100, 77, "keep=77")])
def test_stretch_rejects_shrinking_and_keeping_everything(new_len, keep, match):
  with pytest.raises(ValueError, match=match):
    text.stretch_positional_embedding(np.zeros((77, 4)), new_len, keep=keep)


# ----------------------------------------------------------------------------------------
# Loading a 77-position checkpoint into a 248-position model.
# ----------------------------------------------------------------------------------------
def tiny_model_cfg(max_len: int, scan: bool = False) -> ml_collections.ConfigDict:
  c = config_lib.base()
  c.model.update(embed_dim=8, scan_layers=scan)
  c.model.image.update(image_size=8, patch_size=4, width=16, depth=2, heads=2, mlp_dim=32)
  c.model.text.update(vocab_size=32, max_len=max_len, width=16, depth=2, heads=2, mlp_dim=32)
  return c.model


def flat(tree) -> dict:
  return {k: np.asarray(v) for k, v in nnx.traversals.flatten_mapping(tree).items()}


def test_import_params_stretches_only_the_positional_table():
  short, long = tiny_model_cfg(77), tiny_model_cfg(248)
  loaded = adapt.flat_params(init_params(short, seed=1))
  out = adapt.flat_params(adapt.import_params(loaded, long))
  table = "text.positional_embedding"
  assert out[table].shape == (248, 16)
  np.testing.assert_array_equal(out[table][:20], loaded[table][:20])
  for key in loaded:
    if key != table:
      np.testing.assert_array_equal(out[key], loaded[key], err_msg=key)
  kernel = "text.blocks.1.mlp.fc1.kernel"
  with pytest.raises(ValueError, match=r"text\.blocks\.1\.mlp\.fc1\.kernel has shape"):
    adapt.import_params({**loaded, kernel: np.ones((16, 64), np.float32)}, long)
  with pytest.raises(ValueError, match="positions but config.model.text.max_len=64"):
    adapt.import_params(loaded, tiny_model_cfg(64))
  with pytest.raises(ValueError, match=r"missing tensor\(s\) \['logit_scale'\]"):
    adapt.import_params({k: v for k, v in loaded.items() if k != "logit_scale"}, long)


def init_params(cfg, seed):
  """Random float32 params of TwoTower(cfg), drawn in NumPy (no init to compile)."""
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: TwoTower(cfg, rngs=nnx.Rngs(0))),
                                        nnx.Param))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), a.dtype),
                      abstract)


def encode_text(cfg, params, tokens):
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: TwoTower(cfg, rngs=nnx.Rngs(0))))
  return np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p).encode_text(t))(params, tokens))


@pytest.fixture(scope="module", params=[False, True], ids=["per_layer", "scanned"])
def short_run(tmp_path_factory, request):
  """A big_clip workdir whose checkpoint (step 7) has a 24-position text table; its blocks
  per layer (`blocks.0.…`, restored with string indices) or scanned (`blocks.…` stacked)."""
  workdir = str(tmp_path_factory.mktemp("short_run"))
  cfg = tiny_model_cfg(24, scan=request.param)
  params = init_params(cfg, seed=3)
  save_run(workdir, cfg, params, image_size=8)
  return workdir, cfg, params


def save_run(workdir, model_cfg, params, image_size):
  """What big_clip.train leaves behind: checkpoints/7 and config.json."""
  mngr = checkpoints.manager(os.path.join(workdir, "checkpoints"), keep=1, use_async=False)
  checkpoints.save(mngr, 7, {"step": jnp.int32(7), "params": params}, {"next_example": 0})
  mngr.wait_until_finished()
  mngr.close()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump({"model": model_cfg.to_dict(), "data": {"image_size": image_size}}, f)


def test_warm_start_loads_a_24_position_checkpoint_into_a_36_position_model(short_run):
  workdir, short_cfg, short_params = short_run
  long_cfg = tiny_model_cfg(36, scan=short_cfg.scan_layers)  # 20 + 4 * (24 - 20)
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  params = init_params(long_cfg, seed=9)
  shardings = jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, jax.P()), params)
  params = jax.device_put(params, shardings)
  loaded = sharding.place_like(adapt.load_big_clip(f"big_clip:{workdir}:7", long_cfg)[1],
                               params)
  got, want = flat(loaded), flat(short_params)
  table = ("text", "positional_embedding")
  assert got[table].shape == (36, 16)
  np.testing.assert_array_equal(got[table][:20], want[table][:20])
  np.testing.assert_allclose(got[table], long_clip_release_stretch(want[table].astype(float)),
                             atol=1e-6)
  for key in want:
    if key != table:
      np.testing.assert_array_equal(got[key], want[key], err_msg=str(key))
  assert all(v.sharding == s for v, s in zip(jax.tree.leaves(loaded), jax.tree.leaves(
      shardings)))

  # Causal attention + identical first 20 positions: a short caption embeds exactly as before;
  # a 36-token caption runs end to end.
  tokens = np.array([[5, 9, 7, 3] + [0] * 14, list(range(4, 21)) + [3]], np.int32)
  np.testing.assert_allclose(encode_text(long_cfg, loaded, tokens),
                             encode_text(short_cfg, short_params, tokens), atol=1e-6)
  long_tokens = np.array([list(range(4, 31)) + list(range(4, 11)) + [5, 3]], np.int32)
  assert np.isfinite(encode_text(long_cfg, loaded, long_tokens)).all()


def test_warm_start_names_a_missing_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match="No checkpoint"):
    checkpoints.read_params(str(tmp_path), None)
  with pytest.raises(ValueError, match="big_clip:WORKDIR"):
    adapt.parse_big_clip_spec("hf:openai/clip")


# ----------------------------------------------------------------------------------------
# Primary-component matching loss (§3.2).
# ----------------------------------------------------------------------------------------
def numpy_long_clip_loss(img, txt_long, txt_short, scale, k, short_weight):
  """float64: CLIP loss on long captions + PCA(SVD)-coarsened images vs short captions."""
  def clip_loss(a, b):
    z = scale * a @ b.T
    lse = lambda x: np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)) + x.max(1)
    return 0.5 * (np.mean(lse(z) - np.diag(z)) + np.mean(lse(z.T) - np.diag(z)))
  mean = img.mean(0)
  _, _, vt = np.linalg.svd(img - mean, full_matrices=False)  # as the release's PCA()
  coarse = (img - mean) @ vt[:k].T @ vt[:k] + mean
  coarse /= np.linalg.norm(coarse, axis=1, keepdims=True)
  return clip_loss(img, txt_long) + short_weight * clip_loss(coarse, txt_short)


def numeric_grad(fn, args, which, eps=1e-6):
  x = args[which]
  grad = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    hi = [a.copy() for a in args]
    lo = [a.copy() for a in args]
    hi[which][idx] += eps
    lo[which][idx] -= eps
    grad[idx] = (fn(*hi) - fn(*lo)) / (2 * eps)
  return grad


@pytest.mark.parametrize("use_mesh", [False, True], ids=["1_device", "8_devices"])
def test_long_clip_loss_matches_float64_numpy_value_and_gradients(use_mesh):
  rng = np.random.default_rng(0)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  args = [unit(rng.standard_normal((16, 6))) for _ in range(3)]
  k, w, scale = 3, 0.7, 10.0
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1)) if use_mesh else None
  fn = lambda i, tl, ts: long_clip.loss(i, tl, ts, scale, None, num_components=k,
                                        short_weight=w, mesh=mesh)
  with jax.set_mesh(mesh) if mesh else jax.default_device(jax.devices()[0]):
    value, grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))(
        *(jnp.float32(a) for a in args))
  ref = lambda *a: numpy_long_clip_loss(*a, scale, k, w)
  np.testing.assert_allclose(value, ref(*args), rtol=1e-5)
  for which in range(3):
    np.testing.assert_allclose(grads[which], numeric_grad(ref, args, which), atol=2e-5)


def test_primary_components_rejects_more_components_than_the_batch_spans():
  with pytest.raises(ValueError, match="num_components=8"):
    long_clip.primary_components(jnp.ones((8, 16)), 8)


# ----------------------------------------------------------------------------------------
# Long captions in the embedded data, and their retrieval eval.
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def long_tokenizer(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("spm") / "spm.model")
  tokenizers.train_spm(embedded.sample_captions(n=2000, seed=0, long_captions=True), path, 1024)
  return tokenizers.SpmTokenizer(path, 248)


def test_long_captions_name_colour_and_shape_only_after_token_77(long_tokenizer):
  _, captions = embedded.long_caption_set(60, seed=0, image_size=16)
  late = set(embedded.COLOURS) | {w for pair in
                                  [("circle", "circles"), ("square", "squares"),
                                   ("triangle", "triangles"), ("cross", "crosses"),
                                   ("diamond", "diamonds")] for w in pair}
  for caption in captions:
    words = caption.replace(".", " ").replace(",", " ").replace(":", " ").split()
    first_late = min(i for i, w in enumerate(words) if w in late)
    # Sentencepiece pieces never span words: >= 1 token per word for any such tokenizer.
    assert first_late >= 100, caption
    ids = long_tokenizer._sp.encode(caption)
    pieces = long_tokenizer._sp.id_to_piece(ids)
    assert 77 < min(i for i, p in enumerate(pieces) if p.lstrip("▁") in late)
    assert len(ids) < 248  # fits (with EOS) in Long-CLIP's 248 positions
  # Truncated at 77 (CLIP's length), the caption says nothing about colour or shape.
  cut = tokenizers.SpmTokenizer(long_tokenizer.model_path, 77).decode(
      tokenizers.SpmTokenizer(long_tokenizer.model_path, 77).encode(captions))
  assert not any(set(c.replace(".", " ").replace(",", " ").split()) & late for c in cut)


def test_long_caption_batches_carry_short_captions_and_leave_the_default_alone(long_tokenizer):
  cfg = config_lib.base().data
  cfg.update(dict(source="embedded", global_batch=4, image_size=16, max_len=248,
                  languages={"en": 1.0}, long_captions=1.0))
  batch = pipeline.make(cfg, 0, 1, tokenizer=long_tokenizer, seed=0, prefetch=0,
                        with_short_captions=True).batch_at(0)
  for row in range(4):
    image, attrs = embedded.render_example(0, "train", row, 16)
    short = embedded.caption(attrs, "en", np.random.default_rng([0, 1, row]))
    assert long_tokenizer.decode(batch["text_short"][row]) == short
    assert embedded.COLOURS[attrs["colour"]] in long_tokenizer.decode(batch["text"][row])
    assert (batch["text"][row] != 0).sum() > 150
  off = config_lib.base().data
  off.update(dict(cfg.to_dict(), long_captions=0.0))
  default = pipeline.make(off, 0, 1, tokenizer=long_tokenizer, seed=0, prefetch=0).batch_at(0)
  want = long_tokenizer.encode([pipeline.example(0, i, 16, ("en",), np.ones(1))[2]
                                for i in range(4)])
  np.testing.assert_array_equal(default["text"], want)
  assert "text_short" not in default


def test_long_caption_keys_are_validated():
  c = config_lib.base()
  c.data.long_captions = 0.5
  c.data.languages = {"en": 1.0, "de": 1.0}
  with pytest.raises(config_lib.ConfigError, match="English only"):
    config_lib.validate(c)
  c = config_lib.base()
  c.loss.long_clip.enabled = True
  with pytest.raises(config_lib.ConfigError, match="data.long_captions > 0"):
    config_lib.validate(c)
  c.loss.long_clip.enabled = False
  c.init_from = "/tmp/run"
  with pytest.raises(config_lib.ConfigError, match="init_from"):
    config_lib.validate(c)


# ----------------------------------------------------------------------------------------
# End to end: a train step on 248-token captions with the PCE term and a distilled teacher.
# ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_step_on_248_token_captions_with_pce_and_a_stretched_teacher(long_tokenizer,
                                                                            tmp_path):
  from big_clip import steps
  from big_clip.losses import distill, softmax
  from big_clip.models import teacher

  c = config_lib.base()
  c.model.update(embed_dim=8)
  c.model.image.update(image_size=16, patch_size=8, width=16, depth=1, heads=2, mlp_dim=32)
  c.model.text.update(vocab_size=1024, max_len=248, width=16, depth=1, heads=2, mlp_dim=32)
  c.data.update(global_batch=8, image_size=16, max_len=248, long_captions=1.0)
  c.data.tokenizer.path = long_tokenizer.model_path
  c.loss.long_clip.update(enabled=True, num_components=3, short_weight=0.5)
  # The teacher: a run with 24 text positions (stretched to 248 when loaded).
  teacher_cfg = ml_collections.ConfigDict(c.to_dict())
  teacher_cfg.model.text.max_len = 24
  save_run(str(tmp_path), teacher_cfg.model, init_params(teacher_cfg.model, seed=5),
           image_size=16)
  c.loss.distill.update(enabled=True, teacher=f"big_clip:{tmp_path}", kl_weight=0.7,
                        contrastive_weight=0.5)
  config_lib.validate(c)

  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  the_teacher = teacher.Teacher(c.loss.distill.teacher, c, None)
  data = teacher.WithTeacher(pipeline.make(c.data, 0, 1, tokenizer=long_tokenizer, seed=0,
                                           prefetch=0, with_short_captions=True), the_teacher)
  batch = next(data)
  assert (batch["text"] != 0).sum(1).min() > 150  # long captions, not truncated at 77
  setup = steps.build(c, mesh, teacher_dim=the_teacher.embed_dim)
  params = jax.device_get(setup.state["params"])
  _, metrics = setup.step(setup.state, sharding.place_batch(batch, mesh))

  @jax.jit  # the loss from its definition, on one device
  def want(params, batch):
    model = nnx.merge(setup.graphdef, params)
    img, txt = model(batch["image"], batch["text"])
    scale, _ = model.scale_and_bias()
    contrastive = softmax.loss(img, txt, scale)
    short = long_clip.loss(img, txt, model.encode_text(batch["text_short"]), scale, None,
                           num_components=3, short_weight=1.0,
                           base_loss=softmax.loss) - contrastive
    # contrastive_weight 0.5 on the contrastive term only; short_weight 0.5 on its own term.
    return 0.5 * contrastive + 0.5 * short + distill.loss(
        img, txt, batch["teacher_image"], batch["teacher_text"], kl_weight=0.7)

  np.testing.assert_allclose(metrics["loss"], want(params, batch), rtol=1e-4)


def test_frozen_positions_stay_bit_identical_and_get_no_gradient():
  # Long-CLIP as released (§3.1): the first 20 rows of the stretched table are frozen while
  # the rest fine-tunes. Here 4 of 16 rows: zero gradient (Adam's first moment stays 0),
  # the same bits after 2 steps at full learning rate; every other row moves.
  from big_clip import steps
  from test_train import adam_first_moment, random_batch, tiny_config

  config = tiny_config(**{"model.text.freeze_positions": 4, "optim.warmup_steps": 0,
                          "optim.schedule": "warmup_constant"})
  config_lib.validate(config)
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  setup = steps.build(config, mesh)
  before = np.asarray(jax.device_get(setup.state["params"]["text"]["positional_embedding"]))
  state = setup.state
  for seed in range(2):
    state, _ = setup.step(state, sharding.place_batch(random_batch(config, seed), mesh))
  after = np.asarray(jax.device_get(state["params"]["text"]["positional_embedding"]))
  mu = np.asarray(jax.device_get(adam_first_moment(state["opt"])["text"]["positional_embedding"]))
  np.testing.assert_array_equal(after[:4], before[:4])
  assert not np.any(mu[:4])
  assert np.all(np.abs(after[4:] - before[4:]).max(axis=1) > 1e-5)


@pytest.mark.parametrize("max_len", [248, 77])
def test_long_caption_retrieval_equals_recall_computed_from_the_embeddings(long_tokenizer,
                                                                           max_len):
  # big_clip/evals/long_captions.py against recall@k counted here from the model's own
  # embeddings of the same images and captions (tokenized at the run's max_len: 77 cuts them).
  from big_clip.evals import long_captions, specs, towers as towers_lib

  c = config_lib.base()
  c.model.update(embed_dim=8)
  c.model.image.update(image_size=16, patch_size=8, width=16, depth=1, heads=2, mlp_dim=32)
  c.model.text.update(vocab_size=1024, max_len=max_len, width=16, depth=1, heads=2, mlp_dim=32)
  c.data.update(image_size=16, max_len=max_len, languages={"en": 1.0})
  c.eval.update(batch_size=16)  # one batch: equal captions, equal scores
  config_lib.validate(c)
  tok = tokenizers.SpmTokenizer(long_tokenizer.model_path, max_len)
  model = TwoTower(c.model, rngs=nnx.Rngs(params=3))
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  towers = towers_lib.Towers.build(c, tok, graphdef, mesh)
  spec = specs.parse("long_captions:embedded,limit=12")
  [evaluator] = long_captions.Evaluator.build(spec, c, towers, "tiny")
  [record] = evaluator.run(params)

  images, captions = embedded.long_caption_set(12, seed=c.seed, image_size=16)
  tokens = np.asarray(tok.encode(captions))
  assert tokens.shape == (12, max_len)
  img = np.asarray(model.encode_image(pipeline.normalize(images, c.data.mean, c.data.std)),
                   np.float64)
  txt = np.asarray(model.encode_text(jnp.asarray(tokens)), np.float64)
  scores = img @ txt.T  # [image, caption]; caption i describes image i
  # Cut at 77 tokens, two captions can be the same tokens: equal scores rank by index.
  scores = np.round(scores, 5)
  diag, before = np.diag(scores), np.tri(12, k=-1, dtype=bool)  # before[i, j]: j < i
  text_rank = ((scores > diag[None, :]) | ((scores == diag[None, :]) & before.T)).sum(0)
  image_rank = ((scores > diag[:, None]) | ((scores == diag[:, None]) & before)).sum(1)
  assert record["dataset"] == "embedded_long_captions" and record["num_images"] == 12
  for k in (1, 5, 10):
    assert record["metrics"][f"image_retrieval_recall@{k}"] == pytest.approx(
        np.mean(text_rank < k))
    assert record["metrics"][f"text_retrieval_recall@{k}"] == pytest.approx(
        np.mean(image_rank < k))


def test_frozen_positions_and_file_source_long_captions_are_validated():
  c = config_lib.base()
  c.model.text.freeze_positions = c.model.text.max_len
  with pytest.raises(config_lib.ConfigError, match="freeze_positions"):
    config_lib.validate(c)
  c = config_lib.base()
  c.data.source = "shards:/data/*.tar"
  c.loss.long_clip.enabled = True
  with pytest.raises(config_lib.ConfigError, match="long_caption_prob > 0"):
    config_lib.validate(c)
  c.data.long_caption_prob = 1.0
  config_lib.validate(c)  # PCM on a file source with long captions
  c.loss.text_pair_weight, c.data.pair_language = 1.0, "en"
  with pytest.raises(config_lib.ConfigError, match="pair_language"):
    config_lib.validate(c)
