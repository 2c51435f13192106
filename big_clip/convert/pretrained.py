"""Weights to and from PyTorch: Hugging Face CLIPModel / SiglipModel and open_clip folders,
and `load_init` for `config.init_from` ('hf:PATH', 'open_clip:PATH', 'big_clip:WORKDIR[:STEP]').

Every imported tree goes through `models.adapt.import_params`, which checks it against the
model's parameters and names any tensor that is missing, unexpected or of the wrong shape.
Softmax models export as `CLIPModel`, sigmoid models as `SiglipModel`; a setting that the
target cannot represent (e.g. MAP pooling for CLIPModel) is an `ExportError` naming it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np
from absl import logging
import safetensors.numpy

from big_clip import checkpoints, fileio
from big_clip import config as config_lib
from big_clip import workdir as workdir_lib
from big_clip.convert import hf, open_clip
from big_clip.convert.tables import ExportError, ImportMismatchError
from big_clip.models import adapt

HF_WEIGHTS = "model.safetensors"
TOKENIZER_NOTE = "TOKENIZER.md"
__all__ = ["ExportError", "ImportMismatchError", "config_for_model", "from_hf",
           "from_open_clip", "load_init", "to_hf", "to_open_clip", "write_import"]


# ---------------------------------------------------------------------------------------------
# Configs.
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Import.
# ---------------------------------------------------------------------------------------------
def _read_json(path: str) -> dict[str, Any]:
  if not fileio.exists(path):
    raise FileNotFoundError(f"{path} not found.")
  return fileio.read_json(path)


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  if not fileio.exists(path):
    raise FileNotFoundError(f"{path} not found; big_clip imports single-file safetensors.")
  return safetensors.numpy.load(fileio.read_bytes(path))


def from_hf(path: str, config: ml_collections.ConfigDict | None = None
            ) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """(config, params) of a `save_pretrained` folder of CLIPModel / SiglipModel. With
  `config`, its model settings must match the checkpoint's; without, they are derived."""
  kind, derived = hf.model_config_from_hf(_read_json(os.path.join(path, "config.json")))
  if config is None:
    config = config_for_model(derived)
    config.loss.name = {"clip": "softmax", "siglip": "sigmoid"}[kind]
  else:
    adapt.check_architecture(derived, config.model, path)
  source = os.path.join(path, HF_WEIGHTS)
  flat, origin = hf.import_state(_load_safetensors(source), config.model, kind, source)
  return config, adapt.import_params(flat, config.model, origin=origin, source=source)


def from_open_clip(path: str, config: ml_collections.ConfigDict | None = None
                   ) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """(config, params) of an open_clip folder (open_clip_config.json + safetensors)."""
  cfg = _read_json(os.path.join(path, open_clip.CONFIG_FILE))
  derived = open_clip.model_config_from_open_clip(cfg.get("model_cfg", cfg))
  if config is None:
    config = config_for_model(derived)
    config.loss.name = "softmax" if derived["logit_bias_init"] == 0.0 else "sigmoid"
  else:
    adapt.check_architecture(derived, config.model, path)
  source = os.path.join(path, open_clip.WEIGHTS_FILE)
  flat, origin = open_clip.import_state(_load_safetensors(source), config.model, source)
  return config, adapt.import_params(flat, config.model, origin=origin, source=source)


def load_init(init_from: str, config: ml_collections.ConfigDict,
              tokenizer_path: str | None = None) -> dict[str, Any]:
  """`config.init_from` ('hf:PATH', 'open_clip:PATH', 'big_clip:WORKDIR[:STEP]') -> params
  (NumPy, the model's layout). A big_clip run must share the tokenizer (`tokenizer_path`)."""
  kind, _, path = init_from.partition(":")
  if kind not in ("hf", "open_clip", "big_clip") or not path:
    raise ValueError(f"config.init_from={init_from!r}; use hf:PATH, open_clip:PATH or "
                     "big_clip:WORKDIR[:STEP].")
  logging.info("Initializing the towers from %s", init_from)
  if kind == "big_clip":  # config.init_only: some towers (the others keep their init)
    return adapt.load_big_clip(init_from, config.model, tokenizer_path,
                               tuple(config.init_only))[1]
  return (from_hf if kind == "hf" else from_open_clip)(path, config)[1]


