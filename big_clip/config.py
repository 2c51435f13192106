"""The config schema: every key a recipe may set, its type and allowed values.

Recipes in `configs/` start from `base()` and change what they need; `validate()` runs before
anything is built and turns a misspelled key, a wrong type or an impossible batch/mesh into
an error that names the key and what is allowed. The schema *is* `base()`: adding a knob
means adding it here with its default, so it is documented in one place.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from typing import Any

import ml_collections

from big_clip import fileio
from big_clip.errors import UserError

# OpenAI CLIP's pixel statistics (Radford et al. 2021), the default normalization.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Keys whose value is a free mapping (any key, values of one type), not a fixed schema.
FREE_MAPPINGS = {"data.languages": float}

# `config.data.source` is 'embedded' or one of these prefixes followed by a location.
SOURCE_PREFIXES = ("tfds:", "shards:", "manifest:")
# `config.init_from` is '' or one of these prefixes followed by a location.
INIT_PREFIXES = ("hf:", "open_clip:", "big_clip:")

# The projections of an LLM tower that LoRA may adapt (config.model.text.llm.lora_targets).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LOSS_NAMES = ("softmax", "sigmoid", "grouped")
# The top-level parameter groups of the dual encoder (config.init_only, config.optim.freeze).
PARAM_GROUPS = ("image", "text", "logit_scale", "logit_bias", "decoder")

# Keys whose value must be one of a fixed set.
CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.activation": ("gelu", "quick_gelu", "gelu_tanh"),
    "model.image.pool": ("cls", "map", "gap"),
    "model.image.stem": ("patch", "conv"),
    "model.attention_impl": ("auto", "xla", "einsum"),
    "model.text.pool": ("eos", "last", "argmax", "final"),
    "loss.name": LOSS_NAMES,
    "loss.group_base": ("softmax", "sigmoid"),
    "model.text.kind": ("clip", "llm"),
    "model.text.llm.pooling": ("mean", "last", "eos"),
    "model.text.llm.dtype": ("float32", "bfloat16"),
    "model.text.llm.attention": ("causal", "bidirectional"),
    "optim.schedule": ("warmup_cosine", "warmup_constant"),
    "nan_policy": ("stop", "skip"),
    "mesh.multihost": ("auto", "true", "false"),
    "loss.distill.feature": ("cosine", "mse"),
    "loss.caption.mode": ("ar", "parallel"),
    "loss.align.target": ("", "teacher_text", "ema_image"),
}


class ConfigError(UserError, ValueError):
  """A config that cannot run; the message names the key and the fix."""


def base() -> ml_collections.ConfigDict:
  """Every key with its default. A tiny CPU-sized model unless a recipe says otherwise."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.log_every = 50  # steps between progress lines / metric writes
  c.nan_policy = "stop"  # 'stop': raise naming the step; 'skip': drop the update, count it

  c.model = dict(
      embed_dim=256,  # joint image-text embedding
      dtype="float32",  # compute dtype; 'bfloat16' on GPU/TPU
      param_dtype="float32",  # master weights
      remat=False,  # recompute each block's activations in the backward pass
      scan_layers=False,  # nnx.scan over blocks: O(1) compile time in depth
      activation="gelu",  # exact erf GELU as PyTorch nn.GELU; 'quick_gelu' for OpenAI CLIP
      logit_scale_init=math.log(1 / 0.07),  # CLIP: temperature 0.07
      logit_scale_max=100.0,
      logit_bias_init=0.0,  # SigLIP uses -10
      image=dict(image_size=224, patch_size=16, width=768, depth=12, heads=12, mlp_dim=3072,
                 pool="cls"),
      text=dict(vocab_size=32000, max_len=64, width=512, depth=12, heads=8, mlp_dim=2048,
                pool="eos", eos_id=3, pad_id=0,
                # Long-CLIP fine-tuning (§3.1, as released): the first N rows of the position
                # table get no gradient, so the well-trained short positions stay as they are.
                freeze_positions=0,
                kind="clip",  # 'clip': CLIP text transformer; 'llm': decoder LLM (llm.py)
                # kind='llm' (LLM2CLIP). path: a Hugging Face Llama/Qwen2 folder (config.json,
                # *.safetensors, tokenizer.json), loaded at init; '' = a random-init decoder
                # sized by the keys above (width, depth, heads, mlp_dim, vocab_size) using
                # the sentencepiece tokenizer. Only nnx.Param is trained: the frozen base gets
                # no gradients and no optimizer state.
                llm=dict(
                    path="",
                    pooling="mean",  # 'mean' | 'last' | 'eos' (an EOS token is appended)
                    freeze=True,  # base weights frozen (LoRA / adapter still train)
                    lora_rank=0,  # 0 = no LoRA
                    lora_alpha=16.0,  # LoRA update scaled by lora_alpha / lora_rank
                    lora_targets=("q_proj", "v_proj"),  # any of q,k,v,o,gate,up,down _proj
                    adapter_hidden=0,  # 0: linear adapter; >0: Linear-GELU-Linear
                    dtype="float32",  # compute dtype and storage of frozen weights
                    cache_dir="",  # read pooled features from tools/cache_text_embeddings.py
                    kv_heads=0,  # random-init decoder only: 0 = heads (no GQA)
                    rope_theta=10000.0,  # random-init decoder only
                    # 'bidirectional': no causal mask (LLM2Vec), as LLM2CLIP's CC stage
                    # trains the LLM and every later stage must then run it
                    attention="causal",
                    lm_head=False,  # load the LM head (HF lm_head.weight) for loss.mntp_weight
                )),
      # The caption decoder (models/decoder.py, for config.loss.caption): cross-attends to
      # the image tower's last-block tokens; vocabulary and length are the text tower's.
      # depth 0 = no decoder. CoCa/CapPa B-size decoders: width 512-768, depth 6-12.
      decoder=dict(width=512, depth=0, heads=8, mlp_dim=2048),
  )
  c.loss = dict(
      name="softmax",  # 'softmax' (CLIP), 'sigmoid' (SigLIP), 'grouped' (M2-Encoder)
      group_size=0,  # grouped: data x fsdp x expert devices per contrastive batch; 0 = all devices
      group_base="softmax",  # grouped: the loss computed inside each group
      # Batch accumulation (gradient cache, Gao et al. 2021): embed the global batch in
      # accum_steps micro-batches, take the loss over the WHOLE batch, then backprop each
      # micro-batch. The contrastive batch stays global_batch; activation memory is one
      # micro-batch's. Unlike optim.grad_accum_steps, which makes each micro-batch its own
      # (smaller) contrastive batch. At most one of the two may be > 1.
      accum_steps=1,
      # Long-CLIP §3.2: also match the PCA-coarsened image feature to the short caption
      # (needs data.long_captions > 0; big_clip/losses/long_clip.py).
      long_clip=dict(enabled=False, short_weight=1.0, num_components=32),
      # Distillation from a frozen teacher's embeddings (big_clip/losses/distill.py):
      # teacher = 'big_clip:WORKDIR[:STEP]'; feature term ('cosine' | 'mse') on the text
      # (and image) embeddings plus KL between similarity matrices at `temperature`.
      distill=dict(enabled=False, teacher="", feature="cosine", feature_weight=1.0,
                   kl_weight=1.0, temperature=0.05, contrastive_weight=1.0),
      # > 0: + text_pair_weight * the contrastive loss (config.loss.name) between each
      # caption and another caption of its image in data.pair_language (translation ranking,
      # as LaBSE / Multilingual-CLIP): ties every language to the pivot's text embedding.
      text_pair_weight=0.0,
      # LLM2CLIP's caption-contrastive (CC) stage (Huang et al. 2024 §3.2; losses/
      # caption_contrast.py): text only, the loss is config.loss.name's softmax between the
      # pooled LLM features of each caption ('text') and another caption of its image
      # ('text_pair', data.pair_language); the image tower and the adapter are not used.
      caption_contrast=False,
      # + mntp_weight * masked next-token prediction (LLM2Vec §2.2): mntp_mask_prob of the
      # caption tokens become mntp_mask_id, each predicted from the previous position.
      mntp_weight=0.0,
      mntp_mask_prob=0.2,
      mntp_mask_id=0,
      # Captioning (CoCa, Yu et al. 2022; CapPa, Tschannen et al. 2023): + weight * the
      # token cross-entropy of config.model.decoder predicting each example's caption
      # (losses/caption.py). weight 0 = off (then model.decoder.depth must be 0).
      # mode 'ar': teacher forcing, causal; 'parallel': CapPa's parallel prediction (mask
      # tokens in, non-causal) for a parallel_fraction share of the examples, 'ar' for the
      # rest (CapPa uses 0.75).
      caption=dict(weight=0.0, mode="ar", parallel_fraction=1.0),
      # ProCLIP (Hu et al. 2025; losses/alignment.py): instance_weight * instance alignment
      # (squared distance of each embedding to the teacher's) + structure_weight * structure
      # alignment (smooth-L1 between the batch's pair distances) of one tower's embeddings.
      # target '': off; 'teacher_text': the text tower follows the text embeddings of
      # `teacher` ('big_clip:WORKDIR[:STEP]', a trained CLIP; stage 1); 'ema_image': the
      # image tower follows the EMA of itself (needs optim.ema_decay > 0; stage 2's
      # self-distillation). contrastive_weight weighs the contrastive loss (stage 1: 0).
      align=dict(target="", teacher="", instance_weight=1.0, structure_weight=1.0,
                 contrastive_weight=1.0),
  )
  # Architecture switches for exact CLIP / SigLIP layouts (big_clip/export.py maps them to
  # Hugging Face and open_clip); the defaults are OpenAI CLIP's.
  c.model.ln_eps = 1e-5  # every LayerNorm; SigLIP uses 1e-6
  c.model.image.ln_pre = True  # LayerNorm before the blocks (CLIP); SigLIP has none
  c.model.image.proj = True  # linear map to embed_dim; False (SigLIP): embed_dim == width
  # 'patch': CLIP's stride-p patchify; 'conv': early 3x3 stride-2 convolutions (Xiao et al.
  # 2021), better from scratch on small data, not exportable to HF / open_clip.
  c.model.image.stem = "patch"
  # FLIP (Li et al. 2023): drop this share of patch tokens per image in training (after the
  # positional embeddings; the class token stays), none in eval/export. 0.5-0.75 trains 2-3x
  # faster per step. Masking stops at patch_dropout_until_step (0 = never) for FLIP's short
  # unmasked tail; that step compiles a second, unmasked train step.
  c.model.image.patch_dropout = 0.0
  c.model.image.patch_dropout_until_step = 0
  # NaFlex (SigLIP 2 §2.4.2): images keep their aspect ratio as up to data.max_patches
  # patches (padded); the position table (image_size / patch_size square) is resized per
  # image. Needs pool 'map' or 'gap' and data.max_patches > 0. docs/models.md.
  c.model.image.naflex = False
  # Attention kernel: 'xla' = jax.nn.dot_product_attention (cuDNN flash on GPU, fused on
  # TPU); 'einsum' = one fused q/k/v matmul and a written-out backward
  # (layers.einsum_attention); 'auto' = 'xla' (no platform measured einsum faster)
  # (python -m benchmarks.attention compares the two on any machine).
  c.model.attention_impl = "auto"
  c.model.text.causal = True  # causal self-attention (CLIP); SigLIP attends both ways
  c.model.text.proj_bias = False  # SigLIP's text head has a bias
  # Mixture-of-experts MLPs (models/moe.py; Switch / GShard routing, CLIP-MoE upcycling).
  for tower in ("image", "text"):
    c.model[tower].moe = dict(
        experts=0,  # 0 = dense MLPs everywhere
        top_k=2,  # experts per token; gates renormalized over the chosen k (Mixtral)
        every_n_layers=2,  # blocks i with (i + 1) % n == 0 get an MoE MLP (1 = all)
        capacity_factor=1.25,  # tokens per expert per example = ceil(k T cf / E); 0 dropless
        router_z_loss=1e-3,  # ST-MoE router z-loss weight
        load_balance=1e-2,  # Switch load-balancing loss weight
        upcycle_noise=0.0,  # init_from a dense run: expert copies + N(0, (noise*std)^2)
        # How tokens reach experts on other devices: 'einsum' (GSPMD inserts the exchange
        # from sharding constraints) or 'all_to_all' (shard_map with explicit all-to-alls
        # over mesh.expert; what a large pod needs, docs/moe.md). Same routing and values.
        dispatch="einsum",
    )
  # Start from pretrained weights when the workdir has no checkpoint (fine-tuning):
  # 'hf:PATH' (a save_pretrained folder), 'open_clip:PATH' (open_clip_config.json +
  # a state dict) or 'big_clip:WORKDIR[:STEP]'. '' = random init. A shorter text position
  # table than model.text.max_len is stretched (Long-CLIP §3.1, models/text.py).
  c.init_from = ""
  # With init_from='big_clip:...': load only these of PARAM_GROUPS ('image', 'text',
  # 'logit_scale', ...) from that run, whose other towers may differ (ProCLIP stage 1 takes
  # CLIP's image tower next to an LLM text tower); the rest keep their init. () = all.
  c.init_only = ()
  c.data = dict(
      source="embedded",
      global_batch=256,  # examples per step over all hosts
      image_size=224,  # must equal model.image.image_size
      max_len=64,  # tokens per caption, must equal model.text.max_len
      languages={"en": 1.0},  # language -> sampling weight
      long_captions=0.0,  # embedded data: share of long English captions (0 = none)
      tokenizer=dict(path="", vocab_size=32000),  # path '' = train at first use in the workdir
      mean=CLIP_MEAN,
      std=CLIP_STD,
      # Real sources (tfds:, shards:, manifest:; see big_clip/data/files.py):
      split="train",  # manifest split; tfds split when the source names none
      data_dir="",  # tfds data_dir ('' = tfds's default)
      text_language="en",  # language of plain-text captions (.txt, tfds text/labels)
      crop_min_scale=0.9,  # random-resized crop area fraction (open_clip); >= 1: centre crop
      flip_prob=0.0,  # files/tfds: P(mirror an image left-right); small data sets gain from 0.5
      # '' or a language: each example also carries 'text_pair', another caption of its image
      # in this language (for loss.text_pair_weight; the drawn caption when there is no other)
      pair_language="",
      long_caption_prob=0.0,  # P(use the 'long_captions' field when an image has one)
      shuffle_buffer=10_000,  # tfds only: seeded shuffle buffer after the file shuffle
      # NaFlex (model.image.naflex): each image is resized at its aspect ratio to the largest
      # patch grid with at most max_patches patches of patch_size pixels (patch_size must
      # equal model.image.patch_size); 0 = square images of image_size (fixed resolution).
      max_patches=0,
      patch_size=16,
  )
  c.optim = dict(
      lr=1e-3,
      schedule="warmup_cosine",
      warmup_steps=100,
      end_lr_ratio=0.0,  # cosine decays to lr * end_lr_ratio
      b1=0.9,
      b2=0.98,  # CLIP's beta2 for stability at large batch
      eps=1e-6,
      weight_decay=0.2,
      clip_norm=1.0,  # global-norm clipping; 0 disables
      grad_accum_steps=1,  # micro-batches per step; gradients averaged (not a bigger
                           # contrastive batch: see loss.accum_steps for that)
      # > 0: keep an exponential moving average of the trainable weights, updated after
      # every step: ema = ema_decay * ema + (1 - ema_decay) * params, starting at the
      # initial weights (no decay warmup). It lives in the train state (sharded like the
      # params, one more copy of them in memory) and checkpoints; in-training evals,
      # evaluate, export, predict and big_clip.load use it (--no_ema: the raw weights).
      # 0 = off. E.g. 0.999 for runs of many thousand steps (docs/training.md).
      ema_decay=0.0,
      # '' = every parameter trains. Otherwise a regular expression searched in each dotted
      # parameter path (e.g. 'image.blocks.0.mlp.fc1.kernel'): only matching parameters get
      # gradients and optimizer state, the others stay as initialized or loaded (init_from).
      # CLIP-MoE's cluster fine-tunes train the MLPs only: r'\.mlp\.' (docs/moe.md).
      trainable="",
      # Parameter groups (of PARAM_GROUPS) kept as they are: no gradient, no optimizer state,
      # no weight decay; e.g. ('image',) locks the image tower (LiT).
      freeze=(),
  )
  # expert: shards MoE experts (config.model.*.moe) and, as MaxText's, splits the batch
  # like data everywhere else; with no MoE layers expert=k is the same as data=k.
  c.mesh = dict(data=-1, fsdp=1, tensor=1, expert=1, multihost="auto")
  c.checkpoint = dict(every_steps=500, keep=3, use_async=True)
  c.eval = dict(every_steps=500, zeroshot_tasks=("colour", "shape"), num_images=600,
                batch_size=200)
  # What the eval Suite runs (in training every eval.every_steps, and in
  # `python -m big_clip.evaluate`): spec strings, grammar in big_clip/evals/specs.py, e.g.
  # 'zeroshot:tfds:cifar10:test,classnames=FILE', 'retrieval:manifest:PATH:test',
  # 'long_captions:embedded,limit=200'. The bare 'zeroshot:embedded' runs
  # eval.zeroshot_tasks when training on the embedded data.
  c.evals = ("zeroshot:embedded",)
  # Region-text alignment and hard attribute negatives (CLOC, Chen et al. 2024; FG-CLIP 2,
  # Xie et al. 2025; docs/regions.md). All off by default.
  # data.max_regions: boxes carried per example from the 'regions' field (padded, masked;
  # they follow crops and flips; data/regions.py). 0 = none.
  c.data.max_regions = 0
  # model.region: CLOC's prompter (models/region.py): a box -> RoI-pooled patch tokens +
  # a box prompt embedding -> `depth` attention-pooling blocks over the box's patches ->
  # the joint space. depth 0 = no prompter. Width, heads and MLP are the image tower's.
  c.model.region = dict(depth=0)
  # + region_weight * the region-text contrastive loss over every valid region of the
  # global batch (losses/region.py); needs data.max_regions > 0 and model.region.depth > 0.
  c.loss.region_weight = 0.0
  # FG-CLIP 2's hard fine-grained negatives: per caption, this many captions of the same
  # form with one attribute swapped (colour, shape, size, count, position; embedded data
  # only), + hard_negative_weight * the cross-entropy of each image over its caption and
  # them (losses/hard_negatives.py). 0 = off.
  c.loss.hard_negatives = 0
  c.loss.hard_negative_weight = 1.0
  c.lock()  # no new keys: a misspelled key in a recipe fails where it is written
  for key in FREE_MAPPINGS:  # ...except inside free mappings (language -> weight)
    section, name = key.rsplit(".", 1)
    c[section][name].unlock()
  return c


