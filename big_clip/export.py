r"""To and from PyTorch: Hugging Face CLIPModel / SiglipModel and open_clip, exactly.

Export a training run (its newest checkpoint, or --step):

  python -m big_clip.export --workdir /tmp/big_clip_default --format hf --out /tmp/export_hf
  python -m big_clip.export --workdir /tmp/big_clip_default --format open_clip --out /tmp/oc

Import pretrained weights as an orbax checkpoint (for `evaluate`, `export` or
`--config.init_from=big_clip:WORKDIR`); without --config the model config is derived from
the checkpoint's own config:

  python -m big_clip.export --import hf:/path/to/save_pretrained_dir --out /tmp/imported

Softmax models export as `CLIPModel`, sigmoid models as `SiglipModel`; a setting that the
target cannot represent (e.g. MAP pooling for CLIPModel) is an error that names it. Every
imported tree goes through `import_params`, which checks it against the model's parameters
and names any tensor that is missing, unexpected or of the wrong shape.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx

from big_clip import config as config_lib
from big_clip.convert import hf, open_clip, tables
from big_clip.convert.tables import ExportError, ImportMismatchError
from big_clip.models import two_tower

FORMATS = ("hf", "open_clip")
HF_WEIGHTS = "model.safetensors"
TOKENIZER_NOTE = "TOKENIZER.md"
__all__ = ["ExportError", "ImportMismatchError", "import_params", "load_pretrained", "to_hf",
           "to_open_clip", "from_hf", "from_open_clip", "from_big_clip"]


# ---------------------------------------------------------------------------------------------
# Our parameters as a flat {dotted path: array} in the per-layer layout.
# ---------------------------------------------------------------------------------------------
def _is_stacked(path: str) -> bool:
  """`...blocks.<param>` without a layer index: the scanned layout (stacked on axis 0)."""
  parts = path.split(".")
  return "blocks" in parts and not parts[parts.index("blocks") + 1].isdigit()


def _unstack(flat: Mapping[str, Any], take: Any = lambda x, i: x[i]) -> dict[str, Any]:
  """Scanned `a.blocks.b` [depth, ...] -> per-layer `a.blocks.<i>.b`."""
  out = {}
  for path, value in flat.items():
    if _is_stacked(path):
      head, tail = path.split(".blocks.", 1)
      for i in range(value.shape[0]):
        out[f"{head}.blocks.{i}.{tail}"] = take(value, i)
    else:
      out[path] = value
  return out


def _stack(flat: Mapping[str, np.ndarray], stacked_paths: set[str]) -> dict[str, np.ndarray]:
  """Per-layer `a.blocks.<i>.b` -> scanned `a.blocks.b` for each path in `stacked_paths`."""
  out = {k: v for k, v in flat.items() if ".blocks." not in k}
  for path in stacked_paths:
    head, tail = path.split(".blocks.", 1)
    depth = sum(1 for k in flat if k.startswith(f"{head}.blocks.") and k.endswith(f".{tail}")
                and k.split(".blocks.", 1)[1].split(".", 1)[0].isdigit())
    out[path] = np.stack([flat[f"{head}.blocks.{i}.{tail}"] for i in range(depth)])
  return out


def flat_params(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Model params (nnx pure dict, scanned or not) -> per-layer float32 NumPy arrays."""
  flat = tables.flatten(params)
  flat = {k: np.asarray(jax.device_get(v), np.float32) for k, v in flat.items()}
  return _unstack(flat)


