r"""Compile a run for a TPU topology from any machine: python -m big_clip.plan --config CFG
--topology v5e:16x16 [--num_slices N] [--json OUT].

The train step that `big_clip.train` would run (and the eval embedding steps) is compiled
by the TPU compiler for the topology's chips with the config's mesh (-1 axes take the
rest of the chips), from the abstract state: nothing is allocated or executed. It prints per
chip the memory (arguments, temporaries, outputs, total against the chip's HBM), FLOPs,
collectives and compile time, and a verdict; exits with status 1 when the step does not fit.
Needs libtpu: pip install -r requirements-tpu.txt.
"""

from __future__ import annotations

import json
import os

# Planning compiles for abstract TPU devices; the host's own backend is only the CPU (with
# libtpu installed JAX would otherwise probe for an attached TPU).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from big_clip import cli, fileio, planning  # noqa: E402
from big_clip.errors import UserError  # noqa: E402

FLAGS = flags.FLAGS


class DoesNotFitError(UserError):
  """The compiled step needs more memory per chip than the chip has."""


def main(argv: list[str]) -> None:
  del argv
  report = planning.compile_plan(FLAGS.config, FLAGS.topology, FLAGS.num_slices,
                                 with_eval=FLAGS.eval, hlo_path=FLAGS.hlo_out)
  print(planning.describe(report), flush=True)
  if FLAGS.json:
    fileio.write(FLAGS.json, json.dumps(report, indent=1))
  if not report["fits"]:
    raise DoesNotFitError(planning.verdict(report))


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "A config file in configs/.",
                                  lock_config=True)
  flags.DEFINE_string("topology", None, "A TPU slice, GENERATION:SHAPE: v5e:16x16, v4:4x4x4, "
                      "v5p:8x8x8, v6e:8x8.")
  flags.DEFINE_integer("num_slices", 1, "Slices of that shape joined over DCN (multi-slice).")
  flags.DEFINE_string("json", None, "Also write the report as JSON here.")
  flags.DEFINE_string("hlo_out", None, "Also write the train step's optimized HLO here.")
  flags.DEFINE_bool("eval", True, "Also compile the eval embedding steps.")
  flags.mark_flags_as_required(["config", "topology"])
  cli.run(main, "big_clip.plan")
