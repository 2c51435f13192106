r"""The eval binary: python -m big_clip.evaluate --config CFG --workdir DIR [--eval=SPEC ...].

Runs the evaluations listed in `config.evals` (or `--eval`, repeatable; grammar in
`evals/specs.py`) on the latest checkpoint of DIR, or on `--checkpoint PATH` (a step folder
or a workdir). The same `Suite` runs periodically inside training (train.py).

- Zero-shot classification per language (CLIP §3.1.2): each class is embedded as the
  renormalized mean of its normalized prompt embeddings in that language (prompt
  ensembling); an image gets the class with the highest cosine similarity. A language that
  names only some classes is scored on the images of those classes, K-way among them
  (Babel-ImageNet protocol). Means over languages and over language groups are added.
- Retrieval per language on a captioned manifest: recall@1/5/10 text->image and
  image->text (CLIP_benchmark protocol; an image query is right when any of its captions is
  in the top k).

Results are JSON lines with CLIP_benchmark's fields, {"dataset", "model", "task",
"language", "metrics"}, plus "step", to `--output` (default DIR/eval/results.jsonl), and a
table on stdout.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx
from jax.experimental import multihost_utils

from big_clip import sharding
from big_clip.evals import datasets, labels as labels_lib, metrics as metrics_lib, specs
from big_clip.evals.metrics import classification_metrics

ZEROSHOT, RETRIEVAL = "zeroshot_classification", "zeroshot_retrieval"


# ---------------------------------------------------------------------------------------------
# Embedding in sharded batches.
# ---------------------------------------------------------------------------------------------
def embed_batched(fn, params: Any, inputs, mesh: jax.sharding.Mesh, batch_size: int, *,
                  preprocess: Callable[[np.ndarray], np.ndarray] | None = None,
                  desc: str | None = None) -> np.ndarray:
  """Applies a jitted `fn(params, x)` over `inputs` in sharded batches; numpy [N, D] out.

  `inputs` is anything with `len()` that takes an int index array (a numpy array, or a
  lazy `datasets.ImageSet`): each process reads only its rows of each batch. The last batch
  is padded by repeating the last row (one batch shape, one compilation) and the padding
  is dropped. Every process gets the whole result.
  """
  dp = sharding.data_parallel_size(mesh)
  n = len(inputs)
  per_device = -(-n // dp)  # a small set: the next power of two per device (few compiles)
  batch_size = dp * min(max(1, batch_size // dp), 1 << (per_device - 1).bit_length())
  pc, pi = jax.process_count(), jax.process_index()
  starts = range(0, n, batch_size)
  if len(starts) > 2 and pi == 0 and desc:
    from tqdm import tqdm
    starts = tqdm(starts, desc=desc, unit="batch", leave=False, disable=None)  # None: TTY only
  outs = []
  for start in starts:
    index = np.minimum(np.arange(start, start + batch_size), n - 1)
    local = inputs[index.reshape(pc, -1)[pi]]
    if preprocess is not None:
      local = preprocess(local)
    x = jax.make_array_from_process_local_data(sharding.batch_sharding(mesh), local)
    out = multihost_utils.process_allgather(fn(params, x), tiled=True)
    outs.append(np.asarray(out)[:min(batch_size, n - start)])
  return np.concatenate(outs)


@dataclasses.dataclass
class Towers:
  """The jitted towers and what feeding them needs."""
  image_fn: Callable
  text_fn: Callable
  mesh: jax.sharding.Mesh
  tokenizer: Any
  batch_size: int
  image_size: int
  mean: Sequence[float]
  std: Sequence[float]

  @classmethod
  def build(cls, config: ml_collections.ConfigDict, tokenizer, graphdef: nnx.GraphDef,
            mesh: jax.sharding.Mesh) -> Towers:
    with jax.set_mesh(mesh):
      image_fn = jax.jit(lambda p, x: nnx.merge(graphdef, p).encode_image(x))
      text_fn = jax.jit(lambda p, t: nnx.merge(graphdef, p).encode_text(t))
    return cls(image_fn, text_fn, mesh, tokenizer, config.eval.batch_size,
               config.data.image_size, tuple(config.data.mean), tuple(config.data.std))

  def images(self, params, images: datasets.ImageSet, desc: str) -> tuple[np.ndarray, np.ndarray]:
    """([N, D] embeddings, [N] bool: decoded fine); failed images are warned about by name."""
    from big_clip.data import pipeline

    emb = embed_batched(self.image_fn, params, images, self.mesh, self.batch_size, desc=desc,
                        preprocess=lambda x: pipeline.normalize(x, self.mean, self.std))
    failed = np.zeros(len(images), np.int32)
    failed[list(images.failed)] = 1
    if jax.process_count() > 1:  # each process decoded its own rows
      failed = np.asarray(multihost_utils.process_allgather(failed)).max(axis=0)
    for i in np.flatnonzero(failed)[:5]:
      logging.warning("%s: skipping %s", desc, images.failed.get(int(i), images.names[i]))
    if failed.any():
      logging.warning("%s: %d of %d images could not be decoded and were skipped.", desc,
                      int(failed.sum()), len(images))
    return emb, failed == 0

  def texts(self, params, tokens: np.ndarray, desc: str | None = None) -> np.ndarray:
    return embed_batched(self.text_fn, params, tokens, self.mesh, self.batch_size, desc=desc)


def class_embeddings(towers: Towers, params, tokens: np.ndarray, num_classes: int
                     ) -> np.ndarray:
  """[K, D] from the [K * T, L] prompt tokens (class-major): prompt ensembling."""
  emb = towers.texts(params, tokens)
  return metrics_lib.ensemble(emb.reshape(num_classes, len(tokens) // num_classes, -1))


def _record(dataset: str, model: str, task: str, language: str, metrics: dict, **extra) -> dict:
  return {"dataset": dataset, "model": model, "task": task, "language": language,
          "metrics": metrics, **extra}


def _aggregates(rows: list[dict], groups: dict[str, list[str]] | None) -> list[dict]:
  """'mean' over all languages and 'group:NAME' over each group's languages."""
  if len(rows) < 2 and not groups:
    return []
  by_lang = {r["language"]: r for r in rows}
  out = []
  for name, members in [("mean", list(by_lang))] + [(f"group:{g}", m)
                                                     for g, m in (groups or {}).items()]:
    present = [l for l in members if l in by_lang]
    if not present:
      logging.warning("%s %s: no evaluated language, left out.", rows[0]["dataset"], name)
      continue
    base = rows[0]
    out.append(_record(base["dataset"], base["model"], base["task"], name,
                       metrics_lib.mean_metrics([by_lang[l]["metrics"] for l in present]),
                       languages=present))
  return out