def abstract_params(config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
  """The model's parameters as flat {path: ShapeDtypeStruct} (its own layout), no allocation."""
  model = nnx.eval_shape(lambda: two_tower.TwoTower(config.model, rngs=nnx.Rngs(0)))
  return tables.flatten(nnx.to_pure_dict(nnx.state(model)))


# ---------------------------------------------------------------------------------------------
# The one entry point for imported weights.
# ---------------------------------------------------------------------------------------------
def import_params(flat: Mapping[str, np.ndarray], config: ml_collections.ConfigDict, *,
                  origin: Mapping[str, str] | None = None, source: str = "imported weights"
                  ) -> dict[str, Any]:
  """Checks per-layer params `flat` against the model `config` builds and returns them as
  the model's pure dict (scanned if `config.model.scan_layers`), in `param_dtype`.

  Every tensor must be present with the model's shape; the error names the tensor (and the
  source tensor it came from), its shape and the expected shape.
  """
  abstract = abstract_params(config)
  expected = _unstack(abstract, take=lambda a, i: jax.ShapeDtypeStruct(a.shape[1:], a.dtype))
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
        + ". The model config does not describe this checkpoint.")
  pos = "text.positional_embedding"
  have_len, want_len = flat[pos].shape[0], expected[pos].shape[0]
  if flat[pos].shape[-1:] == expected[pos].shape[-1:] and have_len < want_len:
    # Long-CLIP §3.1 (Zhang et al. 2024): a shorter table (77) is stretched to max_len (248),
    # the first 20 positions kept as trained (models/text.py).
    from big_clip.models import text as text_tower
    logging.info("%s: stretching %s from %d to %d positions (Long-CLIP).", source, pos,
                 have_len, want_len)
    flat = {**flat, pos: text_tower.stretch_positional_embedding(np.asarray(flat[pos]),
                                                                 want_len)}
  elif flat[pos].shape[-1:] == expected[pos].shape[-1:] and have_len > want_len:
    raise ImportMismatchError(
        f"{source}: {name(pos)} has {flat[pos].shape[0]} positions but config.model.text."
        f"max_len={expected[pos].shape[0]}; positional stretching (Long-CLIP) only "
        "lengthens a table, it never cuts one. Set config.model.text.max_len >= "
        f"{flat[pos].shape[0]}.")
  for path in sorted(expected):
    got, want = tuple(np.shape(flat[path])), tuple(expected[path].shape)
    if got != want:
      raise ImportMismatchError(f"{source}: tensor {name(path)} has shape {got}; the model "
                                f"expects {want}. Check the widths/sizes in config.model.")
  out = {k: np.asarray(flat[k]).astype(expected[k].dtype) for k in expected}
  stacked = {k for k in abstract if _is_stacked(k)}
  if stacked:
    out = _stack(out, stacked)
  return tables.unflatten(out)


# ---------------------------------------------------------------------------------------------
# Configs.
# ---------------------------------------------------------------------------------------------
def load_config_json(path: str) -> ml_collections.ConfigDict:
  """A run's `config.json` (written by train.py) merged into the schema, validated."""
  with open(path) as f:
    values = json.load(f)
  config = config_lib.base()
  config.update(values)
  config_lib.validate(config)
  return config


def config_for_model(model: Mapping[str, Any], base: ml_collections.ConfigDict | None = None
                     ) -> ml_collections.ConfigDict:
  """`base` (default: the schema's defaults) with `config.model` set to `model`, float32, and
  the data sizes that follow from it."""
  config = config_lib.base() if base is None else ml_collections.ConfigDict(base.to_dict())
  config.model.update(model)
  config.model.update(dtype="float32", param_dtype="float32")
  config.data.update(image_size=config.model.image.image_size,
                     max_len=min(config.data.max_len, config.model.text.max_len))
  if "init_from" in config:
    config.init_from = ""
  return config


def _check_architecture(derived: Mapping[str, Any], model: Any, source: str,
                        prefix: str = "config.model") -> None:
  """Settings of `model` (the user's config) that differ from the checkpoint's `derived`
  values: a different function even where every tensor shape matches."""
  skip = {"max_len", "logit_scale_init", "logit_bias_init", "logit_scale_max", "pad_id",
          "dtype", "param_dtype", "remat", "scan_layers"}
  for key, want in derived.items():
    if key in skip or (key == "eos_id" and derived.get("pool") != "eos"):
      continue
    if isinstance(want, Mapping):
      _check_architecture(want, model[key], source, f"{prefix}.{key}")
    elif model.get(key, want) != want and not (isinstance(want, float)
                                               and np.isclose(model[key], want)):
      raise ImportMismatchError(f"{source}: the checkpoint needs {prefix}.{key}={want!r}, the "
                                f"config has {model[key]!r}.")


# ---------------------------------------------------------------------------------------------
# Import.
# ---------------------------------------------------------------------------------------------
def _read_json(path: str) -> dict[str, Any]:
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found.")
  with open(path) as f:
    return json.load(f)


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file

  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found; big_clip imports single-file safetensors.")
  return load_file(path)


def from_hf(path: str, config: ml_collections.ConfigDict | None = None
            ) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """(config, params) of a `save_pretrained` folder of CLIPModel / SiglipModel. With
  `config`, its model settings must match the checkpoint's; without, they are derived."""
  kind, derived = hf.model_config_from_hf(_read_json(os.path.join(path, "config.json")))
  if config is None:
    config = config_for_model(derived)
    config.loss.name = {"clip": "softmax", "siglip": "sigmoid"}[kind]
  else:
    _check_architecture(derived, config.model, path)
  source = os.path.join(path, HF_WEIGHTS)
  flat, origin = hf.import_state(_load_safetensors(source), config.model, kind, source)
  return config, import_params(flat, config, origin=origin, source=source)


