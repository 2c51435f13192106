"""The train step and its state, built the same way for training and for planning a pod:
shapes from `eval_shape`, shardings decided before anything is allocated, the step compiled
ahead of time with the state donated (big_vision / MaxText style).

`make_train_step` is the pure `(state, batch) -> (state, metrics)`; `abstract_setup` gives
every shape and sharding without executing the init (what `python -m big_clip.plan` style
compilation for another topology needs); `build` initializes the state in its sharded layout
and compiles the step.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax import nnx

from big_clip import checkpoints, losses, optim, sharding
from big_clip import config as config_lib
from big_clip.errors import UserError
from big_clip.losses import auxiliary, caption_contrast, grad_cache
from big_clip.models import decoder, llm, moe, two_tower, vit

# {'step', 'params', 'opt', 'nonfinite', 'first_nonfinite_step'} and, with
# config.optim.ema_decay > 0, 'ema': the moving average of the trainable part of 'params'.
State = dict[str, Any]


class NonFiniteLossError(UserError, FloatingPointError):
  """The loss became NaN/inf; the state on disk is the last good one."""


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
  ema_decay = config.optim.ema_decay
  extra_terms = auxiliary.make(config)  # Long-CLIP short captions, distillation (or None)
  captioning = config.loss.caption.weight > 0
  # The caption decoder and the region prompter read the image tower's last-block tokens.
  with_tokens = captioning or config.loss.region_weight > 0
  split = ((lambda p: optim.partition(p, trainable)) if trainable is not None
           else (lambda p: (p, {})))

  self_distill = config.loss.align.target == "ema_image"
  cc, mntp_weight = config.loss.caption_contrast, float(config.loss.mntp_weight)
  pad_id = llm.TowerOptions.from_config(config.model).pad_id if mntp_weight > 0 else None

  def compute_loss(params, frozen, batch):
    model = nnx.merge(graphdef, optim.combine(params, frozen))
    if cc:  # LLM2CLIP's text-only CC stage: no image tower, no adapter
      scale, bias = model.scale_and_bias()
      loss, parts = caption_contrast.loss(model.text, batch, scale, mesh=mesh,
                                          mntp_weight=mntp_weight)
      return loss, (scale, bias, parts)
    image_tokens = None
    if with_tokens:  # one image pass for all losses (no MoE towers: config validation)
      img_emb, txt_emb, image_tokens = model.embed_with_image_tokens(
          batch["image"], batch["text"], batch.get("patch_noise"))
      moe_stats = {}
    else:
      img_emb, txt_emb, moe_stats = model.forward(batch["image"], batch["text"],
                                                  batch.get("patch_noise"))
    scale, bias = model.scale_and_bias()
    loss = loss_fn(img_emb, txt_emb, scale, bias, mesh=mesh)
    parts = {}  # the terms of a composite loss, logged as metrics
    if extra_terms is not None:
      loss, parts = extra_terms(loss, model, batch, img_emb, txt_emb, scale, bias, mesh=mesh,
                                image_tokens=image_tokens)
    if moe_stats:  # router losses of MoE towers (Switch load balance, ST-MoE z-loss)
      moe_loss, moe_logs = moe.aux_loss(moe_stats, config.model)
      loss, parts = loss + moe_loss, {**parts, **moe_logs}
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
    if mntp_weight > 0:  # masked per step from (seed, step): resumes and meshes agree
      batch = {**batch, **caption_contrast.mntp_inputs(config, state["step"], batch["text"],
                                                       pad_id)}
    if captioning:  # CapPa: the examples predicted in parallel this step
      batch = {**batch, "caption_parallel": decoder.parallel_rows(
          config, state["step"], batch["text"].shape[0])}
    params, frozen = split(state["params"])
    if self_distill:  # ProCLIP stage 2 (Fig. 2): the EMA of the image tower is its teacher
      teacher = nnx.merge(graphdef, optim.combine(state["ema"], frozen))
      batch = {**batch, "teacher_image": jax.lax.stop_gradient(
          teacher.encode_image(batch["image"]))}
    (loss, (scale, bias, parts)), grads = gradients(params, frozen, batch)
    grad_norm = optax.global_norm(grads)
    updates, opt = tx.update(grads, state["opt"], params)
    params = two_tower.clamp_logit_scale(optax.apply_updates(params, updates), config.model)
    ema = optim.ema_update(state["ema"], params, ema_decay) if ema_decay else None
    params = optim.combine(params, frozen)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # Never let a NaN into the parameters (or a checkpoint): with either nan_policy the step
    # keeps the last finite state (the EMA included); 'stop' then raises on the host.
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params, opt = keep(params, state["params"]), keep(opt, state["opt"])
    step = state["step"] + 1
    new_state = {
        "step": step,
        "params": params,
        "opt": opt,
        **({"ema": keep(ema, state["ema"])} if ema_decay else {}),
        "nonfinite": state["nonfinite"] + (~finite).astype(jnp.int32),
        "first_nonfinite_step": jnp.where(
            (state["first_nonfinite_step"] < 0) & ~finite, step,
            state["first_nonfinite_step"]),
    }
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]),
               "logit_scale": scale, "logit_bias": bias, **parts}
    return new_state, metrics

  return train_step


def eval_params(state: State) -> Any:
  """The weights evals and exports use: the EMA where the state keeps one."""
  return optim.with_ema(state["params"], state["ema"]) if "ema" in state else state["params"]


# ---------------------------------------------------------------------------------------------
# State and compilation.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Plan:
  """The shapes and shardings of a run, decided without allocating or executing anything."""
  graphdef: nnx.GraphDef
  init_state: Callable[[], State]  # jit it with out_shardings=state_shardings
  abstract_state: State  # ShapeDtypeStructs (no shardings)
  state_shardings: Any
  param_shardings: Any
  abstract_batch: dict[str, jax.ShapeDtypeStruct]  # global, with shardings
  step_fn: Callable[[State, dict], tuple]  # pure; jit with `jit_step`
  schedule: optax.Schedule
  unmasked_step_fn: Callable[[State, dict], tuple]  # the same without patch dropout
  unmasked_after: int  # FLIP's unmasked tail starts after this step (0: no tail)
  ema_of: Callable[[Any], Any] | None  # params -> a fresh EMA (their trainable part); None: off

  def jit_step(self, mesh: jax.sharding.Mesh, masked: bool = True) -> Any:
    """The step jitted with explicit shardings, the state donated."""
    batch_sharding = sharding.batch_sharding(mesh)
    return jax.jit(self.step_fn if masked else self.unmasked_step_fn,
                   in_shardings=(self.state_shardings,
                                 {k: batch_sharding for k in self.abstract_batch}),
                   out_shardings=(self.state_shardings, sharding.replicated(mesh)),
                   donate_argnums=(0,))

  def abstract_sharded_state(self) -> State:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self.abstract_state, self.state_shardings)


def plan(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
         teacher_dim: int | None = None) -> Plan:
  """Every shape and sharding of the train state and batch, and the pure step, on `mesh`
  (whose devices may be abstract: a TPU topology described on a CPU host)."""
  graphdef, abs_params, param_shardings = two_tower.abstract_params(config.model, mesh)
  tx, schedule = optim.make(config.optim, config.total_steps)
  repl = sharding.replicated(mesh)
  init_model = two_tower.init_fn(config.model, config.seed)
  trainable = optim.trainable_mask(nnx.eval_shape(init_model), config.optim.trainable,
                                   config.optim.freeze)

  ema = config.optim.ema_decay > 0
  # The EMA starts at the weights: a copy (its own buffers, since the step donates both).
  ema_of = lambda params: jax.tree.map(jnp.copy, optim.partition(params, trainable)[0])

  def init_state() -> State:
    params = nnx.to_pure_dict(nnx.state(init_model()))
    opt = tx.init(optim.partition(params, trainable)[0])  # no state for frozen weights
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt": opt,
            **({"ema": ema_of(params)} if ema else {}),
            "nonfinite": jnp.zeros((), jnp.int32),
            "first_nonfinite_step": jnp.full((), -1, jnp.int32)}

  abs_state = jax.eval_shape(init_state)
  opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abs_state["opt"],
                                        optim.partition(param_shardings, trainable)[0],
                                        transform_non_params=lambda _: repl)
  state_shardings = {"step": repl, "params": param_shardings, "opt": opt_shardings,
                     "nonfinite": repl, "first_nonfinite_step": repl}
  if ema:  # one more copy of the trainable weights, sharded exactly like them
    state_shardings["ema"] = optim.partition(param_shardings, trainable)[0]
  n_params = sum(x.size for x in jax.tree.leaves(abs_params))
  n_trainable = sum(x.size for x in jax.tree.leaves(optim.partition(abs_params, trainable)[0]))
  logging.info("Model: %.2fM parameters, %.2fM trainable%s", n_params / 1e6, n_trainable / 1e6,
               f", their EMA (decay {config.optim.ema_decay:g}) kept too" if ema else "")

  make_step = lambda mask: make_train_step(graphdef, tx, schedule,
                                          losses.from_config(config.loss), mesh, config,
                                          trainable, mask_patches=mask)
  batch_sharding = sharding.batch_sharding(mesh)
  gb = config.data.global_batch
  text_shape, text_dtype = llm.text_input_shape(config.model, config.data.max_len)
  abs_batch = {
      "image": jax.ShapeDtypeStruct((gb, *config_lib.image_input_shape(config.data)),
                                    jnp.float32, sharding=batch_sharding),
      "text": jax.ShapeDtypeStruct((gb, *text_shape), text_dtype, sharding=batch_sharding),
  }
  for key, (shape, dtype) in auxiliary.batch_entries(config, teacher_dim).items():
    abs_batch[key] = jax.ShapeDtypeStruct((gb, *shape), dtype, sharding=batch_sharding)
  image = config.model.image
  return Plan(graphdef, init_state, abs_state, state_shardings, param_shardings, abs_batch,
              make_step(True), schedule, make_step(False),
              image.patch_dropout_until_step if image.patch_dropout else 0,
              ema_of if ema else None)


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
  # state -> state with the EMA restarted at its params (after loading weights into them);
  # the identity when config.optim.ema_decay is 0.
  restart_ema: Callable[[State], State] = lambda state: state

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
  p = plan(config, mesh, teacher_dim)
  with jax.set_mesh(mesh):
    state = jax.jit(p.init_state, out_shardings=p.state_shardings)()
    two_tower.load_tower_weights(state["params"], config.model, p.param_shardings)
    abstract_state = checkpoints.abstract_like(state)

  def restart_ema(state: State) -> State:
    if p.ema_of is None:
      return state
    with jax.set_mesh(mesh):
      ema = jax.jit(p.ema_of, out_shardings=p.state_shardings["ema"])(state["params"])
    return {**state, "ema": ema}

  state = restart_ema(state)  # the loaded tower weights are its start

  def compile_step(masked: bool) -> Any:
    with jax.set_mesh(mesh):
      return p.jit_step(mesh, masked).lower(abstract_state, p.abstract_batch).compile()

  t0 = time.perf_counter()
  compiled = compile_step(True)
  compile_seconds = time.perf_counter() - t0
  logging.info("Compiled the train step in %.1f s", compile_seconds)
  mem = compiled.memory_analysis()
  if mem is not None:
    logging.info("Step memory per device: %.1f MiB arguments, %.1f MiB temporaries",
                 mem.argument_size_in_bytes / 2**20, mem.temp_size_in_bytes / 2**20)
  return Setup(p.graphdef, state, p.state_shardings, compiled, p.schedule, compile_seconds,
               p.unmasked_after, lambda: compile_step(False), restart_ema=restart_ema)
