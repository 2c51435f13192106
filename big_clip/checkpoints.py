"""Orbax checkpoints of the train state *and* the data iterator position.

Saves are asynchronous (training continues while the arrays are written) and atomic (orbax
writes into a temporary directory and renames it when complete), so a run killed at any
moment restarts from the last complete checkpoint and replays the same batches.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from big_clip import fileio, optim
from big_clip import workdir as workdir_lib
from big_clip.errors import UserError

Path = tuple[Any, ...]  # a flat parameter path, e.g. ('text', 'positional_embedding')


def manager(directory: str, *, keep: int, use_async: bool) -> ocp.CheckpointManager:
  directory = workdir_lib.absolute(directory)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=use_async, create=True,
      # A checkpoint interrupted mid-write leaves a temporary directory; remove it on restart.
      cleanup_tmp_directories=True)
  return ocp.CheckpointManager(directory, options=options, item_names=("state", "data"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_state: dict) -> None:
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=ocp.args.JsonSave(data_state)), force=True)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any
                   ) -> tuple[int, Any, dict] | None:
  """(step, state, data_state) of the newest complete checkpoint, or None if there is none.

  `abstract_state` is a pytree of jax.ShapeDtypeStruct with shardings: arrays are restored
  directly into their final sharded layout on every host.
  """
  step = mngr.latest_step()
  if step is None:
    return None
  saved = set(_saved_state(mngr.directory, step))
  if "ema" in saved.symmetric_difference(abstract_state):
    raise UserError(
        f"Checkpoint {step} in {mngr.directory} was written with config.optim.ema_decay "
        f"{'> 0' if 'ema' in saved else '= 0'}, this config has the other; resume with the "
        "setting the run started with (or start a new workdir, init_from=big_clip:...).")
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
  logging.info("Restored checkpoint of step %d from %s", step, mngr.directory)
  return step, restored["state"], restored["data"]


def abstract_like(state: Any) -> Any:
  """ShapeDtypeStructs (with shardings) describing `state`, the restore target."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      state)


def _reader(directory: str) -> ocp.CheckpointManager:
  """A read-only manager of a checkpoints folder that knows how its items were written."""
  return ocp.CheckpointManager(
      workdir_lib.absolute(str(directory)), options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                     "data": ocp.JsonCheckpointHandler()})


def _saved_state(directory: Any, step: int) -> Any:
  """The metadata tree (shapes, dtypes) of checkpoint `step`'s train state in `directory`."""
  reader = _reader(directory)
  meta = reader.item_metadata(step)["state"]
  reader.close()
  return getattr(meta, "tree", meta)


def restore_params(mngr: ocp.CheckpointManager, step: int, abstract_params: Any, *,
                   ema: bool = True) -> Any:
  """Only the model parameters of checkpoint `step` (no optimizer state), e.g. for eval:
  with `ema`, those the checkpoint holds an EMA of are the EMA (config.optim.ema_decay)."""
  item = {"params": abstract_params}
  saved = _saved_state(mngr.directory, step)
  if ema and "ema" in saved:  # the EMA's leaves, in the layout of `abstract_params`
    key = lambda path: tuple(str(p) for p in path)
    averaged = {key(p) for p in nnx.traversals.flatten_mapping(saved["ema"])}
    item["ema"] = nnx.traversals.unflatten_mapping(
        {p: a for p, a in nnx.traversals.flatten_mapping(abstract_params).items()
         if key(p) in averaged})
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(
          item=item,
          restore_args=jax.tree.map(
              lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype), item),
          partial_restore=True)))["state"]
  logging.info("Read the %s of checkpoint %d in %s%s.",
               "EMA weights" if "ema" in item else "weights", step, mngr.directory,
               " (--no_ema / ema=False: the raw weights)" if "ema" in item else "")
  return optim.with_ema(restored["params"], restored["ema"]) if "ema" in item else \
      restored["params"]


def find(path: str) -> tuple[str, int | None, str]:
  """(checkpoints folder, step or None for the newest, workdir) of a step folder
  (WORKDIR/checkpoints/STEP), a checkpoints folder or a workdir."""
  path = workdir_lib.absolute(path.rstrip("/"))
  base = os.path.basename(path)
  if base.isdigit() and fileio.isdir(path):
    return os.path.dirname(path), int(base), os.path.dirname(os.path.dirname(path))
  if fileio.isdir(workdir_lib.checkpoints_dir(path)):
    return workdir_lib.checkpoints_dir(path), None, path
  if base == workdir_lib.CHECKPOINTS and fileio.isdir(path):
    return path, None, os.path.dirname(path)
  raise FileNotFoundError(f"{path!r} is not a checkpoint step folder (WORKDIR/checkpoints/"
                          "STEP) or a workdir with a checkpoints/ folder; train first with "
                          "python -m big_clip.train --config ... --workdir ...")


def read_params(directory: str, step: int | None = None, target: Any = None, *,
                ema: bool = True) -> tuple[int, Any]:
  """(step, params) of the checkpoint `step` (newest if None) in the checkpoints folder
  `directory`: the one reader of saved parameters (eval, export, warm start, teachers).

  `target` (abstract params with shardings) restores straight into that layout, which must
  be the saved one; without it the arrays come back at their saved shapes, on one device, as
  NumPy arrays keyed by flat path (for fitting into another model: models/adapt.py).
  `ema`: the weight EMA where the run kept one (config.optim.ema_decay > 0); False: the raw
  weights.
  """
  mngr = _reader(directory)
  step = mngr.latest_step() if step is None else step
  if step is None or step not in mngr.all_steps():
    raise FileNotFoundError(f"No checkpoint {'' if step is None else step} in {directory} "
                            f"(steps: {list(mngr.all_steps())}); train that run first or "
                            "name an existing step.")
  if target is None:
    meta = _saved_state(directory, step)["params"]  # saved shapes and dtypes
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          meta)
    params = restore_params(mngr, step, target, ema=ema)
    mngr.close()
    return step, {path: np.asarray(v)
                  for path, v in nnx.traversals.flatten_mapping(params).items()}
  params = restore_params(mngr, step, target, ema=ema)
  mngr.close()
  return step, params
