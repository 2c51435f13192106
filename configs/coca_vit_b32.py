r"""CoCa-style ViT-B/32: CLIP's contrastive loss + a captioning decoder, on a TPU pod.

Yu et al. 2022 (CoCa) train one image tower with two losses: the contrastive loss of CLIP
and the token cross-entropy of a decoder that cross-attends to the image tokens and writes
the caption (eq. 4: L = L_con + lambda L_cap). The sizes follow open_clip's coca_ViT-B-32
(12-layer 512-wide decoder, caption weight 2, contrastive weight 1) with CLIP B/32's
LAION-400M optimizer settings (configs/clip_vit_b32.py). Unlike CoCa the decoder has its
own token embedding (as CapPa / LocCa), so the two towers stay CLIP's layout and export as
CLIPModel / open_clip CLIP (the decoder is left out of the export, with a warning).
`loss.caption.mode='parallel'` (parallel_fraction 0.75) gives CapPa's mix instead.

On a v4-256 / v5e-256 pod (one command on every host):

  gcloud compute tpus tpu-vm ssh $TPU --worker=all --command "cd big_clip && \
    python -m big_clip.train --config configs/coca_vit_b32.py --workdir gs://$BUCKET/coca_b32"

`--config configs/coca_vit_b32.py:local` shrinks it to a CPU smoke run on the embedded data.

Compiled for a v5e-256 (python -m big_clip.plan --config configs/coca_vit_b32.py
--topology v5e:16x16; benchmarks/RESULTS.md): 5.28 GiB per chip of 16 with replicated
weights (data=-1): 431 MiB of all-reduces and 64 MiB of ring permutes per chip per step. FSDP
over all chips needed 2.71 GiB but moved 1206 MiB of all-reduces, 375 MiB of all-gathers
and 38 MiB of all-to-alls (3.6x the bytes).
"""

from big_clip import config as config_lib

ARGS = ("local",)  # what get_config(arg) takes besides None


def get_config(arg: str | None = None):
  c = config_lib.base()
  c.total_steps = 390_000  # 12.8B samples seen at 32k
  c.log_every = 100

  c.model.update(embed_dim=512, dtype="bfloat16", remat=True, scan_layers=True,
                 activation="gelu")
  c.model.image.update(image_size=224, patch_size=32, width=768, depth=12, heads=12,
                       mlp_dim=3072, pool="cls")
  c.model.text.update(vocab_size=32000, max_len=77, width=512, depth=12, heads=8,
                      mlp_dim=2048, pool="eos")
  c.model.decoder.update(width=512, depth=12, heads=8, mlp_dim=2048)

  c.loss.name = "softmax"
  c.loss.caption.update(weight=2.0, mode="ar")  # open_clip: coca_caption_loss_weight=2
  c.data.update(source="shards:gs://YOUR_BUCKET/laion400m/{00000..41407}.tar",
                global_batch=32768, image_size=224, max_len=77, languages={"en": 1.0})
  c.data.tokenizer.update(path="gs://YOUR_BUCKET/tokenizers/spm_en_32k.model",
                          vocab_size=32000)

  c.optim.update(lr=5e-4, warmup_steps=2000, weight_decay=0.2, b1=0.9, b2=0.98, eps=1e-6,
                 clip_norm=1.0)
  # Replicated weights (compiled for v5e-256, see the docstring); fsdp=-1 for larger towers.
  c.mesh.update(data=-1, fsdp=1, tensor=1, multihost="auto")
  c.checkpoint.update(every_steps=2000, keep=3, use_async=True)
  c.eval.update(every_steps=10_000)

  if arg == "local":
    config_lib.shrink_for_local(c)
  elif arg:
    raise ValueError(f"configs/coca_vit_b32.py: unknown argument {arg!r}; allowed: "
                     f"{', '.join(ARGS)}.")
  return c
