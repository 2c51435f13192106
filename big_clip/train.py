r"""Contrastive image-text training: python -m big_clip.train --config CFG --workdir DIR.

One linear `train()` in banner sections, big_vision style: config, mesh, input pipeline,
model & optimizer (`steps.build`: shapes from eval_shape, shardings decided before init, the
step compiled once ahead of time with the state donated), checkpoint restore, train loop.
Started again on the same workdir, it resumes from the newest complete checkpoint and
continues the same trajectory (same batches, same parameters).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from big_clip import checkpoints, cli, fileio, reporting, sharding
from big_clip import config as config_lib
from big_clip import workdir as workdir_lib
from big_clip.convert import pretrained
from big_clip.data import pipeline
from big_clip.evals import records, suite
from big_clip.models import teacher
from big_clip.steps import NonFiniteLossError, build, eval_params

__all__ = ["train", "NonFiniteLossError", "build"]


# ---------------------------------------------------------------------------------------------
# Input wait
# ---------------------------------------------------------------------------------------------
class InputWait:
  """Times the loop's blocking on the input pipeline (next batch + host->device copy).

  Steps are dispatched asynchronously, so the loop usually runs ahead of the device with
  steps queued; blocking on input then costs no step time. `fractions()` reports both:

    input_block_fraction: share of wall time the loop blocked on input at all;
    data_wait_fraction: the part of it during which the previous step had already finished,
        i.e. the device had nothing to run: the time training waited for data. An upper
        bound: a step that finishes during the wait counts the whole wait.
  """

  def __init__(self):
    self._blocked = self._starved = 0.0

  def fetch(self, get_batch: Callable[[], Any], previous_outputs: Any) -> Any:
    """`get_batch()`, timed; `previous_outputs` are the last dispatched step's arrays."""
    start = time.perf_counter()
    batch = get_batch()
    seconds = time.perf_counter() - start
    self._blocked += seconds
    if all(x.is_ready() for x in jax.tree.leaves(previous_outputs)):
      self._starved += seconds
    return batch

  def fractions(self, window_seconds: float) -> dict[str, float]:
    """The shares of `window_seconds` since the last call; restarts the counts."""
    out = {"data_wait_fraction": self._starved / window_seconds,
           "input_block_fraction": self._blocked / window_seconds}
    self._blocked = self._starved = 0.0
    return out


