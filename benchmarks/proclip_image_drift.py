r"""How much of CLIP's image-text alignment a tuned image tower kept: zero-shot accuracy of
runs' image towers paired with the original CLIP run's text tower (ProCLIP stage 2's
self-distillation is meant to keep it; Hu et al. 2025, §1), and the mean cosine between the
tuned and the original image embeddings of held-out embedded images.

  python benchmarks/proclip_image_drift.py --clip /tmp/proclip2/clip_teacher \
      --runs /tmp/proclip2/pc2,/tmp/proclip2/pc2_noreg --no_ema

Each run must share the CLIP run's image tower architecture (ProCLIP's stages do).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from big_clip import sharding  # noqa: E402
from big_clip.data import embedded, pipeline  # noqa: E402
from big_clip.evals import records, suite  # noqa: E402
from big_clip.models import adapt, two_tower  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("clip", None, "The original CLIP run (its text tower and image tower).")
flags.DEFINE_list("runs", [], "Runs whose image towers to pair with the CLIP text tower.")
flags.DEFINE_bool("no_ema", False, "The runs' raw weights instead of their weight EMA.")
flags.DEFINE_integer("images", 300, "Held-out embedded images for the cosine.")


def main(argv: list[str]) -> None:
  del argv
  mesh = sharding.mesh_from_config({"data": -1, "fsdp": 1, "tensor": 1})
  config, clip_params, _ = adapt.read_run(FLAGS.clip, mesh=mesh)
  graphdef = nnx.graphdef(nnx.eval_shape(two_tower.init_fn(config.model)))
  tokenizer = pipeline.build_tokenizer(config, FLAGS.clip)
  evals = suite.Suite(config, tokenizer, graphdef, mesh, "clip_text")
  images = pipeline.model_images([embedded.render_example(
      config.seed, "test", i, config.data.image_size)[0] for i in range(FLAGS.images)],
      config.data)
  encode = lambda p: np.asarray(nnx.merge(graphdef, p).encode_image(images))
  reference = encode(clip_params)
  print("run | image cosine to CLIP | colour mean | shape mean (CLIP text tower)")
  for run in [FLAGS.clip] + FLAGS.runs:
    _, params, step = adapt.read_run(run, mesh=mesh, ema=not FLAGS.no_ema)
    paired = {**clip_params, "image": params["image"]}
    cosine = float(np.mean(np.sum(encode(paired) * reference, axis=1)))
    scores = records.records_to_scalars(evals.run(paired))
    colour, shape = (scores.get(f"embedded_{t}/mean/acc1", float("nan")) for t in
                     ("colour", "shape"))
    print(f"{run} (step {step}) | {cosine:.4f} | {100 * colour:.1f}% | {100 * shape:.1f}%")


if __name__ == "__main__":
  flags.mark_flag_as_required("clip")
  app.run(main)