def from_open_clip(path: str, config: ml_collections.ConfigDict | None = None
                   ) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """(config, params) of an open_clip folder (open_clip_config.json + safetensors)."""
  cfg = _read_json(os.path.join(path, open_clip.CONFIG_FILE))
  derived = open_clip.model_config_from_open_clip(cfg.get("model_cfg", cfg))
  if config is None:
    config = config_for_model(derived)
    config.loss.name = "softmax" if derived["logit_bias_init"] == 0.0 else "sigmoid"
  else:
    _check_architecture(derived, config.model, path)
  source = os.path.join(path, open_clip.WEIGHTS_FILE)
  flat, origin = open_clip.import_state(_load_safetensors(source), config.model, source)
  return config, import_params(flat, config, origin=origin, source=source)


def restore_workdir(workdir: str, step: int | None = None
                    ) -> tuple[ml_collections.ConfigDict, dict[str, Any], int]:
  """(config, params, step) of a big_clip run's checkpoint (newest unless `step`)."""
  from big_clip import checkpoints, sharding, train

  config = load_config_json(os.path.join(workdir, "config.json"))
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  _, abs_params, shardings = train.abstract_params(config, mesh)
  abs_params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abs_params, shardings)
  mngr = checkpoints.manager(os.path.join(workdir, "checkpoints"), keep=1_000_000,
                             use_async=False)
  step = mngr.latest_step() if step is None else step
  if step is None or step not in mngr.all_steps():
    raise FileNotFoundError(f"No checkpoint {'' if step is None else step} in "
                            f"{workdir}/checkpoints (have: {list(mngr.all_steps())}).")
  return config, checkpoints.restore_params(mngr, step, abs_params), step


def from_big_clip(spec: str, config: ml_collections.ConfigDict
                  ) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """`WORKDIR[:STEP]` of another run -> params for `config` (checked like any import)."""
  workdir, _, step = spec.partition(":")
  source_config, params, step = restore_workdir(workdir, int(step) if step else None)
  _check_architecture(source_config.model.to_dict(), config.model, workdir)
  return config, import_params(flat_params(params), config,
                               source=f"{workdir} checkpoint {step}")


