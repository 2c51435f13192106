"""big_clip.plan compiles the real train step for TPU topologies on this CPU-only machine.

The FLOPs read from the compiled TPU program (dots and convolutions, loop bodies times their
trip count) are checked against the independent analytic count of benchmarks/flops.py, on a
scanned recipe (XLA's own cost_analysis counts a scanned tower's layers once).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

pytest.importorskip("libtpu", reason="needs libtpu: pip install -r requirements-tpu.txt")

from benchmarks import flops  # noqa: E402
from big_clip import planning, sharding  # noqa: E402
from configs import default  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config():
  c = default.get_config("quick")
  c.model.scan_layers = True  # the scanned layout the pod recipes use
  return c


@pytest.fixture(scope="module")
def v5e():
  return planning.compile_plan(small_config(), "v5e:2x2", with_eval=True)


def test_v5e_memory_flops_and_collectives(v5e):
  c = small_config()
  assert v5e["chips"] == 4 and v5e["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1,
                                                      "expert": 1}
  m = v5e["per_chip_bytes"]
  assert m["arguments"] > 0 and m["temporaries"] > 0 and m["total"] > 0
  assert v5e["fits"] and v5e["hbm_bytes"] == 16 * 2**30
  analytic = flops.train_step_flops(c.model, c.data.global_batch) / 4
  assert v5e["flops_per_chip"] == pytest.approx(analytic, rel=0.10)
  # What counting the loop bodies fixes: XLA's count sees each scanned tower's layer once.
  assert v5e["xla_cost_analysis_flops"] < 0.75 * analytic
  # Pure data parallelism: the gradients are summed over the 4 chips, nothing is gathered.
  assert v5e["collectives"]["all-reduce"]["count"] >= 1
  assert v5e["eval"]["image"]["per_chip_bytes"]["total"] > 0


def test_after_planning_a_train_run_in_the_same_process_is_still_single_host(v5e):
  # Planning sets TPU_WORKER_HOSTNAMES=localhost for libtpu; read as "a TPU pod" it made
  # train() in the same process call jax.distributed.initialize() and fail (seen in CI).
  assert os.environ.get("TPU_WORKER_HOSTNAMES") == "localhost"
  assert not sharding.environment_is_multihost(os.environ)


def test_v4_megacore_fsdp():
  c = small_config()
  c.mesh.update(data=1, fsdp=-1)
  r = planning.compile_plan(c, "v4:2x2x1", with_eval=False)
  assert r["chips"] == 4 and r["mesh"]["fsdp"] == 4 and r["device_kind"] == "TPU v4"
  assert r["fits"] and r["hbm_bytes"] == 32 * 2**30 and r["per_chip_bytes"]["total"] > 0
  analytic = flops.train_step_flops(c.model, c.data.global_batch) / 4
  assert r["flops_per_chip"] == pytest.approx(analytic, rel=0.10)
  # FSDP: each scanned layer's weights are gathered inside the layer loops (forward and
  # backward of both towers), so the per-step count is at least 2 x depth.
  assert r["collectives"]["all-gather"]["count"] >= 2 * c.model.image.depth


def test_does_not_fit_exits_nonzero_naming_the_fix(tmp_path):
  """The binary at a batch whose activations cannot fit (the TPU compiler itself refuses the
  program): exit status 1, one line naming the fix, and the JSON report."""
  out = tmp_path / "plan.json"
  # 16384 examples per chip through un-rematerialized towers: ~58 GiB of temporaries.
  cmd = [sys.executable, "-m", "big_clip.plan", "--config", "configs/default.py:quick",
         "--topology", "v4:2x2x1", "--config.model.scan_layers=True",
         "--config.mesh.data=1", "--config.mesh.fsdp=-1",
         "--config.data.global_batch=65536", f"--json={out}"]
  p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
  assert p.returncode == 1, p.stderr[-3000:]
  last = p.stderr.strip().splitlines()[-1]
  assert last.startswith("big_clip.plan: error: does not fit"), last
  assert "model.remat=True" in last
  r = json.loads(out.read_text())
  assert not r["fits"] and r["per_chip_bytes"]["total"] > r["hbm_bytes"] == 32 * 2**30


def test_unknown_topology_is_one_line():
  with pytest.raises(planning.TopologyError, match="v5e:16x16"):
    planning.topology_devices("tpu7:2x2")


def test_collectives_that_share_a_channel_id_are_counted_each():
  """The TPU compiler gives every synchronous all-to-all channel 1 (clip_moe's 72 per-layer
  exchanges were counted as one); the ring's permutes are counted once per hop."""
  mesh = Mesh(np.array(planning.topology_devices("v5e:2x2")), ("x",))
  block = jax.ShapeDtypeStruct((4 * 128, 256), jnp.float32, sharding=NamedSharding(mesh, P("x")))
  nbytes = 128 * 256 * 4  # one chip's block

  def exchanges(x):
    for _ in range(3):
      x = jax.lax.all_to_all(x, "x", 0, 0, tiled=True) * 2.0
    return x

  def ring(a, b):  # 5 hops, two blocks moved per hop
    right = [(i, (i + 1) % 4) for i in range(4)]

    def hop(_, carry):
      a, b, acc = carry
      a, b = jax.lax.ppermute(a, "x", right), jax.lax.ppermute(b, "x", right)
      return a, b, acc + jnp.sum(a * b)
    return jax.lax.fori_loop(0, 5, hop, (a, b, 0.0 * a[0, 0]))[2][None]

  for fn, args, kind, count in ((exchanges, (block,), "all-to-all", 3),
                                (ring, (block, block), "collective-permute", 10)):
    specs = tuple(P("x") for _ in args)
    step = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P("x")))
    counted = planning.count_hlo(step.lower(*args).compile().as_text()).collectives[kind]
    assert counted == {"count": count, "bytes": count * nbytes}, (kind, counted)


