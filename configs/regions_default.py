r"""Fine-grained alignment on the embedded data: the default recipe plus CLOC's region-text
loss (a prompter turns each object's box into a region embedding, matched against its
caption over the whole batch) and FG-CLIP 2's hard negatives (each image against captions
of it with one attribute swapped). docs/regions.md.

  python -m big_clip.train --config configs/regions_default.py --workdir /tmp/big_clip_regions

Arguments: 'quick' (200 steps, for smoke checks); 'baseline': the same run and evals
without the region loss and hard negatives (the comparison at equal steps);
'regions_only' / 'negatives_only': one of the two; a '_quick' suffix makes any of them
200 steps (benchmarks/RESULTS.md compares them).
"""

import importlib.util
import os

# The default recipe, read from its file next to this one (configs/ is not a package).
_SPEC = importlib.util.spec_from_file_location(
    "big_clip_configs_default", os.path.join(os.path.dirname(__file__), "default.py"))
default = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(default)

ARGS = ("quick", "baseline", "baseline_quick", "regions_only", "regions_only_quick",
        "negatives_only", "negatives_only_quick")


def get_config(arg: str | None = None):
  if arg is not None and arg not in ARGS:
    raise ValueError(f"configs/regions_default.py: unknown argument {arg!r}; allowed: "
                     f"{', '.join(ARGS)}.")
  quick = arg is not None and arg.endswith("quick")
  c = default.get_config("quick" if quick else None)
  variant = arg.removesuffix("_quick").removesuffix("quick") if arg else ""
  regions = variant in ("", "regions_only")
  negatives = variant in ("", "negatives_only")
  if regions:
    c.data.max_regions = 3  # an embedded image has 1-3 objects
    c.model.region.depth = 1
    c.loss.region_weight = 1.0
  if negatives:
    c.loss.update(hard_negatives=2, hard_negative_weight=1.0)
  c.evals = (("zeroshot:embedded", "fine_grained:embedded,limit=200")
             + (("regions:embedded,limit=100",) if regions else ()))
  return c
