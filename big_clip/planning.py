"""A run compiled for a TPU topology from any machine: per-chip memory, FLOPs and collectives.

`jax.experimental.topologies.get_topology_desc` describes the chips of a TPU slice (or of
several slices) without any TPU attached, given `libtpu` (`pip install -r requirements-tpu.txt`);
the real train step of `big_clip.steps.plan` (the one `steps.build` compiles for training)
is lowered against those abstract devices and compiled by the TPU compiler (MaxText's
`train_compile.py` does the same). Nothing executes: the state is abstract.

What the compiled program tells, per chip:
  memory      XLA's buffer assignment (`memory_analysis`): arguments (the sharded state and
              batch), temporaries (activations, gathered weights, gradients, loss blocks),
              outputs; the state is donated, so outputs aliasing arguments count once.
  FLOPs       counted from the optimized HLO: every dot and convolution, times the trip count
              of each enclosing while loop. XLA's own `cost_analysis()` counts a loop body once,
              so a scanned tower of L layers would be undercounted ~L-fold.
  collectives every all-gather / reduce-scatter / all-reduce / collective-permute / all-to-all
              of the optimized HLO, times the trip count of its loops; bytes = its result
              buffer on one chip.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils, topologies
from jax.sharding import AxisType, Mesh

from big_clip import config as config_lib
from big_clip import fileio, sharding, steps
from big_clip.errors import UserError

GiB = 2 ** 30
# HBM per chip (Cloud TPU system architecture pages).
HBM_BYTES = {"v4": 32 * GiB, "v5e": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB}
# v4 and v5p chips hold two TensorCores driven as one device (megacore), as on a real slice.
MEGACORE = ("v4", "v5p")
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")


class TopologyError(UserError, ValueError):
  """A topology name libtpu cannot describe, or libtpu missing."""


# ---------------------------------------------------------------------------------------------
# Devices and mesh.
# ---------------------------------------------------------------------------------------------
def topology_devices(topology: str, num_slices: int = 1) -> list[Any]:
  """The compile-only devices of `num_slices` slices of `topology` ('v5e:16x16', 'v4:2x2x1')."""
  generation = topology.partition(":")[0]
  if generation not in HBM_BYTES or ":" not in topology:
    raise TopologyError(f"--topology={topology!r}: use GENERATION:SHAPE with GENERATION one of "
                        f"{', '.join(HBM_BYTES)}, e.g. v5e:16x16 or v4:4x4x4.")
  try:
    import libtpu  # noqa: F401  (heavy optional dependency: only planning needs it)
  except ImportError as e:
    raise TopologyError("compiling for a TPU topology needs libtpu: "
                        "pip install -r requirements-tpu.txt") from e
  kwargs = {"chip_config_name": "megacore"} if generation in MEGACORE else {}
  if num_slices > 1:
    kwargs["num_slices"] = num_slices
  # libtpu asks the (absent) TPU metadata server for TPU_WORKER_HOSTNAMES; set, it does not
  # warn. It stays set for the process: removed again, a later topology in the same process
  # finds it filled with libtpu's warning text instead. A single host ("localhost") does not
  # make a later train() in this process multi-host (sharding.environment_is_multihost).
  # Compiling needs no chip: ALLOW_MULTIPLE_LIBTPU_LOAD lets several processes (test
  # workers, a plan next to a benchmark) load libtpu at once.
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, **kwargs)
  except Exception as e:  # noqa: BLE001 - libtpu's message names what it cannot build
    raise TopologyError(f"--topology={topology!r} (num_slices={num_slices}): libtpu cannot "
                        f"describe it ({' '.join(str(e).split())[:300]}); use a slice shape of "
                        "that generation, e.g. v5e:4x4, v4:2x2x2.") from e
  return list(desc.devices)


def topology_mesh(requested: dict[str, int], devices: Sequence[Any], num_slices: int = 1) -> Mesh:
  """The mesh of `config.mesh` (-1 resolved) over `devices` in the physical ICI order; with
  several slices the slowest (DCN) dimension goes to the first of data, fsdp that it divides."""
  sizes = sharding.mesh_shape(requested, len(devices))
  shape = [sizes[a] for a in sharding.MESH_AXES]
  if num_slices == 1:
    grid = mesh_utils.create_device_mesh(shape, list(devices), allow_split_physical_axes=True)
  else:
    axis = next((i for i, a in enumerate(sharding.MESH_AXES[:2]) if shape[i] % num_slices == 0),
                None)
    if axis is None:
      raise TopologyError(f"mesh {sizes} over {num_slices} slices: neither data nor fsdp is a "
                          f"multiple of {num_slices}; set --config.mesh.data={num_slices}.")
    ici, dcn = list(shape), [1] * len(shape)
    ici[axis], dcn[axis] = shape[axis] // num_slices, num_slices
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, list(devices),
                                                allow_split_physical_axes=True)
  return Mesh(np.asarray(grid), sharding.MESH_AXES,
              axis_types=(AxisType.Auto,) * len(sharding.MESH_AXES))


# ---------------------------------------------------------------------------------------------
# Reading the optimized HLO.
# ---------------------------------------------------------------------------------------------
_DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
                "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")
_COMP_HEAD = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\))?.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition|called_computations|"
                    r"branch_computations)=(\{[^}]*\}|%?[\w.\-]+)")
_TRIP = re.compile(r'known_trip_count[^0-9]*(\d+)')


def _arrays(text: str) -> list[tuple[str, list[int]]]:
  return [(t, [int(d) for d in dims.split(",") if d]) for t, dims in _ARRAY.findall(text)
          if t in _DTYPE_BYTES]


def _bytes(shape_text: str) -> int:
  return sum(_DTYPE_BYTES[t] * math.prod(d) for t, d in _arrays(shape_text))


def _dims(attr: str, text: str) -> list[int]:
  m = re.search(attr + r"=\{([\d,]*)\}", text)
  return [int(d) for d in m.group(1).split(",") if d] if m else []


def _operands(rest: str) -> list[str]:
  """The operand names of an instruction (`rest` is the text after its opening paren)."""
  return re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])


def _op_flops(op: str, out_shape: str, rest: str, shapes: dict[str, str]) -> int:
  """FLOPs (2 per multiply-add) of one dot or convolution (the TPU compiler writes most
  matmuls as convolutions); operand shapes come from the computation's symbol table."""
  outs = _arrays(out_shape)
  names = _operands(rest)
  if not outs or len(names) < 2:
    return 0
  lhs, rhs = (_arrays(shapes.get(n, "")) for n in names[:2])
  if not lhs or not rhs:
    return 0
  out_elems = math.prod(outs[0][1])
  if op == "dot":
    return 2 * out_elems * math.prod(lhs[0][1][i] for i in _dims("lhs_contracting_dims", rest))
  # Each output element sums over the kernel's input features times the window taps that
  # land on real input elements (not padding, not the holes of lhs_dilate). The TPU
  # compiler writes attention's batched matmuls as convolutions whose batch dimensions are
  # spatial (lhs_dilate = window size, or a padded reversed window): there only one tap per
  # output is real, so taps are counted per spatial dimension, not taken as the window size.
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", rest)
  if not labels:
    return 0
  lhs_l, rhs_l, out_l = labels.groups()
  kernel, out = rhs[0][1], outs[0][1]
  pairs = 1  # (output position, kernel tap) pairs that read a real input element
  window = re.search(r"window=\{([^}]*)\}", rest)
  spatial = sorted(c for c in out_l if c.isdigit())
  if window and spatial:
    def field(key: str, default: list[int]) -> list[int]:
      m = re.search(r"\b" + key + r"=([\d_x\-]+)", window.group(1))
      return [int(v) for v in m.group(1).split("x")] if m and "_" not in m.group(1) else default

    n_sp = len(spatial)
    size = field("size", [1] * n_sp)
    stride = field("stride", [1] * n_sp)
    lhs_dil = field("lhs_dilate", [1] * n_sp)
    rhs_dil = field("rhs_dilate", [1] * n_sp)
    pad = re.search(r"\bpad=([\d_x\-]+)", window.group(1))
    pads = ([tuple(int(v) for v in d.split("_")) for d in pad.group(1).split("x")]
            if pad else [(0, 0)] * n_sp)
    for i, c in enumerate(spatial):
      n_in, n_out = lhs[0][1][lhs_l.index(c)], out[out_l.index(c)]
      span = (n_in - 1) * lhs_dil[i]
      valid = 0
      for j in range(n_out):
        for t in range(size[i]):
          q = j * stride[i] + t * rhs_dil[i] - pads[i][0]
          valid += 0 <= q <= span and q % lhs_dil[i] == 0
      pairs *= valid
    out_elems //= math.prod(out[out_l.index(c)] for c in spatial)
  return 2 * out_elems * kernel[rhs_l.index("i")] * pairs


