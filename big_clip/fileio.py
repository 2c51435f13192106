"""Every read and write of a user's path (workdir, data, exports, tokenizer) in one place.

Paths are local, `gs://bucket/...`, or any other filesystem TensorFlow knows (`ram://` in the
tests), all through `tf.io.gfile`: one code path, so a local run exercises the same calls a
TPU run on GCS makes. Never `open` / `os.makedirs` / `os.path.exists` on such a path: on
'gs://bucket/run' they read nothing and write into a local folder named 'gs:'.
`os.path.join` / `dirname` / `basename` are fine on URLs; `os.path.abspath` is not (use
`absolute`). Checkpoints are orbax's (big_clip.checkpoints): it reaches gs:// through
etils.epath and tensorstore.
"""

from __future__ import annotations

import json
import os
from typing import Any

import tensorflow as tf

# tf.io.gfile: TensorFlow is already loaded by the TensorBoard writer and the data readers,
# and, unlike etils.epath (which itself delegates gs:// to tf.io.gfile when TF is installed),
# it accepts ram://, so the gs:// code paths run in tests without a bucket.
open_file = tf.io.gfile.GFile
exists = tf.io.gfile.exists
isdir = tf.io.gfile.isdir
listdir = tf.io.gfile.listdir
glob = tf.io.gfile.glob
remove = tf.io.gfile.remove
walk = tf.io.gfile.walk


def is_remote(path: str) -> bool:
  return "://" in path


def absolute(path: str) -> str:
  """Local paths made absolute (orbax needs it); gs:// and other URLs as they are."""
  return path if is_remote(path) else os.path.abspath(path)


def makedirs(path: str) -> None:
  tf.io.gfile.makedirs(path)


def size(path: str) -> int:
  return tf.io.gfile.stat(path).length


def copy(src: str, dst: str) -> None:
  tf.io.gfile.copy(src, dst, overwrite=True)


def read_bytes(path: str) -> bytes:
  with open_file(path, "rb") as f:
    return f.read()


def read_text(path: str) -> str:
  with open_file(path, "r") as f:
    return f.read()


def read_json(path: str) -> Any:
  return json.loads(read_text(path))


def write(path: str, data: str | bytes) -> None:
  """Writes a whole file, renamed into place so a reader never sees half of it (on GCS the
  rename is a server-side copy). One path for every filesystem: TensorFlow's ram:// (the
  tests' stand-in for gs://) appends on mode 'w' instead of truncating, a rename replaces."""
  makedirs(os.path.dirname(path) or ".")
  with open_file(path + ".tmp", "wb" if isinstance(data, bytes) else "w") as f:
    f.write(data)
  tf.io.gfile.rename(path + ".tmp", path, overwrite=True)


def append(path: str, text: str) -> None:
  """Appends to a text file (on GCS the object is rewritten: keep such files small)."""
  with open_file(path, "a") as f:
    f.write(text)
