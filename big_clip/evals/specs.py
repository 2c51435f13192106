"""Eval spec strings: which evaluation to run on which data, as one string per eval.

    TASK:SOURCE[,key=value...]

TASK is `zeroshot` (classification) or `retrieval`. SOURCE is one of

    embedded[:TASK]          the embedded synthetic data (zeroshot; colour / shape, or all of
                             config.eval.zeroshot_tasks when no task is named)
    manifest:PATH[:SPLIT]    a manifest file (big_clip/data/manifest.py); zeroshot reads the
                             items' `label`, retrieval their captions per language
    tfds:NAME[:SPLIT]        a TensorFlow Datasets dataset (zeroshot; e.g. tfds:cifar10:test)
    folder:PATH              an image folder, one subfolder per class, classes in sorted order

Options (after commas): classnames=FILE, templates=FILE, groups=FILE (JSON files, see
`evals/labels.py`), languages=en+de (a subset, `+`-separated), data_dir=DIR (tfds),
limit=N (the first N images), name=NAME (the dataset name in the results).

    zeroshot:tfds:cifar10:test,data_dir=/data/tfds,classnames=cifar10_classnames.json
    retrieval:manifest:/data/flickr8k_multi30k/manifest.json:test,languages=en+de

This module imports nothing heavy: `config.validate()` parses every spec of `config.evals`.
"""

from __future__ import annotations

import dataclasses

TASKS = ("zeroshot", "retrieval")
SOURCE_KINDS = ("embedded", "manifest", "tfds", "folder")
# Which task may read which source (retrieval needs captions: only manifests have them).
ALLOWED = {"zeroshot": SOURCE_KINDS, "retrieval": ("manifest",)}
OPTIONS = ("classnames", "templates", "groups", "languages", "data_dir", "limit", "name")
_RETRIEVAL_OPTIONS = ("languages", "limit", "name")


class SpecError(ValueError):
  """An eval spec string that does not follow the grammar above."""


@dataclasses.dataclass(frozen=True)
class EvalSpec:
  text: str                   # the spec as written, for messages
  task: str                   # 'zeroshot' | 'retrieval'
  kind: str                   # 'embedded' | 'manifest' | 'tfds' | 'folder'
  location: str               # path, tfds name or embedded task ('' = all configured tasks)
  split: str | None           # manifest / tfds split
  options: dict[str, str]

  @property
  def languages(self) -> list[str] | None:
    value = self.options.get("languages")
    return value.split("+") if value else None

  @property
  def limit(self) -> int | None:
    return int(self.options["limit"]) if "limit" in self.options else None


def _split_location(rest: str) -> tuple[str, str | None]:
  """'PATH:SPLIT' -> (PATH, SPLIT); a trailing part with a '/' is a path (gs://b/x.json)."""
  head, sep, tail = rest.rpartition(":")
  if sep and head and tail and "/" not in tail:
    return head, tail
  return rest, None


def parse(text: str) -> EvalSpec:
  """Parses one spec; raises SpecError naming the spec and what is allowed."""
  if not isinstance(text, str):
    raise SpecError(f"eval spec {text!r} must be a string like 'zeroshot:embedded:colour'.")
  body, *option_parts = text.split(",")
  task, _, source = body.partition(":")
  if task not in TASKS:
    raise SpecError(f"eval spec {text!r}: unknown task {task!r}; allowed: {', '.join(TASKS)} "
                    "(e.g. 'zeroshot:embedded:colour', 'retrieval:manifest:PATH:test').")
  kind, _, rest = source.partition(":")
  if kind not in ALLOWED[task]:
    raise SpecError(f"eval spec {text!r}: source {kind!r} is not allowed for {task}; allowed: "
                    f"{', '.join(k + ':...' for k in ALLOWED[task])}.")
  options = {}
  for part in option_parts:
    key, eq, value = part.partition("=")
    allowed = _RETRIEVAL_OPTIONS if task == "retrieval" else OPTIONS
    if not eq or key not in allowed or not value:
      raise SpecError(f"eval spec {text!r}: bad option {part!r}; options are key=value with "
                      f"key in {', '.join(allowed)}.")
    options[key] = value
  if "limit" in options and not (options["limit"].isdigit() and int(options["limit"]) > 0):
    raise SpecError(f"eval spec {text!r}: limit={options['limit']!r} must be a positive integer.")
  if kind == "embedded":
    location, split = rest, None
  elif kind in ("manifest", "tfds"):
    location, split = _split_location(rest)
  else:
    location, split = rest, None
  if kind != "embedded" and not location:
    raise SpecError(f"eval spec {text!r}: {kind}: needs a location, e.g. '{task}:{kind}:PATH'.")
  return EvalSpec(text=text, task=task, kind=kind, location=location, split=split,
                  options=options)
