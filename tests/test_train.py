"""The train step and loop: sharding-invariance, exact resume, NaN handling, learning."""

import functools
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_clip import config as config_lib
from big_clip import sharding, steps, train
from big_clip.errors import UserError
from big_clip.models import adapt, two_tower
from big_clip.data import pipeline, embedded, tokenizers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  """A 2-layer model on the embedded data: seconds per run on a CPU."""
  c = config_lib.base()
  c.total_steps = 6
  c.log_every = 1
  c.model.embed_dim = 32
  c.model.image.update(image_size=32, patch_size=8, width=32, depth=2, heads=2, mlp_dim=64)
  c.model.text.update(vocab_size=1024, max_len=16, width=32, depth=2, heads=2, mlp_dim=64)
  c.data.update(global_batch=16, image_size=32, max_len=16,
                languages={"en": 1.0, "ru": 1.0, "zh": 1.0})
  c.data.tokenizer.vocab_size = 1024
  c.optim.update(lr=1e-3, warmup_steps=2)
  c.checkpoint.update(every_steps=3, keep=2, use_async=True)
  c.eval.update(every_steps=1000, num_images=40, batch_size=40)
  for key, value in overrides.items():
    section, _, name = key.rpartition(".")
    (c[section] if section else c)[name] = value
  return c


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
  """One small multilingual tokenizer for all tests of this module."""
  path = str(tmp_path_factory.mktemp("spm") / "spm.model")
  tokenizers.train_spm(embedded.sample_captions(n=3000, seed=0), path, vocab_size=1024)
  return path


# AdamW with eps = 1 and no clipping: the update is ~lr * g, not lr * sign(g), so a wrong
# gradient scale (a 1/n_devices too many, a doubled loss) changes the parameters.
SCALE_VISIBLE = {"optim.eps": 1.0, "optim.clip_norm": 0.0, "optim.weight_decay": 0.0,
                 "optim.lr": 0.5}


def adam_first_moment(opt_state):
  """Adam's `mu` of an optax state: after the first update it is (1 - b1) * the gradient."""
  import optax

  adam = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(
      s, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)]
  assert len(adam) == 1
  return adam[0].mu


def random_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  b, s, l = config.data.global_batch, config.data.image_size, config.data.max_len
  text = rng.integers(4, config.model.text.vocab_size, size=(b, l)).astype(np.int32)
  lengths = rng.integers(3, l, size=b)
  for i, n in enumerate(lengths):
    text[i, n] = config.model.text.eos_id
    text[i, n + 1:] = config.model.text.pad_id
  return {"image": rng.normal(size=(b, s, s, 3)).astype(np.float32), "text": text}


def run_steps(config, mesh, batches):
  """(initial params, params after the steps, losses, gradient norms); all numpy."""
  setup = steps.build(config, mesh)
  state, losses, norms = setup.state, [], []
  init = jax.device_get(state["params"])
  for batch in batches:
    state, metrics = setup.step(state, sharding.place_batch(batch, mesh))
    losses.append(float(jax.device_get(metrics["loss"])))
    norms.append(float(jax.device_get(metrics["grad_norm"])))
  return init, jax.device_get(state["params"]), losses, norms


@functools.lru_cache(maxsize=None)
def one_device_run(loss_name: str):
  """The 1-device reference of the test below, computed once per loss (numpy results)."""
  config = tiny_config(**{"loss.name": loss_name}, **SCALE_VISIBLE)
  batches = [random_batch(config, seed) for seed in range(2)]
  one = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  return run_steps(config, one, batches)


@pytest.mark.parametrize("loss_name", ["softmax", "sigmoid"])
@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_train_steps_on_8_devices_equal_the_same_steps_on_1_device(mesh_shape, loss_name):
  # Step 1 has lr 0 (warmup starts at 0); step 2 updates with lr 0.25 and eps 1
  # (SCALE_VISIBLE), so the parameters after it show the gradients' size, not their sign.
  config = tiny_config(**{"loss.name": loss_name}, **SCALE_VISIBLE)
  batches = [random_batch(config, seed) for seed in range(2)]
  eight = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape)))
  init, params_1, losses_1, norms_1 = one_device_run(loss_name)
  _, params_8, losses_8, norms_8 = run_steps(config, eight, batches)
  np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
  np.testing.assert_allclose(norms_8, norms_1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
               params_8, params_1)
  # ...and the step did move the parameters well beyond the tolerance (not vacuous).
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), params_1, init))
  assert np.median(moved) > 1e-3, moved


