"""Decoder-LLM text tower: a Llama / Qwen2-family decoder as CLIP's text encoder (LLM2CLIP).

LLM2CLIP (Huang et al. 2024) replaces CLIP's text transformer by a pretrained decoder LLM:
the LLM's pooled last hidden state goes through a small trainable adapter into the joint
space, the LLM itself stays frozen (optionally with LoRA, Hu et al. 2021). This file holds

- `LlmSpec`: the architecture, read from a Hugging Face `config.json` (Llama, Qwen2, and
  their relatives: RMSNorm, RoPE with `rope_theta` and Llama-3 / linear `rope_scaling`,
  grouped-query attention, SwiGLU, Qwen2's q/k/v biases) or, for a tiny random-init tower
  trained in-repo, from `config.model.text` sizes;
- the decoder (`Decoder`), with HF parameter names (`layers.<i>.self_attn.q_proj.kernel` is
  HF `layers.<i>.self_attn.q_proj.weight` transposed to `[in, out]`);
- `load_weights`: `model.safetensors` or sharded safetensors + `model.safetensors.index.json`
  into the (sharded) parameters, each device reading only its slice;
- `LlmTextTower`: tokens -> decoder -> pooling (mean / last / EOS) -> adapter, or, with an
  embedding cache (`config.model.text.llm.cache_dir`), cached pooled features -> adapter.

Frozen weights are `Frozen` variables, not `nnx.Param`: the trainer differentiates and
optimizes `nnx.Param` only (`big_clip.optim.trainable_mask`), so a frozen 8B base gets no
gradient buffers and no Adam moments. Padding is marked by `pad_id` (-1 for HF tokenizers,
see `big_clip.data.tokenizers.HfTokenizer`, so that no real token id is ever mistaken for it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from flax.nnx import traversals
from safetensors import safe_open

from big_clip import config as config_lib
from big_clip import sharding
from big_clip.models import layers
from big_clip.errors import UserError

# Padding of HF-tokenized text: no vocabulary has id -1, so padding is never mistaken for a
# real token (the sentencepiece tokenizers of CLIP towers pad with 0 instead).
PAD_ID = -1
POOLINGS = ("mean", "last", "eos")
ATTENTIONS = ("causal", "bidirectional")
# What big_clip.convert.llm_export writes into the config.json of a trained LLM: the run, the
# attention it was trained with and the sha256 of its weights (the embedding cache's key).
BIG_CLIP_SECTION = "big_clip"
LORA_TARGETS = config_lib.LORA_TARGETS
ROPE_TYPES = ("default", "linear", "llama3")
CONFIG_FILE, INDEX_FILE, SINGLE_FILE = "config.json", "model.safetensors.index.json", \
    "model.safetensors"
LM_HEAD = "lm_head.weight"  # loaded only for MNTP (config.model.text.llm.lm_head)

ACT_KV_HEADS = ("activation_batch", "activation_length", "activation_kv_heads", "activation_kv")


class Frozen(nnx.Variable):
  """A weight the optimizer never sees: a frozen LLM's base weights."""


class CheckpointError(UserError, ValueError):
  """An LLM folder whose tensors do not match the architecture; names the tensor."""


