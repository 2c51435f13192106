"""Orbax checkpoints of the train state *and* the data iterator position.

Saves are asynchronous (training continues while the arrays are written) and atomic (orbax
writes into a temporary directory and renames it when complete), so a run killed at any
moment restarts from the last complete checkpoint and replays the same batches.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


def _is_remote(path: str) -> bool:
  return "://" in path


def manager(directory: str, *, keep: int, use_async: bool) -> ocp.CheckpointManager:
  directory = directory if _is_remote(directory) else os.path.abspath(directory)
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
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
  logging.info("Restored checkpoint of step %d from %s", step, mngr.directory)
  return step, restored["state"], restored["data"]


def abstract_like(state: Any) -> Any:
  """ShapeDtypeStructs (with shardings) describing `state`, the restore target."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      state)


def restore_params(mngr: ocp.CheckpointManager, step: int, abstract_params: Any) -> Any:
  """Only the model parameters of checkpoint `step` (no optimizer state), e.g. for eval."""
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(
          item={"params": abstract_params},
          restore_args=jax.tree.map(
              lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype),
              {"params": abstract_params}),
          partial_restore=True)))
  return restored["state"]["params"]
