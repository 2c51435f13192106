"""Two processes on localhost (4 CPU devices each, gloo collectives) compute the same losses
and the same train step as this single process does on its 8 devices; their step embeds
the batch in 4 micro-batches (loss.accum_steps, gradient cache), this one all at once.

The children run tests/multihost_worker.py, which joins the job through
`sharding.maybe_initialize_distributed` (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID) and reads its half of every batch from the real data pipeline
(`pipeline.make(..., jax.process_index(), jax.process_count())` + `place_batch`).
"""

import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_clip import config as config_lib
from big_clip import losses, sharding, steps
from big_clip.data import pipeline, embedded, tokenizers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")

GLOBAL_BATCH, DIM, SCALE, BIAS = 32, 16, 10.0, -3.0
# name -> (mesh shape, loss name, group size, group base)
LOSS_CASES = {
    "softmax": ((8, 1, 1), "softmax", 0, "softmax"),
    "sigmoid": ((2, 4, 1), "sigmoid", 0, "softmax"),
    "grouped_softmax_2": ((2, 4, 1), "grouped", 2, "softmax"),
}


# --------------------------------------------------------------------------------------
# The computations, run identically by the parent (1 process) and each child (2 processes).
# --------------------------------------------------------------------------------------


def loss_results() -> dict[str, tuple]:
  """name -> (value, d/d img, d/d txt, d/d scale, d/d bias) on global (sharded) arrays."""
  rng = np.random.default_rng(0)
  img, txt = (x / np.linalg.norm(x, axis=1, keepdims=True)
              for x in rng.normal(size=(2, GLOBAL_BATCH, DIM)).astype(np.float32))
  out = {}
  for name, (shape, loss_name, group_size, group_base) in LOSS_CASES.items():
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))
    spec = sharding.batch_sharding(mesh)
    # Each process fills only its own devices' blocks of the global arrays.
    img_g, txt_g = (jax.make_array_from_callback(x.shape, spec, lambda idx, x=x: x[idx])
                    for x in (img, txt))
    cfg = config_lib.base().loss
    cfg.update(name=loss_name, group_size=group_size, group_base=group_base)
    loss_fn = losses.from_config(cfg)
    value_and_grads = jax.jit(jax.value_and_grad(
        lambda i, t, s, b: loss_fn(i, t, s, b, mesh=mesh), argnums=(0, 1, 2, 3)))
    value, grads = value_and_grads(img_g, txt_g, jnp.float32(SCALE), jnp.float32(BIAS))
    out[name] = (value, *grads)
  return out


def one_train_step(spm_path: str, accum_steps: int):
  """(loss, gradient norm, params after, params before) one step of train.build's compiled
  step on the pipeline's first batch."""
  from test_train import SCALE_VISIBLE, tiny_config

  # The grouped loss (SigLIP in groups of 4 devices = one host each): the step is only equal
  # if every host's rows, and every micro-batch's rows, land on the same devices.
  config = tiny_config(**{"loss.name": "grouped", "loss.group_size": 4,
                          "loss.group_base": "sigmoid", "loss.accum_steps": accum_steps,
                          "data.global_batch": 32, "model.logit_bias_init": -10.0,
                          # Full learning rate at step 0: the one update moves every weight,
                          # by ~lr * g (AdamW eps 1, no clipping), so the gradients' size
                          # shows in the parameters, not only their sign.
                          "optim.schedule": "warmup_constant", "optim.warmup_steps": 0},
                       **SCALE_VISIBLE)
  config.model.image.depth = config.model.text.depth = 1
  config.data.tokenizer.path = spm_path
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  config_lib.validate_for_mesh(config, sharding.data_parallel_size(mesh),
                                     jax.process_count())
  tokenizer = pipeline.build_tokenizer(config, os.path.dirname(spm_path))
  data = pipeline.make(config.data, jax.process_index(), jax.process_count(),
                       tokenizer=tokenizer, seed=config.seed)
  batch = sharding.place_batch(next(data), mesh)
  data.close()
  setup = steps.build(config, mesh)
  init = jax.tree.map(jnp.copy, setup.state["params"])  # the step donates its input
  state, metrics = setup.step(setup.state, batch)
  return metrics["loss"], metrics["grad_norm"], state["params"], init


# --------------------------------------------------------------------------------------
# The test.
# --------------------------------------------------------------------------------------


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start_two_processes(out_path: str, spm_path: str) -> list[subprocess.Popen]:
  """The two workers; process i writes its output to `{out_path}.{i}.log`."""
  port = _free_port()
  procs = []
  for process_id in range(2):
    env = {**os.environ,
           # The parent's conftest gives it 8 devices; each child has 4 of the 8.
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu",
           "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
           "JAX_NUM_PROCESSES": "2",
           "JAX_PROCESS_ID": str(process_id),
           "PYTHONPATH": os.pathsep.join([ROOT, TESTS, os.environ.get("PYTHONPATH", "")])}
    with open(f"{out_path}.{process_id}.log", "w") as log:  # the child keeps its own handle
      procs.append(subprocess.Popen(
          [sys.executable, os.path.join(TESTS, "multihost_worker.py"), out_path, spm_path],
          env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
  return procs


def _wait(procs: list[subprocess.Popen], out_path: str, timeout_s: float = 900) -> None:
  try:
    for proc in procs:
      proc.wait(timeout=timeout_s)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for process_id, proc in enumerate(procs):
    with open(f"{out_path}.{process_id}.log") as log:
      assert proc.returncode == 0, f"process {process_id} failed:\n{log.read()[-4000:]}"


@pytest.mark.slow
def test_two_processes_compute_the_same_losses_and_train_step_as_one(tmp_path):
  spm_path = str(tmp_path / "spm.model")
  tokenizers.train_spm(embedded.sample_captions(n=3000, seed=0), spm_path, vocab_size=1024)
  out_path = str(tmp_path / "multihost.npz")
  procs = _start_two_processes(out_path, spm_path)
  try:  # the references, computed while the children start up and compile
    expected_losses = {name: jax.device_get(v) for name, v in loss_results().items()}
    # The children accumulate over 4 micro-batches (gradient cache); this process takes
    # the whole batch at once. Equal only if both the hosts' and the micro-batches' splits
    # keep every row on its device.
    loss, grad_norm, params, init = jax.device_get(one_train_step(spm_path, accum_steps=1))
  finally:
    _wait(procs, out_path)
  got = dict(np.load(out_path))

  for name, values in expected_losses.items():
    for i, expected in enumerate(values):
      np.testing.assert_allclose(got[f"{name}/{i}"], expected, rtol=1e-5, atol=1e-6,
                                 err_msg=f"{name}, output {i}")
  np.testing.assert_allclose(got["train/loss"], loss, rtol=1e-5)
  np.testing.assert_allclose(got["train/grad_norm"], grad_norm, rtol=1e-5)
  leaves = jax.tree_util.tree_leaves_with_path(params)
  assert len(leaves) == sum(k.startswith("train/params") for k in got)
  for path, expected in leaves:
    np.testing.assert_allclose(got["train/params" + jax.tree_util.keystr(path)], expected,
                               rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), params, init)
  assert np.median(jax.tree.leaves(moved)) > 1e-4, moved  # the step did change the weights
  assert moved["logit_scale"] > 1e-4 and moved["logit_bias"] > 1e-4, moved
