"""ProCLIP (configs/proclip_stage{1,2}.py): the alignment terms against float64 NumPy (value
and gradients, 1 device and 8), stage 2's teacher being the EMA of the image tower, the
tower selection of init_only / optim.freeze, and the stages chained on CPU."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from big_clip import checkpoints, optim, sharding, steps, train
from big_clip import config as config_lib
from big_clip import workdir as workdir_lib
from big_clip.losses import alignment
from big_clip.models import adapt, two_tower

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def numpy_terms(s, t):
  """float64, straight from ProCLIP's definitions (squared distances; smooth-L1 of pdist)."""
  instance = np.mean(np.sum((s - t) ** 2, axis=1))
  pdist = lambda x: np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
  i, j = np.triu_indices(len(s), k=1)
  diff = np.abs(pdist(s)[i, j] - pdist(t)[i, j])
  structure = np.mean(np.where(diff < 1, 0.5 * diff ** 2, diff - 0.5))
  return instance, structure


def numeric_grad(fn, x, eps=1e-6):
  grad = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    hi, lo = x.copy(), x.copy()
    hi[idx] += eps
    lo[idx] -= eps
    grad[idx] = (fn(hi) - fn(lo)) / (2 * eps)
  return grad


@pytest.mark.parametrize("use_mesh", [False, True], ids=["1_device", "8_devices"])
def test_alignment_terms_match_float64_numpy_value_and_gradients(use_mesh):
  rng = np.random.default_rng(0)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  s, t = unit(rng.standard_normal((16, 5))), unit(rng.standard_normal((16, 5)))
  t[3] = 1.5 * t[3]  # not only unit vectors; and pair distances beyond 1 (both smooth-L1 arms)
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1)) if use_mesh else None
  weighted = lambda a, b: (lambda ins, st: 0.7 * ins + 1.9 * st)(*alignment.terms(
      a, b, mesh=mesh))
  with jax.set_mesh(mesh) if mesh else jax.default_device(jax.devices()[0]):
    (instance, structure) = jax.jit(lambda a, b: alignment.terms(a, b, mesh=mesh))(
        jnp.float32(s), jnp.float32(t))
    grads = jax.jit(jax.grad(weighted, argnums=(0, 1)))(jnp.float32(s), jnp.float32(t))
  ref_instance, ref_structure = numpy_terms(s, t)
  np.testing.assert_allclose(instance, ref_instance, rtol=1e-5)
  np.testing.assert_allclose(structure, ref_structure, rtol=1e-5)
  assert ref_structure > 0
  ref = lambda a: (lambda ins, st: 0.7 * ins + 1.9 * st)(*numpy_terms(a, t))
  np.testing.assert_allclose(grads[0], numeric_grad(ref, s), atol=2e-5)
  np.testing.assert_array_equal(grads[1], 0.0)  # the teacher is frozen


def test_alignment_is_zero_for_the_teacher_itself_and_finite_on_duplicates():
  x = np.eye(4, 6, dtype=np.float32)
  x[1] = x[0]  # a duplicate pair: distance 0 off the diagonal
  instance, structure = alignment.terms(jnp.asarray(x), jnp.asarray(x))
  assert float(instance) == 0.0 and float(structure) == pytest.approx(0.0, abs=1e-6)
  grad = jax.grad(lambda a: sum(alignment.terms(a, jnp.asarray(x[::-1].copy()))))(
      jnp.asarray(x))
  assert np.isfinite(grad).all()
  with pytest.raises(ValueError, match="at least 2"):
    alignment.terms(jnp.ones((1, 3)), jnp.ones((1, 3)))


def tiny_config():
  c = config_lib.base()
  c.model.update(embed_dim=16)
  c.model.image.update(image_size=16, patch_size=8, width=16, depth=1, heads=2, mlp_dim=32)
  c.model.text.update(vocab_size=64, max_len=8, width=16, depth=1, heads=2, mlp_dim=32)
  c.data.update(global_batch=8, image_size=16, max_len=8)
  c.evals = ()
  return c


def test_stage2_teacher_is_the_ema_of_the_image_tower():
  """The step's 'loss/instance' and 'loss/structure' are the alignment of the student's image
  embeddings with those of the EMA weights (not of the current ones: they start equal)."""
  c = tiny_config()
  c.optim.ema_decay = 0.9
  c.loss.align.update(target="ema_image", instance_weight=0.5, structure_weight=2.0)
  config_lib.validate(c)
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  plan = steps.plan(c, mesh)
  with jax.set_mesh(mesh):
    state = jax.jit(plan.init_state, out_shardings=plan.state_shardings)()
  rng = np.random.default_rng(1)
  # An EMA that differs from the weights, as after some steps.
  state["ema"] = jax.tree.map(lambda e: e + 0.05 * rng.standard_normal(e.shape).astype(
      e.dtype), state["ema"])
  images = rng.standard_normal((8, 16, 16, 3)).astype(np.float32)
  batch = {"image": images, "text": rng.integers(1, 64, (8, 8)).astype(np.int32)}
  encode = lambda p: np.asarray(nnx.merge(plan.graphdef, p).encode_image(images), np.float64)
  student, teacher = encode(state["params"]), encode(optim.with_ema(state["params"],
                                                                   state["ema"]))
  ref_instance, ref_structure = numpy_terms(student, teacher)
  with jax.set_mesh(mesh):
    _, metrics = jax.jit(plan.step_fn)(state, sharding.place_batch(batch, mesh))
  assert ref_instance > 1e-3
  np.testing.assert_allclose(metrics["loss/instance"], ref_instance, rtol=1e-4)
  np.testing.assert_allclose(metrics["loss/structure"], ref_structure, rtol=1e-3, atol=1e-7)
  np.testing.assert_allclose(
      metrics["loss"], metrics["loss/contrastive"] + 0.5 * ref_instance + 2.0 * ref_structure,
      rtol=1e-5)


