"""The eval binary end to end on a tiny random-init checkpoint: the CLI writes CLIP_benchmark
JSON lines, and its numbers equal an unsharded float64 NumPy evaluation of the same model
(zero-shot on the embedded data, retrieval on the shared Flickr8k/Multi30K test split)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from big_clip import checkpoints, evaluate, sharding, train
from big_clip.evals import suite
from big_clip.models import two_tower
from big_clip.data import manifest, pipeline, embedded, tokenizers

from test_evaluate import ref_classification, ref_ensemble, ref_retrieval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLICKR = os.path.join(ROOT, "..", "shared", "data", "flickr8k_multi30k", "manifest.json")

CONFIG = '''"""A tiny model for the eval tests.

  python -m big_clip.train --config {path} --workdir /tmp/tiny
"""
from big_clip import config as config_lib


def get_config(arg=None):
  c = config_lib.base()
  c.total_steps = 1
  c.model.embed_dim = 32
  c.model.image.update(image_size=32, patch_size=8, width=32, depth=2, heads=2, mlp_dim=64)
  c.model.text.update(vocab_size=1024, max_len=16, width=32, depth=2, heads=2, mlp_dim=64)
  c.data.update(global_batch=16, image_size=32, max_len=16, languages={{"en": 1.0, "ru": 1.0}})
  c.data.tokenizer.update(path={spm!r}, vocab_size=1024)
  c.checkpoint.update(every_steps=1, use_async=False)
  c.eval.update(every_steps=1000, num_images=40, batch_size=24)
  return c
'''


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(config path, config, workdir): a tiny model's initial parameters saved as the
  checkpoint of step 1 by checkpoints.save, as training saves them (no train step is
  compiled: the eval binary is under test, and CI time is shared)."""
  tmp = tmp_path_factory.mktemp("evalcli")
  spm = str(tmp / "spm.model")
  tokenizers.train_spm(embedded.sample_captions(n=2000, seed=0), spm, vocab_size=1024)
  path = str(tmp / "tiny_eval.py")
  with open(path, "w") as f:
    f.write(CONFIG.format(path=path, spm=spm))
  config = _load(path)
  workdir = str(tmp / "work")
  params = nnx.to_pure_dict(nnx.state(two_tower.init_fn(config.model, config.seed)()))
  mngr = checkpoints.manager(os.path.join(workdir, "checkpoints"), keep=1, use_async=False)
  checkpoints.save(mngr, 1, {"params": params}, {"next_example": 0})
  mngr.wait_until_finished()
  mngr.close()
  return path, config, workdir


def _load(path):
  import importlib.util

  spec = importlib.util.spec_from_file_location("tiny_eval", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def unsharded_model(config, workdir):
  """The step-1 model on one device, params as numpy (an evaluation without the suite)."""
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  graphdef, abs_params, shardings = two_tower.abstract_params(config.model, mesh)
  abs_params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abs_params, shardings)
  mngr = checkpoints.manager(os.path.join(workdir, "checkpoints"), keep=2, use_async=False)
  params = jax.device_get(checkpoints.restore_params(mngr, 1, abs_params))
  model = nnx.merge(graphdef, params)
  return Encoders(jax.jit(model.encode_image), jax.jit(model.encode_text)), params, graphdef


class Encoders:
  def __init__(self, encode_image, encode_text):
    self.encode_image, self.encode_text = encode_image, encode_text


def to64(x):
  return np.asarray(x, np.float64)


