"""What every binary (train, evaluate, export) does around its `main`: quiet library logs,
JAX flags from absl, and mistakes the user made reported as one line instead of a traceback.

A user's mistake is an exception of a class that subclasses `UserError` (a bad config key or
value, a data file that cannot be read, weights that do not fit the model, a non-finite
loss), `FileNotFoundError`, or a misspelled `--config.*` override. It ends the binary with

    big_clip.train: error: config.data.global_batch=100 is not divisible by ...

and exit status 1; `--verbose_errors` (or BIG_CLIP_VERBOSE_ERRORS=1) shows the traceback too.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import jax
from absl import app, flags, logging

from big_clip import workdir as workdir_lib
from big_clip.errors import UserError

flags.DEFINE_bool("verbose_errors", False, "Show the Python traceback of a user error too "
                  "(also BIG_CLIP_VERBOSE_ERRORS=1).")


USER_ERRORS = (UserError, FileNotFoundError)


def _is_user_error(error: BaseException) -> bool:
  if isinstance(error, USER_ERRORS):
    return True
  # ml_collections' config flags: `--config.a.b=v` naming no key raises a KeyError/
  # AttributeError whose message names the key, inside flag parsing.
  return isinstance(error, flags.Error)


def run(main: Callable[[list[str]], None], name: str) -> None:
  """`absl.app.run(main)` for the binary `name` ('big_clip.train', ...)."""

  def wrapped(argv: list[str]) -> None:
    logging.get_absl_handler().addFilter(workdir_lib.QuietLibraries())
    verbose = flags.FLAGS.verbose_errors or os.environ.get("BIG_CLIP_VERBOSE_ERRORS") == "1"
    try:
      main(argv)
    except Exception as e:  # noqa: BLE001 - the user's mistakes end in one line
      if verbose or not _is_user_error(e):
        raise
      message = " ".join(str(e).split()) or type(e).__name__
      print(f"{name}: error: {message}", file=sys.stderr, flush=True)
      sys.exit(1)

  # A console script (big-clip-train, ...) is its own main module: its --help lists the key
  # flags of sys.argv[0], so the flags the binary's module defined are declared for it too.
  # Its usage text is the binary's docstring, as with `python -m`.
  for flag in flags.FLAGS.get_key_flags_for_module(main.__module__):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  script = sys.modules.get("__main__")
  if script is not None and not getattr(script, "__doc__", None):
    script.__doc__ = sys.modules[main.__module__].__doc__
  jax.config.config_with_absl()
  app.run(wrapped)