def test_grad_accumulation_of_one_batch_is_the_mean_of_its_micro_batch_gradients():
  # 2 micro-batches of 8 (rows i, i + 2, ...) == the mean of the two separate 8-example
  # steps: loss and every gradient, read from Adam's first moment (gradients, not an
  # update, so a wrong 1/accum shows; no clipping, which would rescale them).
  config = tiny_config(**{"optim.grad_accum_steps": 2, "optim.clip_norm": 0.0})
  mesh = sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  batch = random_batch(config)
  setup = steps.build(config, mesh)
  state, metrics = setup.step(setup.state, sharding.place_batch(batch, mesh))
  grads = jax.device_get(adam_first_moment(state["opt"]))
  single = tiny_config(**{"data.global_batch": 8, "optim.clip_norm": 0.0})
  single_setup = steps.build(single, mesh)
  micro_losses, micro_grads = [], []
  for i in range(2):
    micro = {k: v[i::2] for k, v in batch.items()}
    state = jax.tree.map(jnp.copy, single_setup.state)  # the step donates its input
    state, m = single_setup.step(state, sharding.place_batch(micro, mesh))
    micro_losses.append(float(m["loss"]))
    micro_grads.append(jax.device_get(adam_first_moment(state["opt"])))
  np.testing.assert_allclose(float(metrics["loss"]), np.mean(micro_losses), rtol=1e-5)
  # The floor: key biases have a gradient of 0 analytically, float32 noise here.
  atol = 1e-6 * max(np.abs(g).max() for g in jax.tree.leaves(grads))
  jax.tree.map(lambda g, a, b: np.testing.assert_allclose(g, (a + b) / 2, rtol=1e-4, atol=atol),
               grads, *micro_grads)


def test_optim_trainable_updates_only_the_matching_parameters_with_their_full_gradients():
  # No clipping (its global norm would cover fewer gradients) and no warmup (lr > 0 now).
  overrides = {"optim.clip_norm": 0.0, "optim.warmup_steps": 0}
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  batch = random_batch(tiny_config())

  def one_step(config):
    setup = steps.build(config, mesh)
    before = adapt.flatten(jax.device_get(setup.state["params"]))
    state, _ = setup.step(setup.state, sharding.place_batch(batch, mesh))
    return (before, adapt.flatten(jax.device_get(state["params"])),
            adapt.flatten(jax.device_get(adam_first_moment(state["opt"]))))

  _, _, grads_full = one_step(tiny_config(**overrides))
  before, after, grads = one_step(tiny_config(**overrides, **{"optim.trainable": r"\.mlp\."}))
  moved = {k for k in after if not np.array_equal(after[k], before[k])}
  assert moved == {k for k in after if ".mlp." in k} and moved
  assert set(grads) == moved  # no optimizer state for the frozen parameters
  for k in moved:
    np.testing.assert_allclose(grads[k], grads_full[k], rtol=1e-5, atol=1e-9, err_msg=k)
  with pytest.raises(config_lib.ConfigError, match="config.optim.trainable"):
    config_lib.validate(tiny_config(**{"optim.trainable": "mlp("}))
  with pytest.raises(UserError, match="matches no parameter"):
    steps.build(tiny_config(**{"optim.trainable": "nope"}), mesh)


def test_a_nan_batch_is_not_applied_and_is_counted():
  config = tiny_config()
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  setup = steps.build(config, mesh)
  before = jax.device_get(setup.state["params"])
  batch = random_batch(config)
  batch["image"][3] = np.nan
  state, _ = setup.step(setup.state, sharding.place_batch(batch, mesh))
  after = jax.device_get(state["params"])
  jax.tree.map(np.testing.assert_array_equal, after, before)
  assert int(state["nonfinite"]) == 1 and int(state["first_nonfinite_step"]) == 1


