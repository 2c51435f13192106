"""Hugging Face `CLIPModel` / `SiglipModel` / `Siglip2Model` (transformers 5.x) <-> big_clip.

CLIPModel (Radford et al. 2021): class token, pre-LN (`pre_layrnorm`), post-LN on the class
token, bias-free projections, causal text tower pooled at the first `eos_token_id` (or at the
largest id when `eos_token_id == 2`, HF's legacy rule), scalar `logit_scale`, no bias.
SiglipModel (Zhai et al. 2023): patch conv with bias, no class token, no pre-LN, post-LN on all
tokens then a MAP head (`nn.MultiheadAttention` with fused q/k/v) whose output is the image
embedding (no projection); bidirectional text tower pooled at position L-1, then `head`
(a Linear with bias); `logit_scale` and `logit_bias` of shape [1]; LayerNorm eps 1e-6.
Siglip2Model (export only) is SigLIP with NaFlex inputs (`image.naflex`): a Linear patch
embedding on (row, col, channel)-ordered patches, the position table of
`vision_config.num_patches` resized per image (bilinear, antialiased) as ours is.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from big_clip.convert import tables
from big_clip.convert.tables import Entry, ExportError, ImportMismatchError

KINDS = ("clip", "siglip")
ARCHITECTURES = {"clip": "CLIPModel", "siglip": "SiglipModel", "siglip2": "Siglip2Model"}

# Ours -> HF `hidden_act`; HF -> ours also accepts the other names of the tanh approximation.
ACT_TO_HF = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}
ACT_FROM_HF = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh"}

BLOCK_NAMES = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn": "self_attn",
               "q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj",
               "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
MAP_NAMES = {"out": "out_proj"}  # torch nn.MultiheadAttention inside SigLIP's MAP head

# transformers 5.24 defaults of the config fields we read (a config.json may omit them).
HF_DEFAULTS = {
    "clip": {"text": dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                          num_hidden_layers=12, num_attention_heads=8,
                          max_position_embeddings=77, hidden_act="quick_gelu",
                          layer_norm_eps=1e-5, pad_token_id=1, eos_token_id=49407),
             "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, num_channels=3, image_size=224,
                            patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5),
             "top": dict(projection_dim=512, logit_scale_init_value=2.6592)},
    "siglip": {"text": dict(vocab_size=32000, hidden_size=768, intermediate_size=3072,
                            num_hidden_layers=12, num_attention_heads=12,
                            max_position_embeddings=64, hidden_act="gelu_pytorch_tanh",
                            layer_norm_eps=1e-6, pad_token_id=1, eos_token_id=49407,
                            projection_size=None),
               "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, num_channels=3, image_size=224,
                              patch_size=16, hidden_act="gelu_pytorch_tanh",
                              layer_norm_eps=1e-6, vision_use_head=True),
               "top": {}},
}


def kind_for_loss(loss_name: str, naflex: bool = False) -> str:
  """Softmax (CLIP) models export as CLIPModel, sigmoid (SigLIP) models as SiglipModel, or
  with NaFlex inputs as Siglip2Model."""
  kind = {"softmax": "clip", "sigmoid": "siglip"}[loss_name]
  return "siglip2" if naflex and kind == "siglip" else kind


# ------------------------------------------------------------------------------ Export.
def check_exportable(m: Any, kind: str) -> None:
  """Raises ExportError listing every `config.model` setting the HF class cannot represent."""
  img, txt = m.image, m.text
  ln_pre, proj = tables.setting(img, "ln_pre", True), tables.setting(img, "proj", True)
  causal, proj_bias = tables.setting(txt, "causal", True), tables.setting(txt, "proj_bias", False)
  bad = []

  def need(ok: bool, setting: str, fix: str) -> None:
    if not ok:
      bad.append(f"config.model.{setting} ({fix})")

  need(tables.setting(img, "stem", "patch") == "patch", f"image.stem={img.get('stem')!r}",
       "the HF vision embeddings patchify with one stride-p convolution: 'patch'")
  naflex = tables.setting(img, "naflex", False)
  need(naflex == (kind == "siglip2"), f"image.naflex={naflex}",
       "NaFlex models export as Siglip2Model, which needs the sigmoid loss's SigLIP layout"
       if naflex else "Siglip2Model takes NaFlex inputs")
  if kind == "clip":
    need(img.pool == "cls", f"image.pool={img.pool!r}", "CLIPModel pools the class token: 'cls'")
    need(ln_pre, "image.ln_pre=False", "CLIPModel has a pre-LayerNorm")
    need(proj, "image.proj=False", "CLIPModel has a visual_projection")
    need(txt.pool in ("eos", "argmax"), f"text.pool={txt.pool!r}",
         "CLIPModel pools at the EOS token: 'eos' or 'argmax'")
    need(not (txt.pool == "eos" and int(txt.eos_id) == 2), "text.pool='eos' with eos_id=2",
         "HF CLIP reads eos_token_id=2 as argmax pooling; use pool='argmax' or another EOS id")
    need(causal, "text.causal=False", "CLIPModel's text tower is causal")
    need(not proj_bias, "text.proj_bias=True",
         "CLIPModel's text_projection has no bias")
  else:
    need(img.pool == "map", f"image.pool={img.pool!r}", "SiglipModel pools with a MAP head")
    need(not ln_pre, "image.ln_pre=True", "SigLIP has no pre-LayerNorm")
    need(not proj, "image.proj=True",
         "SigLIP's image embedding is the MAP head output; set image.proj=False")
    need(txt.pool == "final", f"text.pool={txt.pool!r}",
         "SiglipTextModel pools position L-1: 'final'")
    need(not causal, "text.causal=True", "SigLIP's text tower is "
         "bidirectional; set text.causal=False")
    need(proj_bias, "text.proj_bias=False",
         "SigLIP's text head has a bias; set text.proj_bias=True")
  for setting in tables.moe_settings(m):
    need(False, setting, "the HF towers have dense MLPs; MoE towers do not export")
  if bad:
    raise ExportError(f"Not exportable to transformers {ARCHITECTURES[kind]}: "
                      + "; ".join(bad) + ".")


def entries(m: Any, kind: str) -> list[Entry]:
  """The tensor table of the HF model that `config.model` `m` describes."""
  img, txt = m.image, m.text
  v, t = "vision_model", "text_model"
  if kind == "siglip2":  # a Linear on (row, col, channel)-ordered patches, as ours
    out = tables.linear("image.patch_embed", f"{v}.embeddings.patch_embedding", bias=False)
  else:
    out = [tables.conv_patch("image.patch_embed.kernel",
                             f"{v}.embeddings.patch_embedding.weight", int(img.patch_size))]
  out += [tables.copy("image.positional_embedding", f"{v}.embeddings.position_embedding.weight")]
  out += tables.blocks("image.blocks", f"{v}.encoder.layers", int(img.depth), BLOCK_NAMES,
                       fused_qkv=False)
  out += tables.layer_norm("image.ln_post", f"{v}.post_layernorm")
  out += [tables.copy("text.token_embedding.embedding",
                      f"{t}.embeddings.token_embedding.weight"),
          tables.copy("text.positional_embedding", f"{t}.embeddings.position_embedding.weight")]
  out += tables.blocks("text.blocks", f"{t}.encoder.layers", int(txt.depth), BLOCK_NAMES,
                       fused_qkv=False)
  out += tables.layer_norm("text.ln_final", f"{t}.final_layer_norm")
  if kind == "clip":
    out += [tables.copy("image.class_embedding", f"{v}.embeddings.class_embedding")]
    out += tables.layer_norm("image.ln_pre", f"{v}.pre_layrnorm")
    out += tables.linear("image.proj", "visual_projection", bias=False)
    out += tables.linear("text.proj", "text_projection", bias=False)
    out += [tables.copy("logit_scale", "logit_scale")]
  else:
    # SigLIP's patch conv has a bias; we keep it folded into the position table (exact: every
    # token gets both), so export writes zeros and import adds it to the positions.
    out += [tables.copy("image.patch_embed.bias", f"{v}.embeddings.patch_embedding.bias")]
    h = "image.head"
    out += [tables.copy(f"{h}.probe", f"{v}.head.probe")]
    out += tables.attention(f"{h}.attn", f"{v}.head.attention", fused=True, names=MAP_NAMES)
    out += tables.layer_norm(f"{h}.ln", f"{v}.head.layernorm")
    out += tables.linear(f"{h}.mlp.fc1", f"{v}.head.mlp.fc1")
    out += tables.linear(f"{h}.mlp.fc2", f"{v}.head.mlp.fc2")
    out += tables.linear("text.proj", f"{t}.head", bias=True)
    out += [tables.vector1("logit_scale", "logit_scale"),
            tables.vector1("logit_bias", "logit_bias")]
  return out


def export_state(flat: dict[str, np.ndarray], m: Any, kind: str) -> dict[str, np.ndarray]:
  """Our flat params (per-layer layout) -> the HF state dict."""
  check_exportable(m, kind)
  flat = dict(flat)
  # HF applies exp(logit_scale) unclipped; big_clip clips at logit_scale_max (CLIP §2.5).
  flat["logit_scale"] = np.minimum(flat["logit_scale"],
                                   np.float32(math.log(float(m.logit_scale_max))))
  if kind == "clip":
    flat.pop("logit_bias")  # CLIPModel has none; softmax is invariant to a shared bias
  else:
    width = flat["image.positional_embedding"].shape[-1]
    flat["image.patch_embed.bias"] = np.zeros((width,), flat["image.positional_embedding"].dtype)
  return tables.to_theirs(flat, entries(m, kind), f"transformers {ARCHITECTURES[kind]}")


def import_state(state: dict[str, np.ndarray], m: Any, kind: str, source: str
                 ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """An HF state dict -> (our flat params, our path -> HF key)."""
  flat, origin = tables.to_ours(state, entries(m, kind), f"transformers {ARCHITECTURES[kind]}",
                                source)
  if kind == "clip":
    flat["logit_bias"] = np.zeros((), np.float32)  # CLIPModel's logits have no bias
    origin["logit_bias"] = "(none in CLIPModel: 0)"
  else:
    bias = flat.pop("image.patch_embed.bias")
    if bias.shape[-1:] != flat["image.positional_embedding"].shape[-1:]:
      width = flat["image.positional_embedding"].shape[-1]
      raise ImportMismatchError(f"{source}: tensor {origin['image.patch_embed.bias']} has shape "
                                f"{bias.shape}; expected ({width},).")
    flat["image.positional_embedding"] = flat["image.positional_embedding"] + bias
  return flat, origin


def hf_config(m: Any, kind: str, logit_scale: float, dtype: str = "float32") -> dict[str, Any]:
  """config.json for `from_pretrained` (only the fields that define the function)."""
  img, txt = m.image, m.text
  act, eps = ACT_TO_HF[m.activation], float(tables.setting(m, "ln_eps", 1e-5))
  common = dict(hidden_act=act, layer_norm_eps=eps, attention_dropout=0.0)
  vision = dict(common, hidden_size=int(img.width), intermediate_size=int(img.mlp_dim),
                num_hidden_layers=int(img.depth), num_attention_heads=int(img.heads),
                num_channels=3, image_size=int(img.image_size), patch_size=int(img.patch_size))
  text = dict(common, vocab_size=int(txt.vocab_size), hidden_size=int(txt.width),
              intermediate_size=int(txt.mlp_dim), num_hidden_layers=int(txt.depth),
              num_attention_heads=int(txt.heads), max_position_embeddings=int(txt.max_len),
              pad_token_id=int(txt.pad_id), bos_token_id=None,  # big_clip captions have no BOS
              eos_token_id=2 if txt.pool == "argmax" else int(txt.eos_id))
  if kind == "clip":
    out = dict(model_type="clip", projection_dim=int(m.embed_dim),
               logit_scale_init_value=float(logit_scale))
    vision.update(model_type="clip_vision_model", projection_dim=int(m.embed_dim))
    text.update(model_type="clip_text_model", projection_dim=int(m.embed_dim))
  else:
    out = dict(model_type=kind)
    vision.update(model_type=f"{kind}_vision_model", vision_use_head=True)
    text.update(model_type=f"{kind}_text_model", projection_size=int(m.embed_dim))
    if kind == "siglip2":  # the position table is num_patches = (image_size / patch)^2
      vision["num_patches"] = (int(img.image_size) // int(img.patch_size)) ** 2
      del vision["image_size"]
  return dict(out, architectures=[ARCHITECTURES[kind]], dtype=dtype, text_config=text,
              vision_config=vision)


# ------------------------------------------------------------------------------ Import.
def model_config_from_hf(hf: dict[str, Any]) -> tuple[str, dict[str, Any]]:
  """(kind, `config.model` values) that reproduce the HF model of config.json `hf` exactly."""
  kind = hf.get("model_type")
  if kind not in KINDS:
    raise ImportMismatchError(f"config.json model_type={kind!r}; big_clip imports "
                              f"{', '.join(KINDS)} (CLIPModel, SiglipModel).")
  d = HF_DEFAULTS[kind]
  t = dict(d["text"], **{k: v for k, v in hf.get("text_config", {}).items() if v is not None})
  v = dict(d["vision"], **{k: x for k, x in hf.get("vision_config", {}).items() if x is not None})
  top = dict(d["top"], **hf)

  def same(field: str, what: str) -> Any:
    if t[field] != v[field]:
      raise ImportMismatchError(
          f"config.json: text_config.{field}={t[field]!r} but vision_config.{field}="
          f"{v[field]!r}; big_clip has one {what} for both towers.")
    return t[field]

  act = same("hidden_act", "config.model.activation")
  if act not in ACT_FROM_HF:
    raise ImportMismatchError(f"config.json: hidden_act={act!r}; big_clip supports "
                              f"{', '.join(ACT_FROM_HF)}.")
  if v["num_channels"] != 3:
    raise ImportMismatchError(f"config.json: vision_config.num_channels={v['num_channels']}; "
                              "big_clip's image tower takes RGB (3).")
  image = dict(image_size=v["image_size"], patch_size=v["patch_size"], width=v["hidden_size"],
               depth=v["num_hidden_layers"], heads=v["num_attention_heads"],
               mlp_dim=v["intermediate_size"])
  text = dict(vocab_size=t["vocab_size"], max_len=t["max_position_embeddings"],
              width=t["hidden_size"], depth=t["num_hidden_layers"],
              heads=t["num_attention_heads"], mlp_dim=t["intermediate_size"],
              eos_id=int(t["eos_token_id"]), pad_id=int(t["pad_token_id"]))
  model = dict(activation=ACT_FROM_HF[act],
               ln_eps=float(same("layer_norm_eps", "config.model.ln_eps")))
  if kind == "clip":
    image.update(pool="cls", ln_pre=True, proj=True)
    text.update(pool="argmax" if t["eos_token_id"] == 2 else "eos", causal=True,
                proj_bias=False)
    model.update(embed_dim=int(top["projection_dim"]),
                 logit_scale_init=float(top["logit_scale_init_value"]), logit_bias_init=0.0)
  else:
    if not v["vision_use_head"]:
      raise ImportMismatchError("config.json: vision_config.vision_use_head=false; SiglipModel "
                                "needs the MAP head for its image embedding.")
    proj = t["projection_size"] or t["hidden_size"]
    if proj != v["hidden_size"]:
      raise ImportMismatchError(
          f"config.json: text_config.projection_size={proj} differs from vision_config."
          f"hidden_size={v['hidden_size']}, the image embedding size; they must be equal.")
    image.update(pool="map", ln_pre=False, proj=False)
    text.update(pool="final", causal=False, proj_bias=True)
    model.update(embed_dim=int(proj), logit_scale_init=math.log(10.0), logit_bias_init=-10.0)
  model.update(image=image, text=text)
  return kind, model
