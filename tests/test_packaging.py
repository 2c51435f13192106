"""pyproject.toml: every console script names a callable `run` of an existing binary, the
dependencies are requirements.txt's pins, and every data file in big_clip/ ships."""

import fnmatch
import importlib
import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _project():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


def test_console_scripts_name_the_run_function_of_each_binary():
  scripts = _project()["project"]["scripts"]
  assert set(scripts) == {"big-clip-train", "big-clip-evaluate", "big-clip-export",
                          "big-clip-predict", "big-clip-report"}
  for name, target in scripts.items():
    module, _, attr = target.partition(":")
    assert module == "big_clip." + name.removeprefix("big-clip-"), name
    assert callable(getattr(importlib.import_module(module), attr)), target


def test_dependencies_are_the_pinned_requirements_and_data_files_ship():
  project = _project()
  assert project["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
  globs = project["tool"]["setuptools"]["package-data"]
  for root, _, files in os.walk(os.path.join(ROOT, "big_clip")):
    for f in files:
      if f.endswith((".py", ".pyc")):
        continue
      rel = os.path.relpath(os.path.join(root, f), ROOT)
      package, _, _ = os.path.dirname(rel).replace(os.sep, ".").partition(".data")
      inside = os.path.relpath(os.path.join(root, f), os.path.join(ROOT, *package.split(".")))
      assert any(fnmatch.fnmatch(inside, g) for g in globs.get(package, ())), rel