def load_json(path: str, *, check: bool = True) -> ml_collections.ConfigDict:
  """A run's `config.json` (written at the start of training) merged into the schema: keys
  added to the schema since that run take their defaults. `check=False` skips validation,
  for readers that need only some sections (a teacher's or warm start's `model`)."""
  if not fileio.exists(path):
    raise FileNotFoundError(f"{path} not found: is its folder a big_clip workdir (made by "
                            "python -m big_clip.train)?")
  values = fileio.read_json(path)
  config = base()
  config.update(values)
  for key in FREE_MAPPINGS:  # a mapping is the run's own, not merged into the default's
    section, name = key.rsplit(".", 1)
    if name in values.get(section, {}):
      config[section][name] = ml_collections.ConfigDict(values[section][name])
  if check:
    validate(config)
  return config


def image_input_shape(data_cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
  """One example's image input: (H, W, 3) pixels, or with NaFlex (max_patches > 0) the
  padded patch sequence (max_patches, patch_size^2 * 3 + 2: pixels, then (row, col))."""
  if data_cfg.max_patches > 0:
    return (int(data_cfg.max_patches), int(data_cfg.patch_size) ** 2 * 3 + 2)
  return (int(data_cfg.image_size), int(data_cfg.image_size), 3)


def shrink_for_local(c: ml_collections.ConfigDict) -> None:
  """Turns a pod recipe into a 10-step CPU smoke run on the embedded data, in place.

  Keeps the recipe's architecture family (pooling, loss, widths) so that `:local` still
  exercises the same code paths, just shallow, small and in float32.
  """
  c.total_steps = 10
  c.model.update(dtype="float32", remat=False)
  c.model.image.update(image_size=64, depth=2)
  c.model.text.update(depth=2, max_len=32, vocab_size=1024)
  c.model.decoder.update(depth=min(c.model.decoder.depth, 2))  # 0 (no decoder) stays 0
  c.data.update(source="embedded", global_batch=8, image_size=64, max_len=32)
  c.data.tokenizer.update(path="", vocab_size=1024)
  c.mesh.update(data=-1, fsdp=1)


def _flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in cfg.items():
    path = f"{prefix}{key}"
    if isinstance(value, (Mapping, ml_collections.ConfigDict)) and path not in FREE_MAPPINGS:
      out.update(_flatten(value, path + "."))
    else:
      out[path] = value
  return out


def _type_ok(value: Any, default: Any) -> bool:
  if isinstance(default, bool):
    return isinstance(value, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(default, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(default, (tuple, list)):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(default))


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for unknown keys, wrong types, bad choices and inconsistent sizes."""
  schema = _flatten(base())
  given = _flatten(config)
  for key, value in given.items():
    if key not in schema:
      near = difflib.get_close_matches(key, schema, n=1)
      hint = f" Did you mean {near[0]!r}?" if near else ""
      raise ConfigError(f"Unknown config key {key!r}.{hint} Known keys are listed in "
                        "big_clip/config.py:base().")
    default = schema[key]
    if key in FREE_MAPPINGS:
      if not isinstance(value, (Mapping, ml_collections.ConfigDict)):
        raise ConfigError(f"config.{key} must be a mapping, got {value!r}.")
      for k, v in value.items():
        if not _type_ok(v, FREE_MAPPINGS[key]()):
          raise ConfigError(f"config.{key}.{k}={v!r}: expected a number.")
      continue
    if default is not None and not _type_ok(value, default):
      raise ConfigError(f"config.{key}={value!r} has type {type(value).__name__}; expected "
                        f"{type(default).__name__} (default {default!r}).")
    if key in CHOICES and str(value).lower() not in CHOICES[key]:
      raise ConfigError(f"config.{key}={value!r}; allowed: {', '.join(CHOICES[key])}.")
  source = config.data.source
  if source != "embedded" and not source.startswith(SOURCE_PREFIXES):
    raise ConfigError(f"config.data.source={source!r}; allowed: 'embedded' or "
                      f"{', '.join(p + '...' for p in SOURCE_PREFIXES)}.")
  if config.init_from and not config.init_from.startswith(INIT_PREFIXES):
    raise ConfigError(f"config.init_from={config.init_from!r}; allowed: '' or "
                      f"{', '.join(p + 'PATH' for p in INIT_PREFIXES)}.")
  # config.evals: each spec is parsed by big_clip.evals.validate (the evaluators know their
  # grammar), which the binaries run right after this.
  _validate_consistency(config)


def _validate_consistency(c: ml_collections.ConfigDict) -> None:
  def need(cond: bool, msg: str) -> None:
    if not cond:
      raise ConfigError(msg)

  need(c.data.image_size == c.model.image.image_size,
       f"config.data.image_size={c.data.image_size} != config.model.image.image_size="
       f"{c.model.image.image_size}; set both to the same value.")
  need(c.data.max_len <= c.model.text.max_len,
       f"config.data.max_len={c.data.max_len} exceeds config.model.text.max_len="
       f"{c.model.text.max_len}, the number of text positions.")
  need(0 <= c.model.text.freeze_positions < c.model.text.max_len,
       f"config.model.text.freeze_positions={c.model.text.freeze_positions} must be in [0, "
       f"config.model.text.max_len={c.model.text.max_len}) (Long-CLIP freezes 20).")
  need(c.model.image.image_size % c.model.image.patch_size == 0,
       f"config.model.image.image_size={c.model.image.image_size} is not divisible by "
       f"config.model.image.patch_size={c.model.image.patch_size}.")
  need(0.0 <= c.model.image.patch_dropout < 1.0,
       f"config.model.image.patch_dropout={c.model.image.patch_dropout}; the share of patch "
       "tokens dropped must be in [0, 1).")
  need(c.model.image.patch_dropout_until_step >= 0,
       f"config.model.image.patch_dropout_until_step={c.model.image.patch_dropout_until_step}; "
       "use 0 (mask every step) or the step at which masking stops.")
  need(c.model.image.naflex == (c.data.max_patches > 0),
       f"config.model.image.naflex={c.model.image.naflex} with config.data.max_patches="
       f"{c.data.max_patches}; NaFlex needs both: naflex=True and max_patches > 0 (e.g. 256), "
       "or naflex=False and max_patches=0.")
  need(not c.model.image.naflex or c.data.patch_size == c.model.image.patch_size,
       f"config.data.patch_size={c.data.patch_size} != config.model.image.patch_size="
       f"{c.model.image.patch_size}; NaFlex patchifies in the input pipeline, set both equal.")
  need(not c.model.image.naflex or (c.model.image.pool != "cls"
                                   and c.model.image.stem == "patch"
                                   and c.model.image.patch_dropout == 0),
       "config.model.image.naflex=True needs model.image.pool='map' or 'gap', stem='patch' "
       "and patch_dropout=0.")
  p = c.model.image.patch_size
  need(c.model.image.stem != "conv" or (p >= 2 and p & (p - 1) == 0),
       f"config.model.image.stem='conv' halves the image once per 3x3 stride-2 convolution, so "
       f"config.model.image.patch_size={p} must be a power of two >= 2.")
  for tower in ("image", "text"):
    t = c.model[tower]
    need(t.width % t.heads == 0, f"config.model.{tower}.width={t.width} is not divisible by "
         f"config.model.{tower}.heads={t.heads}.")
  need(c.model.ln_eps > 0, f"config.model.ln_eps={c.model.ln_eps} must be positive.")
  need(c.model.image.proj or c.model.embed_dim == c.model.image.width,
       f"config.model.image.proj=False needs config.model.embed_dim={c.model.embed_dim} equal "
       f"to config.model.image.width={c.model.image.width}.")
  for key in ("total_steps", "log_every"):
    need(c[key] > 0, f"config.{key}={c[key]} must be positive.")
  need(c.data.global_batch > 0, "config.data.global_batch must be positive.")
  need(c.optim.grad_accum_steps >= 1, "config.optim.grad_accum_steps must be >= 1.")
  need(0.0 <= c.optim.ema_decay < 1.0, f"config.optim.ema_decay={c.optim.ema_decay}; give a "
       "value in [0, 1): 0 turns the weight EMA off, e.g. 0.999 averages ~1000 steps.")
  try:
    re.compile(c.optim.trainable)
  except re.error as e:
    raise ConfigError(f"config.optim.trainable={c.optim.trainable!r} is not a regular "
                      f"expression ({e}); e.g. r'\\.mlp\\.' trains the MLPs only.") from None
  need(c.data.global_batch % c.optim.grad_accum_steps == 0,
       f"config.data.global_batch={c.data.global_batch} is not divisible by "
       f"config.optim.grad_accum_steps={c.optim.grad_accum_steps}.")
  need(c.loss.accum_steps >= 1, "config.loss.accum_steps must be >= 1.")
  need(c.data.global_batch % c.loss.accum_steps == 0,
       f"config.data.global_batch={c.data.global_batch} is not divisible by "
       f"config.loss.accum_steps={c.loss.accum_steps}.")
  need(c.loss.accum_steps == 1 or c.optim.grad_accum_steps == 1,
       f"config.loss.accum_steps={c.loss.accum_steps} and config.optim.grad_accum_steps="
       f"{c.optim.grad_accum_steps} are both > 1; pick one: loss.accum_steps keeps the whole "
       "batch as one contrastive batch (gradient cache), optim.grad_accum_steps makes each "
       "micro-batch its own contrastive batch.")
  need(c.loss.accum_steps == 1 or not (c.loss.long_clip.enabled or c.loss.distill.enabled
                                       or c.loss.text_pair_weight > 0 or c.loss.align.target),
       f"config.loss.accum_steps={c.loss.accum_steps} (gradient cache) covers the contrastive "
       "loss only; set it to 1 with config.loss.long_clip, config.loss.distill, "
       "config.loss.align or config.loss.text_pair_weight (use optim.grad_accum_steps for "
       "memory there).")
  need(c.loss.text_pair_weight >= 0, f"config.loss.text_pair_weight="
       f"{c.loss.text_pair_weight} must be >= 0 (0 = off).")
  pairs_read = c.loss.text_pair_weight > 0 or c.loss.caption_contrast
  need(pairs_read == bool(c.data.pair_language),
       f"config.loss.text_pair_weight={c.loss.text_pair_weight} (or config.loss."
       f"caption_contrast={c.loss.caption_contrast}) and config.data.pair_language="
       f"{c.data.pair_language!r} go together: the paired caption is read only by those loss "
       "terms; set both (e.g. text_pair_weight=1.0, pair_language='en') or neither.")
  _validate_caption_contrast(c)
  need(c.loss.text_pair_weight == 0 or not c.model.text.llm.cache_dir,
       "config.loss.text_pair_weight needs the text tower to embed the paired captions, but "
       f"config.model.text.llm.cache_dir={c.model.text.llm.cache_dir!r} feeds cached features "
       "for the drawn captions only; unset the cache or the caption pairs.")
  need(c.loss.group_size >= 0, f"config.loss.group_size={c.loss.group_size} must be >= 0 "
       "(0 = all data-parallel devices).")
  need(c.loss.name == "grouped" or c.loss.group_size == 0,
       f"config.loss.group_size={c.loss.group_size} only applies to config.loss.name="
       f"'grouped' (got {c.loss.name!r}); set loss.name='grouped' or group_size=0.")
  need(bool(c.data.languages), "config.data.languages is empty; name at least one language.")
  need(c.checkpoint.keep >= 1, "config.checkpoint.keep must be >= 1.")
  need(0 < c.data.crop_min_scale, f"config.data.crop_min_scale={c.data.crop_min_scale} must "
       "be > 0 (an area fraction; >= 1 turns the random crop off).")
  need(0 <= c.data.flip_prob <= 1, f"config.data.flip_prob={c.data.flip_prob} must be a "
       "probability in [0, 1].")
  need(0 <= c.data.long_caption_prob <= 1, f"config.data.long_caption_prob="
       f"{c.data.long_caption_prob} must be a probability in [0, 1].")
  need(c.data.shuffle_buffer >= 0, "config.data.shuffle_buffer must be >= 0.")
  need(all(float(w) >= 0 for w in c.data.languages.values()),
       f"config.data.languages={dict(c.data.languages)} has a negative weight.")
  need(c.data.source.partition(":")[2] != "" or c.data.source == "embedded",
       f"config.data.source={c.data.source!r} names no location, e.g. 'shards:/data/*.tar'.")
  _validate_long_captions(c)
  _validate_regions(c)
  _validate_align(c)
  _validate_moe(c)
  _validate_caption(c)
  validate_llm(c.model.text.llm)


def _validate_caption_contrast(c: ml_collections.ConfigDict) -> None:
  """config.loss.caption_contrast / mntp_*: LLM2CLIP's text-only CC stage."""
  def need(cond: bool, msg: str) -> None:
    if not cond:
      raise ConfigError(msg)

  need(c.loss.mntp_weight >= 0, f"config.loss.mntp_weight={c.loss.mntp_weight} must be >= 0.")
  need(0 < c.loss.mntp_mask_prob < 1, f"config.loss.mntp_mask_prob={c.loss.mntp_mask_prob} "
       "must be in (0, 1).")
  need(c.loss.mntp_weight == 0 or c.loss.caption_contrast, "config.loss.mntp_weight > 0 needs "
       "config.loss.caption_contrast=True (MNTP trains the LLM in the CC stage).")
  need(c.loss.mntp_weight == 0 or c.model.text.llm.lm_head, "config.loss.mntp_weight > 0 "
       "predicts tokens: set config.model.text.llm.lm_head=True.")
  if not c.loss.caption_contrast:
    return
  need(c.model.text.kind == "llm" and not c.model.text.llm.cache_dir,
       "config.loss.caption_contrast trains the LLM text tower: set config.model.text.kind="
       "'llm' and clear config.model.text.llm.cache_dir.")
  need(not (c.loss.long_clip.enabled or c.loss.distill.enabled or c.loss.text_pair_weight > 0
            or c.loss.accum_steps > 1 or c.loss.align.target),
       "config.loss.caption_contrast is a text-only stage; turn off config.loss.long_clip, "
       "config.loss.distill, config.loss.align, config.loss.text_pair_weight and "
       "config.loss.accum_steps.")
  need(c.loss.name == "softmax", f"config.loss.caption_contrast uses the softmax "
       f"loss (InfoNCE, as LLM2Vec / LLM2CLIP); config.loss.name={c.loss.name!r}.")


def _validate_regions(c: ml_collections.ConfigDict) -> None:
  """config.data.max_regions, config.model.region, config.loss.region_weight and
  config.loss.hard_negatives."""
  def need(cond: bool, msg: str) -> None:
    if not cond:
      raise ConfigError(msg)

  need(c.data.max_regions >= 0, f"config.data.max_regions={c.data.max_regions} must be >= 0 "
       "(0 = no regions).")
  need(c.model.region.depth >= 0, f"config.model.region.depth={c.model.region.depth} must be "
       ">= 0 (0 = no region prompter).")
  need(c.loss.region_weight >= 0, f"config.loss.region_weight={c.loss.region_weight} must be "
       ">= 0 (0 = off).")
  on = c.loss.region_weight > 0
  need(on == (c.model.region.depth > 0) == (c.data.max_regions > 0),
       f"config.loss.region_weight={c.loss.region_weight}, config.model.region.depth="
       f"{c.model.region.depth} and config.data.max_regions={c.data.max_regions} go together: "
       "the prompter is trained only by the region loss, which reads the regions; set all "
       "three (e.g. 1.0, 1, 3) or none.")
  need(c.loss.hard_negatives >= 0 and c.loss.hard_negative_weight >= 0,
       f"config.loss.hard_negatives={c.loss.hard_negatives} and hard_negative_weight="
       f"{c.loss.hard_negative_weight} must be >= 0 (0 negatives = off).")
  if c.loss.hard_negatives:
    need(c.data.source == "embedded" and c.data.long_captions == 0
         and not c.data.pair_language,
         "config.loss.hard_negatives swaps attributes with the embedded data's grammar: it "
         "needs config.data.source='embedded' (user swap lists for other sources are not "
         "supported yet), no long captions and no pair_language.")
  if not (on or c.loss.hard_negatives):
    return
  need(c.loss.accum_steps == 1, f"config.loss.accum_steps={c.loss.accum_steps} (gradient "
       "cache) covers the contrastive loss only; set it to 1 with the region loss or hard "
       "negatives (use optim.grad_accum_steps for memory).")
  if on:
    need(not (c.model.image.moe.experts or c.model.text.moe.experts or c.model.image.naflex
              or c.model.image.patch_dropout or c.loss.caption.weight > 0),
         "config.loss.region_weight with MoE towers, NaFlex, patch dropout or the caption "
         "loss is not supported yet (the prompter reads the full square patch grid); turn "
         "one of them off.")
    need(c.model.text.kind == "clip" or not c.model.text.llm.cache_dir,
         "config.loss.region_weight embeds region captions with the text tower; "
         "config.model.text.llm.cache_dir feeds cached features for the drawn captions "
         "only; unset the cache.")


def _validate_align(c: ml_collections.ConfigDict) -> None:
  """config.loss.align (ProCLIP's stages), config.init_only and config.optim.freeze."""
  def need(cond: bool, msg: str) -> None:
    if not cond:
      raise ConfigError(msg)

  for key, groups in (("init_only", c.init_only), ("optim.freeze", c.optim.freeze)):
    bad = [g for g in groups if g not in PARAM_GROUPS]
    need(not bad, f"config.{key} has {bad}; allowed: {', '.join(PARAM_GROUPS)}.")
  need(not c.init_only or c.init_from.startswith("big_clip:"),
       f"config.init_only={tuple(c.init_only)} picks towers of a big_clip run; set "
       "config.init_from='big_clip:WORKDIR[:STEP]' or init_only=().")
  a = c.loss.align
  need(min(a.instance_weight, a.structure_weight, a.contrastive_weight) >= 0,
       "config.loss.align weights must be >= 0.")
  need(a.target == "teacher_text" or not a.teacher, f"config.loss.align.teacher="
       f"{a.teacher!r} is read only with target='teacher_text'; clear it.")
  if a.target == "teacher_text":
    need(a.teacher.startswith("big_clip:"), f"config.loss.align.teacher={a.teacher!r}; "
         "target='teacher_text' needs 'big_clip:WORKDIR[:STEP]' (a trained CLIP run).")
    need(not c.loss.distill.enabled, "config.loss.align.target='teacher_text' and "
         "config.loss.distill both load a teacher; use one of them.")
  if a.target == "ema_image":
    need(c.optim.ema_decay > 0, "config.loss.align.target='ema_image' distills the image "
         "tower from the EMA of itself: set config.optim.ema_decay > 0 (e.g. 0.999).")
    need("image" not in c.optim.freeze, "config.loss.align.target='ema_image' regularizes "
         "a trained image tower; remove 'image' from config.optim.freeze.")


MOE_DISPATCHES = ("einsum", "all_to_all")  # models/moe.py DISPATCHES


def _validate_moe(c: ml_collections.ConfigDict) -> None:
  """config.model.{image,text}.moe and what MoE towers do not support yet."""
  def need(cond: bool, msg: str) -> None:
    if not cond:
      raise ConfigError(msg)

  any_moe = False
  for tower in ("image", "text"):
    m, key = c.model[tower].moe, f"config.model.{tower}.moe"
    need(m.experts >= 0, f"{key}.experts={m.experts} must be >= 0 (0 = dense).")
    if not m.experts:
      continue
    any_moe = True
    need(1 <= m.top_k <= m.experts, f"{key}.top_k={m.top_k} must be in [1, {key}.experts="
         f"{m.experts}].")
    need(1 <= m.every_n_layers <= c.model[tower].depth, f"{key}.every_n_layers="
         f"{m.every_n_layers} must be in [1, depth={c.model[tower].depth}].")
    need(not c.model.scan_layers or m.every_n_layers == 1,
         f"{key}.every_n_layers={m.every_n_layers} with config.model.scan_layers=True: a "
         "scanned stack has one block type; use every_n_layers=1 or scan_layers=False.")
    need(m.capacity_factor >= 0, f"{key}.capacity_factor={m.capacity_factor} must be >= 0 "
         "(0 = dropless).")
    for name in ("router_z_loss", "load_balance", "upcycle_noise"):
      need(m[name] >= 0, f"{key}.{name}={m[name]} must be >= 0.")
    need(m.dispatch in MOE_DISPATCHES, f"{key}.dispatch={m.dispatch!r}; allowed: "
         f"{', '.join(MOE_DISPATCHES)}.")
    expert_axis = c.mesh.expert
    need(expert_axis <= 1 or m.experts % expert_axis == 0,
         f"{key}.experts={m.experts} is not divisible by config.mesh.expert={expert_axis}; "
         "use a multiple of the expert axis.")
  need(c.model.text.kind == "clip" or not c.model.text.moe.experts,
       "config.model.text.moe.experts needs config.model.text.kind='clip' (LLM towers have "
       "no MoE MLPs).")
  need(not any_moe or c.loss.accum_steps == 1,
       f"config.loss.accum_steps={c.loss.accum_steps} (gradient cache) with MoE towers is not "
       "supported yet (the router losses would be dropped); use optim.grad_accum_steps.")


def _validate_caption(c: ml_collections.ConfigDict) -> None:
  """config.loss.caption and the decoder it trains (config.model.decoder)."""
  def need(cond: bool, msg: str) -> None:
    if not cond:
      raise ConfigError(msg)

  cap, dec = c.loss.caption, c.model.decoder
  need(cap.weight >= 0, f"config.loss.caption.weight={cap.weight} must be >= 0 (0 = off).")
  need((cap.weight > 0) == (dec.depth > 0),
       f"config.loss.caption.weight={cap.weight} and config.model.decoder.depth={dec.depth} go "
       "together: the decoder is trained only by the caption loss; set both (e.g. weight=1.0, "
       "depth=6) or neither.")
  if cap.weight == 0:
    return
  need(dec.depth >= 1 and min(dec.width, dec.heads, dec.mlp_dim) >= 1,
       "config.model.decoder: width, depth, heads and mlp_dim must be positive.")
  need(dec.width % dec.heads == 0, f"config.model.decoder.width={dec.width} is not divisible "
       f"by config.model.decoder.heads={dec.heads}.")
  need(0 < cap.parallel_fraction <= 1, f"config.loss.caption.parallel_fraction="
       f"{cap.parallel_fraction} must be in (0, 1] (CapPa: 0.75).")
  need(c.model.text.kind == "clip", "config.loss.caption decodes the text tower's token ids; "
       f"config.model.text.kind={c.model.text.kind!r} has none of its own; use kind='clip'.")
  need(c.loss.accum_steps == 1, f"config.loss.accum_steps={c.loss.accum_steps} (gradient "
       "cache) covers the contrastive loss only; set it to 1 with config.loss.caption (use "
       "optim.grad_accum_steps for memory).")
  need(not (c.model.image.moe.experts or c.model.text.moe.experts),
       "config.loss.caption with MoE towers (config.model.*.moe.experts) is not supported "
       "yet (the router losses would be dropped); turn one of them off.")
  need(not c.model.image.naflex, "config.loss.caption with config.model.image.naflex is not "
       "supported yet (the decoder would attend to padding); turn one of them off.")


def _validate_long_captions(c: ml_collections.ConfigDict) -> None:
  """Long-CLIP, long-caption data and distillation keys."""
  def need(cond: bool, msg: str) -> None:
    if not cond:
      raise ConfigError(msg)

  need(0.0 <= c.data.long_captions <= 1.0,
       f"config.data.long_captions={c.data.long_captions} is a share; use a value in [0, 1].")
  if c.data.long_captions > 0:
    need(c.data.source == "embedded", "config.data.long_captions needs "
         "config.data.source='embedded'.")
    need(set(c.data.languages) == {"en"}, "The embedded long captions are English only; set "
         "config.data.languages={'en': 1.0} with config.data.long_captions.")
  lc = c.loss.long_clip
  if lc.enabled:
    need(c.data.long_captions > 0 or (c.data.source != "embedded"
                                      and c.data.long_caption_prob > 0),
         "config.loss.long_clip.enabled needs long captions: set config.data.long_captions "
         "> 0 (embedded data) or config.data.long_caption_prob > 0 (a source with a "
         "'long_captions' field); each image then also gets its short caption.")
    need(not c.data.pair_language, "config.loss.long_clip.enabled and config.data."
         "pair_language both need the second caption of each example; set one of them off.")
    # PCA of a batch of B features: at most B - 1 directions carry variance.
    limit = min(c.data.global_batch // max(c.optim.grad_accum_steps, 1) - 1, c.model.embed_dim)
    need(1 <= lc.num_components < limit,
         f"config.loss.long_clip.num_components={lc.num_components} must be in [1, {limit}) "
         f"(below the contrastive batch - 1 and config.model.embed_dim).")
    need(lc.short_weight >= 0, "config.loss.long_clip.short_weight must be >= 0.")
  d = c.loss.distill
  if d.enabled:
    need(d.teacher.startswith("big_clip:"), f"config.loss.distill.teacher={d.teacher!r} must "
         "be 'big_clip:WORKDIR[:STEP]' (a trained or imported big_clip run).")
    need(d.temperature > 0, "config.loss.distill.temperature must be > 0.")
    need(min(d.feature_weight, d.kl_weight, d.contrastive_weight) >= 0,
         "config.loss.distill weights must be >= 0.")


def validate_llm(llm: ml_collections.ConfigDict) -> None:
  """config.model.text.llm: LoRA / adapter sizes and targets, cache needs a frozen LLM."""
  key = "config.model.text.llm"
  targets = LORA_TARGETS
  bad = [t for t in llm.lora_targets if t not in targets]
  if bad:
    raise ConfigError(f"{key}.lora_targets has {bad}; allowed: {', '.join(targets)}.")
  for name in ("lora_rank", "adapter_hidden", "kv_heads"):
    if llm[name] < 0:
      raise ConfigError(f"{key}.{name}={llm[name]} must be >= 0.")
  if llm.lora_rank and llm.lora_alpha <= 0:
    raise ConfigError(f"{key}.lora_alpha={llm.lora_alpha} must be positive.")
  if llm.cache_dir and not llm.path:
    raise ConfigError(f"{key}.cache_dir needs {key}.path: the LLM folder the cache was made "
                      "with (its config.json and tokenizer.json key the cache).")
  if llm.cache_dir and (not llm.freeze or llm.lora_rank):
    raise ConfigError(f"{key}.cache_dir needs a frozen LLM without LoRA (freeze=True, "
                      "lora_rank=0): cached features cannot change while training.")


def validate_for_mesh(config: ml_collections.ConfigDict, data_parallel: int,
                      process_count: int) -> None:
  """Batch sizes that the mesh (data x fsdp x expert devices) and the hosts can split evenly."""
  micro = config.data.global_batch // config.optim.grad_accum_steps
  if micro % data_parallel:
    raise ConfigError(
        f"config.data.global_batch={config.data.global_batch} (micro-batch {micro} with "
        f"grad_accum_steps={config.optim.grad_accum_steps}) is not divisible by the "
        f"data-parallel size {data_parallel} (mesh data x fsdp x expert); use a multiple of "
        f"{data_parallel}.")
  # Batch accumulation: every micro-batch is still split over all data-parallel devices.
  loss_micro = config.data.global_batch // config.loss.accum_steps
  if loss_micro % data_parallel:
    raise ConfigError(
        f"config.data.global_batch={config.data.global_batch} / config.loss.accum_steps="
        f"{config.loss.accum_steps} = {loss_micro} examples per micro-batch is not "
        f"divisible by the data-parallel size {data_parallel} (mesh data x fsdp x expert); use a "
        f"global batch that is a multiple of {config.loss.accum_steps * data_parallel}.")
  group_size = config.loss.group_size
  if group_size and data_parallel % group_size:
    raise ConfigError(
        f"config.loss.group_size={group_size} does not divide the data-parallel size "
        f"{data_parallel} (mesh data x fsdp x expert); use a divisor of {data_parallel}, or 0 for "
        "all devices.")
  if config.data.global_batch % process_count:
    raise ConfigError(f"config.data.global_batch={config.data.global_batch} is not divisible "
                      f"by the {process_count} processes.")