# ---------------------------------------------------------------------------------------------
# Zero-shot classification.
# ---------------------------------------------------------------------------------------------
def _num_classes(raw_names: dict, labels: np.ndarray, where: str) -> int:
  """K of a dataset that does not know its classes (a manifest): the class-name lists'
  length, else one more than the largest index or label."""
  lengths = {len(v) for v in raw_names.values() if isinstance(v, list)}
  if len(lengths) > 1:
    raise labels_lib.LabelFileError(f"{where}: the languages have different numbers of class "
                                    f"names {sorted(lengths)}; every list needs one entry per "
                                    "class (null where a language lacks it).")
  if lengths:
    return lengths.pop()
  keys = [int(k) for v in raw_names.values() if isinstance(v, dict) for k in v if k.isdigit()]
  return max([int(labels.max())] + keys) + 1


class ZeroShot:
  """Zero-shot classification of one labelled set, per language (Babel-ImageNet protocol)."""

  def __init__(self, spec: specs.EvalSpec, config: ml_collections.ConfigDict, towers: Towers,
               model_name: str, embedded_task: str | None = None):
    self.spec, self.towers, self.model_name = spec, towers, model_name
    self.groups = None
    if spec.kind == "embedded":
      from big_clip.data import sources

      n = spec.limit or config.eval.num_images
      images, self.labels = sources.zeroshot_set(embedded_task, n, seed=config.seed,
                                                 image_size=config.data.image_size)
      self.name = f"embedded_{embedded_task}"
      self.images = datasets.array_set(images, self.name)
      self.languages = spec.languages or list(config.data.languages)
      classnames = {l: sources.zeroshot_classnames(embedded_task, l) for l in self.languages}
      templates = {l: sources.zeroshot_templates(embedded_task, l) for l in self.languages}
    else:
      data = datasets.labelled_set(spec, towers.image_size)
      self.name = spec.options.get("name", data.name)
      self.images, self.labels = data.images, data.labels
      path = spec.options.get("classnames")
      if path:
        where = f"eval {spec.text!r}, class-name file {path!r}"
        raw = labels_lib.read_json_object(path, "class-name")
        k = data.num_classes or _num_classes(raw, data.labels, where)
        if data.labels.max() >= k:
          raise labels_lib.LabelFileError(
              f"{where}: the data has label {int(data.labels.max())} but the file names "
              f"{k} classes; give one name (or null) per class 0..{int(data.labels.max())}.")
        classnames = labels_lib.parse_classnames(raw, k, where)
      elif data.classnames is not None:
        classnames = data.classnames
      else:
        raise ValueError(f"eval {spec.text!r}: the data has no class names; add "
                         "classnames=FILE ({lang: [name, ...]}, see big_clip/evals/labels.py).")
      unknown = sorted(set(spec.languages or []) - set(classnames))
      if unknown:
        raise ValueError(f"eval {spec.text!r}: languages {unknown} have no class names; "
                         f"the class-name languages are {sorted(classnames)}.")
      self.languages = spec.languages or list(classnames)
      templates = labels_lib.load_templates(spec.options.get("templates"), list(classnames))
      if "groups" in spec.options:
        self.groups = labels_lib.load_groups(spec.options["groups"], list(classnames))
    # Per language: its classes, and the tokens of every (class, template) prompt, once.
    self.classes, self.tokens = {}, {}
    for lang in self.languages:
      names = classnames[lang]
      self.classes[lang] = np.asarray([k for k, c in enumerate(names) if c is not None])
      prompts = [t.replace("{c}", names[k]) for k in self.classes[lang] for t in templates[lang]]
      self.tokens[lang] = towers.tokenizer.encode(prompts)

  def run(self, params) -> list[dict]:
    img_emb, ok = self.towers.images(params, self.images, f"{self.name}: images")
    skipped = [self.images.names[i] for i in np.flatnonzero(~ok)]
    rows = []
    for lang in self.languages:
      classes = self.classes[lang]
      # Babel-ImageNet: only the images of this language's classes, K-way among them.
      keep = ok & np.isin(self.labels, classes)
      if not keep.any():
        logging.warning("%s/%s: no image of the %d classes this language names; skipped.",
                        self.name, lang, len(classes))
        continue
      position = np.full(int(max(classes.max(), self.labels.max())) + 1, -1)
      position[classes] = np.arange(len(classes))
      cls_emb = class_embeddings(self.towers, params, self.tokens[lang], len(classes))
      metrics = classification_metrics(img_emb[keep] @ cls_emb.T,
                                       position[self.labels[keep]])
      metrics["chance"] = 1.0 / len(classes)
      extra = {"num_images": int(keep.sum()), "num_classes": len(classes)}
      if skipped:
        extra["skipped_images"] = skipped
      rows.append(_record(self.name, self.model_name, ZEROSHOT, lang, metrics, **extra))
    return rows + _aggregates(rows, self.groups)


