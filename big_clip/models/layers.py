"""Transformer layers shared by the image and text towers, in the OpenAI / HF CLIP layout.

Radford et al. 2021 (CLIP) use a pre-LN transformer (`x + attn(ln_1(x)); x + mlp(ln_2(x))`).
The parameter layout maps 1:1 onto HF `CLIPEncoderLayer` (separate q/k/v/out projections
with biases, `fc1`/`fc2`), so export is a rename plus a transpose of each kernel
(`nnx.Linear.kernel` is `[in, out]`, a torch `Linear.weight` is `[out, in]`).

Every weight names its logical axes (`big_clip.sharding.RULES`); activations are
constrained by logical name at block boundaries. Nothing here knows about the mesh.

Mixed precision: parameters live in `param_dtype`; matmuls run in `dtype` (nnx.Linear casts
parameters and inputs); LayerNorm statistics and the attention softmax run in float32.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from big_clip import sharding

# Logical names of activations (big_clip.sharding.RULES).
ACT_EMBED = ("activation_batch", "activation_length", "activation_embed")
ACT_MLP = ("activation_batch", "activation_length", "activation_mlp")
ACT_HEADS = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
# nnx.vmap / nnx.scan insert this logical name for the stacked-layers axis of a scanned stack.
LAYERS_METADATA = {nnx.PARTITION_NAME: "layers"}

DTYPES: Mapping[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ACTIVATIONS: Mapping[str, Callable[[jax.Array], jax.Array]] = {
    # Exact erf GELU, as PyTorch nn.GELU() (open_clip ViT-B-16 etc., HF "gelu").
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    # OpenAI CLIP's sigmoid approximation x * sigmoid(1.702 x) (HF "quick_gelu").
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    # The tanh approximation (SigLIP / big_vision; HF "gelu_pytorch_tanh").
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


def choose(value: Any, allowed: Sequence[str] | Mapping[str, Any], key: str) -> Any:
  """`value` if it is one of `allowed`, else a ValueError naming the config key."""
  if value not in allowed:
    raise ValueError(f"{key}={value!r}; allowed: {', '.join(allowed)}.")
  return value


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """The hyper-parameters a transformer stack needs, read from `config.model`."""
  width: int
  depth: int
  heads: int
  mlp_dim: int
  activation: str = "gelu"
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32
  remat: bool = False
  scan_layers: bool = False
  ln_eps: float = 1e-5  # every LayerNorm of the tower (torch/CLIP 1e-5, SigLIP 1e-6)
  attention: str = "xla"  # 'xla' | 'einsum', resolved from config.model.attention_impl

  @classmethod
  def from_config(cls, model_cfg: Any, tower: str) -> TransformerConfig:
    """Reads `config.model.<tower>` and the shared `config.model` fields; validates them."""
    t = model_cfg[tower]
    key = f"config.model.{tower}"
    for name in ("width", "depth", "heads", "mlp_dim"):
      if int(t[name]) < 1:
        raise ValueError(f"{key}.{name}={t[name]}; must be a positive integer.")
    if t.width % t.heads:
      raise ValueError(f"{key}.width={t.width} is not divisible by {key}.heads={t.heads}; "
                       f"choose heads that divide the width.")
    return cls(
        width=int(t.width), depth=int(t.depth), heads=int(t.heads), mlp_dim=int(t.mlp_dim),
        activation=choose(model_cfg.activation, ACTIVATIONS, "config.model.activation"),
        dtype=DTYPES[choose(model_cfg.dtype, DTYPES, "config.model.dtype")],
        param_dtype=DTYPES[choose(model_cfg.param_dtype, DTYPES, "config.model.param_dtype")],
        remat=bool(model_cfg.remat), scan_layers=bool(model_cfg.scan_layers),
        ln_eps=float(model_cfg.ln_eps),
        attention=attention_impl(model_cfg.attention_impl))


ATTENTION_IMPLS = ("auto", "xla", "einsum")


def attention_impl(name: str, platform: str | None = None) -> str:
  """'xla' or 'einsum' for `config.model.attention_impl`. 'auto' is
  jax.nn.dot_product_attention (cuDNN flash / TPU fusions) everywhere: on XLA:CPU the einsum
  kernel measured the same speed (benchmarks/attention.py, RESULTS.md), so the default keeps
  the numbers every earlier run produced."""
  choose(name, ATTENTION_IMPLS, "config.model.attention_impl")
  if name != "auto":
    return name
  del platform  # the same choice on every platform until one measures faster
  return "xla"


def param(rngs: nnx.Rngs, init: nnx.Initializer, shape: Sequence[int],
          axes: Sequence[str | None], dtype: Any) -> nnx.Param:
  """A Param drawn from `init`, carrying logical axis names `axes`."""
  return nnx.Param(nnx.with_partitioning(init, tuple(axes))(rngs.params(), tuple(shape), dtype))


def dense(in_features: int, out_features: int, axes: tuple[str, str], *, std: float,
          cfg: TransformerConfig, rngs: nnx.Rngs, use_bias: bool = True) -> nnx.Linear:
  """nnx.Linear with a normal(std) kernel and zero bias, both named by logical axes."""
  return nnx.Linear(
      in_features, out_features, use_bias=use_bias, dtype=cfg.dtype,
      param_dtype=cfg.param_dtype,
      kernel_init=nnx.with_partitioning(nnx.initializers.normal(std), axes),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros, axes[-1:]), rngs=rngs)


def take_positions(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x[i, idx[i]] for x [b, t, d] and idx [b]: one position per sequence (text pooling).

  Written as a gather with the batch as a batching dimension (take_along_axis), not as
  `x[arange(b), idx]`: GSPMD partitions the former along a sharded batch, while the latter's
  backward (a scatter-add) made the TPU compiler all-gather the whole global batch's
  [B, d] activations, 12 times per step in the SigLIP B/16 pod recipe (benchmarks/RESULTS.md).
  """
  return jnp.take_along_axis(x, idx[:, None, None].astype(jnp.int32), axis=1)[:, 0]


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  """Normalizes the last axis with float32 statistics, then scale and bias; float32 out."""
  x = x.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  y = (x - mean) * jax.lax.rsqrt(var + eps)
  return y * scale.astype(jnp.float32) + bias.astype(jnp.float32)


