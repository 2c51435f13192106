"""python -m big_clip.predict on a tiny random-init workdir: folders walked, a broken and a
missing image each reported on one line and skipped, the JSON lines' top-k equal to
`Model.zero_shot` of the same images, caption ranking recomputed in float64 NumPy, and a
command line without labels ends in one line naming the flags."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import big_clip
from big_clip import predict

from test_api import COLOURS, write_images, write_workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("predict")
  _, workdir = write_workdir(tmp)
  paths = write_images(tmp / "images")
  (tmp / "images" / "red" / "broken.png").write_bytes(b"\x89PNG not really")
  return workdir, str(tmp / "images"), paths, big_clip.load(workdir)


def _predict(*args):
  return subprocess.run([sys.executable, "-m", "big_clip.predict", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)


def test_predict_walks_folders_skips_unreadable_images_and_prints_json(run, tmp_path):
  workdir, folder, paths, model = run
  missing = str(tmp_path / "missing.jpg")
  out = _predict("--model", workdir, "--images", folder, missing, "--labels", "red,green,blue",
                 "--top_k", "2", "--json")
  assert out.returncode == 0, out.stderr
  rows = [json.loads(line) for line in out.stdout.splitlines()]
  assert [r["image"] for r in rows] == paths
  skipped = [l for l in out.stderr.splitlines() if l.startswith("big_clip.predict: skipped")]
  assert len(skipped) == 2 and "broken.png" in skipped[0] and "missing.jpg" in skipped[1]
  assert "Traceback" not in out.stderr
  probs = model.zero_shot(paths, ["red", "green", "blue"])
  for r, p in zip(rows, probs):
    top = r["predictions"]["en"]
    assert [t["label"] for t in top] == [["red", "green", "blue"][i] for i in np.argsort(-p)[:2]]
    np.testing.assert_allclose([t["probability"] for t in top], np.sort(p)[::-1][:2], atol=1e-5)


def test_predict_ranks_captions_and_labels_per_language(run, tmp_path):
  _, _, paths, model = run
  texts = ["a red circle.", "zwei grüne Quadrate.", "синий треугольник."]
  rows, skipped = predict.predict(model, paths[:3], texts=texts, k=3)
  assert not skipped
  img, txt = model.encode_image(paths[:3]).astype(np.float64), model.encode_text(texts)
  logits = model.logit_scale * img @ txt.astype(np.float64).T
  want = np.exp(logits - logits.max(1, keepdims=True))
  want /= want.sum(1, keepdims=True)
  for r, w in zip(rows, want):
    got = {t["label"]: t["probability"] for t in r["predictions"]["texts"]}
    np.testing.assert_allclose([got[t] for t in texts], w, atol=1e-5)
  names = {"en": list(COLOURS), "de": ["blau", "grün", "rot"]}
  rows, _ = predict.predict(model, paths, classnames=names, k=1)
  probs = model.zero_shot(paths, names)
  for r, i in zip(rows, range(len(paths))):
    for lang in names:
      assert r["predictions"][lang][0]["label"] == names[lang][int(probs[lang][i].argmax())]


def test_predict_without_labels_is_one_line_naming_the_flags(run):
  workdir, folder, _, _ = run
  out = _predict("--model", workdir, "--images", folder)
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1].startswith(
      "big_clip.predict: error: give exactly one of --labels")
  assert "Traceback" not in out.stderr