# ---------------------------------------------------------------------------------------------
# Retrieval.
# ---------------------------------------------------------------------------------------------
class Retrieval:
  """Image-text retrieval on a captioned manifest, per language."""

  def __init__(self, spec: specs.EvalSpec, towers: Towers, model_name: str):
    self.spec, self.towers, self.model_name = spec, towers, model_name
    data = datasets.captioned_set(spec, towers.image_size)
    self.name = spec.options.get("name", data.name)
    self.images = data.images
    unknown = sorted(set(spec.languages or []) - set(data.languages))
    if unknown:
      raise ValueError(f"eval {spec.text!r}: languages {unknown} have no captions in "
                       f"{spec.location!r}; its languages: {data.languages}.")
    self.languages = spec.languages or data.languages
    # Per language: every caption's tokens and the image it belongs to, tokenized once.
    self.tokens, self.owner = {}, {}
    for lang in self.languages:
      pairs = [(i, c) for i, caps in enumerate(data.captions) for c in caps.get(lang, [])]
      self.owner[lang] = np.asarray([i for i, _ in pairs])
      self.tokens[lang] = towers.tokenizer.encode([c for _, c in pairs])

  def run(self, params) -> list[dict]:
    img_emb, ok = self.towers.images(params, self.images, f"{self.name}: images")
    skipped = [self.images.names[i] for i in np.flatnonzero(~ok)]
    rows = []
    for lang in self.languages:
      owner = self.owner[lang]
      keep_text = ok[owner]
      images = np.unique(owner[keep_text])  # images with a caption in this language
      if not len(images):
        logging.warning("%s/%s: no decodable image has a caption; skipped.", self.name, lang)
        continue
      txt_emb = self.towers.texts(params, self.tokens[lang], desc=f"{self.name}: {lang} texts")
      scores = img_emb[images] @ txt_emb[keep_text].T
      text_to_image = np.searchsorted(images, owner[keep_text])
      extra = {"num_images": len(images), "num_texts": int(keep_text.sum())}
      if skipped:
        extra["skipped_images"] = skipped
      rows.append(_record(self.name, self.model_name, RETRIEVAL, lang,
                          metrics_lib.retrieval_metrics(scores, text_to_image), **extra))
    return rows + _aggregates(rows, None)


