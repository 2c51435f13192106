"""Loaded parameters made to fit the model being built: the one gate every loader passes
(`init_from=hf:/open_clip:/big_clip:`, `--import`, distillation teachers).

`import_params` checks a per-layer flat dict against the model's parameters (every tensor
present, each of the model's shape, the error naming the tensor and where it came from),
stretches a shorter text positional table to `max_len` (Long-CLIP, Zhang et al. 2024, §3.1)
and returns it in the model's layout (scanned or per-layer). `load_big_clip` reads another
big_clip run through it; the Hugging Face / open_clip importers in `big_clip.convert` call it
on the tensors they converted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from big_clip import checkpoints, fileio, sharding
from big_clip import config as config_lib
from big_clip import workdir as workdir_lib
from big_clip.models import layers, moe, text, two_tower
from big_clip.errors import UserError

BIG_CLIP_PREFIX = "big_clip:"
POSITIONAL_TABLE = "text.positional_embedding"  # never inside the (scanned) blocks


class ImportMismatchError(UserError, ValueError):
  """Pretrained weights that do not fit the model: names the tensor, its shape and the
  expected shape (or the config setting and its value)."""


# ---------------------------------------------------------------------------------------------
# Flat views of a parameter tree.
# ---------------------------------------------------------------------------------------------
def flatten(tree: Mapping[Any, Any], prefix: str = "") -> dict[str, Any]:
  """Nested dict (nnx pure dict) -> {'a.b.0.c': leaf}."""
  out = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten(value, path + "."))
    else:
      out[path] = value
  return out


def unflatten(flat: Mapping[str, Any]) -> dict[Any, Any]:
  """{'a.b.0.c': leaf} -> nested dict; numeric parts become int keys (nnx.List indices)."""
  tree: dict[Any, Any] = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = [int(p) if p.isdigit() else p for p in path.split(".")]
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _as_tuples(flat: Mapping[str, Any]) -> dict[tuple[Any, ...], Any]:
  return {tuple(int(p) if p.isdigit() else p for p in k.split(".")): v for k, v in flat.items()}


def _as_dotted(flat: Mapping[tuple[Any, ...], Any]) -> dict[str, Any]:
  return {".".join(str(p) for p in k): v for k, v in flat.items()}


def per_layer(flat: Mapping[str, Any], take: Callable[[Any, int], Any] | None = None
              ) -> dict[str, Any]:
  """Dotted paths in the scanned layout -> the per-layer layout (`layers.unstack_flat`)."""
  return _as_dotted(layers.unstack_flat(_as_tuples(flat), take))


def flat_params(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Model params (nnx pure dict, scanned or not) -> per-layer float32 NumPy arrays."""
  flat = {k: np.asarray(jax.device_get(v), np.float32) for k, v in flatten(params).items()}
  return per_layer(flat)


def abstract_flat(model_cfg: Any) -> dict[str, jax.ShapeDtypeStruct]:
  """The model's parameters as flat {dotted path: ShapeDtypeStruct}, in its own layout."""
  return flatten(two_tower.abstract_params(model_cfg)[1])


