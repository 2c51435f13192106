r"""Long-CLIP fine-tune (Zhang et al. 2024, arXiv 2403.15378): a trained 77-token CLIP reads
248 tokens after knowledge-preserved stretching of its positional table (first 20 rows
kept, the rest interpolated 4x, §3.1), fine-tuned on long captions, optionally with the
primary-component matching loss for short captions (§3.2).

Pod recipe: ViT-B/16 from a big_clip run (its tokenizer must be the one set below), Long-CLIP's
hyper-parameters (lr 1e-6, wd 0.01, 200 warmup steps, global batch 1024, one epoch of
ShareGPT4V's 1.2M long captions):

  python -m big_clip.train --config configs/longclip_finetune.py \
    --config.init_from=big_clip:gs://$BUCKET/clip_b16 --workdir gs://$BUCKET/lc

On the embedded data (CPU, the benchmark in benchmarks/RESULTS.md "Long captions"): a 77-token
base model, then the same fine-tune budget at 77 tokens (control) and stretched to 248:

  python -m big_clip.train --config configs/longclip_finetune.py:base77 --workdir /tmp/lc77
  python -m big_clip.train --config configs/longclip_finetune.py:ft77 --workdir /tmp/lc_ft77 \
    --config.init_from=big_clip:/tmp/lc77 \
    --config.data.tokenizer.path=/tmp/lc77/tokenizer/spm.model
  python -m big_clip.train --config configs/longclip_finetune.py:ft248 --workdir /tmp/lc_ft248 \
    --config.init_from=big_clip:/tmp/lc77 \
    --config.data.tokenizer.path=/tmp/lc77/tokenizer/spm.model

`:llm248` is the LLM-tower row of that benchmark: a small Llama-style decoder (RoPE, GQA,
SwiGLU) as the text tower, random-init and trained on the same embedded data at 248 tokens
for the same total budget (base77's 400 steps + the fine-tune's 200):

  python -m big_clip.train --config configs/longclip_finetune.py:llm248 --workdir /tmp/lc_llm

`:local` is a 10-step CPU smoke run of the fine-tune (248 tokens, long captions, the
short-caption PCE loss) from random init, or from a run given by init_from.

Compiled for a v5e-256 (python -m big_clip.plan --config configs/longclip_finetune.py
--topology v5e:16x16; benchmarks/RESULTS.md): 2.49 GiB per chip of 16, 375 MiB of gradient
all-reduce per chip per step.
"""

from big_clip import config as config_lib

ARGS = ("base77", "ft77", "ft248", "llm248", "local")


