r"""A run's report as one HTML page: python -m big_clip.report WORKDIR [--out report.html].

Plots from WORKDIR/metrics.jsonl and WORKDIR/eval/history.jsonl (the builder is
`big_clip/reporting.py`; training writes WORKDIR/report.html at its end too): the loss and its
terms, lr, logit scale, examples/s and every other logged scalar, skipped examples by reason,
and the eval history per language with a bar chart of the last evaluation. The page is
self-contained (PNGs embedded), so it can be mailed or opened from a bucket.
"""

from __future__ import annotations

from absl import app, flags

from big_clip import cli, reporting

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  if len(argv) != 2:
    raise app.UsageError("Usage: python -m big_clip.report WORKDIR [--out report.html]")
  out = reporting.write_report(argv[1], FLAGS.out)
  if out is None:
    raise FileNotFoundError("matplotlib is not installed; pip install -r requirements.txt.")
  print(f"Wrote {out}")


def run() -> None:
  """`python -m big_clip.report`, and the console script big-clip-report."""
  flags.DEFINE_string("out", None, "The HTML file (default WORKDIR/report.html).")
  cli.run(main, "big_clip.report")


if __name__ == "__main__":
  run()
