r"""Contrastive image-text training: python -m big_clip.train --config CFG --workdir DIR.

One linear `train()` in banner sections, big_vision style: config, mesh, input pipeline,
model & optimizer (shapes from eval_shape, shardings decided before init), update step
(compiled once, ahead of time, state donated), checkpoint restore, train loop.
Started again on the same workdir, it resumes from the newest complete checkpoint and
continues the same trajectory (same batches, same parameters).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from big_clip import checkpoints, evaluate, optim, sharding
from big_clip import config as config_lib
from big_clip import losses
from big_clip.losses import auxiliary
from big_clip.data import pipeline, tokenizers
from big_clip.losses import grad_cache
from big_clip.models import adapt, llm, two_tower, vit

State = dict[str, Any]  # {'step', 'params', 'opt', 'nonfinite', 'first_nonfinite_step'}


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN/inf; the state on disk is the last good one."""


# ---------------------------------------------------------------------------------------------
# Metrics: TensorBoard through clu, plus a JSONL copy for scripts.
# ---------------------------------------------------------------------------------------------
class MetricsLog:
  """Writes scalars to TensorBoard (clu) and `workdir/metrics.jsonl` (process 0 only)."""

  def __init__(self, workdir: str, resume_step: int):
    from clu import metric_writers  # heavy (TensorFlow); imported when training starts

    self.is_main = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    # TensorBoard only: the progress line is ours (clu's LoggingWriter would repeat it).
    self.writer = (metric_writers.AsyncWriter(metric_writers.SummaryWriter(workdir))
                   if self.is_main else None)
    if self.is_main:
      self._drop_after(resume_step)

  def _drop_after(self, step: int) -> None:
    # Steps after the restored checkpoint were lost with the killed run and are recomputed
    # (identically); keep the file a clean curve with one line per step.
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [l for l in f if l.strip() and json.loads(l).get("step", 0) <= step]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(lines)
    os.replace(tmp, self.path)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if self.is_main:
      self.writer.write_scalars(step, dict(scalars))
      with open(self.path, "a") as f:
        f.write(json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}}) + "\n")

  def close(self) -> None:
    if self.writer is not None:
      self.writer.flush()
      self.writer.close()


def _eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ---------------------------------------------------------------------------------------------
# The update step.
# ---------------------------------------------------------------------------------------------
def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, loss_fn: Callable, mesh: jax.sharding.Mesh | None,
                    config: ml_collections.ConfigDict,
                    trainable: Any = None, mask_patches: bool = True
                    ) -> Callable[[State, dict], tuple]:
  """A pure `(state, batch) -> (state, metrics)`; jit it with shardings.

  `trainable` (optim.trainable_mask) marks the params that get gradients and optimizer
  state; the others (a frozen LLM base) pass through unchanged. None: all of them.
  `mask_patches`: apply `config.model.image.patch_dropout` (False for FLIP's unmasked tail).
  """
  accum = config.optim.grad_accum_steps
  skip_nonfinite = True  # both policies keep the last finite params; 'stop' raises on host
  extra_terms = auxiliary.make(config)  # Long-CLIP short captions, distillation (or None)
  split = ((lambda p: optim.partition(p, trainable)) if trainable is not None
           else (lambda p: (p, {})))

  def compute_loss(params, frozen, batch):
    model = nnx.merge(graphdef, optim.combine(params, frozen))
    img_emb, txt_emb = model(batch["image"], batch["text"], batch.get("patch_noise"))
    scale, bias = model.scale_and_bias()
    loss = loss_fn(img_emb, txt_emb, scale, bias, mesh=mesh)
    parts = {}  # the terms of a composite loss, logged as metrics
    if extra_terms is not None:
      loss, parts = extra_terms(loss, model, batch, img_emb, txt_emb, scale, bias, mesh=mesh)
    return loss, (scale, bias, parts)

  grad_fn = jax.value_and_grad(compute_loss, has_aux=True)

  def gradients(params, frozen, batch):
    if config.loss.accum_steps > 1:  # one contrastive batch, backprop in micro-batches
      model = lambda p: nnx.merge(graphdef, optim.combine(p, frozen))
      (loss, (scale, bias)), grads = grad_cache.value_and_grad(
          lambda p, b: model(p)(b["image"], b["text"], b.get("patch_noise")),
          lambda p: model(p).scale_and_bias(), loss_fn, params, batch,
          accum_steps=config.loss.accum_steps, mesh=mesh)
      return (loss, (scale, bias, {})), grads
    if accum == 1:
      return grad_fn(params, frozen, batch)
    # Micro-batch i holds examples i, i+accum, ... so that each one stays spread over all
    # data-parallel devices. Gradients are averaged; each micro-batch is its own
    # contrastive batch (one contrastive batch over all of them: loss.accum_steps).
    micro = grad_cache.split(batch, accum)

    def body(carry, mb):
      (loss, aux), grads = grad_fn(params, frozen, mb)
      return jax.tree.map(jnp.add, carry, (loss, grads)), aux

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss_sum, grad_sum), aux = jax.lax.scan(body, zeros, micro)
    aux = jax.tree.map(lambda a: a.mean(0), aux)  # scale / bias: the same in every one
    return (loss_sum / accum, aux), jax.tree.map(lambda g: g / accum, grad_sum)

  def train_step(state: State, batch: dict) -> tuple[State, dict]:
    if mask_patches and config.model.image.patch_dropout > 0:  # per example: any mesh or
      batch = {**batch, "patch_noise": vit.patch_noise(  # micro-batching draws the same
          config, state["step"], batch["image"].shape[0])}  # mask; resumes exactly
    params, frozen = split(state["params"])
    (loss, (scale, bias, parts)), grads = gradients(params, frozen, batch)
    grad_norm = optax.global_norm(grads)
    updates, opt = tx.update(grads, state["opt"], params)
    params = optim.combine(optax.apply_updates(params, updates), frozen)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if skip_nonfinite:  # never let a NaN into the parameters (or a checkpoint)
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
      params, opt = keep(params, state["params"]), keep(opt, state["opt"])
    step = state["step"] + 1
    new_state = {
        "step": step,
        "params": params,
        "opt": opt,
        "nonfinite": state["nonfinite"] + (~finite).astype(jnp.int32),
        "first_nonfinite_step": jnp.where(
            (state["first_nonfinite_step"] < 0) & ~finite, step,
            state["first_nonfinite_step"]),
    }
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]),
               "logit_scale": scale, "logit_bias": bias, **parts}
    return new_state, metrics

  return train_step