class LayerNorm(nnx.Module):
  """LayerNorm (eps `cfg.ln_eps`, scale and bias, as torch nn.LayerNorm) with float32
  statistics."""

  def __init__(self, width: int, cfg: TransformerConfig, eps: float | None = None):
    self.scale = nnx.Param(jnp.ones((width,), cfg.param_dtype), out_sharding=("embed",))
    self.bias = nnx.Param(jnp.zeros((width,), cfg.param_dtype), out_sharding=("embed",))
    self.eps = cfg.ln_eps if eps is None else eps
    self.dtype = cfg.dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    return layer_norm(x, self.scale[...], self.bias[...], self.eps).astype(self.dtype)


class MLP(nnx.Module):
  """fc1 -> activation -> fc2, with biases (HF CLIPMLP).

  open_clip init: fc1 std (2 width)^-0.5, fc2 std width^-0.5 (2 depth)^-0.5.
  """

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    w = cfg.width
    self.fc1 = dense(w, cfg.mlp_dim, ("embed", "mlp"), std=(2 * w) ** -0.5, cfg=cfg, rngs=rngs)
    self.fc2 = dense(cfg.mlp_dim, w, ("mlp", "embed"), std=w ** -0.5 * (2 * cfg.depth) ** -0.5,
                     cfg=cfg, rngs=rngs)
    self.activation = cfg.activation

  def __call__(self, x: jax.Array) -> jax.Array:
    h = sharding.constrain(self.fc1(x), ACT_MLP)
    return self.fc2(ACTIVATIONS[self.activation](h))


