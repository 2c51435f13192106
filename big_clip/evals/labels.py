"""Class-name, prompt-template and language-group files for zero-shot classification.

    classnames: {"en": ["airplane", ...], "de": ["Flugzeug", null, ...]}   K names, null where
                or {"de": {"0": "Flugzeug", "7": "Pferd"}}                  a language lacks a class
    templates:  {"en": ["a photo of a {c}.", ...], "de": [...]}            '{c}': the class name
    groups:     {"high": ["en", "de"], "low": ["sw"]}                      e.g. Babel-ImageNet's
                                                                           resource groups

A language whose names cover only some classes is evaluated on those classes only
(Babel-ImageNet protocol, Geigle et al. 2024 §3): its images, K-way among its K classes.
Shipped files live in `big_clip/evals/data/` (CIFAR-10 names in seven languages, OpenAI's
CIFAR-10 and ImageNet templates).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

from absl import logging

from big_clip.errors import UserError

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DEFAULT_TEMPLATES = os.path.join(DATA_DIR, "openai_imagenet_templates.json")
FALLBACK_LANGUAGE = "en"


class LabelFileError(UserError, ValueError):
  """A class-name, template or group file that does not fit the format or the dataset."""


def read_json_object(path: str, what: str) -> dict:
  import tensorflow as tf  # gfile: local paths and gs://

  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"{what} file {path!r} does not exist (see big_clip/evals/labels.py "
                            f"for the format; shipped files are in {DATA_DIR}).")
  with tf.io.gfile.GFile(path) as f:
    try:
      raw = json.load(f)
    except json.JSONDecodeError as e:
      raise LabelFileError(f"{what} file {path!r} is not valid JSON: {e}") from e
  if not isinstance(raw, dict) or not raw:
    raise LabelFileError(f"{what} file {path!r} must be a non-empty JSON object keyed by "
                         "language.")
  return raw


def parse_classnames(raw: Mapping, num_classes: int, where: str
                     ) -> dict[str, list[str | None]]:
  """{lang: [name or None] * num_classes} from either format; checks K against the data."""
  out = {}
  for lang, names in raw.items():
    if isinstance(names, list):
      if len(names) != num_classes:
        raise LabelFileError(
            f"{where}: language {lang!r} has {len(names)} class names but the dataset has "
            f"{num_classes} classes (labels 0..{num_classes - 1}); give one entry per class, "
            "null where the language lacks the class, or use {\"index\": name}.")
      full = list(names)
    elif isinstance(names, dict):
      full = [None] * num_classes
      for key, name in names.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < num_classes):
          raise LabelFileError(f"{where}: language {lang!r}: class index {key!r} is not an "
                               f"integer in 0..{num_classes - 1} (the dataset's labels).")
        full[int(key)] = name
    else:
      raise LabelFileError(f"{where}: language {lang!r} must map to a list of names or to "
                           f"{{index: name}}, got {type(names).__name__}.")
    bad = [n for n in full if n is not None and (not isinstance(n, str) or not n.strip())]
    if bad:
      raise LabelFileError(f"{where}: language {lang!r} has class names that are not "
                           f"non-empty strings: {bad[:3]!r}.")
    if all(n is None for n in full):
      raise LabelFileError(f"{where}: language {lang!r} names no class.")
    out[lang] = full
  return out


def load_classnames(path: str, num_classes: int) -> dict[str, list[str | None]]:
  return parse_classnames(read_json_object(path, "class-name"), num_classes,
                          f"class-name file {path!r}")


def parse_templates(raw: Mapping, languages: Sequence[str], where: str
                    ) -> dict[str, list[str]]:
  """{lang: templates} for every language in `languages`; English fills in for a language
  the file does not cover (logged). Unknown languages in the file are errors (a typo would
  otherwise silently fall back to English)."""
  unknown = sorted(set(raw) - set(languages) - {FALLBACK_LANGUAGE})
  if unknown:
    raise LabelFileError(f"{where}: languages {unknown} have templates but no class names "
                         f"(class-name languages: {sorted(languages)}); fix the language code "
                         "or add its class names.")
  for lang, templates in raw.items():
    if (not isinstance(templates, list) or not templates or
        not all(isinstance(t, str) and "{c}" in t for t in templates)):
      raise LabelFileError(f"{where}: language {lang!r} needs a non-empty list of template "
                           "strings, each with a '{c}' slot for the class name.")
  missing = [l for l in languages if l not in raw]
  if missing and FALLBACK_LANGUAGE not in raw:
    raise LabelFileError(f"{where}: no templates for {missing} and no English ('en') "
                         "templates to fall back on.")
  if missing:
    logging.warning("%s: no templates for %s; using the English templates for them.", where,
                    missing)
  return {l: list(raw.get(l, raw.get(FALLBACK_LANGUAGE))) for l in languages}


def load_templates(path: str | None, languages: Sequence[str]) -> dict[str, list[str]]:
  path = path or DEFAULT_TEMPLATES
  return parse_templates(read_json_object(path, "template"), languages, f"template file {path!r}")


def load_groups(path: str, languages: Sequence[str]) -> dict[str, list[str]]:
  """{group: [languages]}; every language must be one with class names (typos are errors)."""
  where = f"language-group file {path!r}"
  raw = read_json_object(path, "language-group")
  for group, members in raw.items():
    if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
      raise LabelFileError(f"{where}: group {group!r} must be a list of language codes.")
    unknown = sorted(set(members) - set(languages))
    if unknown:
      raise LabelFileError(f"{where}: group {group!r} names {unknown}, which have no class "
                           f"names (class-name languages: {sorted(languages)}).")
  return {g: list(m) for g, m in raw.items()}
