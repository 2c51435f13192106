r"""SigLIP 2 B/16 NaFlex (Tschannen et al. 2025, §2.4.2) on a TPU pod: the sigmoid loss over
images at their native aspect ratio.

NaFlex = NaViT (Dehghani et al. 2023: any aspect ratio as a padded patch sequence) +
FlexiViT (Beyer et al. 2023: one model for many sequence lengths). Each image is resized,
aspect ratio kept, to the largest grid of 16 px patches with at most `data.max_patches`
(256) of them; the learned 16 x 16 position table is resized bilinearly to each image's
grid; attention and the MAP head ignore the padding. The towers otherwise follow SigLIP
(configs/siglip_vit_b16.py). SigLIP 2's decoder, self-distillation and masked-prediction
losses are not part of this recipe.

  gcloud compute tpus tpu-vm ssh $TPU --worker=all --command "cd big_clip && \
    python -m big_clip.train --config configs/siglip2_naflex.py --workdir gs://$BUCKET/naflex"

`--config configs/siglip2_naflex.py:local` shrinks it to a 10-step CPU run on the embedded
data (still NaFlex: 64 px base grid of 8 px patches, max_patches 64).

Compiled for a v5e-256 (python -m big_clip.plan --config configs/siglip2_naflex.py
--topology v5e:16x16; benchmarks/RESULTS.md): 6.31 GiB per chip of 16 with replicated
weights (data=-1): 388 MiB of all-reduces and 96 MiB of ring permutes per chip per step. FSDP
over all chips needed 2.67 GiB but 1082 MiB of all-reduces (the TPU compiler gathers 3-row
weight shards with padded all-reduces, as for siglip_vit_b16).
"""

import math

from big_clip import config as config_lib


ARGS = ("local",)  # what get_config(arg) takes besides None


def get_config(arg: str | None = None):
  c = config_lib.base()
  c.seed = 0
  c.total_steps = 300_000  # ~9B samples seen at 32k
  c.log_every = 100

  c.model.update(embed_dim=768, dtype="bfloat16", remat=True, scan_layers=True,
                 logit_scale_init=math.log(10.0), logit_bias_init=-10.0,
                 activation="gelu_tanh", ln_eps=1e-6)
  # image_size / patch_size = 16: the stored position table is 16 x 16 (SigLIP 2 NaFlex).
  c.model.image.update(image_size=256, patch_size=16, width=768, depth=12, heads=12,
                       mlp_dim=3072, pool="map", ln_pre=False, proj=False, naflex=True)
  c.model.text.update(vocab_size=32000, max_len=64, width=768, depth=12, heads=12,
                      mlp_dim=3072, pool="final", causal=False, proj_bias=True)

  c.loss.name = "sigmoid"
  c.data.update(source="shards:gs://YOUR_BUCKET/laion400m/{00000..41407}.tar",
                global_batch=32768, image_size=256, max_len=64, languages={"en": 1.0},
                max_patches=256, patch_size=16)
  c.data.tokenizer.update(path="gs://YOUR_BUCKET/tokenizers/spm_en_32k.model",
                          vocab_size=32000)
  c.data.update(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # [-1, 1] pixels

  c.optim.update(lr=1e-3, warmup_steps=5000, weight_decay=1e-4, b1=0.9, b2=0.95, eps=1e-8,
                 clip_norm=1.0)
  # Replicated weights (compiled for v5e-256, see the docstring); fsdp=-1 for larger towers.
  c.mesh.update(data=-1, fsdp=1, tensor=1, multihost="auto")
  c.checkpoint.update(every_steps=2000, keep=3, use_async=True)
  c.eval.update(every_steps=10_000)

  if arg == "local":
    config_lib.shrink_for_local(c)
    c.model.image.patch_size = 8
    c.data.update(patch_size=8, max_patches=64)
  elif arg:
    raise ValueError(f"configs/siglip2_naflex.py: unknown argument {arg!r}; allowed: "
                     f"{', '.join(ARGS)}.")
  return c
