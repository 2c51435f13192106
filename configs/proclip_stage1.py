r"""ProCLIP stage 1 / DC-CLIP-style distillation: a student dual encoder learns from a frozen,
trained CLIP teacher's embeddings before (or instead of) contrastive training.

Loss (big_clip/losses/distill.py): cosine alignment of each student embedding with the
teacher's (image and text, ProCLIP's "instance semantic alignment") plus the KL divergence
between the teacher's and the student's image-text similarity distributions at temperature
0.05 ("embedding structure alignment"); the contrastive term is switched off
(contrastive_weight=0), as in ProCLIP's first stage. The weights and temperature are chosen
here, not copied from the papers.

What is and is not ProCLIP here: the teacher is any big_clip run ('big_clip:WORKDIR[:STEP]',
trained here or imported), run batch by batch on the host; the student is a whole big_clip
dual encoder trained end to end. ProCLIP's student is an LLM embedder with a frozen CLIP
image tower; with the LLM text tower (`model.text.kind='llm'`) the teacher's
embeddings should come from the embedding cache and the image tower be frozen -- not wired
up on this branch.

Pod (teacher = a trained CLIP ViT-B/16 run with the same tokenizer):

  python -m big_clip.train --config configs/proclip_stage1.py \
    --config.loss.distill.teacher=big_clip:gs://$BUCKET/clip_b16 --workdir gs://$BUCKET/pc1

On CPU, distilling the embedded default run into a fresh student of the same size:

  python -m big_clip.train --config configs/default.py --workdir /tmp/big_clip_default
  python -m big_clip.train --config configs/proclip_stage1.py:local --workdir /tmp/pc1_local
"""

from big_clip import config as config_lib


ARGS = ("local",)  # what get_config(arg) takes besides None


def get_config(arg: str | None = None):
  c = config_lib.base()
  c.seed = 1  # a different init from the teacher's
  c.total_steps = 20_000
  c.log_every = 100

  c.model.update(embed_dim=512, dtype="bfloat16", remat=True, scan_layers=True)
  c.model.image.update(image_size=224, patch_size=16, width=768, depth=12, heads=12,
                       mlp_dim=3072, pool="cls")
  c.model.text.update(vocab_size=32000, max_len=77, width=512, depth=12, heads=8,
                      mlp_dim=2048, pool="eos")
  c.loss.name = "softmax"
  c.loss.distill.update(enabled=True, teacher="big_clip:gs://YOUR_BUCKET/clip_b16",
                        feature="cosine", feature_weight=1.0, kl_weight=1.0,
                        temperature=0.05, contrastive_weight=0.0)
  c.data.update(source="shards:gs://YOUR_BUCKET/laion400m/{00000..41407}.tar",
                global_batch=8192, image_size=224, max_len=77, languages={"en": 1.0})
  # The teacher's tokenizer: it reads the student's tokens.
  c.data.tokenizer.update(path="gs://YOUR_BUCKET/tokenizers/spm_en_32k.model",
                          vocab_size=32000)
  c.optim.update(lr=5e-4, warmup_steps=1000, weight_decay=0.1)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.checkpoint.update(every_steps=2000, keep=3)
  c.eval.update(every_steps=5000)

  if arg == "local":  # student and teacher sized as configs/default.py
    c.total_steps, c.log_every = 200, 20
    c.model.update(embed_dim=96, dtype="float32", remat=False, scan_layers=False)
    c.model.image.update(image_size=64, patch_size=8, width=96, depth=3, heads=4,
                         mlp_dim=384, pool="cls")
    c.model.text.update(vocab_size=1024, max_len=24, width=96, depth=3, heads=4, mlp_dim=384)
    c.loss.distill.teacher = "big_clip:/tmp/big_clip_default"
    c.data.update(source="embedded", global_batch=64, image_size=64, max_len=24,
                  languages={lang: 1.0 for lang in
                             ("en", "de", "fr", "es", "ru", "zh", "ja", "ar", "hi")})
    c.data.tokenizer.update(path="/tmp/big_clip_default/tokenizer/spm.model",
                            vocab_size=1024)
    c.optim.update(lr=1e-3, warmup_steps=20)
    c.mesh.update(data=-1, fsdp=1)
    c.checkpoint.update(every_steps=100, keep=1)
    c.eval.update(every_steps=200, num_images=300)
  elif arg:
    raise ValueError(f"configs/proclip_stage1.py: unknown argument {arg!r}; allowed: {', '.join(ARGS)}.")
  return c
