"""A run's report: one self-contained HTML page of plots from WORKDIR/metrics.jsonl and
WORKDIR/eval/history.jsonl (matplotlib PNGs embedded as base64; no file beside it).

Figures, in order: the loss with each term of a composite loss (`loss/contrastive`, ...);
every other training scalar over steps (lr, logit scale, examples/s, grad norm, ...); skipped
examples by reason (`skipped/REASON`, counts so far); per eval dataset and metric one line
per language over steps (chance dotted), and the last evaluation as a bar per language.
Every figure carries `data-metrics`, the metrics.jsonl keys it shows, so a test can check
that none is left out. `python -m big_clip.report WORKDIR` writes it; training writes
WORKDIR/report.html at its end.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging

from big_clip import fileio
from big_clip import workdir as workdir_lib

REPORT_FILE = "report.html"
HISTORY_FILE = os.path.join("eval", "history.jsonl")
_AGGREGATES = ("mean",)  # drawn thicker: the average over languages


def read_jsonl(path: str) -> list[dict]:
  if not fileio.exists(path):
    return []
  return [json.loads(line) for line in fileio.read_text(path).splitlines() if line.strip()]


def eval_scalar_keys(history: Sequence[Mapping[str, Any]]) -> set[str]:
  """The metrics.jsonl keys that training wrote for these eval records
  (`evals.records.records_to_scalars`: DATASET/LANGUAGE/METRIC)."""
  return {f"{r['dataset']}/{r['language']}/{k}" for r in history for k in r["metrics"]
          if k != "chance"}


# ---------------------------------------------------------------------------------------------
# Figures: (title, metrics.jsonl keys shown, PNG bytes).
# ---------------------------------------------------------------------------------------------
def _png(fig) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
  import matplotlib.pyplot as plt

  plt.close(fig)
  return buf.getvalue()


def _axes(title: str, ylabel: str = ""):
  import matplotlib.pyplot as plt

  from matplotlib.ticker import MaxNLocator

  fig, ax = plt.subplots(figsize=(5.2, 3.2))
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps
  ax.set_title(title, fontsize=10)
  ax.set_xlabel("step")
  if ylabel:
    ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  return fig, ax


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
  pts = [(r["step"], r[key]) for r in rows if key in r]
  return [s for s, _ in pts], [v for _, v in pts]


def training_figures(rows: Sequence[Mapping[str, Any]], skip: set[str]
                     ) -> list[tuple[str, list[str], bytes]]:
  keys = list(dict.fromkeys(k for r in rows for k in r if k != "step" and k not in skip))
  terms = [k for k in keys if k.startswith("loss/")]
  skipped = [k for k in keys if k.startswith("skipped/")]
  figures = []
  if "loss" in keys or terms:
    fig, ax = _axes("loss" + (" and its terms" if terms else ""))
    for k in ["loss"] * ("loss" in keys) + terms:
      ax.plot(*_series(rows, k), label=k, linewidth=2 if k == "loss" else 1)
    if terms:
      ax.legend(fontsize=8)
    figures.append(("loss", ["loss"] * ("loss" in keys) + terms, _png(fig)))
  for k in keys:
    if k == "loss" or k in terms or k in skipped:
      continue
    fig, ax = _axes(k)
    ax.plot(*_series(rows, k))
    if k == "lr":
      ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    figures.append((k, [k], _png(fig)))
  if skipped:
    fig, ax = _axes("skipped examples by reason (this host, so far)", "examples")
    for k in skipped:
      ax.plot(*_series(rows, k), label=k.split("/", 1)[1])
    ax.legend(fontsize=8)
    figures.append(("skipped examples", skipped, _png(fig)))
  return figures


def eval_figures(history: Sequence[Mapping[str, Any]]) -> list[tuple[str, list[str], bytes]]:
  """Per (dataset, metric): a line per language over steps; per dataset: the last eval's
  headline metric (its first) as a bar per language."""
  by_dataset: dict[str, list[Mapping[str, Any]]] = {}
  for r in history:
    by_dataset.setdefault(r["dataset"], []).append(r)
  figures = []
  for dataset, recs in by_dataset.items():
    languages = list(dict.fromkeys(r["language"] for r in recs))
    metrics = [m for m in dict.fromkeys(k for r in recs for k in r["metrics"]) if m != "chance"]
    for metric in metrics:
      fig, ax = _axes(f"{dataset}: {metric}", "")
      for lang in languages:
        pts = sorted((r["step"], r["metrics"][metric]) for r in recs
                     if r["language"] == lang and metric in r["metrics"])
        if pts:
          ax.plot(*zip(*pts), marker="o", markersize=3, label=lang,
                  linewidth=2.5 if lang in _AGGREGATES else 1,
                  color="black" if lang in _AGGREGATES else None)
      chance = [r["metrics"]["chance"] for r in recs if "chance" in r["metrics"]]
      if chance and metric.startswith("acc1"):
        ax.axhline(min(chance), linestyle=":", color="grey", label="chance")
      ax.legend(fontsize=7, ncol=2)
      keys = [f"{dataset}/{l}/{metric}" for l in languages]
      figures.append((f"{dataset}: {metric} per language", keys, _png(fig)))
    last_step = max(r["step"] for r in recs)
    last = [r for r in recs if r["step"] == last_step and metrics[0] in r["metrics"]]
    fig, ax = _axes(f"{dataset}: {metrics[0]} at step {last_step}")
    ax.set_xlabel("language")
    names = [r["language"] for r in last]
    values = [r["metrics"][metrics[0]] for r in last]
    bars = ax.bar(names, values, color=["black" if n in _AGGREGATES else "tab:blue"
                                        for n in names])
    ax.bar_label(bars, labels=[f"{v:.1%}" if v <= 1 else f"{v:.3g}" for v in values],
                 fontsize=7)
    ax.tick_params(axis="x", labelrotation=45)
    figures.append((f"{dataset}: {metrics[0]} at the last eval",
                    [f"{dataset}/{n}/{metrics[0]}" for n in names], _png(fig)))
  return figures


# ---------------------------------------------------------------------------------------------
# The page.
# ---------------------------------------------------------------------------------------------
_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.5em}
.grid{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0;border:1px solid #ddd;padding:6px}
figcaption{font-size:.8em;color:#555}table{border-collapse:collapse;font-size:.85em}
td,th{border:1px solid #ddd;padding:2px 8px;text-align:right}"""


