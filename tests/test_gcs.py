"""A workdir on a remote filesystem (gs:// on TPUs) keeps every file there, never locally.

No GCS emulator works here: TensorFlow's gs:// filesystem (which big_clip.fileio, the
TensorBoard writer and etils.epath, hence orbax, all use) has its endpoint compiled in and
ignores STORAGE_EMULATOR_HOST (docs/pods-and-meshes.md says what was tried). So the cycle
runs on TensorFlow's in-memory `ram://` filesystem: it goes through exactly the tf.io.gfile
calls gs:// does, and a stray `open`/`os.makedirs` would leave a local folder named 'ram:'.
orbax refuses ram:// (etils.epath knows gs, s3, az and hf only), so the checkpoints folder of
a ram:// workdir is mapped to a local one here; orbax's own gs:// support is not ours to test.
"""

import json
import os

import jax
import numpy as np
import pytest
import safetensors.numpy
import tensorflow as tf

from big_clip import checkpoints, evaluate, fileio, reporting, train
from big_clip import workdir as workdir_lib
from big_clip.convert import pretrained
from big_clip.data import embedded, shards, tokenizers
from big_clip.evals import datasets, specs
from big_clip.models import adapt
from test_data_sources import _example, _iterator
from test_train import tiny_config

LOCAL_CHECKPOINTS = workdir_lib.checkpoints_dir


def _run(workdir: str, tokenizer: str, export_dir: str, *, kill: bool) -> dict:
  """train (killed after step 4 and resumed if `kill`) -> evaluate -> export, as the
  binaries do."""
  config = tiny_config(**{"data.tokenizer.path": tokenizer})
  if kill:
    train.train(config, workdir, stop_after=4)  # the checkpoint of step 3 survives
  trained = train.train(config, workdir)
  evaluated = evaluate.evaluate_checkpoint(config, workdir) if kill else None
  run_config, params, step = adapt.read_run(workdir)
  pretrained.to_hf(params, run_config, export_dir,
                   tokenizer_path=pretrained.tokenizer_of(run_config, workdir))
  return {"trained": trained, "evaluated": evaluated, "step": step}


# Three compilations of the tiny model (local run, killed run, resumed run) and one of the
# evaluator: tens of seconds on an idle CPU, minutes on a busy one.
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A straight run on local disk; the same run with every path (tokenizer, workdir,
  export) on ram://, killed, resumed and evaluated."""
  tmp = tmp_path_factory.mktemp("gcs")
  captions = embedded.sample_captions(n=3000, seed=0)
  local_tok = tokenizers.train_spm(captions, str(tmp / "spm.model"), vocab_size=1024)
  remote_tok = tokenizers.train_spm(captions, "ram://gcs_data/spm.model", vocab_size=1024)
  local = _run(str(tmp / "run"), local_tok, str(tmp / "export"), kill=False)
  (tmp / "cwd").mkdir()
  mp = pytest.MonkeyPatch()
  mp.chdir(tmp / "cwd")  # where a stray local write to 'ram://...' would land
  # orbax cannot write ram://: only the checkpoints folder of the ram:// run is local.
  mp.setattr(workdir_lib, "checkpoints_dir", lambda w: LOCAL_CHECKPOINTS(
      str(tmp / "ram_checkpoints") if w.startswith("ram://") else w))
  try:
    remote = _run("ram://gcs_run", remote_tok, "ram://gcs_export", kill=True)
  finally:
    mp.undo()
  return {"tmp": tmp, "local": local, "remote": remote}


@pytest.mark.slow
def test_gcs_workdir_files_land_on_the_remote_filesystem_and_nothing_local(runs):
  workdir = "ram://gcs_run"
  for name in ("config.json", "metrics.jsonl", "report.html", "eval/results.jsonl",
               "eval/history.jsonl"):
    assert fileio.exists(f"{workdir}/{name}"), name
  assert any(f.startswith("events.out.tfevents") for f in fileio.listdir(workdir))
  assert sorted(fileio.listdir("ram://gcs_export")) == sorted(
      os.listdir(runs["tmp"] / "export"))
  assert fileio.exists("ram://gcs_data/spm.model") and fileio.exists("ram://gcs_data/spm.vocab")
  # Nothing went to a local folder named after the scheme, in the working directory or in
  # the process's other folders.
  assert os.listdir(runs["tmp"] / "cwd") == []
  assert not os.path.exists("ram:") and not os.path.exists("gs:")