# ---------------------------------------------------------------------------------------------
# Architecture.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LlmSpec:
  """What a Llama / Qwen2 decoder needs; `from_hf` reads it from a `config.json`."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] = ()  # sorted items of HF's rope parameters
  qkv_bias: bool = False  # Qwen2: True; Llama: attention_bias
  o_bias: bool = False  # Llama attention_bias also biases o_proj; Qwen2 never does
  mlp_bias: bool = False
  eos_id: int | None = None
  tie_word_embeddings: bool = False  # the LM head is the embedding table (MNTP's head)
  trained_attention: str = ""  # 'bidirectional' after a CC run exported by big_clip

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], source: str = "config.json") -> LlmSpec:
    """From a HF `config.json` dict of a Llama- or Qwen2-type model (transformers 4 or 5)."""
    def need(key):
      if key not in hf:
        raise ValueError(f"{source}: no {key!r}; is this a Llama/Qwen2 config.json?")
      return hf[key]

    act = hf.get("hidden_act", "silu")
    if act != "silu":
      raise ValueError(f"{source}: hidden_act={act!r}; the LLM tower implements SwiGLU "
                       "(silu) decoders of the Llama / Qwen2 family only.")
    if hf.get("use_sliding_window"):
      raise ValueError(f"{source}: use_sliding_window=true is not supported; set it to false "
                       "(Qwen2 uses full attention on sequences shorter than the window).")
    # transformers 5 writes rope_parameters = {rope_type, rope_theta, ...}; 4 wrote
    # rope_theta and rope_scaling = {rope_type|type, factor, ...} or null.
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    if rope_type not in ROPE_TYPES:
      raise ValueError(f"{source}: rope type {rope_type!r} is not supported; supported: "
                       f"{', '.join(ROPE_TYPES)}.")
    heads = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    model_type = hf.get("model_type", "llama")
    eos = hf.get("eos_token_id")
    if isinstance(eos, list):  # Llama-3 instruct lists several; the first ends a text
      eos = eos[0] if eos else None
    return cls(
        vocab_size=int(need("vocab_size")), hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_layers=int(need("num_hidden_layers")), num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta,
        rope_scaling=tuple(sorted({"rope_type": rope_type, **rope}.items())),
        qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
        o_bias=model_type != "qwen2" and bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)), eos_id=None if eos is None else int(eos),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        trained_attention=str(hf.get(BIG_CLIP_SECTION, {}).get("attention", "")))

  @classmethod
  def from_folder(cls, path: str) -> LlmSpec:
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(file):
      raise FileNotFoundError(f"No {CONFIG_FILE} in {path!r}; config.model.text.llm.path must "
                              "be a Hugging Face model folder (config.json, *.safetensors, "
                              "tokenizer.json).")
    with open(file) as f:
      return cls.from_hf(json.load(f), file)

  @classmethod
  def tiny(cls, text_cfg: Any) -> LlmSpec:
    """A random-init decoder sized by `config.model.text` (width, depth, heads, mlp_dim,
    vocab_size) and `config.model.text.llm.kv_heads` / `rope_theta`."""
    heads, kv = int(text_cfg.heads), int(text_cfg.llm.kv_heads) or int(text_cfg.heads)
    if heads % kv:
      raise ValueError(f"config.model.text.heads={heads} is not divisible by "
                       f"config.model.text.llm.kv_heads={kv}.")
    return cls(vocab_size=int(text_cfg.vocab_size), hidden_size=int(text_cfg.width),
               intermediate_size=int(text_cfg.mlp_dim), num_layers=int(text_cfg.depth),
               num_heads=heads, num_kv_heads=kv, head_dim=int(text_cfg.width) // heads,
               rope_theta=float(text_cfg.llm.rope_theta), eos_id=int(text_cfg.eos_id),
               tie_word_embeddings=True)

  def to_hf(self) -> dict[str, Any]:
    """A Llama `config.json` dict of this architecture (default RoPE only)."""
    if dict(self.rope_scaling).get("rope_type", "default") != "default" or self.o_bias \
        or self.mlp_bias:
      raise ValueError("LlmSpec.to_hf writes plain Llama configs; this spec has rope scaling "
                       "or biases: copy the model's own config.json instead.")
    return {"architectures": ["LlamaModel"], "model_type": "llama",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "hidden_act": "silu",
            "max_position_embeddings": 2048, "eos_token_id": self.eos_id,
            "tie_word_embeddings": self.tie_word_embeddings, "torch_dtype": "float32"}


def rope_inv_freq(spec: LlmSpec) -> np.ndarray:
  """float64 [head_dim / 2] inverse frequencies (Su et al. 2021), with HF's rope scalings."""
  d = spec.head_dim
  inv_freq = 1.0 / spec.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
  p = dict(spec.rope_scaling)
  kind = p.get("rope_type", "default")
  if kind == "linear":  # position interpolation (Chen et al. 2023)
    return inv_freq / float(p["factor"])
  if kind == "llama3":
    # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between
    # (transformers modeling_rope_utils._compute_llama3_parameters).
    factor, low, high = float(p["factor"]), float(p["low_freq_factor"]), \
        float(p["high_freq_factor"])
    old_len = float(p["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled)
  return inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """x [B, T, N, D] rotated by `positions` [B, T], HF layout: halves, not interleaved pairs."""
  angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
  cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]  # [B, T, 1, D/2]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Options of the tower (config.model.text.llm).
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TowerOptions:
  pooling: str = "mean"
  freeze: bool = True
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
  adapter_hidden: int = 0
  dtype: Any = jnp.float32  # compute dtype, and storage dtype of frozen weights
  param_dtype: Any = jnp.float32  # trainable weights (LoRA, adapter, unfrozen base)
  remat: bool = False
  pad_id: int = PAD_ID
  attention: str = "causal"  # 'bidirectional': LLM2Vec's (BehnamGhader et al. 2024) mask
  lm_head: bool = False  # build the LM head (MNTP); tied models reuse the embedding table
  pretrained: bool = False  # base weights come from a checkpoint (init them cheaply)
  cached: bool = False  # inputs are cached pooled features, no decoder

  @classmethod
  def from_config(cls, model_cfg: Any) -> TowerOptions:
    c = model_cfg.text.llm
    key = "config.model.text.llm"
    config_lib.validate_llm(c)
    return cls(
        pooling=layers.choose(c.pooling, POOLINGS, f"{key}.pooling"), freeze=bool(c.freeze),
        lora_rank=int(c.lora_rank), lora_alpha=float(c.lora_alpha),
        lora_targets=tuple(c.lora_targets), adapter_hidden=int(c.adapter_hidden),
        dtype=layers.DTYPES[layers.choose(c.dtype, layers.DTYPES, f"{key}.dtype")],
        param_dtype=layers.DTYPES[layers.choose(model_cfg.param_dtype, layers.DTYPES,
                                                "config.model.param_dtype")],
        remat=bool(model_cfg.remat), pad_id=PAD_ID if c.path else int(model_cfg.text.pad_id),
        attention=layers.choose(c.attention, ATTENTIONS, f"{key}.attention"),
        lm_head=bool(c.lm_head),
        pretrained=bool(c.path), cached=bool(c.cache_dir))


def spec_from_config(model_cfg: Any) -> LlmSpec:
  """The architecture of `config.model.text.llm`: its HF folder, or the tiny random spec."""
  path = model_cfg.text.llm.path
  return LlmSpec.from_folder(path) if path else LlmSpec.tiny(model_cfg.text)


# ---------------------------------------------------------------------------------------------
# Layers. Names follow HF so that loading is a rename (+ transpose of kernels).
# ---------------------------------------------------------------------------------------------
def _weight(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], *, std: float,
            frozen: bool, opt: TowerOptions, ones: bool = False) -> nnx.Variable:
  """A base weight: `Frozen` (stored in opt.dtype) or a trainable Param (opt.param_dtype)."""
  dtype = opt.dtype if frozen else opt.param_dtype
  if ones:
    value = jnp.ones(shape, dtype)
  elif opt.pretrained or std == 0:  # overwritten by load_weights: no random draw
    value = jnp.zeros(shape, dtype)
  else:
    value = std * jax.random.normal(rngs.params(), shape, dtype)
  return (Frozen if frozen else nnx.Param)(value, out_sharding=tuple(axes))