def _figure_html(title: str, keys: Sequence[str], png: bytes) -> str:
  data = base64.b64encode(png).decode()
  return (f'<figure data-metrics="{html.escape(json.dumps(list(keys)))}">'
          f'<img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
          f"<figcaption>{html.escape(title)}</figcaption></figure>")


def _summary(workdir: str, rows: Sequence[Mapping[str, Any]]) -> str:
  items = [("workdir", fileio.absolute(workdir))]
  path = workdir_lib.config_path(workdir)
  if fileio.exists(path):
    cfg = fileio.read_json(path)
    model = cfg.get("model", {})
    items += [("loss", cfg.get("loss", {}).get("name")),
              ("data", cfg.get("data", {}).get("source")),
              ("global batch", cfg.get("data", {}).get("global_batch")),
              ("total steps", cfg.get("total_steps")),
              ("image tower", "width {width}, depth {depth}, patch {patch_size}, {image_size}px"
               .format(**{k: model.get("image", {}).get(k) for k in
                          ("width", "depth", "patch_size", "image_size")})),
              ("text tower", f"{model.get('text', {}).get('kind', 'transformer')}, width "
               f"{model.get('text', {}).get('width')}, depth {model.get('text', {}).get('depth')}")]
  if rows:
    # The newest training row (eval scalars are logged as rows of their own at eval steps).
    last = next((r for r in reversed(rows) if "loss" in r), rows[-1])
    items += [("last logged step", rows[-1]["step"])]
    items += [(k, f"{last[k]:.4g}") for k in ("loss", "examples_per_s", "data_wait_fraction")
              if k in last]
  body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                 for k, v in items)
  return f"<table>{body}</table>"


def build_html(workdir: str) -> str:
  """The report page of `workdir` (raises FileNotFoundError when it has no metrics.jsonl)."""
  import matplotlib

  matplotlib.use("Agg")  # no display: PNGs only
  path = os.path.join(workdir, workdir_lib.METRICS_FILE)
  if not fileio.exists(path):
    raise FileNotFoundError(f"{path} does not exist; give a training workdir (its "
                            f"{workdir_lib.METRICS_FILE} holds the curves).")
  rows = read_jsonl(path)
  history = read_jsonl(os.path.join(workdir, HISTORY_FILE))
  train = training_figures(rows, skip=eval_scalar_keys(history))
  evals = eval_figures(history)
  title = f"big_clip run: {os.path.basename(fileio.absolute(workdir).rstrip('/'))}"
  parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
           f"</title><style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
           _summary(workdir, rows), "<h2>Training</h2><div class='grid'>",
           *(_figure_html(*f) for f in train), "</div>"]
  if evals:
    parts += ["<h2>Evaluation per language</h2><div class='grid'>",
              *(_figure_html(*f) for f in evals), "</div>"]
  else:
    parts += ["<p>No evaluation history (eval/history.jsonl).</p>"]
  parts.append("</body></html>")
  return "\n".join(parts)


def write_report(workdir: str, out: str | None = None) -> str | None:
  """Writes the page to `out` (default WORKDIR/report.html) and returns its path; None, with
  a warning, when matplotlib is not installed (a finished run is not failed for a plot)."""
  try:
    import matplotlib  # noqa: F401
  except ImportError:
    logging.warning("No run report: matplotlib is not installed (pip install -r "
                    "requirements.txt).")
    return None
  page = build_html(workdir)
  out = out or os.path.join(workdir, REPORT_FILE)
  fileio.write(out, page)
  return out
