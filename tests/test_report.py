"""The run report: from a short real run (whose end writes it), one self-contained HTML page
with a figure for every metric in metrics.jsonl, eval lines per language per task and the
last eval's bar chart; loss terms and skip reasons drawn where a run logs them."""

import base64
import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")

from big_clip import reporting, train  # noqa: E402

from test_train import spm_path, tiny_config  # noqa: E402,F401  (the tokenizer fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"


def figures(page: str) -> list[tuple[list[str], bytes]]:
  """(metrics shown, PNG bytes) of every figure of the page."""
  out = []
  for keys, data in re.findall(r'<figure data-metrics="([^"]*)"><img alt="[^"]*" '
                               r'src="data:image/png;base64,([^"]+)"', page):
    out.append((json.loads(keys.replace("&quot;", '"')), base64.b64decode(data)))
  return out


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, spm_path):
  workdir = str(tmp_path_factory.mktemp("report") / "run")
  config = tiny_config(**{"data.tokenizer.path": spm_path, "total_steps": 4,
                          "eval.every_steps": 2, "eval.num_images": 16,
                          "eval.batch_size": 16, "checkpoint.use_async": False})
  train.train(config, workdir)
  return workdir


def test_a_short_run_writes_a_report_with_a_figure_for_every_metric(short_run):
  path = os.path.join(short_run, reporting.REPORT_FILE)
  with open(path) as f:
    page = f.read()
  shown = figures(page)
  assert shown and all(png.startswith(PNG) for _, png in shown)
  assert "src=\"http" not in page and "<link" not in page  # nothing outside the page
  with open(os.path.join(short_run, "metrics.jsonl")) as f:
    logged = {k for line in f for k in json.loads(line) if k != "step"}
  covered = {k for keys, _ in shown for k in keys}
  assert logged - covered == set()
  assert {"loss", "lr", "logit_scale", "examples_per_s"} <= logged
  # Eval: a line per language for each (task, metric) and the last eval per language.
  with open(os.path.join(short_run, "eval", "history.jsonl")) as f:
    history = [json.loads(l) for l in f]
  assert sorted({r["step"] for r in history}) == [2, 4]
  for dataset in {r["dataset"] for r in history}:
    langs = {r["language"] for r in history if r["dataset"] == dataset}
    assert {"en", "ru", "zh", "mean"} <= langs
    assert [f"{dataset}/{l}/acc1" for l in ("en", "ru", "zh", "mean")] in [
        keys for keys, _ in shown]
  assert page.count("at the last eval</figcaption>") == len({r["dataset"] for r in history})


def test_loss_terms_share_the_loss_figure_and_skips_get_one_figure(tmp_path):
  rows = [{"step": s, "loss": 5.0 - s, "loss/contrastive": 3.0 - s, "loss/text_pair": 2.0,
           "lr": 1e-4 * s, "skipped/corrupt_image": s, "skipped/missing_caption": 1}
          for s in (1, 2, 3)]
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  shown = [keys for keys, _ in figures(reporting.build_html(str(tmp_path)))]
  assert shown == [["loss", "loss/contrastive", "loss/text_pair"], ["lr"],
                   ["skipped/corrupt_image", "skipped/missing_caption"]]


def test_the_report_binary_writes_the_page_and_names_a_missing_workdir(short_run, tmp_path):
  out = str(tmp_path / "r.html")
  done = subprocess.run([sys.executable, "-m", "big_clip.report", short_run, "--out", out],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert figures(open(out).read())
  done = subprocess.run([sys.executable, "-m", "big_clip.report", str(tmp_path / "nope")],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 1 and "nope/metrics.jsonl does not exist" in done.stderr
  assert "Traceback" not in done.stderr
