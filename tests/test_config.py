"""Config schema and validation: every recipe builds; bad configs name the key and the fix."""

import glob
import importlib.util
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from big_clip import config as config_lib
from big_clip.evals import suite

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def load(path, arg=None):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_there_are_recipes():
  names = {os.path.basename(p) for p in CONFIG_FILES}
  assert {"default.py", "clip_vit_b32.py", "siglip_vit_b16.py"} <= names


def recipe_args(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.ARGS


RECIPES = [(path, arg) for path in CONFIG_FILES for arg in (None, *recipe_args(path))]


@pytest.mark.parametrize("path, arg", RECIPES,
                         ids=[f"{os.path.basename(p)}:{a or ''}" for p, a in RECIPES])
def test_every_recipe_and_argument_builds_and_validates(path, arg):
  config = load(path, arg)
  config_lib.validate(config)
  suite.validate(config.evals)
  assert config.model.image.image_size == config.data.image_size
  # The docstring carries the launch command.
  with open(path) as f:
    assert "python -m big_clip.train --config" in f.read()


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_an_unknown_recipe_argument_names_the_allowed_ones(path):
  with pytest.raises(ValueError, match="unknown argument 'nope'; allowed: "
                     + ", ".join(recipe_args(path))):
    load(path, "nope")


def test_pod_recipes_have_the_advertised_sizes():
  for name, loss in [("clip_vit_b32.py", "softmax"), ("siglip_vit_b16.py", "sigmoid")]:
    c = load(os.path.join(ROOT, "configs", name))
    assert c.data.global_batch == 32768
    assert c.loss.name == loss
    assert c.optim.schedule == "warmup_cosine" and c.optim.warmup_steps > 0
    # Replicated weights: compiled for v5e-256, 2.8x fewer collective bytes than FSDP-256
    # at 3-6 GiB of 16 per chip (benchmarks/RESULTS.md).
    assert c.mesh.data == -1 and c.mesh.fsdp == 1


def test_misspelled_key_in_a_recipe_fails_where_it_is_written():
  c = config_lib.base()
  with pytest.raises(AttributeError, match="lerning_rate"):
    c.optim.lerning_rate = 1e-3


def test_unknown_key_names_the_key_and_a_suggestion():
  c = config_lib.base()
  with c.unlocked():
    c.optim.warmup_step = 10
  with pytest.raises(config_lib.ConfigError, match=r"optim\.warmup_step.*optim\.warmup_steps"):
    config_lib.validate(c)


def test_wrong_type_names_the_key_and_the_expected_type():
  # ml_collections refuses the assignment on a recipe built from base() ...
  with pytest.raises(TypeError, match="global_batch"):
    config_lib.base().data.global_batch = "big"
  # ... and validate() catches it in a config built some other way (e.g. from a dict).
  d = config_lib.base().to_dict()
  d["data"]["global_batch"] = "big"
  with pytest.raises(config_lib.ConfigError, match=r"data\.global_batch.*expected int"):
    config_lib.validate(ml_collections.ConfigDict(d))


def test_bad_choice_lists_the_allowed_values():
  c = config_lib.base()
  c.loss.name = "triplet"
  with pytest.raises(config_lib.ConfigError, match=r"loss\.name.*softmax, sigmoid"):
    config_lib.validate(c)


def test_languages_is_a_free_mapping_of_weights():
  c = config_lib.base()
  c.data.languages = {"en": 1.0, "sw": 0.5}
  config_lib.validate(c)
  c.data.languages["xx"] = "lots"
  with pytest.raises(config_lib.ConfigError, match=r"data\.languages\.xx"):
    config_lib.validate(c)


def test_inconsistent_image_size_is_named():
  c = config_lib.base()
  c.data.image_size = 64
  with pytest.raises(config_lib.ConfigError, match=r"data\.image_size=64.*model\.image\.image_size"):
    config_lib.validate(c)


def test_conv_stem_needs_a_power_of_two_patch():
  c = config_lib.base()
  c.model.image.update(stem="conv", image_size=240, patch_size=12)
  c.data.image_size = 240
  with pytest.raises(config_lib.ConfigError, match=r"stem='conv'.*patch_size=12.*power of two"):
    config_lib.validate(c)
  c.model.image.update(image_size=224, patch_size=16)
  c.data.image_size = 224
  config_lib.validate(c)


def test_batch_not_divisible_by_data_parallel_size_is_named():
  c = config_lib.base()
  c.data.global_batch = 100
  with pytest.raises(config_lib.ConfigError, match=r"global_batch=100.*data-parallel size 8"):
    config_lib.validate_for_mesh(c, data_parallel=8, process_count=1)
  c.data.global_batch = 96
  config_lib.validate_for_mesh(c, data_parallel=8, process_count=1)


def test_command_line_override_of_unknown_key_is_an_error():
  # absl config_flags refuses keys that are not in the locked config.
  cmd = [sys.executable, "-m", "big_clip.train", "--config", "configs/default.py",
         "--workdir", "/tmp/never_used", "--config.optim.lrr=1"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert "lrr" in out.stderr


def test_a_user_error_is_one_line_and_a_traceback_only_when_asked(tmp_path):
  cmd = [sys.executable, "-m", "big_clip.train", "--config", "configs/default.py:quick",
         "--workdir", str(tmp_path), "--config.data.image_size=48"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1
  assert "Traceback" not in out.stderr
  errors = [l for l in out.stderr.splitlines() if l.startswith("big_clip.train: error: ")]
  assert len(errors) == 1 and "config.data.image_size=48" in errors[0], out.stderr[-2000:]
  verbose = subprocess.run(cmd + ["--verbose_errors"], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
  assert verbose.returncode != 0 and "Traceback" in verbose.stderr
  assert "ConfigError" in verbose.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", ["clip_vit_b32.py", "siglip_vit_b16.py", "siglip2_naflex.py",
                                  "coca_vit_b32.py"])
def test_pod_recipes_train_two_steps_locally(name, tmp_path):
  """`:local` keeps the recipe's architecture (pooling, loss) and actually trains."""
  from big_clip import train

  config = load(os.path.join(ROOT, "configs", name), "local")
  config.total_steps = 2
  config.eval.num_images = 16
  result = train.train(config, str(tmp_path))
  assert result["step"] == 2
  assert np.isfinite(result["metrics"]["loss"])
  assert os.path.exists(tmp_path / "checkpoints" / "2")
