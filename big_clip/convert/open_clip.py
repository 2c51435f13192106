"""open_clip (`open_clip.model.CLIP` with its built-in VisionTransformer / TextTransformer,
open_clip_torch 3.x) <-> big_clip.

open_clip keeps OpenAI's layout: `visual.conv1` (bias-free), `visual.class_embedding`,
`visual.proj` and `text_projection` as `[width, embed_dim]` matrices (no transpose; a Linear
with `proj_bias`), `nn.MultiheadAttention` with fused `in_proj_weight` [3W, W] in every block,
`mlp.c_fc` / `mlp.c_proj`. The model config JSON is open_clip's (`embed_dim`, `quick_gelu`,
`vision_cfg`, `text_cfg`); an export folder holds `open_clip_config.json` (`model_cfg` +
`preprocess_cfg`) and `open_clip_model.safetensors`, so
`open_clip.create_model('local-dir:FOLDER')` loads it (strictly).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from big_clip.convert import tables
from big_clip.convert.tables import Entry, ExportError, ImportMismatchError

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
BLOCK_NAMES = {"ln_1": "ln_1", "ln_2": "ln_2", "attn": "attn", "out": "out_proj",
               "fc1": "mlp.c_fc", "fc2": "mlp.c_proj"}
# Our text pooling -> open_clip's `text_cfg.pool_type`.
TEXT_POOL = {"eos": "eos", "argmax": "argmax", "final": "last"}
GELU_TANH = {"approximate": "tanh"}  # act_kwargs: nn.GELU(approximate='tanh')


def check_exportable(m: Any) -> None:
  img, txt = m.image, m.text
  bad = []
  if img.pool != "cls":
    bad.append(f"config.model.image.pool={img.pool!r} (open_clip's VisionTransformer always has "
               "a class token and pools it; its attentional pooler is not SigLIP's MAP head)")
  if tables.setting(img, "stem", "patch") != "patch":
    bad.append(f"config.model.image.stem={img.stem!r} (open_clip's VisionTransformer patchifies "
               "with one stride-p convolution)")
  if tables.setting(img, "naflex", False):
    bad.append("config.model.image.naflex=True (open_clip's VisionTransformer takes square "
               "images at one resolution; export NaFlex models as transformers Siglip2Model)")
  if not tables.setting(img, "proj", True):
    bad.append("config.model.image.proj=False (open_clip's VisionTransformer has a projection)")
  if txt.pool not in TEXT_POOL:
    bad.append(f"config.model.text.pool={txt.pool!r} (open_clip pools 'eos', 'argmax' or "
               "position L-1 = our 'final'; not the last non-pad token)")
  for tower in ("image", "text"):
    t = m[tower]
    if int(t.width * (t.mlp_dim / t.width)) != t.mlp_dim:
      bad.append(f"config.model.{tower}.mlp_dim={t.mlp_dim} (open_clip's int(width * mlp_ratio) "
                 "does not reproduce it)")
  bad += [f"{setting} (open_clip's towers have dense MLPs; MoE towers do not export)"
          for setting in tables.moe_settings(m)]
  if bad:
    raise ExportError("Not exportable to open_clip: " + "; ".join(bad) + ".")


def has_bias(m: Any, loss_name: str) -> bool:
  """open_clip models have `logit_bias` only when built with init_logit_bias (SigLIP)."""
  return loss_name == "sigmoid"


def entries(m: Any, with_bias: bool) -> list[Entry]:
  img, txt = m.image, m.text
  out = [tables.conv_patch("image.patch_embed.kernel", "visual.conv1.weight",
                           int(img.patch_size)),
         tables.copy("image.class_embedding", "visual.class_embedding"),
         tables.copy("image.positional_embedding", "visual.positional_embedding")]
  if tables.setting(img, "ln_pre", True):
    out += tables.layer_norm("image.ln_pre", "visual.ln_pre")
  out += tables.blocks("image.blocks", "visual.transformer.resblocks", int(img.depth),
                       BLOCK_NAMES, fused_qkv=True)
  out += tables.layer_norm("image.ln_post", "visual.ln_post")
  out += [tables.copy("image.proj.kernel", "visual.proj"),
          tables.copy("text.token_embedding.embedding", "token_embedding.weight"),
          tables.copy("text.positional_embedding", "positional_embedding")]
  out += tables.blocks("text.blocks", "transformer.resblocks", int(txt.depth), BLOCK_NAMES,
                       fused_qkv=True)
  out += tables.layer_norm("text.ln_final", "ln_final")
  if tables.setting(txt, "proj_bias", False):  # open_clip: nn.Linear(width, embed_dim)
    out += tables.linear("text.proj", "text_projection", bias=True)
  else:  # open_clip: a [width, embed_dim] Parameter, our kernel as is
    out += [tables.copy("text.proj.kernel", "text_projection")]
  out += [tables.copy("logit_scale", "logit_scale")]
  if with_bias:
    out += [tables.copy("logit_bias", "logit_bias")]
  return out


def model_cfg(m: Any, logit_bias: float | None) -> dict[str, Any]:
  """open_clip's model config (the JSON under open_clip/model_configs/)."""
  img, txt = m.image, m.text
  eps = float(tables.setting(m, "ln_eps", 1e-5))
  extra = {}
  if eps != 1e-5:  # torch's LayerNorm default
    extra["norm_kwargs"] = {"eps": eps}
  if m.activation == "gelu_tanh":
    extra["act_kwargs"] = dict(GELU_TANH)
  vision = dict(image_size=int(img.image_size), patch_size=int(img.patch_size),
                width=int(img.width), layers=int(img.depth),
                head_width=int(img.width) // int(img.heads),
                mlp_ratio=int(img.mlp_dim) / int(img.width), pool_type="tok",
                no_ln_pre=not tables.setting(img, "ln_pre", True), **extra)
  text = dict(context_length=int(txt.max_len), vocab_size=int(txt.vocab_size),
              width=int(txt.width), heads=int(txt.heads), layers=int(txt.depth),
              mlp_ratio=int(txt.mlp_dim) / int(txt.width), pool_type=TEXT_POOL[txt.pool],
              eos_id=int(txt.eos_id), pad_id=int(txt.pad_id),
              no_causal_mask=not tables.setting(txt, "causal", True),
              proj_bias=bool(tables.setting(txt, "proj_bias", False)), **extra)
  cfg = dict(embed_dim=int(m.embed_dim), quick_gelu=m.activation == "quick_gelu",
             vision_cfg=vision, text_cfg=text)
  if logit_bias is not None:
    cfg["init_logit_bias"] = float(logit_bias)
  return cfg