def _loss_curve(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(l) for l in f]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_stop_and_restart_on_the_same_workdir_continues_the_same_trajectory(tmp_path, spm_path):
  # With a weight EMA (config.optim.ema_decay), which must resume bit-identically too.
  config = tiny_config(**{"data.tokenizer.path": spm_path, "optim.ema_decay": 0.9})
  straight = train.train(config, str(tmp_path / "a"))
  train.train(config, str(tmp_path / "b"), stop_after=4)  # the checkpoint of step 3 survives
  resumed = train.train(config, str(tmp_path / "b"))
  assert straight["step"] == resumed["step"] == 6
  for key in ("params", "ema"):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed[key]),
                 jax.device_get(straight[key]))
  assert _loss_curve(tmp_path / "b") == _loss_curve(tmp_path / "a")
  assert sorted(_loss_curve(tmp_path / "a")) == [1, 2, 3, 4, 5, 6]


def _logged_rows(workdir):
  """{step: logged scalars} without the wall-clock ones (speed, data wait)."""
  timing = ("steps_per_s", "examples_per_s", "data_wait_fraction", "input_block_fraction")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(l) for l in f]
  out = {}
  for row in rows:
    out.setdefault(row["step"], {}).update({k: v for k, v in row.items() if k not in timing})
  return out


@pytest.mark.slow
def test_an_moe_run_on_expert_2_x_data_4_resumes_exactly(tmp_path, spm_path):
  # Top-2 of 4 experts in the second block of each tower, capacity 1.0 (so tokens are
  # dropped), experts split over 2 devices: parameters, Adam's moments and every logged
  # router statistic of the run stopped after step 4 (resumed from its step-3 checkpoint)
  # equal the straight run's. No evals: three compilations of the step are the cost.
  config = tiny_config(**{"data.tokenizer.path": spm_path, "mesh.data": 4, "mesh.expert": 2,
                          "evals": ()})
  for tower in ("image", "text"):
    config.model[tower].moe.update(experts=4, top_k=2, every_n_layers=2, capacity_factor=1.0)
  straight = train.train(config, str(tmp_path / "a"))
  train.train(config, str(tmp_path / "b"), stop_after=4)
  resumed = train.train(config, str(tmp_path / "b"))
  assert straight["step"] == resumed["step"] == 6
  for key in ("params", "opt"):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed[key]),
                 jax.device_get(straight[key]))
  rows_a, rows_b = _logged_rows(tmp_path / "a"), _logged_rows(tmp_path / "b")
  assert sorted(rows_a) == [1, 2, 3, 4, 5, 6] and rows_b == rows_a
  for tower in ("image", "text"):
    assert {f"moe/{tower}_{s}" for s in ("load_balance", "router_z", "dropped")} <= set(rows_a[5])
  assert 0 < rows_a[5]["moe/text_dropped"] < 1  # the capacity limit is exercised


def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_checkpoint_clean(
    tmp_path, spm_path, monkeypatch):
  config = tiny_config(**{"data.tokenizer.path": spm_path, "checkpoint.use_async": False})
  make = pipeline.make

  def poisoned(*args, **kwargs):
    it = make(*args, **kwargs)

    class Poisoned:
      consumed = 0

      def __next__(self):
        batch = next(it)
        self.consumed += 1
        if self.consumed == 5:
          batch["image"][:] = np.nan
        return batch

      def __getattr__(self, name):
        return getattr(it, name)

    return Poisoned()

  monkeypatch.setattr(pipeline, "make", poisoned)
  with pytest.raises(train.NonFiniteLossError, match="step 5"):
    train.train(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]


def _kill_mid_checkpoint(cmd, env, ckpt_dir, min_step: int, delay_s: float) -> bool:
  """Starts `cmd`, waits until it begins writing the checkpoint of a step >= `min_step`
  (orbax's temporary directory appears), waits `delay_s`, then kill -9. True when the kill
  landed mid-write: the temporary directory outlived the process."""
  started = time.time()
  log = ckpt_dir.parent.parent / f"killed_at_{min_step}.log"
  with open(log, "w") as f:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=f)

  def writing() -> str | None:  # this run's '<step>.orbax-checkpoint-tmp', step >= min_step
    for name in os.listdir(ckpt_dir) if ckpt_dir.exists() else ():
      try:
        if (name.endswith("orbax-checkpoint-tmp") and int(name.split(".")[0]) >= min_step
            and os.stat(ckpt_dir / name).st_ctime >= started):  # not a killed run's orphan
          return name
      except (FileNotFoundError, ValueError):
        pass
    return None

  deadline, tmp = time.time() + 900, None
  while tmp is None and time.time() < deadline and proc.poll() is None:
    tmp = writing()
    time.sleep(0.002)
  if tmp is None:
    proc.kill()
    proc.wait()
    raise AssertionError("the run never started the checkpoint it was to be killed in: "
                         + log.read_text()[-3000:])
  time.sleep(delay_s)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return (ckpt_dir / tmp).exists()