# ---------------------------------------------------------------------------------------------
# train()
# ---------------------------------------------------------------------------------------------
def train(config: ml_collections.ConfigDict, workdir: str, *, model_name: str = "big_clip",
          stop_after: int | None = None) -> dict[str, Any]:
  """Trains (or resumes) in `workdir`; returns the last metrics and eval records.

  `stop_after` stops the loop after that global step, as a preemption would (tests).
  """
  # ----------------------------------------------------------------------------- Config, logs.
  config_lib.validate(config)
  suite.validate(config.evals)
  multihost = str(config.mesh.multihost).lower()
  sharding.maybe_initialize_distributed("auto" if multihost == "auto" else multihost == "true")
  workdir = workdir_lib.absolute(workdir)
  fileio.makedirs(workdir)
  if jax.process_index() == 0:
    workdir_lib.write_config(config, workdir)
  logging.info("big_clip.train: workdir %s, %d devices (%s), %d processes", workdir,
               jax.device_count(), jax.devices()[0].platform, jax.process_count())

  # ------------------------------------------------------------------------------------ Mesh.
  mesh = sharding.mesh_from_config(config.mesh)
  config_lib.validate_for_mesh(config, sharding.data_parallel_size(mesh), jax.process_count())
  logging.info("Mesh %s", dict(mesh.shape))

  # -------------------------------------------------------------------------- Input pipeline.
  tokenizer = pipeline.build_tokenizer(config, workdir)
  data_iter = pipeline.make(config.data, jax.process_index(), jax.process_count(),
                            tokenizer=tokenizer, seed=config.seed,
                            with_short_captions=config.loss.long_clip.enabled,
                            hard_negatives=config.loss.hard_negatives)
  teacher_dim = None
  align = config.loss.align
  teacher_spec = (config.loss.distill.teacher if config.loss.distill.enabled
                  else align.teacher if align.target == "teacher_text" else "")
  if teacher_spec:  # the frozen teacher embeds every batch on the host side
    if config.model.text.kind == "llm" and config.model.text.llm.path:
      raise config_lib.ConfigError(
          f"A teacher ({teacher_spec}) reads this run's tokens, but the LLM tower "
          f"{config.model.text.llm.path} has its own tokenizer: not supported yet; use the "
          "random-init LLM tower (config.model.text.llm.path='') with the teacher's "
          "tokenizer (config.data.tokenizer.path).")
    distill_teacher = teacher.Teacher(teacher_spec, config, tokenizer.model_path)
    data_iter, teacher_dim = teacher.WithTeacher(data_iter, distill_teacher), \
        distill_teacher.embed_dim

  # ---------------------------------------------------------------------- Model and optimizer.
  setup = build(config, mesh, teacher_dim)
  state, schedule, graphdef = setup.state, setup.schedule, setup.graphdef
  abs_state = checkpoints.abstract_like(state)

  # ------------------------------------------------------------------------ Load checkpoint.
  ckpt = checkpoints.manager(workdir_lib.checkpoints_dir(workdir), keep=config.checkpoint.keep,
                             use_async=config.checkpoint.use_async)
  restored = checkpoints.restore_latest(ckpt, abs_state)
  first_step = 0
  if restored is not None:
    first_step, state, data_state = restored
    data_iter.set_state(data_state)
    logging.info("Resuming at step %d of %d", first_step, config.total_steps)
  elif config.init_from:  # pretrained towers (hf:, open_clip:, big_clip:), fresh optimizer
    # state; a shorter text positional table is stretched to max_len (Long-CLIP §3.1), and a
    # big_clip run must have used the same tokenizer.
    loaded = pretrained.load_init(config.init_from, config, getattr(tokenizer, "model_path",
                                                                    None))
    # With config.init_only only some groups are loaded; the others keep their init.
    state["params"] = {**state["params"], **sharding.place_like(
        loaded, {k: state["params"][k] for k in loaded})}
    state = setup.restart_ema(state)  # the average starts at the loaded weights
  metrics_log = workdir_lib.MetricsLog(workdir, first_step)

  # ----------------------------------------------------------------------------- Evaluators.
  evaluator = suite.Suite(config, tokenizer, graphdef, mesh, model_name)
  weights = "EMA weights" if "ema" in state else "weights"
  if "ema" in state:
    logging.info("Evals during training use the EMA weights (config.optim.ema_decay=%g).",
                 config.optim.ema_decay)

  def run_eval(step: int) -> list[dict]:
    results = evaluator.run(eval_params(state))
    records.write_records(results, os.path.join(workdir, "eval"), step=step)
    metrics_log.write(step, records.records_to_scalars(results))
    return results

  # ------------------------------------------------------------------------------ Train loop.
  def check_finite(step: int) -> None:
    bad, first_bad = jax.device_get((state["nonfinite"], state["first_nonfinite_step"]))
    if bad and config.nan_policy == "stop":
      raise NonFiniteLossError(
          f"Non-finite loss or gradient at step {int(first_bad)} (lr "
          f"{float(schedule(int(first_bad) - 1)):.3g}); the update was not applied and no "
          f"checkpoint after step {ckpt.latest_step()} was written. Lower config.optim.lr, "
          "check the data, or set config.nan_policy='skip' to drop such steps.")

  pending: list[dict] = []
  last: dict[str, float] = {}
  results: list[dict] = []
  t_log, step_log = time.perf_counter(), first_step
  input_wait = InputWait()
  logging.info("Training from step %d to %d, global batch %d", first_step, config.total_steps,
               config.data.global_batch)
  step = first_step
  for step in range(first_step + 1, config.total_steps + 1):
    batch = input_wait.fetch(lambda: sharding.place_batch(next(data_iter), mesh),
                             pending[-1] if pending else None)
    with jax.transfer_guard("disallow"):  # no silent host<->device copies in the loop
      state, metrics = setup.step_for(step)(state, batch)
    pending.append(metrics)

    if step % config.log_every == 0 or step == config.total_steps:
      check_finite(step)
      fetched = jax.device_get(pending)
      pending = []
      last = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
      last["nonfinite_steps"] = int(jax.device_get(state["nonfinite"]))
      now = time.perf_counter()
      steps_per_s = (step - step_log) / (now - t_log)
      last.update(steps_per_s=steps_per_s,
                  examples_per_s=steps_per_s * config.data.global_batch,
                  **input_wait.fractions(now - t_log))
      t_log, step_log = now, step
      last.update({f"skipped/{k}": v for k, v in data_iter.skipped().items()})
      metrics_log.write(step, last)
      terms = ", ".join(f"{k[5:]} {v:.4f}" for k, v in last.items() if k.startswith("loss/"))
      logging.info("step %d/%d  loss %.4f%s  lr %.2e  scale %.1f  %.2f steps/s  %.0f ex/s  "
                   "data wait %.0f%%  ETA %s", step, config.total_steps, last["loss"],
                   f" ({terms})" if terms else "", last["lr"], last["logit_scale"],
                   steps_per_s, last["examples_per_s"], 100 * last["data_wait_fraction"],
                   workdir_lib.eta((config.total_steps - step) / max(steps_per_s, 1e-9)))

    if step % config.checkpoint.every_steps == 0 or step == config.total_steps:
      check_finite(step)
      checkpoints.save(ckpt, step, state, data_iter.get_state())
    if step % config.eval.every_steps == 0 or step == config.total_steps:
      results = run_eval(step)
      records.print_table(results, title=f"zero-shot accuracy at step {step} ({weights})")
    if stop_after is not None and step >= stop_after:
      logging.info("Stopping after step %d (stop_after).", step)
      break

  ckpt.wait_until_finished()
  ckpt.close()
  data_iter.close()
  if data_iter.skipped():
    logging.info("Data: skipped examples by reason (this host): %s", data_iter.skipped())
  metrics_log.close()
  if jax.process_index() == 0 and (report := reporting.write_report(workdir)):
    logging.info("Report: %s", report)
  return {"step": step, "metrics": last, "eval": results, "compile_seconds": setup.compile_seconds,
          "params": state["params"], "opt": state["opt"], "ema": state.get("ema")}


# ---------------------------------------------------------------------------------------------
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  del argv
  if FLAGS.workdir is None or FLAGS.config is None:
    raise app.UsageError("Usage: python -m big_clip.train --config configs/X.py --workdir DIR")
  name = workdir_lib.run_name(config_flags.get_config_filename(FLAGS["config"]))
  train(FLAGS.config, FLAGS.workdir, model_name=name)


def run() -> None:
  """`python -m big_clip.train`, and the console script big-clip-train."""
  config_flags.DEFINE_config_file("config", None, "A config file in configs/.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Checkpoints, metrics and eval results go here.")
  cli.run(main, "big_clip.train")


if __name__ == "__main__":
  run()
