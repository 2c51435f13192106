"""The weight EMA (config.optim.ema_decay): the train step's average equals a float64 NumPy
EMA of the weights it produced (a resumed run's EMA is bit-identical: test_train.py), and the
loaders (big_clip.load, the eval and export binaries) read the EMA by default and the raw
weights when told."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import big_clip
from big_clip import checkpoints, evaluate, sharding, steps
from big_clip import workdir as workdir_lib
from big_clip.errors import UserError
from big_clip.evals import towers as towers_lib
from big_clip.models import two_tower

import test_api
from test_train import SCALE_VISIBLE, random_batch, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ema_equals_a_float64_numpy_average_of_the_trained_weights_on_8_devices():
  decay = 0.8
  config = tiny_config(**SCALE_VISIBLE, **{"optim.ema_decay": decay, "optim.warmup_steps": 1})
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  setup = steps.build(config, mesh)
  state = setup.state
  # Sharded exactly like the weights (fsdp splits them over 4 devices).
  assert all(jax.tree.leaves(jax.tree.map(lambda e, p: e.sharding == p.sharding,
                                          state["ema"], state["params"])))
  want = jax.tree.map(lambda p: np.asarray(p, np.float64), jax.device_get(state["params"]))
  for seed in range(4):
    state, _ = setup.step(state, sharding.place_batch(random_batch(config, seed), mesh))
    params = jax.device_get(state["params"])
    want = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, want, params)
  ema = jax.device_get(state["ema"])
  jax.tree.map(lambda e, w: np.testing.assert_allclose(e, w, rtol=1e-5, atol=1e-7), ema, want)
  # Not vacuous: the average is far from the weights (and from where they started).
  gap = jax.tree.leaves(jax.tree.map(lambda e, p: np.abs(e - p).max(), ema, params))
  assert np.median(gap) > 1e-2, gap
  # A step with a NaN loss leaves the EMA as it was, like the weights.
  bad = random_batch(config, 9)
  bad["image"][0] = np.nan
  state, _ = setup.step(state, sharding.place_batch(bad, mesh))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["ema"]), ema)


# ---------------------------------------------------------------------------------------------
# Loaders: a checkpoint whose raw weights and EMA are two different random inits.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("ema")
  config, workdir = test_api.write_workdir(tmp)
  raw = nnx.to_pure_dict(nnx.state(two_tower.init_fn(config.model, 0)()))
  ema = nnx.to_pure_dict(nnx.state(two_tower.init_fn(config.model, 1)()))
  mngr = checkpoints.manager(workdir_lib.checkpoints_dir(workdir), keep=2, use_async=False)
  checkpoints.save(mngr, 5, {"params": raw, "ema": ema}, {"next_example": 0})
  mngr.wait_until_finished()
  mngr.close()
  paths = test_api.write_images(tmp / "images")
  return config, workdir, str(tmp / "images"), paths, raw, ema


def test_load_and_evaluate_use_the_ema_unless_told_not_to(run, monkeypatch, tmp_path):
  config, workdir, folder, paths, raw, ema = run
  models = {True: big_clip.load(workdir), False: big_clip.load(workdir, ema=False)}
  for use_ema, want in ((True, ema), (False, raw)):
    assert models[use_ema].step == 5
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(models[use_ema].params), want)
  image_emb = {k: m.encode_image(paths) for k, m in models.items()}
  assert np.abs(image_emb[True] - image_emb[False]).max() > 1e-2
  seen = []
  images_fn = towers_lib.Towers.images

  def images(self, params, image_set, desc):
    emb, ok = images_fn(self, params, image_set, desc)
    seen.append(emb)
    return emb, ok

  monkeypatch.setattr(towers_lib.Towers, "images", images)
  for use_ema in (True, False):
    evaluate.evaluate_checkpoint(config, workdir, evals=[f"zeroshot:folder:{folder}"],
                                 output=str(tmp_path / "results.jsonl"), ema=use_ema)
    np.testing.assert_allclose(seen[-1], image_emb[use_ema], atol=1e-6, rtol=0)
  with pytest.raises(ValueError, match="ema applies to a big_clip workdir"):
    big_clip.load(f"hf:{workdir}", ema=False)


def test_resuming_with_the_ema_switched_off_names_the_key(run):
  # (That a resumed run's EMA is bit-identical: test_train.py's stop-and-restart test.)
  _, workdir, _, _, raw, _ = run
  abstract = {"params": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), raw)}
  mngr = checkpoints.manager(workdir_lib.checkpoints_dir(workdir), keep=2, use_async=False)
  with pytest.raises(UserError, match="config.optim.ema_decay > 0"):
    checkpoints.restore_latest(mngr, abstract)
  step, state, _ = checkpoints.restore_latest(mngr, {**abstract, "ema": abstract["params"]})
  assert step == 5
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["params"]), raw)
  mngr.close()


def test_export_no_ema_writes_the_raw_weights(run, tmp_path):
  _, workdir, _, paths, _, _ = run
  out = str(tmp_path / "oc")
  done = subprocess.run([sys.executable, "-m", "big_clip.export", f"--workdir={workdir}",
                         "--format=open_clip", f"--out={out}", "--no_ema"], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  exported = big_clip.load(f"open_clip:{out}").encode_image(paths)
  raw = big_clip.load(workdir, ema=False).encode_image(paths)
  np.testing.assert_allclose(exported, raw, atol=1e-5, rtol=0)


def test_the_ema_replaces_only_the_leaves_it_holds(tmp_path):
  # A frozen base has no EMA (only the trainable weights are averaged): read from the params.
  params = {"tower": {"kernel": np.arange(6.0, dtype=np.float32).reshape(2, 3)},
            "frozen": np.ones(3, np.float32)}
  ema = {"tower": {"kernel": -params["tower"]["kernel"]}}
  mngr = checkpoints.manager(str(tmp_path), keep=2, use_async=False)
  checkpoints.save(mngr, 1, {"params": params, "ema": ema}, {"next_example": 0})
  mngr.wait_until_finished()
  mngr.close()
  mngr = checkpoints.manager(str(tmp_path), keep=2, use_async=False)  # as evals open it
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                        params)
  for use_ema, kernel in ((True, ema["tower"]["kernel"]), (False, params["tower"]["kernel"])):
    got = checkpoints.restore_params(mngr, 1, target, ema=use_ema)
    np.testing.assert_array_equal(got["tower"]["kernel"], kernel)
    np.testing.assert_array_equal(got["frozen"], params["frozen"])
  mngr.close()
  _, flat = checkpoints.read_params(str(tmp_path))  # the NumPy reader (warm starts, teachers)
  np.testing.assert_array_equal(flat[("tower", "kernel")], ema["tower"]["kernel"])
