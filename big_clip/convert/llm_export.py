"""The LLM of a caption-contrastive (CC) run as a Hugging Face folder: LLM2CLIP's hand-over
from stage 1 (CC, configs/llm2clip_cc.py) to stage 2 (the adapter, configs/llm2clip.py).

The LoRA is merged into the base kernels (Hu et al. 2021 §4.1), so stage 2 runs a plain
frozen LLM (no LoRA compute, the embedding cache applies) and transformers loads the folder
as-is. The folder is the base folder's config.json, tokenizer.json and one model.safetensors
of the merged decoder; config.json gains a section `big_clip` naming the run, its step, the
attention it was trained with and the sha256 of the merged weights. The embedding cache keys
on that hash (data/text_cache.py), so features of the pre-CC LLM are never mistaken for the
CC-tuned LLM's, and the tower refuses to run the LLM with another attention than it learned.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

from flax.nnx import traversals
from safetensors.numpy import save_file

from big_clip import checkpoints
from big_clip import workdir as workdir_lib
from big_clip.errors import UserError
from big_clip.models import adapt, llm


def weights_sha256(tensors: dict[str, Any]) -> str:
  """sha256 over the (name, dtype, shape, bytes) of every tensor, in name order."""
  h = hashlib.sha256()
  for name in sorted(tensors):
    t = tensors[name]
    h.update(f"{name}:{t.dtype}:{t.shape}".encode())
    h.update(t.tobytes())
  return h.hexdigest()


def export_cc_llm(workdir: str, out: str, step: int | None = None) -> dict[str, Any]:
  """Writes the LoRA-merged LLM of the run `workdir` (newest checkpoint unless `step`) to
  the folder `out`; returns the `big_clip` section written into its config.json."""
  config = adapt.run_config(workdir)
  llm_cfg = config.model.text.llm
  if config.model.text.kind != "llm" or not llm_cfg.path:
    raise UserError(f"{workdir} has no LLM text tower loaded from a Hugging Face folder "
                    "(config.model.text.llm.path); only such a run's LLM can be exported "
                    "(a random-init tower has no tokenizer.json).")
  step, flat = checkpoints.read_params(workdir_lib.checkpoints_dir(workdir), step)
  decoder = traversals.unflatten_mapping(
      {tuple(int(p) if str(p).isdigit() else p for p in path[2:]): value
       for path, value in flat.items() if tuple(path[:2]) == ("text", "decoder")})
  tensors = llm.to_hf_tensors(llm.merge_lora(decoder, float(llm_cfg.lora_alpha)))
  section = {"run": workdir_lib.absolute(workdir), "step": int(step),
             "attention": str(llm_cfg.attention), "pooling": str(llm_cfg.pooling),
             "lora_merged": {"rank": int(llm_cfg.lora_rank), "alpha": float(llm_cfg.lora_alpha),
                             "targets": list(llm_cfg.lora_targets)},
             "weights_sha256": weights_sha256(tensors)}
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(llm_cfg.path, llm.CONFIG_FILE)) as f:
    hf_config = json.load(f)
  hf_config[llm.BIG_CLIP_SECTION] = section
  save_file(tensors, os.path.join(out, llm.SINGLE_FILE), metadata={"format": "pt"})
  shutil.copy(os.path.join(llm_cfg.path, "tokenizer.json"), os.path.join(out, "tokenizer.json"))
  with open(os.path.join(out, llm.CONFIG_FILE), "w") as f:  # last: a folder without it is
    json.dump(hf_config, f, indent=2)  # not a model
  return section
