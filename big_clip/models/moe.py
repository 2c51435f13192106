"""Mixture-of-experts MLPs (Shazeer et al. 2017; GShard, Lepikhin et al. 2021; Switch,
Fedus et al. 2022) for the CLIP towers, and the dense -> MoE upcycling of CLIP-MoE (Zhang et
al. 2024; sparse upcycling, Komatsuzaki et al. 2023).

A router `[width, experts]` scores each token; it goes to its `top_k` experts with gates
renormalized over the chosen ones (Mixtral): with identical experts an MoE MLP equals the
dense MLP for any k, which is what upcycling starts from. Each expert takes at most
`capacity = ceil(top_k T capacity_factor / experts)` tokens of an example (T tokens;
`capacity_factor=0`: T, dropless); a token past its expert's capacity skips that expert
(GShard §2.2: first choices fill the buffers before second choices). One example is one
routing group, so routing never depends on how the batch is split over devices.

Dispatch and combine are einsums with a `[B, T, E, C]` mask (GShard, MaxText's
`dense_matmul`), moved between devices in one of two ways (`dispatch`):
- 'einsum': GSPMD. The expert inputs `[E, B, C, W]` are constrained to `E` on the `expert`
  mesh axis and `B` on the other data axes, and XLA inserts the exchange.
- 'all_to_all': `jax.shard_map`. Each device routes its own examples, and its expert buffers
  go to the experts' devices and back with two explicit `jax.lax.all_to_all` over `expert`;
  the expert weights enter whole per expert (gathered over fsdp / tensor). Same routing,
  same values; on a v5e-256 the GSPMD form gathered the dispatch masks of the whole batch
  (benchmarks/RESULTS.md), this one exchanges only the expert buffers.

Expert weights carry a leading `expert` axis (`[E, W, H]`), named like the dense MLP's
(`mlp.fc1.kernel`...) so that upcycling is a broadcast.

Auxiliary losses, averaged over the tower's MoE layers and added to the loss with their
config weights by `aux_loss`: load balancing (Switch eq. 4, `E sum_e f_e P_e` with f_e the
share of routing choices and P_e the mean router probability of expert e; 1 when balanced)
and the router z-loss (ST-MoE, Zoph et al. 2022, eq. 5: mean logsumexp(logits)^2).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from big_clip import sharding
from big_clip.models import layers

ACT_EXPERT_EMBED = ("activation_exp", "activation_batch_no_exp", None, "activation_embed")
ACT_EXPERT_MLP = ("activation_exp", "activation_batch_no_exp", None, "activation_mlp")
# Switch Transformer §2.4 "smaller parameter initialization": router scale 0.1 / fan-in, so
# routing starts near uniform (and an upcycled model starts as its dense parent).
ROUTER_SCALE = 0.1
STATS = ("load_balance", "router_z", "max_load", "dropped")


@dataclasses.dataclass(frozen=True)
class MoeConfig:
  """`config.model.<tower>.moe`."""
  experts: int = 0
  top_k: int = 2
  every_n_layers: int = 2
  capacity_factor: float = 1.25
  router_z_loss: float = 1e-3
  load_balance: float = 1e-2
  upcycle_noise: float = 0.0
  dispatch: str = "einsum"  # config.MOE_DISPATCHES

  @classmethod
  def from_config(cls, model_cfg: Any, tower: str) -> MoeConfig:
    m = model_cfg[tower].get("moe")
    if m is None:  # the LLM tower, or a config from before MoE
      return cls()
    return cls(**{f.name: type(f.default)(m[f.name]) for f in dataclasses.fields(cls)})

  def is_moe_layer(self, index: int) -> bool:
    """Block `index` (0-based) has an MoE MLP: every n-th block, the n-th first (GShard)."""
    return self.experts > 0 and (index + 1) % self.every_n_layers == 0

  def capacity(self, tokens: int) -> int:
    """Slots per expert for a group of `tokens` tokens (each picks an expert at most once,
    so `tokens` slots never drop)."""
    if self.capacity_factor == 0:
      return tokens
    return min(tokens, math.ceil(self.top_k * tokens * self.capacity_factor / self.experts))


def route(logits: jax.Array, top_k: int, capacity: int
          ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """Top-k routing of `logits` [G, S, E] (G groups of S tokens) into `capacity` slots.

  Returns dispatch [G, S, E, C] (1 where token s goes to slot c of expert e), combine
  [G, S, E, C] (the same times the token's renormalized gate) and the routing statistics
  (float32 scalars over all tokens): load_balance, router_z, max_load (E max_e f_e: 1 when
  balanced, E when one expert gets every choice) and dropped (the share of choices past
  capacity).
  """
  dispatch, combine, means = route_means(logits, top_k, capacity)
  return dispatch, combine, routing_stats(means)


def route_means(logits: jax.Array, top_k: int, capacity: int
                ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """`route`, with the token means the statistics are made of (`routing_stats`) in place of
  the statistics: means over equal groups of tokens average into the means over all."""
  num_experts = logits.shape[-1]
  logits = logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  top_p, top_i = jax.lax.top_k(probs, top_k)  # [G, S, k]
  gates = top_p / jnp.sum(top_p, axis=-1, keepdims=True)  # Mixtral: renormalized over k
  choice = jax.nn.one_hot(top_i, num_experts, dtype=jnp.float32)  # [G, S, k, E]
  # GShard §2.2: slots are taken in the order (choice rank, token), so every first choice
  # is placed before any second choice.
  g, s, k, e = choice.shape
  by_rank = choice.transpose(0, 2, 1, 3).reshape(g, k * s, e)
  slot = (jnp.cumsum(by_rank, axis=1) - 1.0).reshape(g, k, s, e).transpose(0, 2, 1, 3)
  slot = jnp.sum(slot * choice, axis=-1)  # [G, S, k]: position in the chosen expert's buffer
  kept = choice * (slot < capacity)[..., None]  # [G, S, k, E]
  slot_onehot = jax.nn.one_hot(slot, capacity, dtype=jnp.float32)  # [G, S, k, C] (0 if >= C)
  dispatch = jnp.einsum("gske,gskc->gsec", kept, slot_onehot)
  combine = jnp.einsum("gske,gskc,gsk->gsec", kept, slot_onehot, gates)
  means = {
      "share": jnp.mean(jnp.sum(choice, axis=2), axis=(0, 1)) / top_k,  # f_e, sums to 1
      "prob": jnp.mean(probs, axis=(0, 1)),  # P_e
      "z": jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1))),
      "kept": jnp.sum(kept) / (g * s * k),
  }
  return dispatch, combine, means


def routing_stats(means: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """The statistics `route` returns, from the token means of `route_means`."""
  num_experts = means["share"].shape[-1]
  return {
      "load_balance": num_experts * jnp.sum(means["share"] * means["prob"]),
      "router_z": means["z"],
      "max_load": num_experts * jnp.max(means["share"]),
      "dropped": 1.0 - means["kept"],
  }


class Experts(nnx.Module):
  """`experts` linear maps `[in, out]` with biases, stacked on a leading expert axis."""

  def __init__(self, experts: int, in_features: int, out_features: int,
               axes: tuple[str, str], *, std: float, cfg: layers.TransformerConfig,
               rngs: nnx.Rngs):
    self.kernel = layers.param(rngs, nnx.initializers.normal(std),
                               (experts, in_features, out_features), ("expert",) + axes,
                               cfg.param_dtype)
    self.bias = layers.param(rngs, nnx.initializers.zeros, (experts, out_features),
                             ("expert", axes[-1]), cfg.param_dtype)
    self.dtype = cfg.dtype

  def weights(self) -> tuple[jax.Array, jax.Array]:
    """(kernel, bias) in the compute dtype."""
    return self.kernel[...].astype(self.dtype), self.bias[...].astype(self.dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return expert_linear(x.astype(self.dtype), *self.weights())


def expert_linear(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """x [E, G, C, in], kernel [E, in, out], bias [E, out] -> [E, G, C, out]: expert e's map
  on its slots."""
  return jnp.einsum("egci,eio->egco", x, kernel) + bias[:, None, None]


class MoeMLP(nnx.Module):
  """Router + `experts` copies of the CLIP MLP (fc1 -> activation -> fc2), same init."""

  def __init__(self, cfg: layers.TransformerConfig, moe: MoeConfig, *, rngs: nnx.Rngs):
    w, e = cfg.width, moe.experts
    self.router = layers.param(rngs, nnx.initializers.normal((ROUTER_SCALE / w) ** 0.5),
                               (w, e), ("embed", None), cfg.param_dtype)
    self.fc1 = Experts(e, w, cfg.mlp_dim, ("embed", "mlp"), std=(2 * w) ** -0.5, cfg=cfg,
                       rngs=rngs)
    self.fc2 = Experts(e, cfg.mlp_dim, w, ("mlp", "embed"),
                       std=w ** -0.5 * (2 * cfg.depth) ** -0.5, cfg=cfg, rngs=rngs)
    self.activation = cfg.activation
    self.top_k, self.moe = moe.top_k, moe

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.with_stats(x)[0]

  def with_stats(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """[B, T, W] -> ([B, T, W], routing statistics); one example is one routing group."""
    if self.moe.dispatch == "all_to_all":
      return self._all_to_all(x)
    logits = jnp.einsum("btw,we->bte", x.astype(jnp.float32),
                        self.router[...].astype(jnp.float32))
    dispatch, combine, stats = route(logits, self.top_k, self.moe.capacity(x.shape[1]))
    # GShard: [B, T, E, C] x [B, T, W] -> [E, B, C, W]; the constraint moves tokens to their
    # experts' devices (an all-to-all over `expert`).
    expert_in = jnp.einsum("btec,btw->ebcw", dispatch.astype(x.dtype), x)
    expert_in = sharding.constrain(expert_in, ACT_EXPERT_EMBED)
    h = sharding.constrain(self.fc1(expert_in), ACT_EXPERT_MLP)
    expert_out = sharding.constrain(self.fc2(layers.ACTIVATIONS[self.activation](h)),
                                    ACT_EXPERT_EMBED)
    y = jnp.einsum("btec,ebcw->btw", combine.astype(expert_out.dtype), expert_out)
    return sharding.constrain(y, layers.ACT_EMBED), stats

  def _all_to_all(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`with_stats` with the routing on each device's own examples and the expert buffers
    exchanged by `jax.lax.all_to_all` over the `expert` mesh axis (inside `jax.shard_map`)."""
    capacity, act = self.moe.capacity(x.shape[1]), layers.ACTIVATIONS[self.activation]
    mesh = jax.sharding.get_abstract_mesh()
    exchange = not mesh.empty

    def local(x, router, w1, b1, w2, b2):  # x [b, T, W]; w1 [E / expert devices, W, H]
      logits = jnp.einsum("btw,we->bte", x.astype(jnp.float32), router)
      dispatch, combine, means = route_means(logits, self.top_k, capacity)
      buf = jnp.einsum("btec,btw->ebcw", dispatch.astype(w1.dtype), x.astype(w1.dtype))
      if exchange:  # [E, b, C, W] -> [E / n, n b, C, W]: this device's experts, all slots
        buf = jax.lax.all_to_all(buf, "expert", 0, 1, tiled=True)
      out = expert_linear(act(expert_linear(buf, w1, b1)), w2, b2)
      if exchange:  # and back: [E, b, C, W], this device's examples
        out = jax.lax.all_to_all(out, "expert", 1, 0, tiled=True)
      y = jnp.einsum("btec,ebcw->btw", combine.astype(out.dtype), out)
      if exchange:  # equal token counts per device: the mean of means is the global mean
        means = jax.lax.pmean(means, sharding.BATCH_AXES)
      return y, routing_stats(means)

    args = (x, self.router[...].astype(jnp.float32), *self.fc1.weights(), *self.fc2.weights())
    if not exchange:  # no mesh (eager use, unit tests): one device holds every expert
      return local(*args)
    batch, expert = P(sharding.BATCH_AXES), P("expert")
    y, stats = jax.shard_map(local, in_specs=(batch, P(), expert, expert, expert, expert),
                             out_specs=(batch, P()))(*args)
    return sharding.constrain(y, layers.ACT_EMBED), stats


def mlp_factory(cfg: layers.TransformerConfig, moe: MoeConfig) -> layers.MlpFactory | None:
  """`layers.make_blocks`' `mlp`: an MoE MLP in the blocks `moe` names (None: all dense)."""
  if not moe.experts:
    return None
  return lambda i, rngs: MoeMLP(cfg, moe, rngs=rngs) if moe.is_moe_layer(i) else None


def aux_loss(stats: dict[str, dict[str, jax.Array]], model_cfg: Any
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(weighted auxiliary loss, metrics) from `{tower: routing statistics}`: per tower
  `load_balance * L_balance + router_z_loss * L_z`, logged as `moe/<tower>_<stat>`."""
  total, logs = jnp.zeros((), jnp.float32), {}
  for tower, s in stats.items():
    m = model_cfg[tower].moe
    total = total + m.load_balance * s["load_balance"] + m.router_z_loss * s["router_z"]
    logs.update({f"moe/{tower}_{k}": v for k, v in s.items()})
  if stats:
    logs["loss/moe_aux"] = total
  return total, logs
