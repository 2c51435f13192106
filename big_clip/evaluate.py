r"""Zero-shot evaluation: python -m big_clip.evaluate --config CFG --workdir DIR.

Zero-shot classification per language (CLIP §3.1.2): each class is embedded as the
normalized mean of its prompt embeddings in that language (prompt ensembling), each image
is assigned the class with the highest cosine similarity. Results are JSON lines with
CLIP_benchmark's fields: {"dataset", "model", "task", "language", "metrics": {acc1, acc5,
mean_per_class_recall}}. The same evaluator runs periodically inside training.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx
from jax.experimental import multihost_utils

from big_clip import sharding


def embed_batched(fn, params: Any, inputs: np.ndarray, mesh: jax.sharding.Mesh,
                  batch_size: int) -> np.ndarray:
  """Applies a jitted `fn(params, x)` over `inputs` in sharded batches; numpy [N, D] out.

  Every process passes the same `inputs` (the eval sets are deterministic) and feeds its
  slice of each batch; the result is gathered back on every process.
  """
  dp = sharding.data_parallel_size(mesh)
  batch_size = max(dp, batch_size // dp * dp)
  n = len(inputs)
  outs = []
  pc, pi = jax.process_count(), jax.process_index()
  for start in range(0, n, batch_size):
    chunk = inputs[start:start + batch_size]
    pad = (-len(chunk)) % batch_size
    if pad:  # a fixed batch shape: one compilation
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    local = chunk.reshape(pc, -1, *chunk.shape[1:])[pi]
    x = jax.make_array_from_process_local_data(sharding.batch_sharding(mesh), local)
    out = multihost_utils.process_allgather(fn(params, x), tiled=True)
    outs.append(np.asarray(out)[:batch_size - pad])
  return np.concatenate(outs)


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """acc1, acc5 (when there are more than 5 classes) and mean per-class recall."""
  k = logits.shape[1]
  order = np.argsort(-logits, axis=1)
  metrics = {"acc1": float(np.mean(order[:, 0] == labels))}
  if k > 5:
    metrics["acc5"] = float(np.mean(np.any(order[:, :5] == labels[:, None], axis=1)))
  recalls = [np.mean(order[labels == c, 0] == c) for c in range(k) if np.any(labels == c)]
  metrics["mean_per_class_recall"] = float(np.mean(recalls))
  return metrics


def class_embeddings(text_fn, params, tokenizer, classnames: Sequence[str],
                     templates: Sequence[str], mesh, batch_size: int) -> np.ndarray:
  """[K, D]: per class, the renormalized mean of its normalized prompt embeddings."""
  prompts = [t.format(c=c) for c in classnames for t in templates]
  emb = embed_batched(text_fn, params, tokenizer.encode(prompts), mesh, batch_size)
  emb = emb.reshape(len(classnames), len(templates), -1).mean(axis=1)
  return emb / np.linalg.norm(emb, axis=-1, keepdims=True)


class ZeroShotEmbedded:
  """Zero-shot colour / shape classification on held-out images of the embedded dataset."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer, graphdef: nnx.GraphDef,
               mesh: jax.sharding.Mesh, model_name: str):
    from big_clip.data import pipeline, sources

    self.config, self.tokenizer, self.mesh, self.model_name = config, tokenizer, mesh, model_name
    self.languages = list(config.data.languages)
    self.tasks = [t for t in config.eval.zeroshot_tasks] if config.data.source == "embedded" \
        else []
    self.sources = sources
    self.sets = {}
    for task in self.tasks:
      images, labels = sources.zeroshot_set(task, config.eval.num_images, seed=config.seed,
                                            image_size=config.data.image_size)
      self.sets[task] = (pipeline.normalize(images, config.data.mean, config.data.std), labels)
    with jax.set_mesh(mesh):
      self.image_fn = jax.jit(lambda p, x: nnx.merge(graphdef, p).encode_image(x))
      self.text_fn = jax.jit(lambda p, t: nnx.merge(graphdef, p).encode_text(t))
    self.long_captions = None  # image <-> long-caption retrieval (big_clip/eval_long.py)
    if config.eval.get("long_caption_images", 0):
      from big_clip import eval_long
      self.long_captions = eval_long.LongCaptionRetrieval(config, tokenizer, mesh, self.image_fn,
                                                          self.text_fn, model_name)

  def run(self, params: Any) -> list[dict]:
    records = []
    bs = self.config.eval.batch_size
    with jax.set_mesh(self.mesh):
      for task in self.tasks:
        images, labels = self.sets[task]
        img_emb = embed_batched(self.image_fn, params, images, self.mesh, bs)
        for lang in self.languages:
          cls_emb = class_embeddings(self.text_fn, params, self.tokenizer,
                                     self.sources.zeroshot_classnames(task, lang),
                                     self.sources.zeroshot_templates(task, lang), self.mesh, bs)
          metrics = classification_metrics(img_emb @ cls_emb.T, labels)
          metrics["chance"] = 1.0 / cls_emb.shape[0]
          records.append({"dataset": f"embedded_{task}", "model": self.model_name,
                          "task": "zeroshot_classification", "language": lang,
                          "metrics": metrics})
      if self.long_captions is not None:
        records += self.long_captions.run(params)
    return records


