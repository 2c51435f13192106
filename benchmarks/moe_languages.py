r"""Where the text tower's MoE layers send each caption language: per run and language, the
share of routing choices (top-k, real tokens only, averaged over the MoE layers) that goes
to each expert, on fresh embedded captions.

Experts fine-tuned on language clusters (configs/clip_moe_multiplet.py:moe, expert e = the
e-th cluster) can route a language to its cluster's expert; in an upcycled run (every expert
the same copy) only the router's training can separate them.

  python -m benchmarks.moe_languages /tmp/clip_moe_chain/moe /tmp/clip_moe_chain/upcycled
"""

from __future__ import annotations

import argparse
import contextlib
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from big_clip import fileio
from big_clip import workdir as workdir_lib
from big_clip.data import embedded, tokenizers
from big_clip.models import adapt, moe, two_tower


@contextlib.contextmanager
def recorded_router_logits():
  """Collects the router logits [B, T, E] of every MoE layer run eagerly inside the block
  (a wrapper around `moe.route`, restored on exit)."""
  logits, route = [], moe.route

  def recording(layer_logits, top_k, capacity):
    logits.append(np.asarray(layer_logits, np.float32))
    return route(layer_logits, top_k, capacity)

  moe.route = recording
  try:
    yield logits
  finally:
    moe.route = route


def expert_shares(logits: list[np.ndarray], real: np.ndarray, top_k: int) -> np.ndarray:
  """[E]: the share of the top-k choices of the `real` [B, T] tokens that each expert gets,
  averaged over the layers."""
  shares = []
  for layer in logits:
    top = np.argsort(-layer, axis=-1)[..., :top_k]  # [B, T, k]
    counts = np.array([np.sum((top == e) & real[..., None]) for e in range(layer.shape[-1])])
    shares.append(counts / counts.sum())
  return np.mean(shares, axis=0)


def run_shares(workdir: str, captions: int, seed: int) -> dict[str, np.ndarray]:
  """{language: [E] expert shares} of the text tower of the run in `workdir`."""
  config, params, _ = adapt.read_run(workdir)
  model = two_tower.TwoTower(config.model, rngs=nnx.Rngs(0))
  nnx.update(model, nnx.State(jax.tree.map(jnp.asarray, params)))
  path = workdir_lib.tokenizer_path(workdir)
  tok = tokenizers.load(path if fileio.exists(path) else config.data.tokenizer.path,
                        config.data.max_len)
  out = {}
  for i, lang in enumerate(config.data.languages):
    rng = np.random.default_rng([seed, i])
    tokens = tok.encode([embedded.caption(embedded.random_attrs(rng), lang, rng)
                         for _ in range(captions)])
    with recorded_router_logits() as logits:
      model.text.forward(jnp.asarray(tokens))
    out[lang] = expert_shares(logits, tokens != tok.pad_id, config.model.text.moe.top_k)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("workdirs", nargs="+", help="runs with MoE text towers")
  parser.add_argument("--captions", type=int, default=256, help="captions per language")
  parser.add_argument("--seed", type=int, default=1)
  args = parser.parse_args()
  for workdir in args.workdirs:
    shares = run_shares(workdir, args.captions, args.seed)
    experts = len(next(iter(shares.values())))
    print(f"\n{os.path.basename(workdir.rstrip('/'))}: text-tower routing share per expert")
    print("| language | " + " | ".join(f"expert {e}" for e in range(experts)) + " |")
    print("|---|" + "---|" * experts)
    for lang, s in shares.items():
      print(f"| {lang} | " + " | ".join(f"{100 * v:.0f} %" for v in s) + " |")


if __name__ == "__main__":
  main()
