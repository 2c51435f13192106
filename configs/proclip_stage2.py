r"""ProCLIP stage 2, contrastive tuning with self-distillation regularization (Hu et al. 2025,
§3 and Fig. 2; github.com/VisionXLab/ProCLIP training/train.py `train_one_epoch_stage2`):
image-text InfoNCE between CLIP's image tower and the LLM embedder of stage 1 (LLM frozen,
adapter trained), now with the image tower trained too. What keeps the image tower from
forgetting CLIP is a teacher that is the exponential moving average of the image tower
itself (Fig. 2: "EMA", frozen, starting at the stage-1 weights): the student's image
embeddings follow the teacher's with the same two terms as stage 1, instance semantic
alignment and embedding structure alignment (config.loss.align.target='ema_image',
big_clip/losses/alignment.py). The regularizer is on the image tower, not the LLM embedder:
the embedder's LLM stays frozen, only its adapter trains.

    L = L_InfoNCE + instance_weight * L_ins(img, ema_img) + structure_weight * L_struct(...)

The EMA is config.optim.ema_decay's weight average (the train state's 'ema', updated after
every step); the teacher's embeddings come from it, without gradient, in the same step. As
everywhere in big_clip the in-training evals, `evaluate`, `export` and `big_clip.load` then
use the EMA weights (`--no_ema`: the student's). The decay (0.999 on a pod, 0.99 for the
300-step `:local`) and the weights (1 and 1, means over the global batch) are chosen here:
the paper's values are not in its release.

Pod (the stage-1 run of configs/proclip_stage1.py):

  python -m big_clip.train --config configs/proclip_stage2.py --workdir gs://$BUCKET/pc2

On CPU, after the two commands of configs/proclip_stage1.py's docstring:

  python -m big_clip.train --config configs/proclip_stage2.py:local --workdir /tmp/pc2_local
"""

import importlib.util
import os

from big_clip import config as config_lib


def _stage1(arg):
  """configs/proclip_stage1.py's config: the same model, loaded whole with init_from."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "proclip_stage1.py")
  spec = importlib.util.spec_from_file_location("proclip_stage1", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


ARGS = ("local",)  # what get_config(arg) takes besides None


def get_config(arg: str | None = None):
  if arg and arg not in ARGS:
    raise ValueError(f"configs/proclip_stage2.py: unknown argument {arg!r}; allowed: {', '.join(ARGS)}.")
  c = _stage1(arg)
  c.total_steps = 300 if arg == "local" else 20_000
  c.init_from = "big_clip:/tmp/pc1_local" if arg == "local" else "big_clip:gs://YOUR_BUCKET/pc1"
  c.init_only = ()  # everything: CLIP's image tower, the LLM, the stage-1 adapter
  c.optim.freeze = ()  # the image tower and the adapter train; the LLM base stays frozen
  c.optim.ema_decay = 0.99 if arg == "local" else 0.999
  c.loss.align.update(target="ema_image", teacher="", instance_weight=1.0,
                      structure_weight=1.0, contrastive_weight=1.0)
  if arg == "local":
    c.optim.update(lr=3e-4, warmup_steps=30)
  else:
    c.optim.update(lr=1e-5, warmup_steps=500, weight_decay=0.05)
  return c
