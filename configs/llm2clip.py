r"""LLM2CLIP: a frozen decoder LLM (Llama-3-8B) as CLIP's text tower, with a trainable adapter.

Huang et al. 2024 (LLM2CLIP): the LLM's mean-pooled last hidden state goes through a small
MLP adapter into the joint space; the LLM stays frozen, so its caption features are computed
once (tools/cache_text_embeddings.py) and training runs only the image tower and the adapter.
Point `model.text.llm.path` at a Hugging Face Llama / Qwen2 folder (config.json,
model*.safetensors, tokenizer.json); set `cache_dir` to train on cached features, or clear it
to run the frozen LLM live (needed for LoRA: lora_rank > 0).

  python tools/cache_text_embeddings.py --llm /models/Meta-Llama-3-8B --pooling mean \
      --max_len 128 --dtype bfloat16 --captions captions.txt --out gs://$BUCKET/llm2clip_cache
  python -m big_clip.train --config configs/llm2clip.py --workdir gs://$BUCKET/llm2clip

`--config configs/llm2clip.py:local` trains a tiny random-init LLM (frozen, LoRA rank 4) with
the adapter on the embedded data on a CPU. `:local_cc` is stage 2 after the CC stage
(configs/llm2clip_cc.py:local, whose docstring lists the commands): the adapter on the
embedding cache of the CC-tuned tiny LLM exported by tools/export_llm.py.

Memory plan, Llama-3-8B (hidden 4096, 32 layers, GQA 32/8 heads, MLP 14336, vocab 128256;
numbers checked by tests/test_llm.py::test_memory_plan_of_the_8b_recipe):
- Frozen base without lm_head: 7.50B parameters = 15.0 GB in bfloat16 (`llm.dtype`). They are
  `Frozen` variables, so they get no gradient buffers and no Adam moments. Sharded by the
  logical rules (embed->fsdp, heads/kv_heads/mlp/vocab->tensor): on a v5e-64 with
  mesh fsdp=16 x tensor=4 that is 235 MB per chip (of 16 GB); on 8xH100 with fsdp=8,
  1.9 GB per GPU (of 80 GB). FSDP gathers one layer (218M params, 436 MB) at a time.
- Trainable: the adapter (4096 -> 4096 -> 1024: 21.0M) and, optionally, LoRA rank 16 on all
  seven projections (41.9M); fp32 weights + gradients + 2 Adam moments = 16 bytes each:
  0.34 GB + 0.67 GB in total, sharded like the base. The ViT-L/14 image tower (304M) adds
  4.9 GB in total (76 MB per v5e chip).
- Activations: frozen without LoRA, nothing of the LLM is differentiated, so no activation is
  kept for the backward pass; the forward peaks at one layer's MLP, 3 x B x L x 14336 x 2 bytes
  = 0.7 GB for 64 captions x 128 tokens per chip (batch 4096 on 64 chips). With LoRA (and
  `model.remat`), each layer keeps its input: B x L x 4096 x 2 bytes x 32 layers = 2.1 GB per
  v5e chip at 64 captions, 17 GB per H100 at 512 captions (batch 4096 on 8 GPUs).
- With the cache (`cache_dir`, the recipe's default) the LLM is not on the devices at all:
  a step reads 4096 x 4096 float32 features (67 MB) per global batch; the cache holds 16 KB per
  caption on disk.

Compiled for a v5e-256 with the 8B LLM run live (benchmarks/pod_plan.py's llm2clip:
`python -m benchmarks.pod_plan --compile --recipes llm2clip --topology v5e:16x16`,
benchmarks/RESULTS.md): 1.90 GiB per chip of 16, 13.3 GiB of FSDP all-gathers of the frozen
LLM per chip per step; with the cache (the default) the LLM is not on the chips.
"""

from big_clip import config as config_lib


ARGS = ("local", "local_cc")  # what get_config(arg) takes besides None


def get_config(arg: str | None = None):
  c = config_lib.base()
  c.seed = 0
  c.total_steps = 40_000
  c.log_every = 100

  c.model.update(embed_dim=1024, dtype="bfloat16", remat=True, scan_layers=True,
                 activation="gelu")
  c.model.image.update(image_size=224, patch_size=14, width=1024, depth=24, heads=16,
                       mlp_dim=4096, pool="cls")
  c.model.text.update(kind="llm", max_len=128)
  c.model.text.llm.update(
      path="/models/Meta-Llama-3-8B", pooling="mean", freeze=True, lora_rank=0,
      adapter_hidden=4096, dtype="bfloat16",
      # Made by the first command of the docstring; '' runs the frozen LLM in every step.
      cache_dir="gs://YOUR_BUCKET/llm2clip_cache")

  c.loss.name = "softmax"
  c.data.update(source="shards:gs://YOUR_BUCKET/cc12m/{00000..01242}.tar", global_batch=4096,
                image_size=224, max_len=128, languages={"en": 1.0})
  c.optim.update(lr=1e-5 * 4096 / 256, warmup_steps=500, weight_decay=0.05, b2=0.98,
                 clip_norm=1.0)
  c.mesh.update(data=1, fsdp=-1, tensor=1, multihost="auto")  # tensor=4 for the live LLM
  c.checkpoint.update(every_steps=2000, keep=3, use_async=True)
  c.eval.update(every_steps=5000)

  if arg in ("local", "local_cc"):
    config_lib.shrink_for_local(c)
    # A tiny random-init decoder instead of the 8B folder, with the SPM tokenizer trained on
    # the embedded captions; frozen with LoRA, so every trainable kind of weight is exercised.
    c.model.update(embed_dim=64, scan_layers=False)
    c.model.image.update(patch_size=8, width=64, heads=4, mlp_dim=128)
    c.model.text.update(width=64, heads=4, mlp_dim=128)
    c.model.text.llm.update(path="", cache_dir="", dtype="float32", adapter_hidden=64,
                            lora_rank=4, lora_targets=("q_proj", "v_proj", "up_proj"),
                            kv_heads=2)
  if arg == "local_cc":  # the folders that the commands of configs/llm2clip_cc.py write
    c.model.text.llm.update(path="/tmp/llm2clip_cc_llm", cache_dir="/tmp/llm2clip_cc_cache",
                            attention="bidirectional", lora_rank=0)
    c.data.languages = {"en": 1.0, "de": 1.0, "fr": 1.0}
  elif arg and arg != "local":
    raise ValueError(f"configs/llm2clip.py: unknown argument {arg!r}; allowed: {', '.join(ARGS)}.")
  return c