class Projection(nnx.Module):
  """x @ kernel [in, out] (+ bias), plus LoRA (Hu et al. 2021, eq. 3): + (alpha / r) x A B.

  A ~ normal(in^-0.5) (the scale of peft's kaiming-uniform init), B = 0, so at init the
  output is exactly the base's and only B gets a gradient in the first step.
  """

  def __init__(self, d_in: int, d_out: int, axes: tuple[str, str], *, bias: bool,
               lora_rank: int, opt: TowerOptions, rngs: nnx.Rngs, std: float = 0.02):
    self.kernel = _weight(rngs, (d_in, d_out), axes, std=std, frozen=opt.freeze, opt=opt)
    self.bias = (_weight(rngs, (d_out,), axes[1:], std=0, frozen=opt.freeze, opt=opt)
                 if bias else None)
    if lora_rank:
      self.lora_a = layers.param(rngs, nnx.initializers.normal(d_in ** -0.5),
                                 (d_in, lora_rank), (axes[0], "lora"), opt.param_dtype)
      self.lora_b = layers.param(rngs, nnx.initializers.zeros, (lora_rank, d_out),
                                 ("lora", axes[1]), opt.param_dtype)
      self.lora_scale = opt.lora_alpha / lora_rank
    else:
      self.lora_a = self.lora_b = None
    self.dtype = opt.dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    y = x @ self.kernel[...].astype(self.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if self.lora_a is not None:
      low = x @ self.lora_a[...].astype(self.dtype)
      y = y + self.lora_scale * (low @ self.lora_b[...].astype(self.dtype))
    return y


class RMSNorm(nnx.Module):
  """x / rms(x) * scale with float32 statistics (Zhang & Sennrich 2019; HF LlamaRMSNorm)."""

  def __init__(self, dim: int, eps: float, opt: TowerOptions, rngs: nnx.Rngs):
    self.scale = _weight(rngs, (dim,), ("embed",), std=0, frozen=opt.freeze, opt=opt, ones=True)
    self.eps, self.dtype = eps, opt.dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + self.eps)
    # HF casts back to the input dtype before the scale; in float32 the two agree.
    return (self.scale[...].astype(jnp.float32) * y).astype(self.dtype)