# ---------------------------------------------------------------------------------------------
# The suite: every eval of a config.
# ---------------------------------------------------------------------------------------------
class Suite:
  """Builds each evaluator once (data read, prompts tokenized); `run(params)` evaluates."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer, graphdef: nnx.GraphDef,
               mesh: jax.sharding.Mesh, model_name: str, evals: Sequence[str] | None = None):
    towers = Towers.build(config, tokenizer, graphdef, mesh)
    self.mesh = mesh
    self.evaluators = []
    for text in (config.evals if evals is None else evals):
      spec = specs.parse(text)
      if spec.kind == "embedded":
        # Bare 'zeroshot:embedded': config.eval.zeroshot_tasks, when training on the embedded
        # data (a model trained on other data does not know its words).
        if not spec.location and config.data.source != "embedded":
          logging.info("eval %r: skipped, config.data.source is %r.", text, config.data.source)
          continue
        for task in ([spec.location] if spec.location else config.eval.zeroshot_tasks):
          self.evaluators.append(ZeroShot(spec, config, towers, model_name, task))
      elif spec.task == "zeroshot":
        self.evaluators.append(ZeroShot(spec, config, towers, model_name))
      else:
        self.evaluators.append(Retrieval(spec, towers, model_name))
    if config.eval.get("long_caption_images", 0):  # image <-> long caption (Long-CLIP)
      from big_clip import eval_long
      self.evaluators.append(eval_long.LongCaptionRetrieval(config, towers, model_name))

  def run(self, params: Any) -> list[dict]:
    with jax.set_mesh(self.mesh):
      return [r for e in self.evaluators for r in e.run(params)]


def write_records(records: list[dict], out_dir: str, *, step: int | None = None,
                  filename: str = "results.jsonl", history: bool = True) -> None:
  """`filename` holds the latest evaluation (with its step); `history.jsonl` every one."""
  if jax.process_index() != 0 or not records:
    return
  if step is not None:
    records = [{**r, "step": step} for r in records]
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, filename)
  with open(path + ".tmp", "w") as f:
    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
  os.replace(path + ".tmp", path)
  if history and step is not None:
    with open(os.path.join(out_dir, "history.jsonl"), "a") as f:
      f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def records_to_scalars(records: list[dict]) -> dict[str, float]:
  out = {}
  for r in records:
    for k, v in r["metrics"].items():
      if k != "chance":
        out[f"{r['dataset']}/{r['language']}/{k}"] = v
  return out


_RETRIEVAL_COLUMNS = [(f"{way}_retrieval_recall@{k}", f"{arrow} R@{k}")
                      for way, arrow in (("image", "T>I"), ("text", "I>T")) for k in (1, 5, 10)]


def _zeroshot_table(rows: list[dict]) -> list[str]:
  """Languages as rows, datasets as columns: acc1 (and x chance); acc5 etc. are in the JSON."""
  datasets_ = list(dict.fromkeys(r["dataset"] for r in rows))
  languages = list(dict.fromkeys(r["language"] for r in rows))
  cell = {(r["dataset"], r["language"]): r["metrics"] for r in rows}
  width = max(8, *map(len, languages))
  lines = [f"{'language':<{width}}  " + "  ".join(f"{d:>24}" for d in datasets_)]
  for lang in languages:
    row = []
    for d in datasets_:
      m = cell.get((d, lang))
      row.append(f"{100 * m['acc1']:8.1f}% ({m['acc1'] / m['chance']:4.1f}x chance)" if m
                 else "-")
    lines.append(f"{lang:<{width}}  " + "  ".join(f"{c:>24}" for c in row))
  return lines


def _retrieval_table(rows: list[dict]) -> list[str]:
  """A row per (dataset, language): recall@1/5/10 text->image, then image->text."""
  width = max(len(f"{r['dataset']}  {r['language']}") for r in rows) + 2
  lines = [f"{'retrieval  language':<{width}}" + "".join(f"{n:>10}" for _, n in _RETRIEVAL_COLUMNS)]
  for r in rows:
    cells = "".join(f"{100 * r['metrics'][k]:9.1f}%" for k, _ in _RETRIEVAL_COLUMNS)
    lines.append(f"{r['dataset'] + '  ' + r['language']:<{width}}{cells}")
  return lines


def print_table(records: list[dict], title: str = "zero-shot evaluation") -> str:
  """Zero-shot accuracy (languages x datasets) and retrieval recall; returns the text too."""
  if not records:
    return ""
  lines = [title]
  zeroshot = [r for r in records if r["task"] == ZEROSHOT]
  retrieval = [r for r in records if r["task"] == RETRIEVAL]
  if zeroshot:
    lines += _zeroshot_table(zeroshot)
  if retrieval:
    lines += ([""] if zeroshot else []) + _retrieval_table(retrieval)
  text = "\n".join(lines)
  if jax.process_index() == 0:
    print(text, flush=True)
  return text


# ---------------------------------------------------------------------------------------------
FLAGS = flags.FLAGS


def find_checkpoint(path: str) -> tuple[str, int | None, str]:
  """(checkpoints folder, step or None for the latest, workdir) of a step folder
  (WORKDIR/checkpoints/STEP), a checkpoints folder or a workdir."""
  path = os.path.abspath(path.rstrip("/"))
  base = os.path.basename(path)
  if base.isdigit() and os.path.isdir(path):
    return os.path.dirname(path), int(base), os.path.dirname(os.path.dirname(path))
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return os.path.join(path, "checkpoints"), None, path
  if base == "checkpoints" and os.path.isdir(path):
    return path, None, os.path.dirname(path)
  raise FileNotFoundError(f"--checkpoint {path!r} is not a checkpoint step folder "
                          "(WORKDIR/checkpoints/STEP) or a workdir with a checkpoints/ folder.")


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, *,
                        checkpoint: str | None = None, step: int | None = None,
                        evals: Sequence[str] | None = None, output: str | None = None,
                        model_name: str = "big_clip") -> list[dict]:
  """What the binary does: restore the params, run the suite, write and print the results."""
  from big_clip import checkpoints, train
  from big_clip import config as config_lib

  if evals:
    config = config.copy_and_resolve_references()
    config.evals = tuple(evals)
  config_lib.validate(config)
  ckpt_dir, ckpt_step, ckpt_workdir = find_checkpoint(checkpoint or workdir)
  workdir = workdir or ckpt_workdir
  step = ckpt_step if step is None else step
  mesh = sharding.make_mesh(dict(data=config.mesh.data, fsdp=config.mesh.fsdp,
                                 tensor=config.mesh.tensor))
  tokenizer = train.build_tokenizer(config, workdir)
  graphdef, abs_params, shardings = train.abstract_params(config, mesh)
  abs_params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abs_params, shardings)
  mngr = checkpoints.manager(ckpt_dir, keep=config.checkpoint.keep, use_async=False)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"No checkpoint in {ckpt_dir}; train first with "
                            "python -m big_clip.train --config ... --workdir ...")
  params = checkpoints.restore_params(mngr, step, abs_params)
  records = Suite(config, tokenizer, graphdef, mesh, model_name).run(params)
  output = output or os.path.join(workdir, "eval", "results.jsonl")
  write_records(records, os.path.dirname(os.path.abspath(output)), step=step,
                filename=os.path.basename(output), history=False)
  print_table(records, title=f"{model_name}, checkpoint step {step}")
  logging.info("Wrote %d records to %s", len(records), output)
  return [{**r, "step": step} for r in records]


def main(argv: list[str]) -> None:
  del argv
  from ml_collections import config_flags

  from big_clip.train import _QuietLibraries, config_name

  logging.get_absl_handler().addFilter(_QuietLibraries())
  if FLAGS.workdir is None and FLAGS.checkpoint is None:
    raise app.UsageError("Give --workdir DIR (its latest checkpoint) or --checkpoint PATH.")
  evaluate_checkpoint(FLAGS.config, FLAGS.workdir, checkpoint=FLAGS.checkpoint, step=FLAGS.step,
                      evals=FLAGS.eval, output=FLAGS.output,
                      model_name=config_name(config_flags.get_config_filename(FLAGS["config"])))


if __name__ == "__main__":
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "The training config file.")
  flags.DEFINE_string("workdir", None, "The training workdir (its latest checkpoint is used).")
  flags.DEFINE_string("checkpoint", None, "A checkpoint step folder or a workdir; overrides "
                      "--workdir for the checkpoint (the tokenizer comes from its workdir).")
  flags.DEFINE_integer("step", None, "Evaluate this checkpoint step instead of the latest.")
  flags.DEFINE_multi_string("eval", None, "An eval spec (repeatable), replacing config.evals; "
                            "e.g. retrieval:manifest:PATH:test (see big_clip/evals/specs.py).")
  flags.DEFINE_string("output", None, "The results file (default WORKDIR/eval/results.jsonl).")
  flags.mark_flags_as_required(["config"])
  app.run(main)