def export_state(flat: dict[str, np.ndarray], m: Any, loss_name: str
                 ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(open_clip state dict, open_clip model config) of our flat params."""
  check_exportable(m)
  flat = dict(flat)
  # open_clip clamps logit_scale in place during training; we clip when using it.
  flat["logit_scale"] = np.minimum(flat["logit_scale"],
                                   np.float32(math.log(float(m.logit_scale_max))))
  with_bias = has_bias(m, loss_name)
  if not with_bias:
    flat.pop("logit_bias")  # softmax is invariant to a shared bias
  state = tables.to_theirs(flat, entries(m, with_bias), "open_clip")
  bias = float(flat["logit_bias"]) if with_bias else None
  return state, model_cfg(m, bias)


def import_state(state: dict[str, np.ndarray], m: Any, source: str
                 ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  with_bias = "logit_bias" in state
  flat, origin = tables.to_ours(state, entries(m, with_bias), "open_clip", source)
  if not with_bias:
    flat["logit_bias"] = np.zeros((), np.float32)
    origin["logit_bias"] = "(none in this open_clip model: 0)"
  return flat, origin


def model_config_from_open_clip(cfg: dict[str, Any]) -> dict[str, Any]:
  """`config.model` values reproducing open_clip model config `cfg` (built-in towers only)."""
  v, t = cfg["vision_cfg"], cfg["text_cfg"]
  unsupported = [f"vision_cfg.{k}" for k in ("timm_model_name", "attentional_pool",
                                             "ls_init_value", "qk_norm", "final_ln_after_pool")
                 if v.get(k)]
  unsupported += [f"text_cfg.{k}" for k in ("hf_model_name", "embed_cls", "ls_init_value",
                                            "qk_norm", "final_ln_after_pool") if t.get(k)]
  if t.get("proj_type", "linear") != "linear":
    unsupported.append(f"text_cfg.proj_type={t['proj_type']!r}")
  if isinstance(v.get("layers"), (list, tuple)):
    unsupported.append("vision_cfg.layers (a ResNet)")
  if v.get("pool_type", "tok") != "tok":
    unsupported.append(f"vision_cfg.pool_type={v['pool_type']!r}")
  pools = {o: b for b, o in TEXT_POOL.items()}
  if t.get("pool_type", "argmax") not in pools:
    unsupported.append(f"text_cfg.pool_type={t['pool_type']!r}")
  eps = {(c.get("norm_kwargs") or {}).get("eps", 1e-5) for c in (v, t)}
  acts = {tuple(sorted((c.get("act_kwargs") or {}).items())) for c in (v, t)}
  if len(eps) > 1 or len(acts) > 1:
    unsupported.append("different norm_kwargs / act_kwargs per tower")
  act = "quick_gelu" if cfg.get("quick_gelu") else "gelu"
  if acts == {tuple(GELU_TANH.items())} and act == "gelu":
    act = "gelu_tanh"
  elif acts != {()}:
    unsupported.append(f"act_kwargs={sorted(acts)}")
  if unsupported:
    raise ImportMismatchError("open_clip config: big_clip cannot represent "
                              + ", ".join(unsupported) + ".")
  width, twidth = int(v.get("width", 768)), int(t.get("width", 512))
  image = dict(image_size=int(v.get("image_size", 224)), patch_size=int(v.get("patch_size", 16)),
               width=width, depth=int(v.get("layers", 12)),
               heads=width // int(v.get("head_width", 64)),
               mlp_dim=int(width * float(v.get("mlp_ratio", 4.0))), pool="cls",
               ln_pre=not v.get("no_ln_pre", False), proj=True)
  text = dict(vocab_size=int(t.get("vocab_size", 49408)),
              max_len=int(t.get("context_length", 77)), width=twidth,
              depth=int(t.get("layers", 12)), heads=int(t.get("heads", 8)),
              mlp_dim=int(twidth * float(t.get("mlp_ratio", 4.0))),
              pool=pools[t.get("pool_type", "argmax")], eos_id=int(t.get("eos_id", 2)),
              pad_id=int(t.get("pad_id", 0)), causal=not t.get("no_causal_mask", False),
              proj_bias=bool(t.get("proj_bias", False)))
  bias = cfg.get("init_logit_bias")
  return dict(embed_dim=int(cfg["embed_dim"]), activation=act, ln_eps=float(eps.pop()),
              logit_scale_init=math.log(1 / 0.07) if bias is None else math.log(10.0),
              logit_bias_init=0.0 if bias is None else float(bias), image=image, text=text)
