r"""The eval binary: python -m big_clip.evaluate --config CFG --workdir DIR [--eval=SPEC ...].

Runs the evaluations listed in `config.evals` (or `--eval`, repeatable; grammar in
`evals/specs.py`) on the latest checkpoint of DIR, or on `--checkpoint PATH` (a step folder
or a workdir). The same `evals.suite.Suite` runs periodically inside training. Evaluators:
`evals/zeroshot.py` (classification per language, Babel-ImageNet protocol),
`evals/retrieval.py` (CLIP_benchmark retrieval per language), `evals/long_captions.py`.

Results are JSON lines with CLIP_benchmark's fields, {"dataset", "model", "task",
"language", "metrics"}, plus "step", to `--output` (default DIR/eval/results.jsonl), and a
table on stdout.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from big_clip import checkpoints, cli, fileio, sharding
from big_clip import config as config_lib
from big_clip import workdir as workdir_lib
from big_clip.data import pipeline
from big_clip.evals import records, suite
from big_clip.models import two_tower

FLAGS = flags.FLAGS


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, *,
                        checkpoint: str | None = None, step: int | None = None,
                        evals: Sequence[str] | None = None, output: str | None = None,
                        model_name: str = "big_clip", ema: bool = True) -> list[dict]:
  """What the binary does: restore the params (the weight EMA where the run kept one,
  unless `ema` is False), run the suite, write and print the results."""
  if evals:
    config = config.copy_and_resolve_references()
    config.evals = tuple(evals)
  config_lib.validate(config)
  suite.validate(config.evals)
  ckpt_dir, ckpt_step, ckpt_workdir = checkpoints.find(checkpoint or workdir)
  workdir = workdir or ckpt_workdir
  step = ckpt_step if step is None else step
  mesh = sharding.mesh_from_config(config.mesh)
  tokenizer = pipeline.build_tokenizer(config, workdir)
  graphdef, abs_params, shardings = two_tower.abstract_params(config.model, mesh)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abs_params, shardings)
  step, params = checkpoints.read_params(ckpt_dir, step, target, ema=ema)
  results = suite.Suite(config, tokenizer, graphdef, mesh, model_name).run(params)
  output = output or os.path.join(workdir, "eval", "results.jsonl")
  records.write_records(results, os.path.dirname(fileio.absolute(output)), step=step,
                        filename=os.path.basename(output), history=False)
  records.print_table(results, title=f"{model_name}, checkpoint step {step}")
  logging.info("Wrote %d records to %s", len(results), output)
  return [{**r, "step": step} for r in results]


def main(argv: list[str]) -> None:
  del argv
  if FLAGS.workdir is None and FLAGS.checkpoint is None:
    raise app.UsageError("Give --workdir DIR (its latest checkpoint) or --checkpoint PATH.")
  name = workdir_lib.run_name(config_flags.get_config_filename(FLAGS["config"]))
  evaluate_checkpoint(FLAGS.config, FLAGS.workdir, checkpoint=FLAGS.checkpoint, step=FLAGS.step,
                      evals=FLAGS.eval, output=FLAGS.output, model_name=name,
                      ema=not FLAGS.no_ema)


def run() -> None:
  """`python -m big_clip.evaluate`, and the console script big-clip-evaluate."""
  config_flags.DEFINE_config_file("config", None, "The training config file.")
  flags.DEFINE_string("workdir", None, "The training workdir (its latest checkpoint is used).")
  flags.DEFINE_string("checkpoint", None, "A checkpoint step folder or a workdir; overrides "
                      "--workdir for the checkpoint (the tokenizer comes from its workdir).")
  flags.DEFINE_integer("step", None, "Evaluate this checkpoint step instead of the latest.")
  flags.DEFINE_multi_string("eval", None, "An eval spec (repeatable), replacing config.evals; "
                            "e.g. retrieval:manifest:PATH:test (see big_clip/evals/specs.py).")
  flags.DEFINE_string("output", None, "The results file (default WORKDIR/eval/results.jsonl).")
  flags.DEFINE_bool("no_ema", False, "Evaluate the raw weights, not the weight EMA the run "
                    "kept (config.optim.ema_decay > 0).")
  flags.mark_flags_as_required(["config"])
  cli.run(main, "big_clip.evaluate")


if __name__ == "__main__":
  run()
