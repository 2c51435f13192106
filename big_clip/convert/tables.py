"""One table entry per PyTorch tensor: which big_clip parameters it is made of, and how.

big_clip parameters are addressed by dotted paths in the per-layer layout
(`image.blocks.3.attn.q.kernel`); `models.adapt` converts the scanned layout (layers
stacked on axis 0) to and from it. Each `Entry` maps one or more of our tensors to one torch
tensor and back, so export and import read the same table and their round trip is the
identity by construction. All arrays are NumPy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from big_clip.models.adapt import ImportMismatchError, flatten, unflatten
from big_clip.errors import UserError


class ExportError(UserError, ValueError):
  """A big_clip model (or config setting) that the target format cannot represent."""


@dataclasses.dataclass(frozen=True)
class Entry:
  ours: tuple[str, ...]  # big_clip paths (per-layer layout)
  theirs: str  # the torch state-dict key
  to_theirs: Callable[..., np.ndarray]  # (*ours) -> theirs
  to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]  # theirs -> ours


def setting(c: Any, key: str, default: Any) -> Any:
  """`c[key]` of a config section, or `default` for a config written before the key existed."""
  return c.get(key, default)


def moe_settings(m: Any) -> list[str]:
  """`config.model.<tower>.moe.experts=N` for each tower with mixture-of-experts MLPs: HF
  CLIPModel / SiglipModel and open_clip have dense MLPs only, so these do not export."""
  return [f"config.model.{tower}.moe.experts={m[tower].moe.experts}"
          for tower in ("image", "text")
          if "moe" in m[tower] and int(m[tower].moe.experts) > 0]


# ------------------------------------------------------------------------------ Transforms.
def copy(ours: str, theirs: str) -> Entry:
  return Entry((ours,), theirs, lambda x: x, lambda t: (t,))


def linear(ours: str, theirs: str, bias: bool = True) -> list[Entry]:
  """nnx.Linear (`kernel` [in, out], `bias`) <-> torch Linear (`weight` [out, in], `bias`)."""
  out = [Entry((f"{ours}.kernel",), f"{theirs}.weight", lambda k: k.T, lambda w: (w.T,))]
  return out + ([copy(f"{ours}.bias", f"{theirs}.bias")] if bias else [])


def layer_norm(ours: str, theirs: str) -> list[Entry]:
  return [copy(f"{ours}.scale", f"{theirs}.weight"), copy(f"{ours}.bias", f"{theirs}.bias")]


def conv_patch(ours: str, theirs: str, patch: int) -> Entry:
  """Our patch kernel [p*p*3, W] (pixels in (row, col, channel) order, see vit.patchify)
  <-> torch Conv2d weight [W, 3, p, p]."""
  return Entry((ours,), theirs,
               lambda k: k.reshape(patch, patch, 3, -1).transpose(3, 2, 0, 1),
               lambda w: (w.transpose(2, 3, 1, 0).reshape(patch * patch * 3, -1),))


def vector1(ours: str, theirs: str) -> Entry:
  """A scalar <-> a shape-[1] tensor (HF SigLIP's logit_scale / logit_bias)."""
  return Entry((ours,), theirs, lambda s: np.reshape(s, (1,)), lambda t: (np.reshape(t, ()),))


def attention(ours: str, theirs: str, *, fused: bool, names: Mapping[str, str]) -> list[Entry]:
  """Our separate q/k/v/out projections <-> separate torch ones (`names`: HF's q_proj...)
  or torch nn.MultiheadAttention's fused `in_proj_weight` [3W, W] (rows q, k, v)."""
  qkv = [f"{ours}.{n}" for n in ("q", "k", "v")]
  if fused:
    entries = [
        Entry(tuple(f"{p}.kernel" for p in qkv), f"{theirs}.in_proj_weight",
              lambda q, k, v: np.concatenate([q.T, k.T, v.T]),
              lambda w: tuple(x.T for x in np.split(w, 3))),
        Entry(tuple(f"{p}.bias" for p in qkv), f"{theirs}.in_proj_bias",
              lambda q, k, v: np.concatenate([q, k, v]), lambda b: tuple(np.split(b, 3)))]
  else:
    entries = [e for n in ("q", "k", "v") for e in linear(f"{ours}.{n}", f"{theirs}.{names[n]}")]
  return entries + linear(f"{ours}.out", f"{theirs}.{names['out']}")


def blocks(ours: str, theirs: str, depth: int, names: Mapping[str, str], *,
           fused_qkv: bool) -> list[Entry]:
  """The transformer stack: `names` maps our block parts (ln_1, attn, q, k, v, out, ln_2,
  fc1, fc2) to the target's."""
  out = []
  for i in range(depth):
    o, t = f"{ours}.{i}", f"{theirs}.{i}"
    out += layer_norm(f"{o}.ln_1", f"{t}.{names['ln_1']}")
    out += attention(f"{o}.attn", f"{t}.{names['attn']}", fused=fused_qkv, names=names)
    out += layer_norm(f"{o}.ln_2", f"{t}.{names['ln_2']}")
    out += linear(f"{o}.mlp.fc1", f"{t}.{names['fc1']}")
    out += linear(f"{o}.mlp.fc2", f"{t}.{names['fc2']}")
  return out


# ------------------------------------------------------------------------------ Applying.
def to_theirs(flat: Mapping[str, np.ndarray], entries: Iterable[Entry], fmt: str
              ) -> dict[str, np.ndarray]:
  """Our flat params -> the torch state dict; every parameter must be used exactly once."""
  entries = list(entries)
  used = {k for e in entries for k in e.ours}
  unused = sorted(set(flat) - used)
  if unused:
    raise ExportError(f"{fmt} has no place for big_clip parameter(s) {unused}; this model "
                      f"cannot be exported to {fmt}.")
  missing = sorted(used - set(flat))
  if missing:  # the table expects parameters that the model lacks: a config/param mismatch
    raise ExportError(f"The {fmt} layout needs big_clip parameter(s) {missing[:5]} that the "
                      "model does not have; the config does not describe these parameters.")
  return {e.theirs: np.array(e.to_theirs(*(flat[k] for k in e.ours)), order="C")
          for e in entries}


def to_ours(state: Mapping[str, Any], entries: Iterable[Entry], fmt: str, source: str
            ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """A torch state dict -> (our flat params, our path -> the torch key it came from).

  Missing and unexpected torch tensors are errors that name them (`source` says where the
  state dict came from and which config produced the expected names).
  """
  entries = list(entries)
  expected = {e.theirs for e in entries}
  missing = sorted(expected - set(state))
  unexpected = sorted(set(state) - expected)
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f"missing tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
      parts.append(f"unexpected tensor(s) {unexpected[:8]}"
                   f"{' ...' if len(unexpected) > 8 else ''}")
    raise ImportMismatchError(
        f"{source}: {'; '.join(parts)} for the {fmt} layout of this model config (depth, "
        "pooling, projection settings). Check that the config matches the checkpoint.")
  flat, origin = {}, {}
  for e in entries:
    value = np.asarray(state[e.theirs])
    try:
      parts = e.to_ours(value)
    except ValueError as err:  # e.g. a fused qkv tensor whose rows do not split in three
      raise ImportMismatchError(f"{source}: tensor {e.theirs} has shape {value.shape}, which "
                                f"does not convert to {', '.join(e.ours)} ({err}).") from err
    for k, v in zip(e.ours, parts):
      flat[k], origin[k] = v, e.theirs
  return flat, origin