# ---------------------------------------------------------------------------------------------
# Export.
# ---------------------------------------------------------------------------------------------
def _save_safetensors(state: Mapping[str, np.ndarray], path: str, fmt: str) -> None:
  fileio.write(path, safetensors.numpy.save(
      {k: np.array(v, np.float32, order="C") for k, v in state.items()},
      metadata={"format": "pt", "producer": f"big_clip.export ({fmt})"}))


def _write_tokenizer(config: ml_collections.ConfigDict, tokenizer_path: str | None,
                     out: str) -> None:
  """Copies the sentencepiece model and writes how to encode text exactly as in training."""
  lines = ["# Inputs as big_clip trained this model", ""]
  t = config.model.text
  if tokenizer_path and fileio.exists(tokenizer_path):
    fileio.copy(tokenizer_path, os.path.join(out, "spm.model"))
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
  fileio.write(os.path.join(out, TOKENIZER_NOTE), "\n".join(lines))


# Parts beyond the two towers that neither format has a place for: (key, what, config).
_EXTRA_PARTS = (("decoder", "caption decoder", "config.model.decoder"),
                ("region", "region prompter", "config.model.region"))


def towers_only(params: Mapping[str, Any], fmt: str) -> Mapping[str, Any]:
  """`params` without the caption decoder (config.loss.caption) and the region prompter
  (config.loss.region_weight), which neither format has a place for: the export is the two
  towers, as a plain CLIP / SigLIP model."""
  for key, what, where in _EXTRA_PARTS:
    if params.get(key) is not None:
      logging.warning("%s has no %s: exporting the image and text towers only (the %s of "
                      "%s stays in the big_clip checkpoint).", fmt, what, what, where)
  return {k: v for k, v in params.items() if k not in {key for key, _, _ in _EXTRA_PARTS}}


def to_hf(params: Mapping[str, Any], config: ml_collections.ConfigDict, out: str, *,
          tokenizer_path: str | None = None) -> str:
  """Writes `out/config.json` + `out/model.safetensors` (CLIPModel for softmax, SiglipModel
  for sigmoid models, Siglip2Model for sigmoid NaFlex ones) and the tokenizer; returns the
  class name."""
  kind = hf.kind_for_loss(config.loss.name, bool(config.model.image.naflex))
  state = hf.export_state(adapt.flat_params(towers_only(params, "transformers")),
                          config.model, kind)
  scale = float(np.reshape(state["logit_scale"], ()))
  fileio.write(os.path.join(out, "config.json"),
               json.dumps(hf.hf_config(config.model, kind, scale), indent=2))
  _save_safetensors(state, os.path.join(out, HF_WEIGHTS), "hf")
  _write_tokenizer(config, tokenizer_path, out)
  return hf.ARCHITECTURES[kind]


def to_open_clip(params: Mapping[str, Any], config: ml_collections.ConfigDict, out: str, *,
                 tokenizer_path: str | None = None) -> dict[str, Any]:
  """Writes `out/open_clip_config.json` + `out/open_clip_model.safetensors` (loadable with
  `open_clip.create_model('local-dir:OUT')`) and the tokenizer; returns the model config."""
  state, model_cfg = open_clip.export_state(
      adapt.flat_params(towers_only(params, "open_clip")), config.model, config.loss.name)
  preprocess = dict(size=int(config.data.image_size), mean=list(config.data.mean),
                    std=list(config.data.std))
  fileio.write(os.path.join(out, open_clip.CONFIG_FILE),
               json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=2))
  _save_safetensors(state, os.path.join(out, open_clip.WEIGHTS_FILE), "open_clip")
  _write_tokenizer(config, tokenizer_path, out)
  return model_cfg


def tokenizer_of(config: ml_collections.ConfigDict, workdir: str) -> str:
  return config.data.tokenizer.path or workdir_lib.tokenizer_path(workdir)


def write_import(config: ml_collections.ConfigDict, params: Mapping[str, Any], out: str,
                 source: str) -> None:
  """An orbax checkpoint (step 0, parameters only) + config.json in workdir `out`."""
  workdir_lib.write_config(config, out)
  mngr = checkpoints.manager(workdir_lib.checkpoints_dir(out), keep=1, use_async=False)
  checkpoints.save(mngr, 0, {"params": params}, {"imported_from": source})
  mngr.wait_until_finished()
  mngr.close()
