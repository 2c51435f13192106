"""big_clip.plan compiles the real train step for TPU topologies on this CPU-only machine.

The FLOPs read from the compiled TPU program (dots and convolutions, loop bodies times their
trip count) are checked against the independent analytic count of benchmarks/flops.py, on a
scanned recipe (XLA's own cost_analysis counts a scanned tower's layers once).
"""

import json
import os
import subprocess
import sys

import pytest

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
