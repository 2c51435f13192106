r"""What is in these photos? Zero-shot labels (or ranked captions) for image files.

  python -m big_clip.predict --model /tmp/big_clip_default --images photo.png photos/ \
      --labels "red,green,blue" [--templates FILE] [--top_k 3] [--json]
  python -m big_clip.predict --model hf:/tmp/export_hf --images photos/ \
      --labels_file names.json          # {"en": ["cat", "dog"], "de": ["Katze", "Hund"]}
  python -m big_clip.predict --model open_clip:/tmp/oc --images a.jpg \
      --texts "a red circle." --texts "two blue squares."

--model is anything `big_clip.load` takes (a workdir, hf:PATH, open_clip:PATH). Folders are
walked for image files; a file that cannot be read or decoded is reported on one line and
skipped. Labels are scored by prompt ensembling as the eval binary does (templates: OpenAI's
80 ImageNet prompts unless --templates names a JSON file: a list, or {language: [...]}, each
with a '{c}' slot); --texts ranks the given captions instead. Output: a table, or with --json
one JSON line per image: {"image", "predictions": {language or "texts": [{"label",
"probability"}, ...]}}.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

import numpy as np
from absl import flags, logging

from big_clip import api, cli, fileio
from big_clip.errors import UserError
from big_clip.evals import datasets, labels

FLAGS = flags.FLAGS
TEXTS = "texts"


class PredictError(UserError, ValueError):
  """A predict command line that cannot run: names the flag and the fix."""


def image_paths(inputs: Sequence[str]) -> list[str]:
  """Files as given; folders walked (sorted) for files with an image extension."""
  out = []
  for path in inputs:
    if fileio.isdir(path):
      for root, dirs, files in fileio.walk(path):
        dirs.sort()
        out += [os.path.join(root, f) for f in sorted(files)
                if f.lower().endswith(datasets.IMAGE_EXTENSIONS)]
    else:
      out.append(path)
  return out


def read_labels(labels_csv: Sequence[str] | None, labels_file: str | None
                ) -> list[str] | dict[str, list[str]]:
  """--labels a,b,c (a list, English prompts) or --labels_file: a JSON list or
  {language: [names]}."""
  if bool(labels_csv) == bool(labels_file):
    raise PredictError("give exactly one of --labels a,b,c, --labels_file FILE.json or "
                       "--texts CAPTION (repeatable).")
  if labels_csv:
    return [l.strip() for l in labels_csv if l.strip()]
  if not fileio.exists(labels_file):
    raise FileNotFoundError(f"--labels_file {labels_file!r} does not exist.")
  try:
    raw = fileio.read_json(labels_file)
  except json.JSONDecodeError as e:
    raise PredictError(f"--labels_file {labels_file!r} is not valid JSON: {e}") from e
  if isinstance(raw, list):
    return raw
  if isinstance(raw, dict) and raw:
    return raw
  raise PredictError(f"--labels_file {labels_file!r} must be a JSON list of names or "
                     '{"language": [names], ...}.')


def read_templates(path: str | None) -> list[str] | dict[str, list[str]] | None:
  if path is None:
    return None
  if not fileio.exists(path):
    raise FileNotFoundError(f"--templates {path!r} does not exist.")
  try:
    raw = fileio.read_json(path)
  except json.JSONDecodeError as e:
    raise PredictError(f"--templates {path!r} is not valid JSON: {e}") from e
  if not isinstance(raw, (list, dict)) or not raw:
    raise PredictError(f"--templates {path!r} must be a JSON list of templates with a '{{c}}' "
                       'slot, or {"language": [templates], ...}.')
  return raw


def top_k(probs: np.ndarray, names: Sequence[str], k: int) -> list[dict]:
  order = np.argsort(-probs, kind="stable")[:k]
  return [{"label": names[i], "probability": round(float(probs[i]), 6)} for i in order]


def predict(model: api.Model, paths: Sequence[str], *, classnames=None, templates=None,
            texts: Sequence[str] | None = None, k: int = 5) -> tuple[list[dict], dict[str, str]]:
  """([{"image", "predictions": {language or 'texts': top-k}}] of the readable images,
  {path: why} of the skipped ones)."""
  emb, failed = model.embed_images(paths)
  keep = [i for i in range(len(paths)) if i not in failed]
  skipped = {paths[i]: failed[i] for i in sorted(failed)}  # input order
  if not keep:
    return [], skipped
  emb = emb[keep]
  if texts:
    per = {TEXTS: (model.probabilities(emb, model.encode_text(list(texts))), list(texts))}
  else:
    probs = model.classify(emb, classnames, templates)
    if isinstance(classnames, dict):
      per = {lang: (probs[lang], classnames[lang]) for lang in classnames}
    else:
      per = {labels.FALLBACK_LANGUAGE: (probs, list(classnames))}
  rows = [{"image": paths[i],
           "predictions": {key: top_k(p[row], names, k) for key, (p, names) in per.items()}}
          for row, i in enumerate(keep)]
  return rows, skipped


def print_table(rows: list[dict]) -> None:
  width = max(len(r["image"]) for r in rows)
  for r in rows:
    for key, preds in r["predictions"].items():
      cells = "  ".join(f"{p['label']} {100 * p['probability']:.1f}%" for p in preds)
      print(f"{r['image']:<{width}}  {key:<6} {cells}")


def main(argv: list[str]) -> None:
  logging.set_verbosity(logging.ERROR)  # skipped images get one line each, below
  paths = image_paths(list(FLAGS.images or []) + list(argv[1:]))
  if not paths:
    raise PredictError("no images: give --images PATH... (files or folders of "
                       f"{'/'.join(datasets.IMAGE_EXTENSIONS)} files).")
  texts = list(FLAGS.texts or [])
  if FLAGS.texts_file:
    texts += [line.strip() for line in fileio.read_text(FLAGS.texts_file).splitlines()
              if line.strip()]
  classnames = None if texts and not (FLAGS.labels or FLAGS.labels_file) else read_labels(
      FLAGS.labels, FLAGS.labels_file)
  if texts and classnames is not None:
    raise PredictError("give labels (--labels / --labels_file) or captions (--texts), not both.")
  if FLAGS.top_k < 1:
    raise PredictError(f"--top_k={FLAGS.top_k}; give 1 or more.")
  model = api.load(FLAGS.model, step=FLAGS.step, ema=not FLAGS.no_ema)
  rows, skipped = predict(model, paths, classnames=classnames,
                          templates=read_templates(FLAGS.templates), texts=texts, k=FLAGS.top_k)
  for path, why in skipped.items():
    print(f"big_clip.predict: skipped {path}: {' '.join(why.split())}", file=sys.stderr)
  if FLAGS.json:
    for r in rows:
      print(json.dumps(r, ensure_ascii=False))
  elif rows:
    print_table(rows)
  if not rows:
    raise PredictError(f"none of the {len(paths)} images could be read.")


def run() -> None:
  flags.DEFINE_string("model", None, "A big_clip workdir, hf:PATH or open_clip:PATH.")
  flags.DEFINE_integer("step", None, "The workdir's checkpoint step (default: the newest).")
  flags.DEFINE_bool("no_ema", False, "Use the workdir's raw weights, not the weight EMA the "
                    "run kept (config.optim.ema_decay > 0).")
  flags.DEFINE_multi_string("images", None, "Image files or folders (repeatable; further "
                            "paths after the flags count too).")
  flags.DEFINE_list("labels", None, "Comma-separated class names (English prompts).")
  flags.DEFINE_string("labels_file", None, 'JSON: a list of names or {"lang": [names]}.')
  flags.DEFINE_string("templates", None, "JSON: a list of prompt templates with a '{c}' slot, "
                      'or {"lang": [templates]} (default: OpenAI\'s ImageNet prompts).')
  flags.DEFINE_multi_string("texts", None, "A caption to rank (repeatable), instead of labels.")
  flags.DEFINE_string("texts_file", None, "Captions to rank, one per line.")
  flags.DEFINE_integer("top_k", 5, "How many labels (or captions) to show per image.")
  flags.DEFINE_bool("json", False, "One JSON line per image instead of a table.")
  flags.mark_flag_as_required("model")
  cli.run(main, "big_clip.predict")


if __name__ == "__main__":
  run()