def write_records(records: list[dict], out_dir: str, *, step: int | None = None) -> None:
  """`results.jsonl` holds the latest evaluation; `history.jsonl` every one, with its step."""
  if jax.process_index() != 0 or not records:
    return
  os.makedirs(out_dir, exist_ok=True)
  tmp = os.path.join(out_dir, "results.jsonl.tmp")
  with open(tmp, "w") as f:
    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
  os.replace(tmp, os.path.join(out_dir, "results.jsonl"))
  if step is not None:
    with open(os.path.join(out_dir, "history.jsonl"), "a") as f:
      f.writelines(json.dumps({"step": step, **r}, ensure_ascii=False) + "\n" for r in records)


def records_to_scalars(records: list[dict]) -> dict[str, float]:
  out = {}
  for r in records:
    for k, v in r["metrics"].items():
      if k != "chance":
        out[f"{r['dataset']}/{r['language']}/{k}"] = v
  return out


def print_table(records: list[dict], title: str = "zero-shot accuracy") -> str:
  """Languages as rows, datasets as columns: acc1 (and x chance). Returns the text too."""
  records = [r for r in records if "acc1" in r["metrics"]]  # classification records only
  if not records:
    return ""
  datasets = sorted({r["dataset"] for r in records})
  languages = list(dict.fromkeys(r["language"] for r in records))
  cell = {(r["dataset"], r["language"]): r["metrics"] for r in records}
  lines = [title, "language  " + "  ".join(f"{d:>24}" for d in datasets)]
  for lang in languages + ["mean"]:
    row = []
    for d in datasets:
      if lang == "mean":
        accs = [cell[(d, l)]["acc1"] for l in languages if (d, l) in cell]
        chance = next(cell[(d, l)]["chance"] for l in languages if (d, l) in cell)
        acc = float(np.mean(accs))
      else:
        acc, chance = cell[(d, lang)]["acc1"], cell[(d, lang)]["chance"]
      row.append(f"{100 * acc:8.1f}% ({acc / chance:4.1f}x chance)")
    lines.append(f"{lang:<8}  " + "  ".join(f"{c:>24}" for c in row))
  text = "\n".join(lines)
  if jax.process_index() == 0:
    print(text, flush=True)
  return text


# ---------------------------------------------------------------------------------------------
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  del argv
  from big_clip.train import _QuietLibraries

  logging.get_absl_handler().addFilter(_QuietLibraries())
  from ml_collections import config_flags

  from big_clip import checkpoints, train
  from big_clip import config as config_lib

  config = FLAGS.config
  config_lib.validate(config)
  workdir = FLAGS.workdir
  mesh = sharding.make_mesh(dict(data=config.mesh.data, fsdp=config.mesh.fsdp,
                                 tensor=config.mesh.tensor))
  tokenizer = train.build_tokenizer(config, workdir)
  graphdef, abs_params, shardings = train.abstract_params(config, mesh)
  abs_params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abs_params, shardings)
  mngr = checkpoints.manager(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                             use_async=False)
  step = mngr.latest_step() if FLAGS.step is None else FLAGS.step
  if step is None:
    raise FileNotFoundError(f"No checkpoint in {workdir}/checkpoints; train first with "
                            "python -m big_clip.train --config ... --workdir ...")
  params = checkpoints.restore_params(mngr, step, abs_params)
  name = train.config_name(config_flags.get_config_filename(FLAGS["config"]))
  records = ZeroShotEmbedded(config, tokenizer, graphdef, mesh, name).run(params)
  out = FLAGS.output or os.path.join(workdir, "eval")
  write_records(records, out)
  print_table(records, title=f"zero-shot accuracy, checkpoint step {step}")
  logging.info("Wrote %d records to %s", len(records), os.path.join(out, "results.jsonl"))


if __name__ == "__main__":
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "The training config file.")
  flags.DEFINE_string("workdir", None, "The training workdir (its latest checkpoint is used).")
  flags.DEFINE_integer("step", None, "Evaluate this checkpoint step instead of the latest.")
  flags.DEFINE_string("output", None, "Directory for results.jsonl (default WORKDIR/eval).")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
