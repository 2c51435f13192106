"""Fitting loaded parameters to the model being built: a checkpoint or an imported model whose
text positional table is shorter than `config.model.text.max_len` gets it stretched
(Long-CLIP, Zhang et al. 2024, §3.1); every other tensor must already have its shape.

`fit_loaded_params` is the one place that decides this, for every loader:
  * `warm_start('big_clip:WORKDIR[:STEP]', ...)` below (`config.init_from`),
  * the PyTorch / Hugging Face import path (`big_clip.export`), which calls it on the flat
    dict it converted before placing the arrays.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from big_clip.models import text

Path = tuple[Any, ...]  # a flat parameter path, e.g. ('text', 'positional_embedding')
# The text positional table is a plain Param of the text tower: never inside the
# (possibly scanned) `blocks`, so its path and [max_len, width] layout are the same with
# and without config.model.scan_layers.
POSITIONAL_TABLE: Path = ("text", "positional_embedding")
BIG_CLIP_PREFIX = "big_clip:"


def _name(path: Path | str) -> str:
  return path if isinstance(path, str) else ".".join(str(p) for p in path)


def fit_loaded_params(flat_params: Mapping[Path, np.ndarray],
                      expected_shapes: Mapping[Path, tuple[int, ...]],
                      model_cfg: Any) -> dict[Path, np.ndarray]:
  """`flat_params` with the text positional table stretched to `model_cfg.text.max_len`.

  Args:
    flat_params: loaded arrays by flat path (tuples; dotted strings also accepted).
    expected_shapes: the model's shape for every path (e.g. from `jax.eval_shape`); the
      same keys as `flat_params`.
    model_cfg: `config.model`; `text.max_len` is the target length.

  Returns:
    A new dict keyed as `expected_shapes`: the positional table stretched when it is shorter than
    `max_len` (`text.stretch_positional_embedding`, first 20 rows kept), every other array
    unchanged (the same object).

  Raises:
    ValueError naming the tensor when a path is missing or extra, when a shape other than
    the positional table's length differs, or when the table is longer than `max_len`.
  """
  # Matched by dotted name: a restored checkpoint spells layer indices as strings ('0'),
  # a live nnx state as ints (0).
  loaded = {_name(k): k for k in flat_params}
  wanted = {_name(k): tuple(v) for k, v in expected_shapes.items()}
  wanted_keys = {_name(k): k for k in expected_shapes}
  missing, extra = sorted(set(wanted) - set(loaded)), sorted(set(loaded) - set(wanted))
  if missing or extra:
    raise ValueError(f"The loaded parameters do not match the model: missing {missing[:8]}, "
                     f"unexpected {extra[:8]}. Check that config.model (towers, "
                     "scan_layers) describes the checkpoint's architecture.")
  table_name, max_len = _name(POSITIONAL_TABLE), int(model_cfg.text.max_len)
  out = {}
  for name, key in loaded.items():
    value, shape = flat_params[key], wanted[name]
    if name == table_name and np.shape(value) != shape:
      value = _fit_positional_table(np.asarray(value), shape, max_len)
    elif np.shape(value) != shape:
      raise ValueError(f"Loaded tensor {name} has shape {np.shape(value)} but the model "
                       f"expects {shape}; only {table_name} may differ (in length).")
    out[wanted_keys[name]] = value
  return out


def _fit_positional_table(table: np.ndarray, shape: tuple[int, ...],
                          max_len: int) -> np.ndarray:
  name = _name(POSITIONAL_TABLE)
  if table.ndim != 2 or table.shape[1:] != shape[1:]:
    raise ValueError(f"Loaded tensor {name} has shape {table.shape} but the model expects "
                     f"{shape}: the text width differs, which stretching cannot fix.")
  if table.shape[0] > max_len:
    raise ValueError(f"Loaded tensor {name} has {table.shape[0]} positions, more than "
                     f"config.model.text.max_len={max_len}; set max_len to at least "
                     f"{table.shape[0]} (positions are stretched, never cut).")
  logging.info("Long-CLIP: stretching %s from %d to %d positions (first %d kept).", name,
               table.shape[0], max_len, text.LONG_CLIP_KEEP)
  return text.stretch_positional_embedding(table, max_len)


# ---------------------------------------------------------------------------------------
# Warm start from a big_clip workdir.
# ---------------------------------------------------------------------------------------
def parse_big_clip_spec(spec: str) -> tuple[str, int | None]:
  """'big_clip:WORKDIR[:STEP]' -> (WORKDIR, STEP or None for the latest)."""
  if not spec.startswith(BIG_CLIP_PREFIX):
    raise ValueError(f"config.init_from={spec!r} must look like "
                     "'big_clip:WORKDIR' or 'big_clip:WORKDIR:STEP'.")
  rest = spec[len(BIG_CLIP_PREFIX):]
  head, _, tail = rest.rpartition(":")
  if head and tail.isdigit():
    return head, int(tail)
  return rest, None


def read_checkpoint_params(workdir: str, step: int | None) -> tuple[int, dict[Path, np.ndarray]]:
  """(step, flat numpy params) of a big_clip run, at the shapes it was saved with."""
  directory = os.path.join(workdir, "checkpoints")
  if "://" not in directory:
    directory = os.path.abspath(directory)
  mngr = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                     "data": ocp.JsonCheckpointHandler()})
  step = mngr.latest_step() if step is None else step
  if step is None or step not in mngr.all_steps():
    raise FileNotFoundError(f"No checkpoint {'' if step is None else step} in {directory} "
                            f"(steps: {list(mngr.all_steps())}); train that run first or "
                            "fix the step in 'big_clip:WORKDIR:STEP'.")
  meta = mngr.item_metadata(step)["state"]
  meta = getattr(meta, "tree", meta)["params"]  # saved shapes and dtypes
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          meta)
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item={"params": abstract}, partial_restore=True,
      restore_args=jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding,
                                                               dtype=a.dtype),
                                {"params": abstract}))))
  mngr.close()
  params = restored["state"]["params"]
  flat = {path: np.asarray(v) for path, v in nnx.traversals.flatten_mapping(params).items()}
  return step, flat


def check_same_tokenizer(workdir: str, tokenizer_path: str) -> None:
  """The embeddings are tied to token ids: refuse a run whose tokenizer differs."""
  source = os.path.join(workdir, "tokenizer", "spm.model")
  if "://" in source or not os.path.exists(source):
    logging.warning("Warm start: %s has no local tokenizer/spm.model; make sure "
                    "config.data.tokenizer.path is the tokenizer that run used.", workdir)
    return
  with open(source, "rb") as a, open(tokenizer_path, "rb") as b:
    if a.read() != b.read():
      raise ValueError(f"The warm-start run {workdir} used the tokenizer {source}, but this "
                       f"run uses {tokenizer_path}; token ids would not match its embeddings. "
                       f"Set config.data.tokenizer.path={source!r}.")


def warm_start(spec: str, model_cfg: Any, params: Any, tokenizer_path: str | None = None) -> Any:
  """`params` (pure dict of sharded arrays) replaced by a big_clip checkpoint's parameters,
  fitted by `fit_loaded_params` and placed in the same shardings.

  `spec` is 'big_clip:WORKDIR[:STEP]'. The optimizer state is not loaded: a fine-tune
  starts with fresh Adam moments and its own schedule.
  """
  workdir, step = parse_big_clip_spec(spec)
  if tokenizer_path is not None:
    check_same_tokenizer(workdir, tokenizer_path)
  step, flat = read_checkpoint_params(workdir, step)
  targets = nnx.traversals.flatten_mapping(params)
  fitted = fit_loaded_params(flat, {k: v.shape for k, v in targets.items()}, model_cfg)
  placed = {}
  for path, target in targets.items():
    value = fitted[path].astype(target.dtype)
    placed[path] = jax.make_array_from_callback(target.shape, target.sharding,
                                                lambda index, v=value: v[index])
  logging.info("Warm start: loaded %d tensors of step %d from %s.", len(placed), step, workdir)
  return nnx.traversals.unflatten_mapping(placed)
