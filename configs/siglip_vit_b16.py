r"""SigLIP ViT-B/16 on WebLI/LAION-style data: the sigmoid loss at 32k batch on a TPU pod.

Zhai et al. 2023 (SigLIP): sigmoid loss with learnable temperature (init log 10) and bias
(init -10), MAP-head pooling in the image tower, last-token text pooling, Adam beta2 0.95,
lr 1e-3, weight decay 1e-4, global batch 32k. The towers follow big_vision's SigLIP exactly
(no pre-LN, no image projection, bidirectional text pooled at position L-1 with a biased
head, tanh GELU, LayerNorm eps 1e-6), so `python -m big_clip.export --format hf` writes a
transformers SiglipModel.

  gcloud compute tpus tpu-vm ssh $TPU --worker=all --command "cd big_clip && \
    python -m big_clip.train --config configs/siglip_vit_b16.py --workdir gs://$BUCKET/siglip"

`--config configs/siglip_vit_b16.py:local` shrinks it to run on a laptop CPU.

Compiled for a v5e-256 (python -m big_clip.plan --config configs/siglip_vit_b16.py
--topology v5e:16x16; benchmarks/RESULTS.md): 5.76 GiB per chip of 16 (arguments 2.34,
temporaries 3.36), 388 MiB of gradient all-reduce and 96 MiB of sigmoid-ring permutes per
chip per step, 21.8 TFLOP per chip.
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
  c.model.image.update(image_size=224, patch_size=16, width=768, depth=12, heads=12,
                       mlp_dim=3072, pool="map", ln_pre=False, proj=False)
  c.model.text.update(vocab_size=32000, max_len=64, width=768, depth=12, heads=12,
                      mlp_dim=3072, pool="final", causal=False, proj_bias=True)

  c.loss.name = "sigmoid"
  c.data.update(source="shards:gs://YOUR_BUCKET/laion400m/{00000..41407}.tar",
                global_batch=32768, image_size=224, max_len=64, languages={"en": 1.0})
  c.data.tokenizer.update(path="gs://YOUR_BUCKET/tokenizers/spm_en_32k.model",
                          vocab_size=32000)
  # SigLIP trains on [-1, 1] pixels.
  c.data.update(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

  c.optim.update(lr=1e-3, warmup_steps=5000, weight_decay=1e-4, b1=0.9, b2=0.95, eps=1e-8,
                 clip_norm=1.0)
  # Pure data parallelism: compiled for v5e-256 (benchmarks/RESULTS.md, "every pod recipe
  # compiled"), fsdp=-1 needed 1081 MiB of all-reduces per chip per step for 2.07 GiB per
  # chip; replicated weights 388 MiB for 5.76 GiB of 16. FSDP (fsdp=-1) is for towers
  # whose state does not fit a chip.
  c.mesh.update(data=-1, fsdp=1, tensor=1, multihost="auto")
  c.checkpoint.update(every_steps=2000, keep=3, use_async=True)
  c.eval.update(every_steps=10_000)

  if arg == "local":
    config_lib.shrink_for_local(c)
  elif arg:
    raise ValueError(f"configs/siglip_vit_b16.py: unknown argument {arg!r}; allowed: {', '.join(ARGS)}.")
  return c
