"""A frozen teacher for distillation (`config.loss.distill.teacher = 'big_clip:WORKDIR[:STEP]'`):
the dual encoder of another big_clip run, loaded with its own `config.json`, whose image and
text embeddings of each batch are added to the batch as 'teacher_image' / 'teacher_text'.

The teacher reads the student's tokens, so both must use the same tokenizer (checked); a
teacher with fewer text positions than `config.data.max_len` is stretched on load. It runs
on the host's default device, batch by batch: right for small teachers; for a large one,
precompute its embeddings once (as the embedding cache of the LLM tower does).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from big_clip.models import adapt, two_tower


class Teacher:
  """`embed(batch)` -> {'teacher_image': [b, D'], 'teacher_text': [b, D']} numpy float32."""

  def __init__(self, spec: str, config: ml_collections.ConfigDict, tokenizer_path: str | None):
    workdir, _ = adapt.parse_big_clip_spec(spec)
    self.config = adapt.run_config(workdir)
    model_cfg = self.config.model
    if int(self.config.data.image_size) != int(config.data.image_size):
      raise ValueError(f"The teacher {workdir} sees {self.config.data.image_size}px images, "
                       f"this run {config.data.image_size}px; set config.data.image_size to "
                       "the teacher's.")
    # A teacher with fewer text positions than the student's captions is stretched on
    # load (Long-CLIP §3.1), like any checkpoint loaded into a longer model.
    model_cfg.text.max_len = max(int(model_cfg.text.max_len), int(config.data.max_len))
    self.step, params = adapt.load_big_clip(spec, model_cfg, tokenizer_path)
    self.params = jax.device_put(params)
    self.embed_dim = int(model_cfg.embed_dim)
    graphdef = nnx.graphdef(nnx.eval_shape(two_tower.init_fn(model_cfg)))
    self._encode = jax.jit(lambda p, image, text: nnx.merge(graphdef, p)(image, text))

  def embed(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    img, txt = self._encode(self.params, batch["image"], batch["text"])
    return {"teacher_image": np.asarray(img), "teacher_text": np.asarray(txt)}


class WithTeacher:
  """Wraps a data iterator: each host batch gets the teacher's embeddings of itself."""

  def __init__(self, data_iter: Any, teacher: Teacher):
    self._it, self._teacher = data_iter, teacher

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._it)
    return {**batch, **self._teacher.embed(batch)}

  def get_state(self) -> dict:
    return self._it.get_state()

  def set_state(self, state: Mapping[str, Any]) -> None:
    self._it.set_state(state)

  def skipped(self) -> dict[str, int]:
    return self._it.skipped()

  def close(self) -> None:
    self._it.close()