def _lora_rank(name: str, opt: TowerOptions) -> int:
  return opt.lora_rank if name in opt.lora_targets else 0


class SelfAttention(nnx.Module):
  """Grouped-query attention (Ainslie et al. 2023) with RoPE, padding mask, and the causal
  mask unless `opt.attention='bidirectional'` (LLM2Vec §2.1: every token sees every token)."""

  def __init__(self, spec: LlmSpec, opt: TowerOptions, rngs: nnx.Rngs):
    h, d = spec.hidden_size, spec.head_dim
    proj = lambda name, d_in, d_out, axes, bias: Projection(
        d_in, d_out, axes, bias=bias, lora_rank=_lora_rank(name, opt), opt=opt, rngs=rngs)
    self.q_proj = proj("q_proj", h, spec.num_heads * d, ("embed", "heads"), spec.qkv_bias)
    self.k_proj = proj("k_proj", h, spec.num_kv_heads * d, ("embed", "kv_heads"),
                       spec.qkv_bias)
    self.v_proj = proj("v_proj", h, spec.num_kv_heads * d, ("embed", "kv_heads"),
                       spec.qkv_bias)
    self.o_proj = proj("o_proj", spec.num_heads * d, h, ("heads", "embed"), spec.o_bias)
    self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, d
    self.spec, self.causal = spec, opt.attention == "causal"

  def __call__(self, x: jax.Array, positions: jax.Array, valid: jax.Array) -> jax.Array:
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    q = sharding.constrain(apply_rope(q, positions, rope_inv_freq(self.spec)), layers.ACT_HEADS)
    k = sharding.constrain(apply_rope(k, positions, rope_inv_freq(self.spec)), ACT_KV_HEADS)
    v = sharding.constrain(v, ACT_KV_HEADS)
    # Keys that are padding are masked for every query; causal masking on top. Padding
    # queries (after the text) still see the text, so no row is fully masked.
    y = jax.nn.dot_product_attention(q, k, v, mask=valid[:, None, None, :],
                                     is_causal=self.causal)
    return self.o_proj(y.reshape(b, t, -1))