# ---------------------------------------------------------------------------------------------
# Building blocks shared with evaluate.py.
# ---------------------------------------------------------------------------------------------
def build_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> tokenizers.SpmTokenizer:
  if config.model.text.kind == "llm" and config.model.text.llm.path:
    return tokenizers.for_llm(config.model, config.data.max_len)  # or its embedding cache
  tok_dir_ready = os.path.exists(os.path.join(workdir, "tokenizer", "spm.model"))
  # path '': trained on the source's own captions (tools/train_spm.py does the same offline).
  corpus = lambda: pipeline.caption_corpus(config.data, config.seed)
  if jax.process_count() > 1 and not config.data.tokenizer.path and not tok_dir_ready:
    # One process trains it; the others wait, then load the same file.
    from jax.experimental import multihost_utils
    if jax.process_index() == 0:
      tokenizers.get_or_train(config.data.tokenizer, workdir, corpus, config.data.max_len)
    multihost_utils.sync_global_devices("tokenizer")
  tok = tokenizers.get_or_train(config.data.tokenizer, workdir, corpus, config.data.max_len)
  if tok.vocab_size > config.model.text.vocab_size:
    raise ValueError(f"The tokenizer has {tok.vocab_size} tokens but "
                     f"config.model.text.vocab_size={config.model.text.vocab_size}; raise it "
                     "to at least the tokenizer's size.")
  return tok


def init_fn(config: ml_collections.ConfigDict) -> Callable[[], two_tower.TwoTower]:
  return lambda: two_tower.TwoTower(config.model, rngs=nnx.Rngs(params=config.seed))


def abstract_params(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                    ) -> tuple[nnx.GraphDef, Any, Any]:
  """(graphdef, abstract params as a pure dict, their NamedShardings), without allocating."""
  abstract_model = nnx.eval_shape(init_fn(config))
  graphdef, abstract_state = nnx.split(abstract_model)
  shardings = nnx.to_pure_dict(sharding.state_shardings(abstract_state, mesh))
  return graphdef, nnx.to_pure_dict(abstract_state), shardings


def config_name(config_path: str | None) -> str:
  if not config_path:
    return "big_clip"
  stem = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  return f"big_clip/{stem}"


