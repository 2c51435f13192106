r"""ProCLIP stage 1, representation inheritance (Hu et al. 2025, §3 and Fig. 2): a frozen LLM
embedder with a trainable MLP adapter learns CLIP's text space from CLIP's frozen text
encoder, on text alone, before any image-text training.

Loss (config.loss.align, big_clip/losses/alignment.py): instance semantic alignment (the
squared distance of each adapted LLM embedding to the CLIP text embedding of the same
caption) + embedding structure alignment (smooth-L1 between the two batches' pair-distance
matrices), weights 1 and 1; no contrastive term (align.contrastive_weight=0). The model is
CLIP's image tower (loaded from the teacher run with `init_only`, frozen with `optim.freeze`:
stage 1 does not touch it) next to the LLM tower (`model.text.kind='llm'`, base frozen, only
the adapter trains). Stage 2 (configs/proclip_stage2.py) starts from this run.

Differences from the paper: means over the global batch instead of the release's sums over
each GPU's batch (the weights are not tied to the batch size); the teacher runs on the host
batch by batch (models/teacher.py) instead of offline. The teacher reads this run's tokens,
so the LLM tower must use the teacher's sentencepiece tokenizer: a random-init decoder
(`llm.path=''`), as `:local` does. An LLM with its own tokenizer (`llm.path` set) is not
supported yet: the teacher would need captions tokenized its way; train.py says so.

Pod (a trained or imported CLIP ViT-L/14 big_clip run as teacher and image tower):

  python -m big_clip.train --config configs/proclip_stage1.py --workdir gs://$BUCKET/pc1

On CPU, with the embedded default run as the CLIP teacher and a tiny random-init LLM:

  python -m big_clip.train --config configs/default.py --workdir /tmp/big_clip_default
  python -m big_clip.train --config configs/proclip_stage1.py:local --workdir /tmp/pc1_local
"""

from big_clip import config as config_lib

LANGUAGES = ("en", "de", "fr", "es", "ru", "zh", "ja", "ar", "hi")
CLIP_GROUPS = ("image", "logit_scale", "logit_bias")  # taken from the CLIP run, kept frozen

ARGS = ("local",)  # what get_config(arg) takes besides None


def get_config(arg: str | None = None):
  c = config_lib.base()
  c.total_steps = 20_000
  c.log_every = 100

  # The image tower is the teacher's (CLIP ViT-L/14 at 224 px).
  c.model.update(embed_dim=768, dtype="bfloat16", remat=True, scan_layers=True,
                 activation="quick_gelu")
  c.model.image.update(image_size=224, patch_size=14, width=1024, depth=24, heads=16,
                       mlp_dim=4096, pool="cls")
  c.model.text.update(kind="llm", max_len=128)
  c.model.text.llm.update(path="/models/Meta-Llama-3-8B", pooling="mean", freeze=True,
                          lora_rank=0, adapter_hidden=4096, dtype="bfloat16")
  teacher = "big_clip:gs://YOUR_BUCKET/clip_l14"
  c.init_from, c.init_only = teacher, CLIP_GROUPS
  c.optim.freeze = CLIP_GROUPS

  c.loss.name = "softmax"
  c.loss.align.update(target="teacher_text", teacher=teacher, instance_weight=1.0,
                      structure_weight=1.0, contrastive_weight=0.0)
  c.data.update(source="shards:gs://YOUR_BUCKET/cc12m/{00000..01242}.tar", global_batch=4096,
                image_size=224, max_len=128, languages={"en": 1.0})
  c.optim.update(lr=1e-4, warmup_steps=500, weight_decay=0.05)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.checkpoint.update(every_steps=2000, keep=3)
  c.eval.update(every_steps=5000)

  if arg == "local":  # teacher and image tower: the run of configs/default.py
    c.total_steps, c.log_every = 1500, 100
    c.model.update(embed_dim=96, dtype="float32", remat=False, scan_layers=False,
                   activation="gelu")
    c.model.image.update(image_size=64, patch_size=8, width=96, depth=3, heads=4,
                         mlp_dim=384, pool="cls")
    # A random-init decoder (frozen) reading the teacher's sentencepiece tokens.
    c.model.text.update(vocab_size=1024, max_len=24, width=64, depth=2, heads=4, mlp_dim=128)
    c.model.text.llm.update(path="", dtype="float32", adapter_hidden=192, kv_heads=2)
    teacher = "big_clip:/tmp/big_clip_default"
    c.init_from = c.loss.align.teacher = teacher
    c.data.update(source="embedded", global_batch=64, image_size=64, max_len=24,
                  languages={lang: 1.0 for lang in LANGUAGES})
    c.data.tokenizer.update(path="/tmp/big_clip_default/tokenizer/spm.model",
                            vocab_size=1024)
    c.optim.update(lr=2e-3, warmup_steps=50)
    c.mesh.update(data=-1, fsdp=1)
    c.checkpoint.update(every_steps=500, keep=1)
    c.eval.update(every_steps=1500, num_images=600)
  elif arg:
    raise ValueError(f"configs/proclip_stage1.py: unknown argument {arg!r}; allowed: {', '.join(ARGS)}.")
  return c