@pytest.mark.slow
def test_sigkill_while_checkpoints_are_written_then_restart_reaches_the_same_parameters(
    tmp_path, spm_path):
  """Real kill -9s, each at a seeded random moment inside a checkpoint write (orbax's
  temporary directory exists), three in a row on one workdir; the run resumed after them
  ends with bit-identical parameters and loss curve to an uninterrupted run."""

  cfg_file = tmp_path / "cfg.py"
  cfg_file.write_text(
      "import sys\n"
      f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
      "from test_train import tiny_config\n"
      "def get_config():\n"
      f"  return tiny_config(**{{'data.tokenizer.path': {spm_path!r}, 'total_steps': 40,\n"
      "                         'checkpoint.every_steps': 5})\n")
  cmd = [sys.executable, "-m", "big_clip.train", f"--config={cfg_file}"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  killed = tmp_path / "killed"
  rng = np.random.default_rng(0)
  mid_write = [_kill_mid_checkpoint(cmd + [f"--workdir={killed}"], env, killed / "checkpoints",
                                    int(step), float(rng.uniform(0, 0.02)))
               for step in sorted(rng.choice(np.arange(5, 40, 5), 3, replace=False))]
  assert any(mid_write), "no kill landed inside a checkpoint write; the test saw nothing"
  for workdir in (killed, tmp_path / "straight"):
    assert subprocess.run(cmd + [f"--workdir={workdir}"], cwd=ROOT, env=env,
                          capture_output=True).returncode == 0
  assert not [n for n in os.listdir(killed / "checkpoints") if "tmp" in n]
  params_killed = adapt.read_run(str(killed))[1]
  params_straight = adapt.read_run(str(tmp_path / "straight"))[1]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params_killed),
               jax.device_get(params_straight))
  curve_killed, curve_straight = _loss_curve(killed), _loss_curve(tmp_path / "straight")
  assert sorted(curve_killed) == list(range(1, 41))
  assert curve_killed == curve_straight


@pytest.mark.slow
def test_default_quick_run_lowers_the_loss_and_beats_chance_in_every_language(tmp_path,
                                                                               spm_path):
  import importlib.util

  spec = importlib.util.spec_from_file_location("default", os.path.join(ROOT, "configs",
                                                                        "default.py"))
  default = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(default)
  config = default.get_config("quick")
  result = train.train(config, str(tmp_path))
  curve = _loss_curve(tmp_path)
  steps = sorted(curve)
  assert curve[steps[-1]] < 0.7 * curve[steps[0]]
  langs = set(config.data.languages)
  colour = {r["language"]: r["metrics"]["acc1"] / r["metrics"]["chance"]
            for r in result["eval"]
            if r["dataset"] == "embedded_colour" and r["language"] in langs}  # not 'mean'
  assert set(colour) == langs
  # 200 steps learn colour in every language (the full run is measured in the README).
  assert min(colour.values()) >= 3.0, colour
  with open(tmp_path / "eval" / "results.jsonl") as f:
    rows = [json.loads(l) for l in f]
  assert all({"dataset", "language", "metrics", "model", "task", "step"} <= set(r) for r in rows)


def test_weight_decay_hits_weight_matrices_only_also_when_layers_are_scanned():
  from big_clip import optim
  from flax import nnx

  for scan in (False, True):
    config = tiny_config(**{"model.scan_layers": scan})
    params = nnx.to_pure_dict(nnx.state(nnx.eval_shape(two_tower.init_fn(config.model, config.seed))))
    flat = jax.tree_util.tree_flatten_with_path(optim.decay_mask(params))[0]
    decayed = {"/".join(str(k.key) for k in path) for path, on in flat if on}
    assert "text/token_embedding/embedding" in decayed
    assert any(p.endswith("attn/q/kernel") for p in decayed)
    assert not any(("ln_" in p or p.endswith("bias") or "positional" in p or "logit" in p)
                   for p in decayed), decayed


