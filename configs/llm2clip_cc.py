r"""LLM2CLIP stage 1: caption-contrastive (CC) fine-tuning of the LLM text tower, text only.

Huang et al. 2024 (LLM2CLIP) §3.2: a raw LLM's pooled features barely tell captions apart, so
before it becomes CLIP's text tower the LLM (Llama-3-8B, LoRA, bidirectional attention as in
LLM2Vec) is fine-tuned with a contrastive loss between two captions of one image (or a
caption and its translation: multilingual CC), all other captions of the global batch being
negatives, on mean-pooled last hidden states; optionally + LLM2Vec's masked next-token
prediction (`loss.mntp_weight`, a weighted second term in the same step). The MNTP weight,
mask rate, LoRA sizes and learning rate here are chosen, not copied from the papers (not
checked against LLM2CLIP's released settings). Loss: big_clip/losses/caption_contrast.py.

The stages, on a pod:

  # 1. CC (this config): the LLM's LoRA (and the logit scale) train; image tower unused
  python -m big_clip.train --config configs/llm2clip_cc.py --workdir gs://$BUCKET/cc
  # 2. the LLM with its LoRA merged, as a HF folder (config.json records the run, the
  #    attention and the weights' sha256)
  python tools/export_llm.py --run gs://$BUCKET/cc --out /models/llama3_8b_cc
  # 3. its embedding cache (keyed by that sha256: a cache of the pre-CC LLM is refused)
  python tools/cache_text_embeddings.py --llm /models/llama3_8b_cc --attention bidirectional \
      --pooling mean --max_len 128 --dtype bfloat16 --captions captions.txt --out $CACHE
  # 4. the adapter (and image tower) against images
  python -m big_clip.train --config configs/llm2clip.py --workdir gs://$BUCKET/llm2clip \
      --config.model.text.llm.path=/models/llama3_8b_cc \
      --config.model.text.llm.attention=bidirectional --config.model.text.llm.cache_dir=$CACHE

On CPU (docs/llm-towers.md runs all four with `:local` configs and a tiny LLM written by
tools/make_tiny_llm.py):

  python tools/make_tiny_llm.py --out /tmp/big_clip_tiny_llm
  python -m big_clip.train --config configs/llm2clip_cc.py:local --workdir /tmp/llm2clip_cc_local
"""

from big_clip import config as config_lib


ARGS = ("local",)  # what get_config(arg) takes besides None
TINY_LLM = "/tmp/big_clip_tiny_llm"  # tools/make_tiny_llm.py --out


def get_config(arg: str | None = None):
  c = config_lib.base()
  c.seed = 0
  c.total_steps = 5_000
  c.log_every = 50

  # The image tower is built (the model is a dual encoder) but never run: keep it tiny.
  c.model.update(embed_dim=64, dtype="bfloat16", remat=True, scan_layers=False)
  c.model.image.update(image_size=32, patch_size=16, width=64, depth=1, heads=1, mlp_dim=64)
  c.model.text.update(kind="llm", max_len=128)
  c.model.text.llm.update(
      path="/models/Meta-Llama-3-8B", pooling="mean", freeze=True, attention="bidirectional",
      lora_rank=16, lora_alpha=32.0,
      lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                    "down_proj"),
      dtype="bfloat16", lm_head=True)
  # LLM2Vec: temperature 0.05 (scale 20); here learned from there.
  c.model.logit_scale_init = 2.9957  # ln 20

  c.loss.update(name="softmax", caption_contrast=True, mntp_weight=0.1, mntp_mask_prob=0.2,
                mntp_mask_id=128002)  # a reserved special token of Llama 3
  # Two captions per image (COCO / ShareGPT4V style): 'text' drawn by `languages`, the
  # pair in pair_language; with several languages the pairs are translations.
  c.data.update(source="manifest:gs://YOUR_BUCKET/captions/manifest.json", global_batch=512,
                image_size=32, max_len=128, languages={"en": 1.0}, pair_language="en")
  c.optim.update(lr=2e-4, warmup_steps=200, weight_decay=0.0, b2=0.999, clip_norm=1.0)
  c.mesh.update(data=1, fsdp=-1, tensor=1, multihost="auto")
  c.checkpoint.update(every_steps=1000, keep=2, use_async=True)
  c.eval.update(every_steps=10**9)
  c.evals = ()  # the adapter is untrained until stage 4: nothing to evaluate yet

  if arg == "local":
    c.total_steps, c.log_every = 10, 5
    c.model.update(dtype="float32", remat=False)
    c.model.text.update(max_len=32)
    c.model.text.llm.update(path=TINY_LLM, dtype="float32", lora_rank=4,
                            lora_targets=("q_proj", "v_proj", "up_proj"))
    c.loss.mntp_mask_id = 1  # [UNK] of tools/make_tiny_llm.py
    # Multilingual CC on the embedded data: a caption in one of three languages vs an
    # English caption of the same image.
    c.data.update(source="embedded", global_batch=16, max_len=32, pair_language="en",
                  languages={"en": 1.0, "de": 1.0, "fr": 1.0})
    c.optim.update(lr=1e-3, warmup_steps=2)
    c.mesh.update(data=-1, fsdp=1)
    c.checkpoint.update(every_steps=10, keep=1, use_async=False)
  elif arg:
    raise ValueError(f"configs/llm2clip_cc.py: unknown argument {arg!r}; allowed: "
                     f"{', '.join(ARGS)}.")
  return c