def test_freeze_and_init_only_pick_top_level_groups():
  c = tiny_config()
  model = nnx.eval_shape(two_tower.init_fn(c.model))
  mask = adapt.flatten(optim.trainable_mask(model, freeze=("image", "logit_scale")))
  assert not any(v for k, v in mask.items() if k.startswith("image.") or k == "logit_scale")
  assert all(v for k, v in mask.items() if k.startswith("text.") or k == "logit_bias")
  flat = {k: np.zeros(v.shape, np.float32) for k, v in adapt.per_layer(
      adapt.abstract_flat(c.model)).items() if k.startswith("image.")}
  loaded = adapt.import_params(flat, c.model, only=("image",))
  assert set(loaded) == {"image"}
  with pytest.raises(adapt.ImportMismatchError, match="missing tensor"):
    adapt.import_params(flat, c.model)  # all groups: the text tower is missing


@pytest.mark.parametrize("change, message", [
    (dict(target="ema_image"), "optim.ema_decay > 0"),
    (dict(target="teacher_text", teacher="/tmp/x"), "big_clip:WORKDIR"),
    (dict(teacher="big_clip:/tmp/x"), "read only with target='teacher_text'"),
    (dict(target="nope"), "allowed: , teacher_text, ema_image"),
], ids=["ema_needs_decay", "teacher_spec", "teacher_without_target", "target"])
def test_align_config_errors_name_the_key(change, message):
  c = tiny_config()
  c.loss.align.update(**change)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c)
  c = tiny_config()
  c.init_only = ("image",)
  with pytest.raises(config_lib.ConfigError, match="config.init_only"):
    config_lib.validate(c)
  c.init_from, c.optim.freeze = "big_clip:/tmp/x", ("vision",)
  with pytest.raises(config_lib.ConfigError, match=r"config.optim.freeze has \['vision'\]"):
    config_lib.validate(c)


def load_recipe(name, arg):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs",
                                                                   name + ".py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.slow
def test_the_proclip_stages_run_end_to_end_on_cpu(tmp_path):
  """CLIP (configs/default.py:quick, 3 steps) -> stage 1 -> stage 2 (`:local`, 3 steps each):
  stage 1 trains the adapter only and keeps CLIP's image tower; stage 2 starts from it (its
  EMA teacher equals the student at step 1) and trains the image tower."""
  def shrink(c, workdir):
    c.total_steps, c.data.global_batch, c.evals = 3, 8, ()
    c.checkpoint.update(every_steps=3, use_async=False)
    c.data.languages = {"en": 1.0, "zh": 1.0}
    return train.train(c, str(tmp_path / workdir))

  clip = load_recipe("default", "quick")
  shrink(clip, "clip")
  spm = workdir_lib.tokenizer_path(str(tmp_path / "clip"))
  s1 = load_recipe("proclip_stage1", "local")
  s1.init_from = s1.loss.align.teacher = f"big_clip:{tmp_path / 'clip'}"
  s1.data.tokenizer.path = spm
  r1 = shrink(s1, "pc1")
  assert r1["metrics"]["loss/instance"] > 0 and r1["metrics"]["loss/structure"] > 0
  s2 = load_recipe("proclip_stage2", "local")
  s2.init_from, s2.data.tokenizer.path = f"big_clip:{tmp_path / 'pc1'}", spm
  s2.log_every = 1
  r2 = shrink(s2, "pc2")
  assert np.isfinite(r2["metrics"]["loss"])

  def read(run):
    flat = checkpoints.read_params(workdir_lib.checkpoints_dir(str(tmp_path / run)),
                                   ema=False)[1]
    return {".".join(map(str, k)): np.asarray(v) for k, v in flat.items()}
  clip_p, p1, p2 = read("clip"), read("pc1"), read("pc2")
  for key in [k for k in p1 if k.startswith("image.")] + ["logit_scale"]:
    np.testing.assert_array_equal(p1[key], clip_p[key], err_msg=key)  # frozen in stage 1
  assert any(not np.array_equal(p2[k], p1[k]) for k in p1 if k.startswith("image."))
  adapter = [k for k in p1 if k.startswith("text.adapter")]
  assert adapter and any(not np.array_equal(p2[k], p1[k]) for k in adapter)
  with open(tmp_path / "pc2" / workdir_lib.METRICS_FILE) as f:
    first = json.loads(f.readline())
  assert first["step"] == 1  # the EMA teacher is still the stage-1 image tower itself
  assert first["loss/instance"] == pytest.approx(0.0, abs=1e-9)