def test_logit_scale_is_clamped_at_the_cap_and_its_gradient_brings_it_back(monkeypatch):
  # A loss of -scale pushes the temperature up, +scale down. Adam with b1 = b2 = 0 moves the
  # parameter by exactly lr = 1 per step, so the path is known: up past ln(100) (clamped
  # there), back down, and clamped at 0. Clipping the scale inside the forward pass instead
  # would zero the gradient at the cap and leave the parameter stuck above it.
  from big_clip import losses

  config = tiny_config(**{"optim.b1": 0.0, "optim.b2": 0.0, "optim.lr": 1.0,
                          "optim.clip_norm": 0.0, "optim.schedule": "warmup_constant",
                          "optim.warmup_steps": 0})
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  compiled = {}
  for sign in (-1.0, 1.0):
    monkeypatch.setattr(losses, "from_config",
                        lambda cfg, sign=sign: lambda img, txt, scale, bias, mesh: sign * scale)
    compiled[sign] = steps.build(config, mesh)
  state = compiled[-1.0].state
  batch = sharding.place_batch(random_batch(config), mesh)
  path = [float(state["params"]["logit_scale"])]
  for sign in [-1.0] * 3 + [1.0] * 5:
    state, _ = compiled[sign].step(state, batch)
    path.append(float(state["params"]["logit_scale"]))
  cap, start = np.log(np.float32(100.0)), np.log(1 / 0.07)
  np.testing.assert_allclose(path, [start, start + 1, cap, cap, cap - 1, cap - 2, cap - 3,
                                    cap - 4, 0.0], atol=1e-5)


class _StepOutput:
  """Stands for a dispatched step's output array: done or still running."""

  def __init__(self, done: bool):
    self.done = done

  def is_ready(self) -> bool:
    return self.done


def test_a_wait_for_input_counts_as_data_wait_only_when_no_step_is_queued():
  """Blocking on input while the previous step still runs costs the device nothing: it is
  input_block time, not data_wait time; after a finished step (or before the first one) it
  is both."""
  wait = train.InputWait()
  fetch = lambda: time.sleep(0.05) or "batch"
  assert wait.fetch(fetch, {"loss": _StepOutput(False)}) == "batch"
  wait.fetch(fetch, {"loss": _StepOutput(True), "lr": _StepOutput(True)})
  wait.fetch(fetch, None)
  shares = wait.fractions(window_seconds=1.0)
  assert shares["data_wait_fraction"] >= 0.1  # the last two fetches
  assert shares["input_block_fraction"] - shares["data_wait_fraction"] >= 0.05  # the first
  assert wait.fractions(1.0) == {"data_wait_fraction": 0.0, "input_block_fraction": 0.0}


def test_the_loop_logs_the_share_of_time_it_waited_for_data(tmp_path, spm_path, monkeypatch):
  """A pipeline that takes 0.3 s per batch: each logged window (one step) spent at least those
  0.3 s waiting, i.e. data_wait_fraction x window seconds >= 0.3 (the tiny step is done long
  before: the device waited); the fraction is <= 1."""
  config = tiny_config(**{"data.tokenizer.path": spm_path, "total_steps": 4,
                          "checkpoint.every_steps": 1000, "checkpoint.use_async": False})
  make = pipeline.make

  def slow(*args, **kwargs):
    it = make(*args, **kwargs)

    class Slow:
      def __next__(self):
        time.sleep(0.3)
        return next(it)

      def __getattr__(self, name):
        return getattr(it, name)

    return Slow()

  monkeypatch.setattr(pipeline, "make", slow)
  train.train(config, str(tmp_path))
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [r for r in map(json.loads, f) if "data_wait_fraction" in r]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  for r in rows:
    assert 0.3 <= r["data_wait_fraction"] / r["steps_per_s"] and r["data_wait_fraction"] <= 1
