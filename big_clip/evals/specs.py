"""Eval spec strings: which evaluation to run on which data, as one string per eval.

    TASK:SOURCE[,key=value...]

TASK names an evaluator: the module `big_clip/evals/<TASK>.py`, whose class `Evaluator`
declares the sources it reads (`SOURCES`) and the options it takes (`OPTIONS`); adding an
evaluator is adding such a file. Shipped: `zeroshot` (classification), `retrieval`
(image <-> text), `long_captions` (image <-> long caption, Long-CLIP), `regions` (box <->
region caption, CLOC) and `fine_grained` (the right caption among its attribute swaps,
FG-CLIP). SOURCE is one of

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
    long_captions:embedded,limit=200
    regions:embedded,limit=100
    fine_grained:embedded,languages=en+zh
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any

from big_clip import evals as evals_package
from big_clip.errors import UserError

SOURCE_KINDS = ("embedded", "manifest", "tfds", "folder")


class SpecError(UserError, ValueError):
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


def evaluator(task: str) -> Any:
  """The `Evaluator` class of `big_clip/evals/<task>.py`; SpecError for an unknown task."""
  try:
    module = (importlib.import_module(f"big_clip.evals.{task}")
              if task.isidentifier() else None)
  except ModuleNotFoundError:
    module = None
  if module is None or not hasattr(module, "Evaluator"):
    raise SpecError(f"unknown task {task!r}; allowed: {', '.join(tasks())}")
  return module.Evaluator


def tasks() -> list[str]:
  """Every evaluator module of big_clip/evals/ (those that define `Evaluator`)."""
  names = [m.name for m in pkgutil.iter_modules(evals_package.__path__)]
  return [n for n in names
          if hasattr(importlib.import_module(f"big_clip.evals.{n}"), "Evaluator")]


def parse(text: str) -> EvalSpec:
  """Parses one spec; raises SpecError naming the spec and what is allowed."""
  if not isinstance(text, str):
    raise SpecError(f"eval spec {text!r} must be a string like 'zeroshot:embedded:colour'.")
  body, *option_parts = text.split(",")
  task, _, source = body.partition(":")
  try:
    cls = evaluator(task)
  except SpecError as e:
    raise SpecError(f"eval spec {text!r}: {e} (e.g. 'zeroshot:embedded:colour', "
                    "'retrieval:manifest:PATH:test').") from None
  kind, _, rest = source.partition(":")
  if kind not in cls.SOURCES:
    raise SpecError(f"eval spec {text!r}: source {kind!r} is not allowed for {task}; allowed: "
                    f"{', '.join(k + ':...' for k in cls.SOURCES)}.")
  options = {}
  for part in option_parts:
    key, eq, value = part.partition("=")
    allowed = cls.OPTIONS
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