class SwiGLU(nnx.Module):
  """down(silu(gate(x)) * up(x)) (Shazeer 2020), the Llama / Qwen2 MLP."""

  def __init__(self, spec: LlmSpec, opt: TowerOptions, rngs: nnx.Rngs):
    h, m, bias = spec.hidden_size, spec.intermediate_size, spec.mlp_bias
    proj = lambda name, d_in, d_out, axes: Projection(
        d_in, d_out, axes, bias=bias, lora_rank=_lora_rank(name, opt), opt=opt, rngs=rngs)
    self.gate_proj = proj("gate_proj", h, m, ("embed", "mlp"))
    self.up_proj = proj("up_proj", h, m, ("embed", "mlp"))
    self.down_proj = proj("down_proj", m, h, ("mlp", "embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    hidden = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
    return self.down_proj(sharding.constrain(hidden, layers.ACT_MLP))


class DecoderLayer(nnx.Module):
  """Pre-RMSNorm residual block: x + attn(norm(x)); x + mlp(norm(x))."""

  def __init__(self, spec: LlmSpec, opt: TowerOptions, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, opt, rngs)
    self.self_attn = SelfAttention(spec, opt, rngs)
    self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, opt, rngs)
    self.mlp = SwiGLU(spec, opt, rngs)

  def __call__(self, x: jax.Array, positions: jax.Array, valid: jax.Array) -> jax.Array:
    x = x + self.self_attn(self.input_layernorm(x), positions, valid)
    x = x + self.mlp(self.post_attention_layernorm(x))
    return sharding.constrain(x, layers.ACT_EMBED)


class Decoder(nnx.Module):
  """HF `LlamaModel` / `Qwen2Model`: embed_tokens -> layers -> norm (last hidden state)."""

  def __init__(self, spec: LlmSpec, opt: TowerOptions, rngs: nnx.Rngs):
    self.embed_tokens = EmbedTokens(spec, opt, rngs)
    self.layers = nnx.List([DecoderLayer(spec, opt, rngs) for _ in range(spec.num_layers)])
    self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, opt, rngs)
    # The LM head for MNTP (HF lm_head.weight, [hidden, vocab] here); tied models use the
    # embedding table instead (`LlmTextTower.token_logits`).
    self.lm_head = (Projection(spec.hidden_size, spec.vocab_size, ("embed", "vocab"),
                               bias=False, lora_rank=0, opt=opt, rngs=rngs)
                    if opt.lm_head and not spec.tie_word_embeddings else None)
    self.remat = opt.remat

  def __call__(self, tokens: jax.Array, valid: jax.Array) -> jax.Array:
    """int32 tokens [B, T] (padding anywhere `valid` [B, T] is False) -> [B, T, hidden]."""
    x = self.embed_tokens(jnp.where(valid, tokens, 0))
    # Position = index among the real tokens: arange for right padding (HF's default),
    # and left-padded text gets the same positions as unpadded text.
    positions = jnp.maximum(jnp.cumsum(valid, axis=-1) - 1, 0)
    step = lambda layer, x: layer(x, positions, valid)
    if self.remat:
      step = nnx.remat(step)
    for layer in self.layers:
      x = step(layer, x)
    return self.norm(x)


class EmbedTokens(nnx.Module):
  """The token embedding table `[vocab, hidden]` (HF `embed_tokens.weight`, no transpose)."""

  def __init__(self, spec: LlmSpec, opt: TowerOptions, rngs: nnx.Rngs):
    self.embedding = _weight(rngs, (spec.vocab_size, spec.hidden_size), ("vocab", "embed"),
                             std=0.02, frozen=opt.freeze, opt=opt)
    self.dtype = opt.dtype

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)
    return sharding.constrain(x, layers.ACT_EMBED)