# ---------------------------------------------------------------------------------------------
# The gate.
# ---------------------------------------------------------------------------------------------
def import_params(flat: Mapping[str, np.ndarray], model_cfg: Any, *,
                  origin: Mapping[str, str] | None = None, source: str = "imported weights",
                  only: tuple[str, ...] = ()) -> dict[str, Any]:
  """Checks per-layer params `flat` against the model `model_cfg` builds and returns them as
  the model's pure dict (scanned if `model_cfg.scan_layers`), NumPy, in `param_dtype`.

  Every tensor must be present with the model's shape; the error names the tensor (and the
  source tensor it came from), its shape and the expected shape. Only the text positional
  table may be shorter than the model's: it is stretched (Long-CLIP §3.1), never cut.
  `only` (config.init_only): just these top-level groups, e.g. ('image',), are checked and
  returned; () = all.
  """
  abstract = abstract_flat(model_cfg)
  if only:
    picked = lambda tree: {k: v for k, v in tree.items() if k.split(".")[0] in only}
    abstract, flat = picked(abstract), picked(flat)
  expected = per_layer(abstract, take=lambda a, i: jax.ShapeDtypeStruct(a.shape[1:], a.dtype))
  origin = origin or {}

  def name(path: str) -> str:
    return f"{path} (from {origin[path]})" if path in origin else path

  missing = sorted(set(expected) - set(flat))
  unexpected = sorted(set(flat) - set(expected))
  if missing or unexpected:
    raise ImportMismatchError(
        f"{source}: "
        + "; ".join(([f"missing tensor(s) {missing[:8]}"] if missing else [])
                    + ([f"unexpected tensor(s) {[name(k) for k in unexpected[:8]]}"]
                       if unexpected else []))
        + ". The model config (towers, widths, scan_layers) does not describe this "
        "checkpoint.")
  pos = POSITIONAL_TABLE
  # An LLM text tower (or one that `only` leaves out) has no positional table.
  have = np.shape(flat[pos]) if pos in flat else (0, 0)
  want = tuple(expected[pos].shape) if pos in expected else (0, 0)
  if have[-1:] == want[-1:] and have[0] < want[0]:
    logging.info("%s: stretching %s from %d to %d positions (Long-CLIP, first %d kept).",
                 source, pos, have[0], want[0], text.LONG_CLIP_KEEP)
    flat = {**flat, pos: text.stretch_positional_embedding(np.asarray(flat[pos]), want[0])}
  elif have[-1:] == want[-1:] and have[0] > want[0]:
    raise ImportMismatchError(
        f"{source}: {name(pos)} has {have[0]} positions but config.model.text."
        f"max_len={want[0]}; positional stretching (Long-CLIP) only lengthens a table, it "
        f"never cuts one. Set config.model.text.max_len >= {have[0]}.")
  for path in sorted(expected):
    got, shape = tuple(np.shape(flat[path])), tuple(expected[path].shape)
    if got != shape:
      raise ImportMismatchError(f"{source}: tensor {name(path)} has shape {got}; the model "
                                f"expects {shape}. Check the widths/sizes in config.model.")
  out = {k: np.asarray(flat[k]).astype(expected[k].dtype) for k in expected}
  stacked = {k for k in abstract if k not in expected}  # the scanned paths of the model
  if stacked:
    out = _as_dotted(layers.stack_flat(_as_tuples(out)))
  return unflatten(out)


def check_architecture(derived: Mapping[str, Any], model: Any, source: str,
                       prefix: str = "config.model") -> None:
  """Settings of `model` (the user's config) that differ from the checkpoint's `derived`
  values: a different function even where every tensor shape matches."""
  # moe: a dense run is upcycled into an MoE model (`upcycle`); the tensor shapes check the
  # rest (an MoE run of another expert count does not load).
  skip = {"max_len", "logit_scale_init", "logit_bias_init", "logit_scale_max", "pad_id",
          "dtype", "param_dtype", "remat", "scan_layers", "moe"}
  for key, want in derived.items():
    if key in skip or (key == "eos_id" and derived.get("pool") != "eos") or key not in model:
      continue
    if isinstance(want, Mapping):
      check_architecture(want, model[key], source, f"{prefix}.{key}")
    elif model[key] != want and not (isinstance(want, float) and np.isclose(model[key], want)):
      raise ImportMismatchError(f"{source}: the checkpoint needs {prefix}.{key}={want!r}, the "
                                f"config has {model[key]!r}.")


