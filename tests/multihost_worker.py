"""One process of the 2-process test in test_multihost.py (not a test module itself).

Run as `python tests/multihost_worker.py OUT.npz SPM_PATH` with JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID, JAX_PLATFORMS=cpu and 4 fake devices in XLA_FLAGS set by
the parent. It joins the job through big_clip's own start-up path, then writes to OUT.npz
every loss's value and gradients and the result of one real train step (4 accumulation
micro-batches), gathered to full arrays, for the parent to compare with its single-process
run on 8 devices (the whole batch at once).
"""

import sys

from big_clip import sharding

sharding.maybe_initialize_distributed("auto")  # before anything touches a jax backend

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import test_multihost  # noqa: E402  (the shared case definitions)


def gathered(tree):
  """Global (possibly not fully addressable) arrays -> full numpy arrays on every host."""
  return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)),
                      tree)


def main(out_path: str, spm_path: str) -> None:
  assert jax.process_count() == 2 and jax.device_count() == 8, (
      jax.process_count(), jax.device_count())
  results = {}
  for name, values in test_multihost.loss_results().items():
    results.update({f"{name}/{i}": v for i, v in enumerate(gathered(values))})
  loss, grad_norm, params, _ = test_multihost.one_train_step(spm_path, accum_steps=4)
  results["train/loss"] = np.asarray(gathered(loss))
  results["train/grad_norm"] = np.asarray(gathered(grad_norm))
  for path, leaf in jax.tree_util.tree_leaves_with_path(gathered(params)):
    results["train/params" + jax.tree_util.keystr(path)] = leaf
  if jax.process_index() == 0:
    np.savez(out_path, **results)
  multihost_utils.sync_global_devices("written")


if __name__ == "__main__":
  main(*sys.argv[1:3])