def _trip_count(rest: str, comps: dict[str, list[tuple[str, str, str, str]]]) -> int:
  """A while loop's trip count: XLA's known_trip_count when it printed one, else the bound
  N of its condition `i < N` (JAX's scans and fori_loops count i from 0 by 1)."""
  t = _TRIP.search(rest)
  if t:
    return int(t.group(1))
  cond = re.search(r"condition=%?([\w.\-]+)", rest)
  instrs = comps.get(cond.group(1), []) if cond else []
  consts = {name: r for name, _, op, r in instrs if op == "constant"}
  for _, _, op, r in instrs:
    if op == "compare" and "direction=LT" in r:
      for n in _operands(r):
        if n in consts:
          value = re.match(r"\s*(-?\d+)\)", consts[n])
          if value:
            return max(int(value.group(1)), 1)
  return 1


def _callees(rest: str) -> list[str]:
  """The computations an instruction calls (fusion, while body and condition, reducers...)."""
  return [callee.strip() for group in _CALLS.findall(rest)
          for callee in group.strip("{}").replace("%", "").split(",") if callee.strip()]


@dataclasses.dataclass
class HloCounts:
  flops: float
  collectives: dict[str, dict[str, int]]  # kind -> {count, bytes} per step, per chip


def count_hlo(hlo_text: str) -> HloCounts:
  """Dot/convolution FLOPs and collectives of an optimized HLO module, per execution: every
  computation weighted by how often its callers run it (while bodies: their trip count).

  An asynchronous collective on TPU appears as a start, continuations and a done, each a
  fusion whose computation holds the collective with the channel id of the one transfer: inside
  fusions a collective is counted once per channel. Outside fusions every instruction is its
  own transfer, even where several share a channel id (TPU HLO gives the synchronous
  all-to-alls of every MoE layer channel 1); a GPU-style `-done` counts the `-start` it waits on.
  """
  comps: dict[str, list[tuple[str, str, str, str]]] = {}
  shapes: dict[str, dict[str, str]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    if current is None:
      m = _COMP_HEAD.match(line)
      if m and "=" not in line.split("{")[0].split("(")[0]:
        current = m.group(1)
        comps[current], shapes[current] = [], {}
        header = line[line.find("(") + 1:line.rfind("->")]
        for pname, pshape in re.findall(r"([\w.\-]+): (\(?[^:]*?\]\)?)(?:,|\)\s*$)", header):
          shapes[current][pname] = pshape
        if line.startswith("ENTRY"):
          entry = current
      continue
    if line.strip() == "}":
      current = None
      continue
    m = _INSTR.match(line)
    if m:
      comps[current].append((m.group(1), m.group(2), m.group(3), m.group(4)))
      shapes[current][m.group(1)] = m.group(2)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")

  weight: dict[str, float] = {}

  def visit(comp: str, w: float, depth: int = 0) -> None:
    if comp not in comps or depth > 64:
      return
    weight[comp] = weight.get(comp, 0.0) + w
    for _, _, op, rest in comps[comp]:
      trip = _trip_count(rest, comps) if op == "while" else 1
      for callee in _callees(rest):
        visit(callee, w * trip, depth + 1)

  visit(entry, 1.0)
  fused = {callee for instrs in comps.values() for _, _, op, rest in instrs if op == "fusion"
           for callee in _callees(rest)}
  flops = 0.0
  seen: dict[tuple[str, str], tuple[float, int]] = {}  # (kind, channel) -> (weight, bytes)
  for comp, w in weight.items():
    for name, shape, op, rest in comps[comp]:
      if op in ("dot", "convolution"):
        flops += w * _op_flops(op, shape, rest, shapes[comp])
        continue
      kind = op[:-len("-done")] if op.endswith("-done") else op
      if kind not in COLLECTIVES or op.endswith("-start"):
        continue
      channel = re.search(r"channel_id=(\d+)", rest) if comp in fused else None
      key = (kind, f"channel:{channel.group(1)}" if channel else f"{comp}/{name}")
      if op.endswith("-done"):  # its operand is the start: look the channel up there
        start = _operands(rest)[:1]
        key = (kind, f"start:{comp}/{start[0] if start else name}")
      old = seen.get(key, (0.0, 0))
      seen[key] = (max(old[0], w), _bytes(shape))
  coll = {k: {"count": 0, "bytes": 0} for k in COLLECTIVES}
  for (kind, _), (w, nbytes) in seen.items():
    coll[kind]["count"] += int(w)
    coll[kind]["bytes"] += int(w * nbytes)
  return HloCounts(flops, coll)


# ---------------------------------------------------------------------------------------------
# Compiling a run.
# ---------------------------------------------------------------------------------------------
def _memory(compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  args, temps, outs = (int(m.argument_size_in_bytes), int(m.temp_size_in_bytes),
                       int(m.output_size_in_bytes))
  alias = int(getattr(m, "alias_size_in_bytes", 0))
  code = int(getattr(m, "generated_code_size_in_bytes", 0))
  # Donated state: outputs written into their argument buffers are not held twice.
  return {"arguments": args, "temporaries": temps, "outputs": outs, "aliased": alias,
          "code": code, "total": args + temps + outs - alias + code}


def _shard_bytes(tree: Any) -> int:
  """Bytes of one chip's shard of every array of a tree of sharded ShapeDtypeStructs."""
  return sum(math.prod(a.sharding.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
             for a in jax.tree.leaves(tree))


def _memory_from_error(message: str, p: steps.Plan) -> dict[str, int]:
  """The memory of a step the compiler refused as too large: its temporaries from the
  message ('... HLO temporaries (58.18G) exceeds available HBM (30.75G)'), the arguments
  from the sharded shapes (the state and the batch), the outputs: the donated state."""
  m = re.search(r"temporaries \(([\d.]+)([KMGT])\)", message)
  if "RESOURCE_EXHAUSTED" not in message or not m:
    raise RuntimeError(message)
  temps = int(float(m.group(1)) * 1024 ** "KMGT".index(m.group(2)) * 1024)
  state = _shard_bytes(p.abstract_sharded_state())
  args = state + _shard_bytes(p.abstract_batch)
  return {"arguments": args, "temporaries": temps, "outputs": state, "aliased": state,
          "code": 0, "total": args + temps, "compiler_message": " ".join(message.split())[:300]}


def _advice(config: ml_collections.ConfigDict, mesh: Mesh, mem: dict[str, int]) -> list[str]:
  fixes = []
  if mem["temporaries"] >= mem["arguments"]:
    if not config.model.remat:
      fixes.append("model.remat=True")
    fixes.append(f"optim.grad_accum_steps={2 * config.optim.grad_accum_steps}")
    fixes.append(f"a smaller data.global_batch (now {config.data.global_batch})")
  chips = mesh.size
  if mesh.shape["fsdp"] < chips:
    fixes.append(f"a larger fsdp axis (mesh.fsdp=-1 mesh.data=1: the state split {chips} ways)")
  if mesh.shape["fsdp"] * mesh.shape["tensor"] == chips or not fixes:
    fixes.append("a topology with more chips (or more HBM per chip)")
  return fixes


def compile_plan(config: ml_collections.ConfigDict, topology: str, num_slices: int = 1,
                 with_eval: bool = True, hlo_path: str | None = None) -> dict[str, Any]:
  """Compiles the train step (and the eval towers) of `config` for `topology`; the report.
  `hlo_path`: also write the train step's optimized HLO there."""
  devices = topology_devices(topology, num_slices)
  mesh = topology_mesh({a: config.mesh[a] for a in sharding.MESH_AXES}, devices, num_slices)
  processes = len({d.process_index for d in devices})
  config_lib.validate(config)
  config_lib.validate_for_mesh(config, sharding.data_parallel_size(mesh), processes)
  generation = topology.partition(":")[0]
  hbm = HBM_BYTES[generation]

  p = steps.plan(config, mesh)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    lowered = p.jit_step(mesh).lower(p.abstract_sharded_state(), p.abstract_batch)
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
      # The TPU compiler itself refuses a program whose buffers exceed the chip's HBM.
      compiled, mem = None, _memory_from_error(str(e), p)
  seconds = time.perf_counter() - t0
  if compiled is not None:
    mem = _memory(compiled)
    hlo = compiled.as_text()
    if hlo_path:
      fileio.write(hlo_path, hlo)
    counts = count_hlo(hlo)
    xla_cost = compiled.cost_analysis() or {}
    if isinstance(xla_cost, list):
      xla_cost = xla_cost[0] if xla_cost else {}
  else:
    counts = HloCounts(0.0, {k: {"count": 0, "bytes": 0} for k in COLLECTIVES})
    xla_cost = {}
  fits = compiled is not None and mem["total"] <= hbm
  report = {
      "topology": topology, "num_slices": num_slices, "chips": len(devices),
      "device_kind": devices[0].device_kind, "mesh": dict(mesh.shape),
      "global_batch": int(config.data.global_batch),
      "per_chip_bytes": {k: mem[k] for k in ("arguments", "temporaries", "outputs", "total")},
      "aliased_bytes": mem["aliased"], "code_bytes": mem["code"],
      "hbm_bytes": hbm, "fits": fits,
      "flops_per_chip": counts.flops,
      "xla_cost_analysis_flops": float(xla_cost.get("flops", 0.0)),
      "collectives": counts.collectives,
      "compile_seconds": seconds,
      "advice": [] if fits else _advice(config, mesh, mem),
  }
  if compiled is None:  # no program: no FLOPs or collectives to read
    report.update(flops_per_chip=None, collectives=None,
                  compiler_message=mem["compiler_message"])
  if with_eval and fits:
    report["eval"] = compile_eval(config, mesh, p)
  return report


def compile_eval(config: ml_collections.ConfigDict, mesh: Mesh, p: steps.Plan) -> dict[str, Any]:
  """The eval embedding steps (image tower, text tower) at `config.eval.batch_size`: memory."""
  dp = sharding.data_parallel_size(mesh)
  batch = max(dp, config.eval.batch_size // dp * dp)
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        p.abstract_state["params"], p.param_shardings)
  bs = sharding.batch_sharding(mesh)
  image = p.abstract_batch["image"]
  text = p.abstract_batch["text"]
  inputs = {
      "image": jax.ShapeDtypeStruct((batch, *image.shape[1:]), image.dtype, sharding=bs),
      "text": jax.ShapeDtypeStruct((batch, *text.shape[1:]), text.dtype, sharding=bs),
  }
  out = {"batch": batch}
  graphdef = p.graphdef
  fns = {"image": lambda q, x: nnx.merge(graphdef, q).encode_image(x),
         "text": lambda q, t: nnx.merge(graphdef, q).encode_text(t)}
  for name, fn in fns.items():
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
      compiled = jax.jit(fn).lower(params, inputs[name]).compile()
    mem = _memory(compiled)
    out[name] = {"per_chip_bytes": {k: mem[k] for k in ("arguments", "temporaries", "outputs",
                                                         "total")},
                 "compile_seconds": time.perf_counter() - t0}
  return out


def describe(report: dict[str, Any]) -> str:
  """The report as the lines `python -m big_clip.plan` prints."""
  g = lambda b: f"{b / GiB:.2f} GiB"
  m = report["per_chip_bytes"]
  lines = [
      f"{report['topology']}" + (f" x {report['num_slices']} slices"
                                 if report["num_slices"] > 1 else "")
      + f": {report['chips']} chips ({report['device_kind']}), mesh {report['mesh']}, "
      f"global batch {report['global_batch']}",
      f"train step, per chip: arguments {g(m['arguments'])}, temporaries {g(m['temporaries'])}, "
      f"outputs {g(m['outputs'])} ({g(report['aliased_bytes'])} of them donated), "
      f"total {g(m['total'])} of {g(report['hbm_bytes'])} HBM",
  ]
  if report["flops_per_chip"] is None:
    lines.append(f"the TPU compiler refused the step: {report['compiler_message']}")
  else:
    lines += [
        f"FLOPs per chip per step: {report['flops_per_chip']:.4g} (dots and convolutions of "
        f"the optimized HLO, loop bodies x trip count; XLA cost_analysis, loop bodies once: "
        f"{report['xla_cost_analysis_flops']:.4g})",
        "collectives per chip per step: " + (", ".join(
            f"{k} {v['count']} x = {v['bytes'] / 2**20:.1f} MiB"
            for k, v in report["collectives"].items() if v["count"]) or "none"),
    ]
  lines.append(f"compiled in {report['compile_seconds']:.1f} s")
  if "eval" in report:
    e = report["eval"]
    lines.append(f"eval embedding at batch {e['batch']}, per chip total: image "
                 f"{g(e['image']['per_chip_bytes']['total'])}, text "
                 f"{g(e['text']['per_chip_bytes']['total'])}")
  lines.append(verdict(report))
  return "\n".join(lines)


def verdict(report: dict[str, Any]) -> str:
  m, hbm = report["per_chip_bytes"], report["hbm_bytes"]
  if report["fits"]:
    return f"fits with {(hbm - m['total']) / GiB:.2f} GiB to spare per chip"
  return (f"does not fit: {m['total'] / GiB:.2f} GiB per chip of {hbm / GiB:.0f} GiB "
          f"(temporaries {m['temporaries'] / GiB:.2f} GiB, arguments "
          f"{m['arguments'] / GiB:.2f} GiB); try " + ", ".join(report["advice"]))