@pytest.mark.slow
def test_gcs_workdir_run_equals_the_local_run(runs):
  local, remote, tmp = runs["local"], runs["remote"], runs["tmp"]
  assert local["step"] == remote["step"] == 6
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(remote["trained"]["params"]),
               jax.device_get(local["trained"]["params"]))
  curve = lambda text: [json.loads(l) for l in text.splitlines()]
  losses = lambda rows: {r["step"]: r["loss"] for r in rows if "loss" in r}
  local_rows = curve((tmp / "run" / "metrics.jsonl").read_text())
  remote_rows = curve(fileio.read_text("ram://gcs_run/metrics.jsonl"))
  assert losses(remote_rows) == losses(local_rows)
  assert sorted(losses(remote_rows)) == [1, 2, 3, 4, 5, 6]  # the resume dropped no line
  # The evaluation of the restored checkpoint equals the one the local run made at its end.
  local_eval = curve((tmp / "run" / "eval" / "results.jsonl").read_text())
  assert curve(fileio.read_text("ram://gcs_run/eval/results.jsonl")) == remote["evaluated"]
  assert len(remote["evaluated"]) == len(local_eval) > 0
  for got, want in zip(remote["evaluated"], local_eval):
    assert got.keys() == want.keys()
    for key, value in want.items():
      assert got[key] == (pytest.approx(value, abs=1e-6) if isinstance(value, float)
                          else value), key
  remote_cfg = fileio.read_json("ram://gcs_run/config.json")
  local_cfg = json.loads((tmp / "run" / "config.json").read_text())
  assert remote_cfg["data"]["tokenizer"]["path"] == "ram://gcs_data/spm.model"
  remote_cfg["data"]["tokenizer"]["path"] = local_cfg["data"]["tokenizer"]["path"]
  assert remote_cfg == local_cfg


@pytest.mark.slow
def test_gcs_export_equals_the_local_export(runs):
  tmp = runs["tmp"]
  local = safetensors.numpy.load_file(str(tmp / "export" / pretrained.HF_WEIGHTS))
  remote = safetensors.numpy.load(fileio.read_bytes(f"ram://gcs_export/{pretrained.HF_WEIGHTS}"))
  assert local.keys() == remote.keys()
  for name in local:
    np.testing.assert_array_equal(remote[name], local[name], err_msg=name)
  assert fileio.read_json("ram://gcs_export/config.json") == json.loads(
      (tmp / "export" / "config.json").read_text())
  assert fileio.read_bytes("ram://gcs_export/spm.model") == fileio.read_bytes(
      "ram://gcs_data/spm.model")


@pytest.mark.slow
def test_gcs_report_and_checkpoint_lookup_read_remote_workdirs(runs, monkeypatch):
  assert "<img" in reporting.build_html("ram://gcs_run")
  assert reporting.read_jsonl("ram://gcs_run/eval/history.jsonl")
  monkeypatch.setattr(workdir_lib, "checkpoints_dir", lambda w: w + "/checkpoints")
  tf.io.gfile.makedirs("ram://gcs_lookup/checkpoints/7")
  assert checkpoints.find("ram://gcs_lookup") == ("ram://gcs_lookup/checkpoints", None,
                                                  "ram://gcs_lookup")
  assert checkpoints.find("ram://gcs_lookup/checkpoints/7") == (
      "ram://gcs_lookup/checkpoints", 7, "ram://gcs_lookup")


def test_gcs_shards_and_image_folders_are_written_and_read_on_the_remote_filesystem(tmp_path):
  for prefix in (str(tmp_path / "part"), "ram://gcs_shards/part"):
    shards.write_shards((_example(i) for i in range(12)), prefix, "tar", 6)
  assert sorted(fileio.listdir("ram://gcs_shards")) == ["part-00000.tar", "part-00001.tar"]
  local = _iterator(f"shards:{tmp_path}/part-*.tar")
  remote = _iterator("shards:ram://gcs_shards/part-*.tar")
  for _ in range(3):
    jax.tree.map(np.testing.assert_array_equal, next(remote), next(local))
  # An image-folder eval set (ROOT/CLASS/IMAGE) on the remote filesystem.
  for i in range(4):
    for root in (str(tmp_path / "folder"), "ram://gcs_folder"):
      fileio.write(f"{root}/class_{i % 2}/img{i}.png", _example(i).image)
  sets = [datasets.labelled_set(specs.parse(f"zeroshot:folder:{root}"), 8)
          for root in (str(tmp_path / "folder"), "ram://gcs_folder")]
  assert sets[1].classnames == sets[0].classnames == {"en": ["class 0", "class 1"]}
  np.testing.assert_array_equal(sets[1].labels, sets[0].labels)
  np.testing.assert_array_equal(sets[1].images[np.arange(4)], sets[0].images[np.arange(4)])
  assert not os.path.exists("ram:")