@pytest.mark.slow
def test_cli_writes_clip_benchmark_lines_equal_to_an_unsharded_evaluation(trained, tmp_path):
  path, config, workdir = trained
  out = tmp_path / "res.jsonl"
  cmd = [sys.executable, "-m", "big_clip.evaluate", f"--config={path}",
         f"--checkpoint={workdir}/checkpoints/1", f"--output={out}",
         "--eval=zeroshot:embedded:colour", "--eval=zeroshot:embedded:shape,languages=ru"]
  env = {**os.environ, "PYTHONPATH": ROOT}
  run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  rows = [json.loads(l) for l in out.read_text().splitlines()]
  assert {(r["dataset"], r["language"]) for r in rows} == {
      ("embedded_colour", "en"), ("embedded_colour", "ru"), ("embedded_colour", "mean"),
      ("embedded_shape", "ru")}
  for r in rows:
    assert {"dataset", "model", "task", "language", "metrics", "step"} <= set(r)
    assert r["model"] == "big_clip/tiny_eval" and r["step"] == 1
    assert r["task"] == "zeroshot_classification"
  table = run.stdout.splitlines()
  assert "checkpoint step 1" in run.stdout and "embedded_colour" in run.stdout
  printed = next(l for l in table if l.startswith("ru ")).split()[1]  # colour column, in %
  colour_ru = next(r for r in rows if r["dataset"] == "embedded_colour" and r["language"] == "ru")
  assert printed == f"{100 * colour_ru['metrics']['acc1']:.1f}%"

  # The same numbers from the model on one device, ensembling and metrics in float64.
  model, _, _ = unsharded_model(config, workdir)
  tok = tokenizers.SpmTokenizer(config.data.tokenizer.path, config.data.max_len)
  for r in rows:
    if r["language"] == "mean":
      continue
    task, lang = r["dataset"].split("_")[1], r["language"]
    images, labels_ = embedded.zeroshot_set(task, 40, seed=0, image_size=32)
    img = to64(model.encode_image(pipeline.normalize(images)))
    names = embedded.zeroshot_classnames(task, lang)
    templates = embedded.zeroshot_templates(task, lang)
    prompts = [t.replace("{c}", c) for c in names for t in templates]
    txt = to64(model.encode_text(tok.encode(prompts))).reshape(len(names), len(templates), -1)
    want = ref_classification(img @ ref_ensemble(txt).T, labels_)
    for k, v in want.items():  # float32 sums in another order may flip a near tie: 1 image
      assert abs(r["metrics"][k] - v) <= 1 / 40 + 1e-9, (r["dataset"], lang, k)
    assert r["metrics"]["chance"] == pytest.approx(1 / len(names))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(FLICKR),
                    reason=f"the shared Flickr8k/Multi30K set is not at {FLICKR}")
def test_retrieval_on_the_flickr_test_split_equals_an_unsharded_float64_evaluation(trained):
  _, config, workdir = trained
  model, params, graphdef = unsharded_model(config, workdir)
  tok = tokenizers.SpmTokenizer(config.data.tokenizer.path, config.data.max_len)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  evals = suite.Suite(config, tok, graphdef, mesh, "tiny",
                         evals=[f"retrieval:manifest:{FLICKR}:test"])
  rows = {r["language"]: r for r in evals.run(params)}
  m = manifest.load(FLICKR, "test")
  assert len(m.items) == 31 and set(m.languages) <= set(rows) and "mean" in rows
  pixels = np.stack([manifest.read_image(it.image, 32) for it in m.items])
  img = to64(model.encode_image(pipeline.normalize(pixels)))
  for lang in m.languages:
    owners = [i for i, it in enumerate(m.items) for _ in it.captions.get(lang, [])]
    texts = [c for it in m.items for c in it.captions.get(lang, [])]
    txt = to64(model.encode_text(tok.encode(texts)))
    want = ref_retrieval(img @ txt.T, np.asarray(owners))
    got = rows[lang]
    assert got["num_images"] == 31 and got["num_texts"] == len(texts)
    assert got["task"] == "zeroshot_retrieval" and "skipped_images" not in got
    for k, v in want.items():  # at most one query may flip on a float32 near tie
      n = len(texts) if k.startswith("image_") else 31
      assert abs(got["metrics"][k] - v) <= 1 / n + 1e-9, (lang, k)
