r"""CLIP ViT-B/32 on LAION-400M-style web data: the open_clip recipe on a TPU pod.

Radford et al. 2021 (CLIP) with open_clip's LAION-400M hyper-parameters (Cherti et al. 2023):
global batch 32k, AdamW lr 5e-4, beta2 0.98, eps 1e-6, weight decay 0.2, 2k warmup steps and
cosine decay over 32 epochs of 400M samples (~390k steps at 32k).

On a v4-256 / v5e-256 pod (one command on every host; jax.distributed is initialized from
the TPU environment):

  gcloud compute tpus tpu-vm ssh $TPU --worker=all --command "cd big_clip && \
    python -m big_clip.train --config configs/clip_vit_b32.py --workdir gs://$BUCKET/clip_b32"

`--config configs/clip_vit_b32.py:local` shrinks it to run on a laptop CPU for a smoke test.

Compiled for a v5e-256 (python -m big_clip.plan --config configs/clip_vit_b32.py
--topology v5e:16x16; benchmarks/RESULTS.md): 3.29 GiB per chip of 16 (arguments 1.66,
temporaries 1.57), 272 MiB of gradient all-reduce per chip per step, 6.9 TFLOP per chip.
"""

from big_clip import config as config_lib


ARGS = ("local",)  # what get_config(arg) takes besides None


def get_config(arg: str | None = None):
  c = config_lib.base()
  c.seed = 0
  c.total_steps = 390_000  # 12.8B samples seen at 32k
  c.log_every = 100

  c.model.update(embed_dim=512, dtype="bfloat16", remat=True, scan_layers=True,
                 activation="gelu")
  c.model.image.update(image_size=224, patch_size=32, width=768, depth=12, heads=12,
                       mlp_dim=3072, pool="cls")
  c.model.text.update(vocab_size=32000, max_len=77, width=512, depth=12, heads=8,
                      mlp_dim=2048, pool="eos")

  c.loss.name = "softmax"
  c.data.update(source="shards:gs://YOUR_BUCKET/laion400m/{00000..41407}.tar",
                global_batch=32768, image_size=224, max_len=77, languages={"en": 1.0})
  # An English sentencepiece model trained with tools/train_spm.py on a caption sample.
  c.data.tokenizer.update(path="gs://YOUR_BUCKET/tokenizers/spm_en_32k.model",
                          vocab_size=32000)

  c.optim.update(lr=5e-4, warmup_steps=2000, weight_decay=0.2, b1=0.9, b2=0.98, eps=1e-6,
                 clip_norm=1.0)
  # FSDP over all chips: params and Adam moments are sharded 256 ways, the batch too.
  # Pure data parallelism: compiled for v5e-256 (benchmarks/RESULTS.md, "every pod recipe
  # compiled"), fsdp=-1 moved 812 MiB of all-reduces per chip per step (the TPU compiler
  # gathers 3-row weight shards with padded all-reduces) for 1.34 GiB per chip; replicated
  # weights need 272 MiB of gradient all-reduce and 3.29 GiB of 16. FSDP (fsdp=-1) is for
  # towers whose state does not fit a chip.
  c.mesh.update(data=-1, fsdp=1, tensor=1, multihost="auto")
  c.checkpoint.update(every_steps=2000, keep=3, use_async=True)
  c.eval.update(every_steps=10_000)

  if arg == "local":
    config_lib.shrink_for_local(c)
  elif arg:
    raise ValueError(f"configs/clip_vit_b32.py: unknown argument {arg!r}; allowed: {', '.join(ARGS)}.")
  return c
