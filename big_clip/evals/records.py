"""Eval results: CLIP_benchmark-style records (one per dataset x language x task), their
means over languages and language groups, the JSON-lines files and the printed tables."""

from __future__ import annotations

import json
import os

import jax
from absl import logging

from big_clip import fileio
from big_clip.evals import metrics as metrics_lib

ZEROSHOT, RETRIEVAL = "zeroshot_classification", "zeroshot_retrieval"


def record(dataset: str, model: str, task: str, language: str, metrics: dict, **extra) -> dict:
  return {"dataset": dataset, "model": model, "task": task, "language": language,
          "metrics": metrics, **extra}


def aggregates(rows: list[dict], groups: dict[str, list[str]] | None) -> list[dict]:
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
    out.append(record(base["dataset"], base["model"], base["task"], name,
                       metrics_lib.mean_metrics([by_lang[l]["metrics"] for l in present]),
                       languages=present))
  return out


def write_records(records: list[dict], out_dir: str, *, step: int | None = None,
                  filename: str = "results.jsonl", history: bool = True) -> None:
  """`filename` holds the latest evaluation (with its step); `history.jsonl` every one."""
  if jax.process_index() != 0 or not records:
    return
  if step is not None:
    records = [{**r, "step": step} for r in records]
  lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
  fileio.write(os.path.join(out_dir, filename), lines)
  if history and step is not None:
    fileio.append(os.path.join(out_dir, "history.jsonl"), lines)


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


def _metrics_lines(rows: list[dict]) -> list[str]:
  """A line per (task, dataset, language) with its metrics, for the other evaluators."""
  return [f"{r['task']}  {r['dataset']}  {r['language']}: " + ", ".join(
      f"{k} {100 * v:.1f}%" for k, v in r["metrics"].items()) for r in rows]


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
  other = [r for r in records if r["task"] not in (ZEROSHOT, RETRIEVAL)]
  if other:
    lines += ([""] if len(lines) > 1 else []) + _metrics_lines(other)
  text = "\n".join(lines)
  if jax.process_index() == 0:
    print(text, flush=True)
  return text
