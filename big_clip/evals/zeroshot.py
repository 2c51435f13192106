"""Zero-shot classification per language (CLIP §3.1.2; Babel-ImageNet protocol).

Each class is embedded as the renormalized mean of its normalized prompt embeddings in that
language (prompt ensembling); an image gets the class with the highest cosine similarity. A
language that names only some classes is scored on the images of those classes, K-way among
them. Means over languages and over language groups are added.
"""

from __future__ import annotations

import ml_collections
import numpy as np
from absl import logging

from big_clip.data import embedded
from big_clip.evals import datasets
from big_clip.evals import labels as labels_lib
from big_clip.evals import metrics as metrics_lib
from big_clip.evals import records, specs
from big_clip.evals import towers as towers_lib


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


class Evaluator:
  """Zero-shot classification of one labelled set, per language (Babel-ImageNet protocol)."""

  SOURCES = specs.SOURCE_KINDS
  OPTIONS = ("classnames", "templates", "groups", "languages", "data_dir", "limit", "name")

  @classmethod
  def build(cls, spec: specs.EvalSpec, config: ml_collections.ConfigDict, towers: towers_lib.Towers,
            model_name: str) -> list[Evaluator]:
    """One evaluator per labelled set; bare 'zeroshot:embedded' is config.eval.zeroshot_tasks
    when training on the embedded data (a model trained on other data does not know its
    words), none otherwise."""
    if spec.kind != "embedded":
      return [cls(spec, config, towers, model_name)]
    if not spec.location and config.data.source != "embedded":
      logging.info("eval %r: skipped, config.data.source is %r.", spec.text, config.data.source)
      return []
    return [cls(spec, config, towers, model_name, task)
            for task in ([spec.location] if spec.location else config.eval.zeroshot_tasks)]

  def __init__(self, spec: specs.EvalSpec, config: ml_collections.ConfigDict, towers: towers_lib.Towers,
               model_name: str, embedded_task: str | None = None):
    self.spec, self.towers, self.model_name = spec, towers, model_name
    self.groups = None
    if spec.kind == "embedded":
      n = spec.limit or config.eval.num_images
      images, self.labels = embedded.zeroshot_set(embedded_task, n, seed=config.seed,
                                                 image_size=config.data.image_size)
      self.name = f"embedded_{embedded_task}"
      self.images = datasets.array_set(images, self.name)
      self.languages = spec.languages or list(config.data.languages)
      classnames = {l: embedded.zeroshot_classnames(embedded_task, l) for l in self.languages}
      templates = {l: embedded.zeroshot_templates(embedded_task, l) for l in self.languages}
    else:
      data = datasets.labelled_set(spec, towers.image_size, towers.crop)
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
      cls_emb = towers_lib.class_embeddings(self.towers, params, self.tokens[lang], len(classes))
      metrics = metrics_lib.classification_metrics(img_emb[keep] @ cls_emb.T,
                                       position[self.labels[keep]])
      metrics["chance"] = 1.0 / len(classes)
      extra = {"num_images": int(keep.sum()), "num_classes": len(classes)}
      if skipped:
        extra["skipped_images"] = skipped
      rows.append(records.record(self.name, self.model_name, records.ZEROSHOT, lang, metrics, **extra))
    return rows + records.aggregates(rows, self.groups)
