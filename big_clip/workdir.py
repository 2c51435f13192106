"""What a run directory holds and how a run talks: config.json, metrics.jsonl (+ TensorBoard),
the run's name, the tokenizer it trained, and the log filter of the binaries.

    WORKDIR/config.json          the resolved config (read back by config.load_json)
    WORKDIR/metrics.jsonl        one JSON line per logged step, TensorBoard events beside it
    WORKDIR/checkpoints/STEP/    orbax checkpoints (big_clip.checkpoints)
    WORKDIR/tokenizer/spm.model  the sentencepiece model trained at first use
    WORKDIR/eval/                results.jsonl (latest) and history.jsonl (every eval)
"""

from __future__ import annotations

import json
import logging as std_logging
import os
from collections.abc import Mapping

import jax
import ml_collections
from clu import metric_writers

from big_clip import fileio

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
TOKENIZER = os.path.join("tokenizer", "spm.model")


is_remote, absolute = fileio.is_remote, fileio.absolute


def config_path(workdir: str) -> str:
  return os.path.join(workdir, CONFIG_FILE)


def checkpoints_dir(workdir: str) -> str:
  return absolute(os.path.join(workdir, CHECKPOINTS))


def tokenizer_path(workdir: str) -> str:
  """The sentencepiece model a run trained at first use (config.data.tokenizer.path='')."""
  return os.path.join(workdir, TOKENIZER)


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  fileio.write(config_path(workdir), config.to_json_best_effort(indent=2))


def run_name(config_file: str | None) -> str:
  """'big_clip/<recipe>' for results records, from the config file the binary was given."""
  if not config_file:
    return "big_clip"
  stem = os.path.splitext(os.path.basename(config_file.split(":")[0]))[0]
  return f"big_clip/{stem}"


def eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class QuietLibraries(std_logging.Filter):
  """Drops INFO lines of orbax / jax internals so the progress lines stay readable."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    noisy = ("orbax" in record.pathname or "xla_bridge" in record.pathname)
    return record.levelno >= std_logging.WARNING or not noisy


class MetricsLog:
  """Writes scalars to TensorBoard (clu) and `workdir/metrics.jsonl` (process 0 only)."""

  def __init__(self, workdir: str, resume_step: int):
    self.is_main = jax.process_index() == 0
    self.path = os.path.join(workdir, METRICS_FILE)
    # TensorBoard only: the progress line is ours (clu's LoggingWriter would repeat it).
    self.writer = (metric_writers.AsyncWriter(metric_writers.SummaryWriter(workdir))
                   if self.is_main else None)
    if self.is_main:
      self._drop_after(resume_step)

  def _drop_after(self, step: int) -> None:
    # Steps after the restored checkpoint were lost with the killed run and are recomputed
    # (identically); keep the file a clean curve with one line per step.
    if not fileio.exists(self.path):
      return
    lines = [l for l in fileio.read_text(self.path).splitlines(keepends=True)
             if l.strip() and json.loads(l)["step"] <= step]
    fileio.write(self.path, "".join(lines))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if self.is_main:
      self.writer.write_scalars(step, dict(scalars))
      fileio.append(self.path, json.dumps(
          {"step": step, **{k: float(v) for k, v in scalars.items()}}) + "\n")

  def close(self) -> None:
    if self.writer is not None:
      self.writer.flush()
      self.writer.close()
