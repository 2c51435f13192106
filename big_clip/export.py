r"""To and from PyTorch: Hugging Face CLIPModel / SiglipModel and open_clip, exactly.

Export a training run (its newest checkpoint, or --step):

  python -m big_clip.export --workdir /tmp/big_clip_default --format hf --out /tmp/export_hf
  python -m big_clip.export --workdir /tmp/big_clip_default --format open_clip --out /tmp/oc

Import pretrained weights as an orbax checkpoint (for `evaluate`, `export` or
`--config.init_from=big_clip:WORKDIR`); without --config the model config is derived from
the checkpoint's own config:

  python -m big_clip.export --import hf:/path/to/save_pretrained_dir --out /tmp/imported

Softmax models export as `CLIPModel`, sigmoid models as `SiglipModel`. The conversions live
in `big_clip/convert/` (`pretrained.py`: folders, `hf.py` / `open_clip.py`: tensor tables);
this file is the command line.
"""

from __future__ import annotations


from absl import app, flags
from ml_collections import config_flags

from big_clip import cli, fileio
from big_clip.convert import pretrained
from big_clip.models import adapt

FORMATS = ("hf", "open_clip")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  del argv
  out = FLAGS.out
  if FLAGS["import"].value:
    spec = FLAGS["import"].value
    kind, _, path = spec.partition(":")
    if kind not in ("hf", "open_clip") or not path:
      raise app.UsageError(f"--import={spec!r}; use hf:PATH or open_clip:PATH.")
    loader = pretrained.from_hf if kind == "hf" else pretrained.from_open_clip
    config, params = loader(path, FLAGS.config)
    pretrained.write_import(config, params, out, spec)
    print(f"Imported {spec} -> {out}/checkpoints/0 ({config.loss.name} model); fine-tune with "
          f"--config.init_from=big_clip:{out}")
    return
  if not FLAGS.workdir or FLAGS.format not in FORMATS:
    raise app.UsageError("Usage: python -m big_clip.export --workdir DIR [--step N] "
                         "--format hf|open_clip --out OUT, or --import hf:PATH --out WORKDIR")
  config, params, step = adapt.read_run(FLAGS.workdir, FLAGS.step, ema=not FLAGS.no_ema)
  tok = pretrained.tokenizer_of(config, FLAGS.workdir)
  if FLAGS.format == "hf":
    what = f"transformers {pretrained.to_hf(params, config, out, tokenizer_path=tok)}"
  else:
    pretrained.to_open_clip(params, config, out, tokenizer_path=tok)
    what = "open_clip"
  print(f"Exported {FLAGS.workdir} step {step} as {what} -> {out}: "
        + ", ".join(sorted(fileio.listdir(out))))


def run() -> None:
  """`python -m big_clip.export`, and the console script big-clip-export."""
  flags.DEFINE_string("workdir", None, "A training workdir to export.")
  flags.DEFINE_integer("step", None, "The checkpoint step (default: the newest).")
  flags.DEFINE_bool("no_ema", False, "Export the raw weights, not the weight EMA the run "
                    "kept (config.optim.ema_decay > 0).")
  flags.DEFINE_enum("format", "hf", FORMATS, "hf: transformers CLIPModel/SiglipModel; "
                    "open_clip: open_clip state dict + model config.")
  flags.DEFINE_string("out", None, "Output folder.")
  flags.DEFINE_string("import", None, "hf:PATH or open_clip:PATH: write an orbax checkpoint.")
  config_flags.DEFINE_config_file("config", None, "Model config for --import (optional).")
  flags.mark_flag_as_required("out")
  cli.run(main, "big_clip.export")


if __name__ == "__main__":
  run()