def load_pretrained(init_from: str, config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`config.init_from` ('hf:PATH', 'open_clip:PATH', 'big_clip:WORKDIR[:STEP]') -> params."""
  kind, _, path = init_from.partition(":")
  loaders = {"hf": from_hf, "open_clip": from_open_clip, "big_clip": from_big_clip}
  if kind not in loaders or not path:
    raise ValueError(f"config.init_from={init_from!r}; use hf:PATH, open_clip:PATH or "
                     "big_clip:WORKDIR[:STEP].")
  logging.info("Initializing the towers from %s", init_from)
  return loaders[kind](path, config)[1]


def place_like(params: Mapping[str, Any], like: Any) -> Any:
  """Host NumPy `params` as global arrays with the shardings of `like` (any process count:
  each process reads the file and provides its own shards)."""
  return jax.tree.map(
      lambda p, l: jax.make_array_from_callback(l.shape, l.sharding, lambda idx: p[idx]),
      params, like)


# ---------------------------------------------------------------------------------------------
# Export.
# ---------------------------------------------------------------------------------------------
def _save_safetensors(state: Mapping[str, np.ndarray], path: str, fmt: str) -> None:
  from safetensors.numpy import save_file

  save_file({k: np.array(v, np.float32, order="C") for k, v in state.items()}, path,
            metadata={"format": "pt", "producer": f"big_clip.export ({fmt})"})


def _write_tokenizer(config: ml_collections.ConfigDict, tokenizer_path: str | None,
                     out: str) -> None:
  """Copies the sentencepiece model and writes how to encode text exactly as in training."""
  lines = ["# Inputs as big_clip trained this model", ""]
  t = config.model.text
  if tokenizer_path and os.path.exists(tokenizer_path):
    shutil.copy(tokenizer_path, os.path.join(out, "spm.model"))
    lines += [
        "`spm.model` is the sentencepiece model of the run. Encode a caption as",
        "", "```python", "import sentencepiece as spm",
        "sp = spm.SentencePieceProcessor(model_file='spm.model')",
        f"ids = sp.encode(text)[:{t.max_len - 1}] + [{t.eos_id}]  # pieces, then EOS",
        f"ids += [{t.pad_id}] * ({t.max_len} - len(ids))  # pad to max_len", "```", "",
        f"(or `big_clip.data.tokenizers.SpmTokenizer('spm.model', {t.max_len})`).", ""]
  else:
    lines += ["No tokenizer file was found for this run (config.data.tokenizer.path).", ""]
  lines += [f"Text pooling: `{t.pool}`; pad every caption to {t.max_len} tokens.",
            f"Images: {config.data.image_size}x{config.data.image_size} RGB in [0, 1], then "
            f"(x - mean) / std with mean={list(config.data.mean)}, std={list(config.data.std)},",
            "as `pixel_values` [B, 3, H, W] (transformers) or the image batch (open_clip).", ""]
  with open(os.path.join(out, TOKENIZER_NOTE), "w") as f:
    f.write("\n".join(lines))


def to_hf(params: Mapping[str, Any], config: ml_collections.ConfigDict, out: str, *,
          tokenizer_path: str | None = None) -> str:
  """Writes `out/config.json` + `out/model.safetensors` (CLIPModel for softmax, SiglipModel
  for sigmoid models) and the tokenizer; returns the class name."""
  kind = hf.kind_for_loss(config.loss.name)
  state = hf.export_state(flat_params(params), config.model, kind)
  os.makedirs(out, exist_ok=True)
  scale = float(np.reshape(state["logit_scale"], ()))
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(hf.hf_config(config.model, kind, scale), f, indent=2)
  _save_safetensors(state, os.path.join(out, HF_WEIGHTS), "hf")
  _write_tokenizer(config, tokenizer_path, out)
  return hf.ARCHITECTURES[kind]


def to_open_clip(params: Mapping[str, Any], config: ml_collections.ConfigDict, out: str, *,
                 tokenizer_path: str | None = None) -> dict[str, Any]:
  """Writes `out/open_clip_config.json` + `out/open_clip_model.safetensors` (loadable with
  `open_clip.create_model('local-dir:OUT')`) and the tokenizer; returns the model config."""
  state, model_cfg = open_clip.export_state(flat_params(params), config.model,
                                            config.loss.name)
  os.makedirs(out, exist_ok=True)
  preprocess = dict(size=int(config.data.image_size), mean=list(config.data.mean),
                    std=list(config.data.std))
  with open(os.path.join(out, open_clip.CONFIG_FILE), "w") as f:
    json.dump({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, f, indent=2)
  _save_safetensors(state, os.path.join(out, open_clip.WEIGHTS_FILE), "open_clip")
  _write_tokenizer(config, tokenizer_path, out)
  return model_cfg


def _tokenizer_of(config: ml_collections.ConfigDict, workdir: str) -> str:
  return config.data.tokenizer.path or os.path.join(workdir, "tokenizer", "spm.model")


def write_import(config: ml_collections.ConfigDict, params: Mapping[str, Any], out: str,
                 source: str) -> None:
  """An orbax checkpoint (step 0, parameters only) + config.json in workdir `out`."""
  from big_clip import checkpoints

  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  mngr = checkpoints.manager(os.path.join(out, "checkpoints"), keep=1, use_async=False)
  checkpoints.save(mngr, 0, {"params": params}, {"imported_from": source})
  mngr.wait_until_finished()
  mngr.close()


# ---------------------------------------------------------------------------------------------
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  del argv
  out = FLAGS.out
  if FLAGS["import"].value:
    spec = FLAGS["import"].value
    kind, _, path = spec.partition(":")
    if kind not in ("hf", "open_clip") or not path:
      raise app.UsageError(f"--import={spec!r}; use hf:PATH or open_clip:PATH.")
    loader = from_hf if kind == "hf" else from_open_clip
    config, params = loader(path, FLAGS.config)
    write_import(config, params, out, spec)
    print(f"Imported {spec} -> {out}/checkpoints/0 ({config.loss.name} model); fine-tune with "
          f"--config.init_from=big_clip:{out}")
    return
  if not FLAGS.workdir or FLAGS.format not in FORMATS:
    raise app.UsageError("Usage: python -m big_clip.export --workdir DIR [--step N] "
                         "--format hf|open_clip --out OUT, or --import hf:PATH --out WORKDIR")
  config, params, step = restore_workdir(FLAGS.workdir, FLAGS.step)
  tok = _tokenizer_of(config, FLAGS.workdir)
  if FLAGS.format == "hf":
    what = f"transformers {to_hf(params, config, out, tokenizer_path=tok)}"
  else:
    to_open_clip(params, config, out, tokenizer_path=tok)
    what = "open_clip"
  print(f"Exported {FLAGS.workdir} step {step} as {what} -> {out}: "
        + ", ".join(sorted(os.listdir(out))))


if __name__ == "__main__":
  from ml_collections import config_flags

  flags.DEFINE_string("workdir", None, "A training workdir to export.")
  flags.DEFINE_integer("step", None, "The checkpoint step (default: the newest).")
  flags.DEFINE_enum("format", "hf", FORMATS, "hf: transformers CLIPModel/SiglipModel; "
                    "open_clip: open_clip state dict + model config.")
  flags.DEFINE_string("out", None, "Output folder.")
  flags.DEFINE_string("import", None, "hf:PATH or open_clip:PATH: write an orbax checkpoint.")
  config_flags.DEFINE_config_file("config", None, "Model config for --import (optional).")
  flags.mark_flag_as_required("out")
  app.run(main)
