r"""Writes webdataset-style .tar or TFRecord shards from a manifest or an image folder.

  # the train split of a manifest (captions in every language it has), 100 examples a shard:
  python tools/make_shards.py --manifest ../shared/data/flickr8k_multi30k/manifest.json \
      --split train --out /tmp/flickr_shards/train --format tar --per_shard 100

  # an image folder + a captions file ("relative/path.jpg<TAB>caption" per line; several
  # lines for one image give it several captions), all in --language:
  python tools/make_shards.py --images DIR --captions captions.tsv --language de \
      --out /tmp/shards/part --format tfrecord --per_shard 1000

Train on them with config.data.source = 'shards:/tmp/flickr_shards/train-*.tar'.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # noqa: E402
import tqdm  # noqa: E402
from absl import app, flags  # noqa: E402

from big_clip.data import manifest as manifest_lib  # noqa: E402
from big_clip.data import shards  # noqa: E402

flags.DEFINE_string("manifest", None, "A manifest JSON (big_clip/data/manifest.py format).")
flags.DEFINE_string("split", None, "Only this split of the manifest (default: all items).")
flags.DEFINE_string("images", None, "An image folder (with --captions).")
flags.DEFINE_string("captions", None, "TSV of 'relative/image/path<TAB>caption' lines.")
flags.DEFINE_string("language", "en", "Language of the --captions file.")
flags.DEFINE_string("out", None, "Output prefix: shards are PREFIX-00000.tar, ...")
flags.DEFINE_enum("format", "tar", ["tar", "tfrecord"], "Shard format.")
flags.DEFINE_integer("per_shard", 1000, "Examples per shard.")
flags.DEFINE_integer("repeat", 1, "Write the examples this many times (benchmarks), keys "
                     "suffixed _r1, _r2, ...")
FLAGS = flags.FLAGS


def _read(path: str) -> bytes:
  with tf.io.gfile.GFile(path, "rb") as f:
    return f.read()


def from_manifest(path: str, split: str | None) -> list[tuple[str, dict, int | None, tuple]]:
  """(image path, captions, label, regions) of each item."""
  return [(item.image, dict(item.captions), item.label, tuple(item.regions))
          for item in manifest_lib.load(path, split).items]


def from_folder(images: str, captions_tsv: str, language: str
                ) -> list[tuple[str, dict, int | None, tuple]]:
  captions: dict[str, list[str]] = {}
  with tf.io.gfile.GFile(captions_tsv, "r") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      rel, sep, text = line.rstrip("\n").partition("\t")
      if not sep:
        raise ValueError(f"{captions_tsv}:{n}: expected 'image<TAB>caption', got {line!r}.")
      captions.setdefault(rel, []).append(text)
  return [(os.path.join(images, rel), {language: caps}, None, ())
          for rel, caps in captions.items()]


def examples(items: list[tuple[str, dict, int | None, tuple]], repeat: int
             ) -> Iterator[shards.RawExample]:
  for r in range(repeat):
    for image_path, captions, label, regions in items:
      key, ext = os.path.splitext(os.path.basename(image_path))
      key = key.replace(".", "_") + (f"_r{r}" if repeat > 1 else "")
      yield shards.RawExample(key, _read(image_path), ext.lstrip(".").lower() or "jpg",
                              captions, {}, label, regions)


def main(argv: list[str]) -> None:
  del argv
  if FLAGS.out is None or (FLAGS.manifest is None) == (FLAGS.images is None):
    raise app.UsageError("Give --out and exactly one of --manifest or --images/--captions.")
  if FLAGS.manifest:
    items = from_manifest(FLAGS.manifest, FLAGS.split)
  else:
    if not FLAGS.captions:
      raise app.UsageError("--images needs --captions (a TSV of 'image<TAB>caption').")
    items = from_folder(FLAGS.images, FLAGS.captions, FLAGS.language)
  total = len(items) * FLAGS.repeat
  progress = tqdm.tqdm(examples(items, FLAGS.repeat), total=total, unit="ex",
                       desc="make_shards")
  paths = shards.write_shards(progress, FLAGS.out, FLAGS.format, FLAGS.per_shard)
  print(f"Wrote {total} examples into {len(paths)} {FLAGS.format} shards: {paths[0]} ... "
        f"{paths[-1]}")


if __name__ == "__main__":
  app.run(main)