# ---------------------------------------------------------------------------------------------
# Another big_clip run.
# ---------------------------------------------------------------------------------------------
def parse_big_clip_spec(spec: str) -> tuple[str, int | None]:
  """'big_clip:WORKDIR[:STEP]' -> (WORKDIR, STEP or None for the latest)."""
  if not spec.startswith(BIG_CLIP_PREFIX):
    raise ValueError(f"{spec!r} must look like 'big_clip:WORKDIR' or 'big_clip:WORKDIR:STEP'.")
  rest = spec[len(BIG_CLIP_PREFIX):]
  head, _, tail = rest.rpartition(":")
  if head and tail.isdigit():
    return head, int(tail)
  return rest, None


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """A run's config.json merged into the schema, unvalidated: loaders read only its `model`
  (and a teacher its image size), which a partial or older config.json still describes."""
  return config_lib.load_json(workdir_lib.config_path(workdir), check=False)


def check_same_tokenizer(workdir: str, tokenizer_path: str) -> None:
  """The embeddings are tied to token ids: refuse a run whose tokenizer differs."""
  source = workdir_lib.tokenizer_path(workdir)
  if not fileio.exists(source):
    logging.warning("%s has no tokenizer/spm.model; make sure "
                    "config.data.tokenizer.path is the tokenizer that run used.", workdir)
    return
  if fileio.read_bytes(source) != fileio.read_bytes(tokenizer_path):
    raise ValueError(f"The run {workdir} used the tokenizer {source}, but this run uses "
                     f"{tokenizer_path}; token ids would not match its embeddings. "
                     f"Set config.data.tokenizer.path={source!r}.")


def _read_big_clip(spec: str, model_cfg: Any, tokenizer_path: str | None,
                   only: tuple[str, ...] = ()) -> tuple[int, dict[str, np.ndarray], str]:
  """(step, per-layer flat params, workdir) of the run `spec` (its weight EMA where it kept
  one), after the tokenizer and architecture checks (of the groups `only` where given)."""
  workdir, step = parse_big_clip_spec(spec)
  run = run_config(workdir)
  if run.loss.caption_contrast:  # its image tower and adapter were never trained
    raise ImportMismatchError(
        f"{workdir} is a caption-contrastive (CC) run: only its LLM is trained. Export it with "
        f"python tools/export_llm.py --run {workdir} --out LLM_FOLDER and set "
        "config.model.text.llm.path=LLM_FOLDER (docs/llm-towers.md).")
  if tokenizer_path is not None and (not only or "text" in only):
    check_same_tokenizer(workdir, tokenizer_path)
  derived = run.model.to_dict()
  if only:  # the shared settings and the towers loaded; the others may differ
    derived = {k: v for k, v in derived.items() if not isinstance(v, Mapping) or k in only}
  check_architecture(derived, model_cfg, workdir)
  step, flat = checkpoints.read_params(workdir_lib.checkpoints_dir(workdir), step)
  per_layer_flat = per_layer(_as_dotted(flat))
  logging.info("Loaded %d tensors of step %d from %s.", len(per_layer_flat), step, workdir)
  return step, per_layer_flat, workdir


def load_big_clip(spec: str, model_cfg: Any, tokenizer_path: str | None = None,
                  only: tuple[str, ...] = ()) -> tuple[int, dict[str, Any]]:
  """(step, params) of another run, `spec` = 'big_clip:WORKDIR[:STEP]', fitted to `model_cfg`
  by `import_params` (NumPy, the model's layout); the run's weight EMA where it kept one. A
  dense run read into a model with MoE
  layers is upcycled (`upcycle`); several runs 'big_clip:A,big_clip:B,...' are assembled
  into the experts (`assemble_experts`).

  Checks, in order: the tokenizer file is the same (when `tokenizer_path` is given), the
  run's architecture settings equal `model_cfg`'s, every tensor fits. `only`
  (config.init_only): load just these top-level groups, e.g. ('image', 'logit_scale').
  """
  runs = [_read_big_clip(one, model_cfg, tokenizer_path, only) for one in spec.split(",")]
  step, flat, workdir = runs[0]
  if len(runs) > 1 or needs_upcycling(flat, model_cfg):
    flat = assemble_experts([r[1] for r in runs], model_cfg)
  params = import_params(flat, model_cfg, source=f"{workdir} checkpoint {step}", only=only)
  return step, params