def _attention_probs(q: jax.Array, k: jax.Array, causal: bool,
                     kv_mask: jax.Array | None = None) -> jax.Array:
  """softmax(q k^T / sqrt(d)) in float32: q [B, T, N, D], k [B, S, N, D] -> [B, N, T, S].
  `kv_mask` [B, S] bool: keys that may be attended to (NaFlex padding is False)."""
  logits = jnp.einsum("btnd,bsnd->bnts", q, k, preferred_element_type=jnp.float32)
  logits = logits * q.shape[-1] ** -0.5
  if causal:
    t, s = logits.shape[-2:]
    allowed = jnp.arange(s)[None, :] <= jnp.arange(t)[:, None]
    logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
  if kv_mask is not None:
    logits = jnp.where(kv_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool = False,
                     kv_mask: jax.Array | None = None) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v per head (Vaswani et al. 2017, eq. 1), heads kept in place:
  q [B, T, N, D], k and v [B, S, N, D] -> [B, T, N, D], as jax.nn.dot_product_attention.

  The backward is written out (dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dP * P)),
  dQ = dS K / sqrt(d), dK = dS^T Q / sqrt(d)): five batched matmuls over (B, N) that read
  the saved float32 P, whatever layout XLA would pick for the autodiff of the forward.
  No kernel library is needed, so it runs on any backend; on GPU/TPU
  jax.nn.dot_product_attention has fused kernels ('auto' picks it there).
  """
  return _einsum_attention_fwd(q, k, v, causal, kv_mask)[0]


def _einsum_attention_fwd(q, k, v, causal, kv_mask):
  probs = _attention_probs(q, k, causal, kv_mask)
  out = jnp.einsum("bnts,bsnd->btnd", probs.astype(v.dtype), v)
  return out, (q, k, v, probs, kv_mask)


def _einsum_attention_bwd(causal, residuals, d_out):
  del causal  # masked entries have P = 0, so their dS is 0 too
  q, k, v, probs, kv_mask = residuals
  d_v = jnp.einsum("bnts,btnd->bsnd", probs.astype(d_out.dtype), d_out)
  d_probs = jnp.einsum("btnd,bsnd->bnts", d_out, v, preferred_element_type=jnp.float32)
  d_logits = probs * (d_probs - jnp.sum(d_probs * probs, axis=-1, keepdims=True))
  d_logits = (d_logits * q.shape[-1] ** -0.5).astype(q.dtype)
  d_q = jnp.einsum("bnts,bsnd->btnd", d_logits, k)
  d_k = jnp.einsum("bnts,btnd->bsnd", d_logits, q)
  d_mask = None if kv_mask is None else np.zeros(kv_mask.shape, jax.dtypes.float0)
  return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), d_mask


einsum_attention.defvjp(_einsum_attention_fwd, _einsum_attention_bwd)


class Attention(nnx.Module):
  """Multi-head attention with separate q/k/v/out projections (HF `CLIPAttention` layout).

  Kernels are `[width, width]`; heads are the contiguous `width // heads` column blocks, as in
  torch (`q.reshape(B, T, heads, head_dim)`). Init follows open_clip: q/k/v std width^-0.5,
  out std width^-0.5 (2 depth)^-0.5.
  """

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    w = cfg.width
    qkv = functools.partial(dense, w, w, ("embed", "heads"), std=w ** -0.5, cfg=cfg, rngs=rngs)
    self.q, self.k, self.v = qkv(), qkv(), qkv()
    self.out = dense(w, w, ("heads", "embed"), std=w ** -0.5 * (2 * cfg.depth) ** -0.5,
                     cfg=cfg, rngs=rngs)
    self.heads = cfg.heads
    self.impl = cfg.attention

  def __call__(self, x: jax.Array, kv: jax.Array | None = None, *, causal: bool = False,
               kv_mask: jax.Array | None = None, mask: jax.Array | None = None) -> jax.Array:
    """Queries from `x` [B, T, W], keys/values from `kv` [B, S, W] (default `x`).

    `kv_mask` [B, S] bool leaves out the keys marked False (NaFlex padding), in either
    kernel. `mask` (bool, broadcastable to [B, heads, T, S], True = attend) replaces `causal`
    and `kv_mask`; it always runs jax.nn.dot_product_attention (the caption decoder's mix
    of causal and parallel rows)."""
    kv = x if kv is None else kv

    def split_heads(y):  # [B, T, W] -> [B, T, heads, head_dim]
      y = y.reshape(*y.shape[:2], self.heads, y.shape[-1] // self.heads)
      return sharding.constrain(y, ACT_HEADS)

    if self.impl == "einsum" and kv is x and mask is None:
      # Self-attention: one [W, 3W] matmul for q, k and v (params stay separate, as HF).
      kernel = jnp.concatenate([self.q.kernel[...], self.k.kernel[...], self.v.kernel[...]], 1)
      bias = jnp.concatenate([self.q.bias[...], self.k.bias[...], self.v.bias[...]])
      qkv = x.astype(self.q.dtype) @ kernel.astype(self.q.dtype) + bias.astype(self.q.dtype)
      q, k, v = (split_heads(y) for y in jnp.split(qkv, 3, axis=-1))
    else:
      q, k, v = split_heads(self.q(x)), split_heads(self.k(kv)), split_heads(self.v(kv))
    if mask is not None:
      y = jax.nn.dot_product_attention(q, k, v, mask=mask)
    elif self.impl == "einsum":
      y = einsum_attention(q, k, v, causal, kv_mask)
    else:  # scale head_dim^-0.5, float32 softmax; fused (cuDNN flash) where the backend has it
      mask = None if kv_mask is None else kv_mask[:, None, None, :]
      y = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)
    return self.out(y.reshape(x.shape[:2] + (-1,)))


# (layer index, rngs) -> the MLP of that block, or None for the dense MLP (models/moe.py).
MlpFactory = Callable[[int, nnx.Rngs], nnx.Module | None]


class Block(nnx.Module):
  """Pre-LN residual block (CLIP): x + attn(ln_1(x)); x + mlp(ln_2(x)).

  `mlp` replaces the dense MLP (an MoE MLP with `with_stats(x) -> (y, routing stats)`)."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs,
               mlp: Callable[[nnx.Rngs], nnx.Module | None] | None = None):
    self.ln_1 = LayerNorm(cfg.width, cfg)
    self.attn = Attention(cfg, rngs=rngs)
    self.ln_2 = LayerNorm(cfg.width, cfg)
    custom = None if mlp is None else mlp(rngs)
    self.mlp = MLP(cfg, rngs=rngs) if custom is None else custom

  def __call__(self, x: jax.Array, causal: bool = False, kv_mask: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """-> (x, routing statistics of an MoE MLP, {} for the dense one). `kv_mask` [B, T]
    bool: tokens the others may attend to (NaFlex padding is False)."""
    x = x + self.attn(self.ln_1(x), causal=causal, kv_mask=kv_mask)
    if isinstance(self.mlp, MLP):
      y, stats = self.mlp(self.ln_2(x)), {}
    else:
      y, stats = self.mlp.with_stats(self.ln_2(x))
    return sharding.constrain(x + y, ACT_EMBED), stats


def make_blocks(cfg: TransformerConfig, *, rngs: nnx.Rngs,
                mlp: MlpFactory | None = None,
                block: Callable[..., nnx.Module] | None = None) -> nnx.List | nnx.Module:
  """`cfg.depth` blocks: an nnx.List (`blocks.<i>.…`), or with `scan_layers` one block whose
  params are stacked on a leading axis named 'layers' (`blocks.…`, shape `[depth, …]`).
  `mlp(i, rngs)` gives block i's MLP (None: dense); a scanned stack has one block type.
  `block(cfg, rngs=rngs)` builds a block other than `Block` (the caption decoder's)."""
  def make(i: int, rngs: nnx.Rngs) -> nnx.Module:
    if block is not None:
      return block(cfg, rngs=rngs)
    return Block(cfg, rngs=rngs, mlp=None if mlp is None else (lambda r: mlp(i, r)))

  if not cfg.scan_layers:
    return nnx.List([make(i, rngs) for i in range(cfg.depth)])

  @nnx.split_rngs(splits=cfg.depth)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=LAYERS_METADATA)
  def stacked(rngs: nnx.Rngs) -> nnx.Module:
    return make(0, rngs)

  return stacked(rngs)