ASYNC_HLO = """HloModule m

%fused_computation.1 (param_0.1: bf16[1,24]) -> bf16[32,24] {
  %param_0.1 = bf16[1,24]{1,0} parameter(0)
  ROOT %all-gather.1 = bf16[32,24]{1,0} all-gather(%param_0.1), channel_id=5, dimensions={0}
}

%async_collective_fusion.2 (param_0.2: bf16[1,24]) -> bf16[32,24] {
  %param_0.2 = bf16[1,24]{1,0} parameter(0)
  ROOT %all-gather.2 = bf16[32,24]{1,0} all-gather(%param_0.2), channel_id=5, dimensions={0}
}

%fused_computation.3 (param_0.3: bf16[1,24]) -> bf16[32,24] {
  %param_0.3 = bf16[1,24]{1,0} parameter(0)
  ROOT %all-gather.3 = bf16[32,24]{1,0} all-gather(%param_0.3), channel_id=5, dimensions={0}
}

ENTRY %main (p: bf16[1,24]) -> bf16[32,24] {
  %p = bf16[1,24]{1,0} parameter(0)
  %async-collective-start.1 = bf16[32,24]{1,0} fusion(%p), kind=kCustom, calls=%fused_computation.1
  %fusion.2 = bf16[32,24]{1,0} fusion(%p), kind=kCustom, calls=%async_collective_fusion.2
  %async-collective-done.1 = bf16[32,24]{1,0} fusion(%p), kind=kCustom, calls=%fused_computation.3
  ROOT %a = bf16[32,24]{1,0} all-gather(%p), channel_id=5, dimensions={0}
}
"""


def test_an_async_collective_split_over_fusions_is_counted_once():
  # TPU HLO: one transfer = start, continuation and done fusions, each holding the collective
  # with the transfer's channel id; a plain instruction with the same id is a second transfer.
  counted = planning.count_hlo(ASYNC_HLO).collectives["all-gather"]
  assert counted == {"count": 2, "bytes": 2 * 32 * 24 * 2}
