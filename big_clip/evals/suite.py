"""The evaluations of a config (`config.evals`), built once and run on any parameters: in
training every `config.eval.every_steps`, and by `python -m big_clip.evaluate`.

Each spec string names its evaluator by task (`evals/specs.py`): the module
`big_clip/evals/<task>.py` and its `Evaluator`, with `build(spec, config, towers, model_name)`
-> evaluators and `run(params)` -> records.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from flax import nnx

from big_clip import config as config_lib
from big_clip.evals import specs
from big_clip.evals import towers as towers_lib


def validate(evals: Sequence[str]) -> None:
  """Parses every spec; a ConfigError names the bad one (files are read when built)."""
  for text in evals:
    try:
      specs.parse(text)
    except specs.SpecError as e:
      raise config_lib.ConfigError(f"config.evals: {e}") from None


class Suite:
  """Builds each evaluator once (data read, prompts tokenized); `run(params)` evaluates."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: Any, graphdef: nnx.GraphDef,
               mesh: jax.sharding.Mesh, model_name: str, evals: Sequence[str] | None = None):
    evals = config.evals if evals is None else evals
    validate(evals)
    towers = towers_lib.Towers.build(config, tokenizer, graphdef, mesh)
    self.mesh = mesh
    self.evaluators = []
    for text in evals:
      spec = specs.parse(text)
      self.evaluators += specs.evaluator(spec.task).build(spec, config, towers, model_name)

  def run(self, params: Any) -> list[dict]:
    with jax.set_mesh(self.mesh):
      return [r for e in self.evaluators for r in e.run(params)]