def _embedded(c, *, max_len: int, long_captions: float, steps: int, lr: float) -> None:
  """The embedded benchmark: towers smaller than configs/default.py's (2 shared CPU cores),
  English long captions."""
  c.total_steps, c.log_every = steps, 25
  c.model.update(embed_dim=64, dtype="float32", remat=False, scan_layers=False)
  c.model.image.update(image_size=64, patch_size=8, width=64, depth=2, heads=4, mlp_dim=256,
                       pool="cls")
  c.model.text.update(vocab_size=1024, max_len=max_len, width=64, depth=2, heads=4,
                      mlp_dim=256, pool="eos")
  c.data.update(source="embedded", global_batch=32, image_size=64, max_len=max_len,
                languages={"en": 1.0}, long_captions=long_captions, long_caption_prob=0.0)
  c.loss.long_clip.enabled = False  # the fine-tunes below turn it on
  c.data.tokenizer.update(path="", vocab_size=1024)
  c.optim.update(lr=lr, warmup_steps=min(50, steps // 5), weight_decay=0.1)
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  c.checkpoint.update(every_steps=steps, keep=1)
  c.eval.update(every_steps=steps, zeroshot_tasks=("colour", "shape"), num_images=200)
  c.evals = ("zeroshot:embedded", "long_captions:embedded,limit=200")


def get_config(arg: str | None = None):
  c = config_lib.base()
  c.seed = 0
  c.total_steps = 1200  # 1.2M ShareGPT4V captions / 1024
  c.log_every = 50

  c.model.update(embed_dim=512, dtype="bfloat16", remat=True, scan_layers=True)
  c.model.image.update(image_size=224, patch_size=16, width=768, depth=12, heads=12,
                       mlp_dim=3072, pool="cls")
  # 248 = 20 + 4 * (77 - 20): the stretched length of a 77-position table.
  c.model.text.update(vocab_size=32000, max_len=248, width=512, depth=12, heads=8,
                      mlp_dim=2048, pool="eos")
  # As released: the first 20 rows of the stretched position table stay frozen (§3.1).
  c.model.text.freeze_positions = 20
  c.loss.name = "softmax"
  # Each shard record's 'long_captions' (ShareGPT4V) is the caption; §3.2's short-caption
  # PCE term pairs the image with its short caption (the long one's first sentence when the
  # record has no short 'captions', as the release does).
  c.data.update(source="shards:gs://YOUR_BUCKET/sharegpt4v/{00000..01199}.tar",
                global_batch=1024, image_size=224, max_len=248, languages={"en": 1.0},
                long_caption_prob=1.0)
  c.loss.long_clip.update(enabled=True, short_weight=1.0, num_components=32)
  c.data.tokenizer.update(path="gs://YOUR_BUCKET/tokenizers/spm_en_32k.model",
                          vocab_size=32000)
  c.optim.update(lr=1e-6, warmup_steps=200, weight_decay=0.01, b2=0.98, eps=1e-6)
  # Pure data parallelism: compiled for v5e-256, fsdp=-1 needed 1035 MiB of all-reduces per
  # chip per step, replicated weights 375 MiB for 2.49 GiB of 16 (benchmarks/RESULTS.md).
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  c.checkpoint.update(every_steps=200, keep=2)
  c.eval.update(every_steps=400)

  if arg == "base77":  # the pretrained CLIP: short captions and truncated long ones
    _embedded(c, max_len=77, long_captions=0.5, steps=400, lr=1e-3)
    c.model.text.freeze_positions = 0  # the pretraining run trains every position
  elif arg in ("ft77", "ft248"):  # the same fine-tune budget, 77 (truncated) or 248 tokens
    _embedded(c, max_len=int(arg[2:]), long_captions=0.8, steps=200, lr=5e-4)
    c.loss.long_clip.update(enabled=True, short_weight=1.0, num_components=16)
    c.model.text.freeze_positions = 20
  elif arg == "llm248":  # the LLM-tower column: a small random-init decoder, trained in-repo
    # The same budget as base77 + ft248 (600 steps, 360 of them long captions on average),
    # from scratch: a 2-layer Llama-style decoder (RoPE, so no position table to stretch,
    # GQA 4/2 heads, SwiGLU), mean-pooled, fully trained, linear adapter into the joint space.
    _embedded(c, max_len=248, long_captions=0.6, steps=600, lr=1e-3)
    c.model.text.update(kind="llm", freeze_positions=0)
    c.model.text.llm.update(path="", cache_dir="", freeze=False, lora_rank=0, pooling="mean",
                            adapter_hidden=0, dtype="float32", kv_heads=2)
  elif arg == "local":
    config_lib.shrink_for_local(c)
    c.model.text.max_len = c.data.max_len = 248
    c.data.update(languages={"en": 1.0}, long_captions=1.0, long_caption_prob=0.0)
    c.loss.long_clip.update(enabled=True, num_components=4)
    c.eval.update(num_images=16)
    c.evals = ("zeroshot:embedded", "long_captions:embedded,limit=16")
  elif arg:
    raise ValueError(f"configs/longclip_finetune.py: unknown argument {arg!r}; allowed: "
                     f"{', '.join(ARGS)}.")
  return c