def apply_blocks(blocks: nnx.List | nnx.Module, x: jax.Array, *, remat: bool,
                 causal: bool = False, **context: jax.Array | None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Runs the stack from `make_blocks`; `remat` recomputes each block in the backward pass.
  `context` goes to every block unchanged (None entries are left out): `kv_mask` [B, T] bool,
  the tokens the others may attend to (NaFlex padding is False); the caption decoder's image
  tokens. Returns the tokens and the MoE layers' routing statistics averaged over those
  layers ({} without MoE layers)."""
  context = {k: v for k, v in context.items() if v is not None}

  def step(block: nnx.Module, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    return block(x, causal, **context)

  if remat:
    step = nnx.remat(step)
  if not isinstance(blocks, nnx.List):  # scanned: one compiled body, weights sliced per layer
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0),
              transform_metadata=LAYERS_METADATA)
    def body(x: jax.Array, block: nnx.Module) -> tuple[jax.Array, dict[str, jax.Array]]:
      return step(block, x)
    x, stats = body(x, blocks)
    return x, jax.tree.map(lambda s: s.mean(0), stats)
  per_layer = []
  for block in blocks:
    x, stats = step(block, x)
    if stats:
      per_layer.append(stats)
  return x, (jax.tree.map(lambda *s: sum(s) / len(s), *per_layer) if per_layer else {})


def _blocks_index(path: tuple[Any, ...]) -> int | None:
  """Position of the layer index in a flat path `(..., 'blocks', i, ...)`, if any."""
  for i, (a, b) in enumerate(zip(path, path[1:])):
    if a == "blocks" and isinstance(b, int):
      return i + 1
  return None


def stack_flat(flat: Mapping[tuple[Any, ...], Any]) -> dict[tuple[Any, ...], Any]:
  """Flat per-layer params (`(..., 'blocks', i, ...)`) -> the scanned layout (`(...,
  'blocks', ...)`, stacked on axis 0); other paths unchanged. The one layout converter:
  checkpoints, imports, export and tests go through it and `unstack_flat`."""
  groups: dict[tuple[Any, ...], dict[int, Any]] = {}
  out: dict[tuple[Any, ...], Any] = {}
  for path, value in flat.items():
    i = _blocks_index(path)
    if i is None:
      out[path] = value
    else:
      groups.setdefault(path[:i] + path[i + 1:], {})[path[i]] = value
  for path, per_layer in groups.items():
    stack = np.stack if all(isinstance(v, np.ndarray) for v in per_layer.values()) else jnp.stack
    out[path] = stack([per_layer[i] for i in range(len(per_layer))])
  return out


def unstack_flat(flat: Mapping[tuple[Any, ...], Any],
                 take: Callable[[Any, int], Any] | None = None) -> dict[tuple[Any, ...], Any]:
  """The scanned layout (`(..., 'blocks', ...)` stacked on axis 0) -> per-layer params;
  `take(value, i)` reads layer i (default `value[i]`; e.g. a shape for abstract values)."""
  take = take or (lambda x, i: x[i])
  out: dict[tuple[Any, ...], Any] = {}
  for path, value in flat.items():
    if "blocks" in path and _blocks_index(path) is None:
      i = path.index("blocks") + 1
      for layer in range(value.shape[0]):
        out[path[:i] + (layer,) + path[i:]] = take(value, layer)
    else:
      out[path] = value
  return out


def _arrays(state: nnx.State) -> dict[tuple[Any, ...], Any]:
  return {path: value[...] if isinstance(value, nnx.Variable) else value
          for path, value in nnx.to_flat_state(state)}


def stack_layers(state: nnx.State) -> nnx.State:
  """Per-layer params (`blocks.<i>.x`) -> the scanned layout, as an nnx.State of arrays."""
  return nnx.State.from_flat_path(stack_flat(_arrays(state)))


def unstack_layers(state: nnx.State) -> nnx.State:
  """The scanned layout -> per-layer params (`blocks.<i>.x`), as an nnx.State of arrays."""
  return nnx.State.from_flat_path(unstack_flat(_arrays(state)))