class Adapter(nnx.Module):
  """LLM2CLIP's trainable head into the joint space: Linear, or Linear-GELU-Linear when
  `hidden` > 0. Always trainable, in param_dtype."""

  def __init__(self, d_in: int, hidden: int, d_out: int, opt: TowerOptions, rngs: nnx.Rngs):
    cfg = layers.TransformerConfig(width=d_in, depth=1, heads=1, mlp_dim=max(hidden, 1),
                                   dtype=jnp.float32, param_dtype=opt.param_dtype)
    if hidden:
      self.fc1 = layers.dense(d_in, hidden, ("embed", "mlp"), std=d_in ** -0.5, cfg=cfg,
                              rngs=rngs)
      self.fc2 = layers.dense(hidden, d_out, ("mlp", "joint"), std=hidden ** -0.5, cfg=cfg,
                              rngs=rngs)
    else:
      self.fc1, self.fc2 = None, layers.dense(d_in, d_out, ("embed", "joint"),
                                              std=d_in ** -0.5, cfg=cfg, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    if self.fc1 is not None:
      x = jax.nn.gelu(self.fc1(x), approximate=False)
    return self.fc2(x)


def pool(hidden: jax.Array, tokens: jax.Array, valid: jax.Array, pooling: str,
         eos_id: int | None) -> jax.Array:
  """float32 [B, H] from hidden states [B, T, H].

  'mean': mean over the non-padding positions (LLM2CLIP, LLM2Vec).
  'last': the last non-padding position (the one that has attended to the whole text).
  'eos':  the last EOS token among the non-padding ones (the tokenizer appends it); the last
          non-padding position if a text has none.
  """
  hidden = hidden.astype(jnp.float32)
  t = tokens.shape[1]
  if pooling == "mean":
    w = valid.astype(jnp.float32)
    return (hidden * w[..., None]).sum(1) / jnp.maximum(w.sum(1, keepdims=True), 1.0)
  rev = jnp.arange(t)[::-1]
  last_valid = t - 1 - jnp.argmax(valid[:, ::-1], axis=-1)
  if pooling == "last":
    idx = last_valid
  elif pooling == "eos":
    if eos_id is None:
      raise ValueError("config.model.text.llm.pooling='eos' but the LLM's config.json has no "
                       "eos_token_id; use pooling='last' or 'mean'.")
    is_eos = (tokens == eos_id) & valid
    idx = jnp.where(is_eos.any(-1), rev[jnp.argmax(is_eos[:, ::-1], axis=-1)], last_valid)
  else:
    raise ValueError(f"config.model.text.llm.pooling={pooling!r}; allowed: "
                     f"{', '.join(POOLINGS)}.")
  return layers.take_positions(hidden, idx)


# ---------------------------------------------------------------------------------------------
# The tower.
# ---------------------------------------------------------------------------------------------
class LlmTextTower(nnx.Module):
  """int32 tokens [B, L] (or cached float32 features [B, hidden]) -> float32 [B, embed_dim].

  `decoder` is absent when the tower reads cached features (`config.model.text.llm.cache_dir`).
  """

  def __init__(self, model_cfg: Any, *, rngs: nnx.Rngs):
    self.spec = spec = spec_from_config(model_cfg)
    self.opt = opt = TowerOptions.from_config(model_cfg)
    # The adapter is built first so that its init does not depend on whether the decoder is
    # there: the cached and the live tower start from the same adapter.
    self.adapter = Adapter(spec.hidden_size, opt.adapter_hidden, int(model_cfg.embed_dim),
                           opt, rngs)
    if spec.trained_attention and spec.trained_attention != opt.attention:
      raise config_lib.ConfigError(
          f"{model_cfg.text.llm.path} was trained with {spec.trained_attention} attention "
          f"(its config.json, section {BIG_CLIP_SECTION!r}); set "
          f"config.model.text.llm.attention={spec.trained_attention!r}.")
    self.decoder = None if opt.cached else Decoder(spec, opt, rngs)

  def hidden_states(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(last hidden states [B, T, hidden], valid [B, T]) of int32 tokens [B, T]."""
    chex.assert_rank(tokens, 2)
    if self.decoder is None:
      raise ValueError("This tower reads cached features (config.model.text.llm.cache_dir); "
                       "it has no decoder to run on tokens.")
    valid = tokens != self.opt.pad_id
    return self.decoder(tokens, valid), valid

  def features(self, tokens: jax.Array) -> jax.Array:
    """Pooled last hidden states, float32 [B, hidden]: what the embedding cache stores."""
    hidden, valid = self.hidden_states(tokens)
    return pool(hidden, tokens, valid, self.opt.pooling, self.spec.eos_id)

  def token_logits(self, hidden: jax.Array) -> jax.Array:
    """float32 [B, T, vocab] next-token logits of hidden states (MNTP): the LM head, or the
    embedding table for tied models (random-init towers, tie_word_embeddings)."""
    if self.decoder is None or not self.opt.lm_head:
      raise ValueError("Token logits need the LM head: set config.model.text.llm.lm_head=True "
                       "(and no cache_dir).")
    if self.decoder.lm_head is not None:
      head = self.decoder.lm_head.kernel[...]
    else:
      head = self.decoder.embed_tokens.embedding[...].T
    return jnp.einsum("bth,hv->btv", hidden.astype(jnp.float32), head.astype(jnp.float32))

  def __call__(self, text: jax.Array) -> jax.Array:
    if self.decoder is None:  # cached pooled features
      chex.assert_shape(text, (None, self.spec.hidden_size))
      return self.adapter(text)
    return self.adapter(self.features(text))


def text_input_shape(model_cfg: Any, max_len: int) -> tuple[tuple[int, ...], Any]:
  """Per-example shape and dtype of the text input of the tower: tokens, or cached features."""
  llm = model_cfg.text.llm
  if model_cfg.text.kind == "llm" and llm.cache_dir:
    return (spec_from_config(model_cfg).hidden_size,), jnp.float32
  return (max_len,), jnp.int32


# ---------------------------------------------------------------------------------------------
# Loading Hugging Face safetensors.
# ---------------------------------------------------------------------------------------------
def weight_files(path: str) -> dict[str, str]:
  """HF tensor name -> safetensors file, from the index (sharded) or the single file."""
  index = os.path.join(path, INDEX_FILE)
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    return {name: os.path.join(path, file) for name, file in weight_map.items()}
  single = os.path.join(path, SINGLE_FILE)
  if not os.path.exists(single):
    raise FileNotFoundError(f"No {SINGLE_FILE} or {INDEX_FILE} in {path!r}; save the model "
                            "with save_pretrained(..., safe_serialization=True).")
  from safetensors import safe_open

  with safe_open(single, framework="np") as f:
    return {name: single for name in f.keys()}


def _our_path(hf_name: str) -> tuple[tuple[Any, ...], bool]:
  """(path in Decoder's params, transpose?) of a HF tensor name."""
  parts = hf_name.split(".")
  if parts[0] == "model":  # *ForCausalLM checkpoints nest the decoder under `model.`
    parts = parts[1:]
  if parts[-1] == "bias":
    leaf, transpose = "bias", False
  elif parts[-1] == "weight" and parts[-2] == "embed_tokens":
    leaf, transpose = "embedding", False
  elif parts[-1] == "weight" and parts[-2].endswith("norm"):
    leaf, transpose = "scale", False
  else:
    leaf, transpose = "kernel", True
  return tuple(int(p) if p.isdigit() else p for p in parts[:-1]) + (leaf,), transpose


def load_weights(decoder_params: dict, path: str, shardings: Any = None) -> dict:
  """Fills the base weights of a Decoder's pure-dict params from `path`, in place.

  Every (sharded) array is built with `jax.make_array_from_callback`, so each process reads
  only the slices its devices hold. LoRA factors are left as they are. Raises CheckpointError
  naming the tensor on a missing or unexpected tensor or a shape mismatch.
  """
  flat = traversals.flatten_mapping(decoder_params)
  flat_shardings = traversals.flatten_mapping(shardings) if shardings is not None else {}
  wanted = {p for p in flat if p[-1] not in ("lora_a", "lora_b")}
  files = weight_files(path)
  plan = {}
  for name, file in files.items():
    ours, transpose = _our_path(name)
    if name == LM_HEAD and ours not in wanted:  # an embedder does not predict tokens
      continue
    if ours not in wanted:
      raise CheckpointError(f"Unexpected tensor {name!r} in {file}: the decoder built from "
                            f"{path}/config.json has no parameter {'/'.join(map(str, ours))}.")
    plan[ours] = (name, file, transpose)
  missing = sorted("/".join(map(str, p)) for p in wanted - set(plan))
  if missing == ["lm_head/kernel"]:
    raise CheckpointError(f"{path} has no {LM_HEAD} (a base model without its LM head) but "
                          "config.model.text.llm.lm_head=True (MNTP) needs it; use the "
                          "*ForCausalLM checkpoint.")
  if missing:
    raise CheckpointError(f"{path}: no tensor for {len(missing)} parameters, e.g. "
                          f"{missing[:3]}; is config.json from the same model as the weights?")
  handles: dict[str, Any] = {}
  try:
    for ours, (name, file, transpose) in sorted(plan.items(), key=lambda kv: str(kv[0])):
      if file not in handles:
        handles[file] = safe_open(file, framework="np")
      tensor = handles[file].get_slice(name)
      hf_shape = tuple(tensor.get_shape())
      target = flat[ours]
      shape = hf_shape[::-1] if transpose else hf_shape
      if shape != tuple(target.shape):
        raise CheckpointError(
            f"Tensor {name!r} in {file} has shape {list(hf_shape)}; the decoder expects "
            f"{list(target.shape[::-1] if transpose else target.shape)} for "
            f"{'/'.join(map(str, ours))} (from config.json).")
      sharding_ = flat_shardings.get(ours) or getattr(target, "sharding", None)
      if sharding_ is None:
        sharding_ = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      dtype = target.dtype

      def read(index, tensor=tensor, transpose=transpose, dtype=dtype):
        index = tuple(index)
        block = tensor[index[::-1]].T if transpose else tensor[index]
        return np.asarray(block).astype(dtype)

      flat[ours] = jax.make_array_from_callback(tuple(target.shape), sharding_, read)
  finally:
    handles.clear()
  logging.info("Loaded %d tensors of the LLM from %s", len(plan), path)
  loaded = traversals.unflatten_mapping(flat)
  decoder_params.clear()
  decoder_params.update(loaded)
  return decoder_params


def load_into(tower: LlmTextTower, path: str) -> None:
  """Eager use: loads `path` into a tower built with `config.model.text.llm.path=path`."""
  if tower.decoder is None:
    raise ValueError("The tower reads cached features; it has no decoder to load.")
  state = nnx.state(tower.decoder)
  params = nnx.to_pure_dict(state)
  nnx.replace_by_pure_dict(state, load_weights(params, path))
  nnx.update(tower.decoder, state)


# ---------------------------------------------------------------------------------------------
# Writing a trained decoder back (LLM2CLIP's CC stage -> the next stage's HF folder).
# ---------------------------------------------------------------------------------------------
def merge_lora(decoder_params: Mapping[str, Any], lora_alpha: float) -> dict[str, Any]:
  """Decoder params (pure dict) with each LoRA folded into its kernel and the factors gone:
  kernel + (alpha / r) A B (Hu et al. 2021 §4.1: no extra latency once merged)."""
  out = {}
  for key, value in decoder_params.items():
    if isinstance(value, Mapping) and "lora_a" in value:
      a, b = (np.asarray(jax.device_get(value[k]), np.float64) for k in ("lora_a", "lora_b"))
      kernel = np.asarray(jax.device_get(value["kernel"]))
      merged = kernel.astype(np.float64) + (lora_alpha / a.shape[-1]) * (a @ b)
      out[key] = {k: v for k, v in value.items() if k not in ("lora_a", "lora_b")}
      out[key]["kernel"] = merged.astype(kernel.dtype)
    elif isinstance(value, Mapping):
      out[key] = merge_lora(value, lora_alpha)
    else:
      out[key] = value
  return out


def to_hf_tensors(decoder_params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Decoder params without LoRA -> {HF tensor name: float32 array}, the inverse of
  `load_weights`' mapping (kernels transposed back to [out, in])."""
  flat = traversals.flatten_mapping(decoder_params)
  out = {}
  for path, value in flat.items():
    if path[-1] in ("lora_a", "lora_b"):
      raise ValueError(f"{'/'.join(map(str, path))}: merge LoRA first (llm.merge_lora).")
    *parents, leaf = (str(p) for p in path)
    value = np.asarray(jax.device_get(value), np.float32)
    if leaf == "kernel":
      value = value.T
    out[".".join(parents) + (".bias" if leaf == "bias" else ".weight")] = \
        np.ascontiguousarray(value)
  return out