@dataclasses.dataclass
class Setup:
  """Everything the loop needs: the sharded initial state and the compiled update step."""
  graphdef: nnx.GraphDef
  state: State
  state_shardings: Any
  step: Any  # compiled (state, batch) -> (state, metrics); donates the state
  schedule: optax.Schedule
  compile_seconds: float
  # FLIP's unmasked tail: from this global step on (0 = never), `step_for` returns the step
  # compiled without patch dropout (compiled at first use).
  unmasked_after: int = 0
  compile_unmasked: Callable[[], Any] | None = None
  unmasked_step: Any = None

  def step_for(self, step: int) -> Any:
    """The compiled step that makes global step `step` (1-based)."""
    if not self.unmasked_after or step <= self.unmasked_after:
      return self.step
    if self.unmasked_step is None:
      self.unmasked_step = self.compile_unmasked()
    return self.unmasked_step


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
          teacher_dim: int | None = None) -> Setup:
  """Initializes the state directly in its sharded layout and compiles the step (AOT)."""
  graphdef, abs_params, param_shardings = abstract_params(config, mesh)
  tx, schedule = optim.make(config.optim, config.total_steps)
  repl = sharding.replicated(mesh)
  trainable = optim.trainable_mask(nnx.eval_shape(init_fn(config)))

  def init_state() -> State:
    params = nnx.to_pure_dict(nnx.state(init_fn(config)()))
    opt = tx.init(optim.partition(params, trainable)[0])  # no state for frozen weights
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt": opt,
            "nonfinite": jnp.zeros((), jnp.int32),
            "first_nonfinite_step": jnp.full((), -1, jnp.int32)}

  abs_state = jax.eval_shape(init_state)
  opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abs_state["opt"],
                                        optim.partition(param_shardings, trainable)[0],
                                        transform_non_params=lambda _: repl)
  state_shardings = {"step": repl, "params": param_shardings, "opt": opt_shardings,
                     "nonfinite": repl, "first_nonfinite_step": repl}
  n_params = sum(x.size for x in jax.tree.leaves(abs_params))
  n_trainable = sum(x.size for x in jax.tree.leaves(optim.partition(abs_params, trainable)[0]))
  logging.info("Model: %.2fM parameters, %.2fM trainable", n_params / 1e6, n_trainable / 1e6)

  step_fn = lambda mask: make_train_step(graphdef, tx, schedule,
                                         losses.from_config(config.loss), mesh, config,
                                         trainable, mask_patches=mask)
  batch_sharding = sharding.batch_sharding(mesh)
  gb, size = config.data.global_batch, config.data.image_size
  text_shape, text_dtype = llm.text_input_shape(config.model, config.data.max_len)
  abs_batch = {
      "image": jax.ShapeDtypeStruct((gb, size, size, 3), jnp.float32, sharding=batch_sharding),
      "text": jax.ShapeDtypeStruct((gb, *text_shape), text_dtype, sharding=batch_sharding),
  }
  for key, (shape, dtype) in auxiliary.batch_entries(config, teacher_dim).items():
    abs_batch[key] = jax.ShapeDtypeStruct((gb, *shape), dtype, sharding=batch_sharding)
  with jax.set_mesh(mesh):
    state = jax.jit(init_state, out_shardings=state_shardings)()
    two_tower.load_pretrained(state["params"], config.model, param_shardings)
    t0 = time.perf_counter()

  def compile_step(mask: bool = True) -> jax.stages.Compiled:
    with jax.set_mesh(mesh):
      return jax.jit(
          step_fn(mask), in_shardings=(state_shardings, {k: batch_sharding for k in abs_batch}),
          out_shardings=(state_shardings, repl), donate_argnums=(0,),
      ).lower(checkpoints.abstract_like(state), abs_batch).compile()

  compiled = compile_step()
  compile_seconds = time.perf_counter() - t0
  logging.info("Compiled the train step in %.1f s", compile_seconds)
  mem = compiled.memory_analysis()
  if mem is not None:
    logging.info("Step memory per device: %.1f MiB arguments, %.1f MiB temporaries",
                 mem.argument_size_in_bytes / 2**20, mem.temp_size_in_bytes / 2**20)
  until = config.model.image.patch_dropout_until_step if config.model.image.patch_dropout else 0
  return Setup(graphdef, state, state_shardings, compiled, schedule, compile_seconds,
               until, lambda: compile_step(mask=False))


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
  multihost = str(config.mesh.multihost).lower()
  sharding.maybe_initialize_distributed("auto" if multihost == "auto" else multihost == "true")
  if "://" not in workdir:
    workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  logging.info("big_clip.train: workdir %s, %d devices (%s), %d processes", workdir,
               jax.device_count(), jax.devices()[0].platform, jax.process_count())

  # ------------------------------------------------------------------------------------ Mesh.
  mesh = sharding.make_mesh(dict(data=config.mesh.data, fsdp=config.mesh.fsdp,
                                 tensor=config.mesh.tensor))
  config_lib.validate_for_mesh(config, sharding.data_parallel_size(mesh), jax.process_count())
  logging.info("Mesh %s", dict(mesh.shape))

  # -------------------------------------------------------------------------- Input pipeline.
  tokenizer = build_tokenizer(config, workdir)
  data_iter = pipeline.make(config.data, jax.process_index(), jax.process_count(),
                            tokenizer=tokenizer, seed=config.seed,
                            with_short_captions=config.loss.long_clip.enabled)
  teacher_dim = None
  if config.loss.distill.enabled:  # the frozen teacher embeds every batch on the host side
    from big_clip.models import teacher
    distill_teacher = teacher.Teacher(config.loss.distill.teacher, config, tokenizer.model_path)
    data_iter, teacher_dim = teacher.WithTeacher(data_iter, distill_teacher), \
        distill_teacher.embed_dim

  # ---------------------------------------------------------------------- Model and optimizer.
  setup = build(config, mesh, teacher_dim)
  state, schedule, graphdef = setup.state, setup.schedule, setup.graphdef
  abs_state = checkpoints.abstract_like(state)

  # ------------------------------------------------------------------------ Load checkpoint.
  ckpt = checkpoints.manager(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                             use_async=config.checkpoint.use_async)
  restored = checkpoints.restore_latest(ckpt, abs_state)
  first_step = 0
  if restored is not None:
    first_step, state, data_state = restored
    data_iter.set_state(data_state)
    logging.info("Resuming at step %d of %d", first_step, config.total_steps)
  elif config.init_from.startswith("big_clip:"):  # fine-tuning from another big_clip run:
    # its params, the text positional table stretched to max_len (Long-CLIP §3.1), same
    # tokenizer required; fresh optimizer state.
    state["params"] = adapt.warm_start(config.init_from, config.model, state["params"],
                                       tokenizer.model_path)
  elif config.init_from:  # hf: / open_clip: pretrained towers, fresh optimizer state
    from big_clip import export
    state["params"] = export.place_like(export.load_pretrained(config.init_from, config),
                                        state["params"])
  metrics_log = MetricsLog(workdir, first_step)

  # ----------------------------------------------------------------------------- Evaluators.
  evaluator = evaluate.Suite(config, tokenizer, graphdef, mesh, model_name)

  def run_eval(step: int) -> list[dict]:
    records = evaluator.run(state["params"])
    evaluate.write_records(records, os.path.join(workdir, "eval"), step=step)
    metrics_log.write(step, evaluate.records_to_scalars(records))
    return records

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
  records: list[dict] = []
  t_log, step_log = time.perf_counter(), first_step
  logging.info("Training from step %d to %d, global batch %d", first_step, config.total_steps,
               config.data.global_batch)
  step = first_step
  for step in range(first_step + 1, config.total_steps + 1):
    batch = sharding.place_batch(next(data_iter), mesh)
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
      t_log, step_log = now, step
      last.update(steps_per_s=steps_per_s,
                  examples_per_s=steps_per_s * config.data.global_batch)
      last.update({f"skipped/{k}": v for k, v in data_iter.skipped().items()})
      metrics_log.write(step, last)
      terms = ", ".join(f"{k[5:]} {v:.4f}" for k, v in last.items() if k.startswith("loss/"))
      logging.info("step %d/%d  loss %.4f%s  lr %.2e  scale %.1f  %.2f steps/s  %.0f ex/s  "
                   "ETA %s", step, config.total_steps, last["loss"],
                   f" ({terms})" if terms else "", last["lr"], last["logit_scale"],
                   steps_per_s, last["examples_per_s"],
                   _eta((config.total_steps - step) / max(steps_per_s, 1e-9)))

    if step % config.checkpoint.every_steps == 0 or step == config.total_steps:
      check_finite(step)
      checkpoints.save(ckpt, step, state, data_iter.get_state())
    if step % config.eval.every_steps == 0 or step == config.total_steps:
      records = run_eval(step)
      evaluate.print_table(records, title=f"zero-shot accuracy at step {step}")
    if stop_after is not None and step >= stop_after:
      logging.info("Stopping after step %d (stop_after).", step)
      break

  ckpt.wait_until_finished()
  ckpt.close()
  data_iter.close()
  if data_iter.skipped():
    logging.info("Data: skipped examples by reason (this host): %s", data_iter.skipped())
  metrics_log.close()
  return {"step": step, "metrics": last, "eval": records, "compile_seconds": setup.compile_seconds,
          "params": state["params"]}


# ---------------------------------------------------------------------------------------------
FLAGS = flags.FLAGS


def define_flags() -> None:
  """Flags of the binary (not at import: evaluate.py defines its own --config)."""
  config_flags.DEFINE_config_file("config", None, "A config file in configs/.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Checkpoints, metrics and eval results go here.")


class _QuietLibraries:
  """Drops INFO lines of orbax / jax internals so the progress lines stay readable."""

  def filter(self, record) -> bool:
    noisy = ("orbax" in record.pathname or "xla_bridge" in record.pathname)
    return record.levelno >= 30 or not noisy


def main(argv: list[str]) -> None:
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if FLAGS.workdir is None or FLAGS.config is None:
    raise app.UsageError("Usage: python -m big_clip.train --config configs/X.py --workdir DIR")
  name = config_name(config_flags.get_config_filename(FLAGS["config"]))
  train(FLAGS.config, FLAGS.workdir, model_name=name)


if __name__ == "__main__":
  define_flags()
  jax.config.config_with_absl()
  app.run(main)