# ---------------------------------------------------------------------------------------------
# Dense MLPs -> MoE experts (sparse upcycling; CLIP-MoE's diversified multiplet).
# ---------------------------------------------------------------------------------------------
def _expected_per_layer(model_cfg: Any) -> dict[str, jax.ShapeDtypeStruct]:
  return per_layer(abstract_flat(model_cfg),
                   take=lambda a, i: jax.ShapeDtypeStruct(a.shape[1:], a.dtype))


def _is_expert_tensor(path: str, shape: tuple[int, ...], dense_shape: tuple[int, ...]) -> bool:
  """An MoE expert weight (`....mlp.fc1.kernel` [E, ...]) whose dense twin has `dense_shape`."""
  return ".mlp.fc" in path and tuple(shape[1:]) == tuple(dense_shape)


def needs_upcycling(flat: Mapping[str, Any], model_cfg: Any) -> bool:
  """Whether `flat` has dense MLPs where `model_cfg` has MoE layers."""
  return any(path in flat and _is_expert_tensor(path, want.shape, np.shape(flat[path]))
             for path, want in _expected_per_layer(model_cfg).items())


def assemble_experts(runs: list[Mapping[str, np.ndarray]], model_cfg: Any, seed: int = 0
                     ) -> dict[str, np.ndarray]:
  """Per-layer params of N dense runs -> those of the MoE model `model_cfg`.

  Expert e of an MoE layer is the dense MLP of run `e % N` (sparse upcycling, Komatsuzaki
  et al. 2023, with N = 1; CLIP-MoE's diversified multiplet, Zhang et al. 2024, with N runs
  fine-tuned on different data clusters), plus `moe.upcycle_noise * std(tensor)` Gaussian
  noise; every other tensor comes from the first run. Routers start small and random
  (`moe.ROUTER_SCALE`): with gates renormalized over the top k, identical experts give the
  dense model's outputs whatever the routing.
  """
  counts = [model_cfg[t].moe.experts for t in ("image", "text") if "moe" in model_cfg[t]]
  if len(runs) > max(counts, default=0):
    raise ImportMismatchError(
        f"{len(runs)} runs to assemble into experts, but config.model.image.moe.experts / "
        f"text.moe.experts are {counts}; set experts >= {len(runs)} (each expert comes from "
        "one run).")
  rng = np.random.default_rng(seed)
  out = dict(runs[0])
  for path, want in _expected_per_layer(model_cfg).items():
    tower = path.split(".")[0]
    if path.endswith(".mlp.router") and path not in out:
      out[path] = rng.normal(0.0, (moe.ROUTER_SCALE / want.shape[0]) ** 0.5, want.shape)
    elif path in out and _is_expert_tensor(path, want.shape, np.shape(out[path])):
      dense = [np.asarray(r[path], np.float32) for r in runs]
      experts = np.stack([dense[e % len(dense)] for e in range(want.shape[0])])
      noise = float(model_cfg[tower].moe.upcycle_noise)
      if noise:
        experts = experts + noise * experts.std() * rng.standard_normal(experts.shape)
      out[path] = experts
  return out


def read_run(workdir: str, step: int | None = None, mesh: jax.sharding.Mesh | None = None,
             *, ema: bool = True) -> tuple[ml_collections.ConfigDict, Any, int]:
  """(config, params, step) of a run's own checkpoint (newest unless `step`), the params
  restored in the run's layout, sharded over `mesh` (default: all devices, data parallel).
  `ema`: the weight EMA where the run kept one; False: the raw weights."""
  config = config_lib.load_json(workdir_lib.config_path(workdir))
  mesh = mesh or sharding.mesh_from_config({"data": -1, "fsdp": 1, "tensor": 1})
  _, abstract, shardings = two_tower.abstract_params(config.model, mesh)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
  step, params = checkpoints.read_params(workdir_lib.checkpoints_dir(workdir), step, target,
                                         ema=ema)
  return config, params, step
