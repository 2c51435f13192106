r"""CLIP-MoE's diversified multiplet upcycling (Zhang et al. 2024) on the embedded data: a
dense parent -> copies of it fine-tuned on different data clusters -> their MLPs assembled as
the experts of one MoE model, which then trains its routers on the whole mixture.

The clusters are caption-language groups by script: `latin` (en, de, fr, es), `cjk` (zh,
ja) and `other` (ru, ar, hi). Every embedded image has captions in all nine languages, so a
cluster differs in its text only: that is what the data supports (an image-feature k-means
would need a pipeline that filters examples by their embedding). As in CLIP-MoE, a cluster
fine-tune trains the MLPs only (`optim.trainable`), so every run keeps the parent's
attention, embeddings and norms, and expert e of the MoE model is cluster e's MLP.

Each stage is a CPU run of the model of configs/default.py; the workdirs are fixed under
/tmp/clip_moe_chain (override init_from / data.tokenizer.path to move them):

  D=/tmp/clip_moe_chain
  python -m big_clip.train --config configs/clip_moe_multiplet.py --workdir $D/parent
  for c in latin cjk other; do
    python -m big_clip.train --config configs/clip_moe_multiplet.py:$c --workdir $D/$c
  done
  python -m big_clip.train --config configs/clip_moe_multiplet.py:moe --workdir $D/moe

Baselines at the same number of steps after the parent (3 x 60 cluster + 60 MoE = 240):
`:dense` (the parent trained on) and `:upcycled` (the MoE model with every expert a copy of
the parent's MLP). benchmarks/RESULTS.md "Diversified multiplet" has the numbers.
"""

from big_clip import config as config_lib

ROOT = "/tmp/clip_moe_chain"  # the chain's workdirs: ROOT/parent, ROOT/latin, ...
CLUSTERS = {"latin": ("en", "de", "fr", "es"), "cjk": ("zh", "ja"), "other": ("ru", "ar", "hi")}
CLUSTER_STEPS, MOE_STEPS = 60, 60

ARGS = (*CLUSTERS, "moe", "dense", "upcycled")  # what get_config(arg) takes besides None


def get_config(arg: str | None = None):
  c = config_lib.base()
  c.seed = 0
  c.total_steps = 200  # the parent: configs/default.py:quick
  c.log_every = 20

  c.model.embed_dim = 96
  c.model.image.update(image_size=64, patch_size=8, width=96, depth=3, heads=4, mlp_dim=384,
                       pool="cls")
  c.model.text.update(vocab_size=1024, max_len=24, width=96, depth=3, heads=4, mlp_dim=384,
                      pool="eos")

  c.loss.name = "softmax"
  c.data.update(source="embedded", global_batch=128, image_size=64, max_len=24,
                languages={lang: 1.0 for langs in CLUSTERS.values() for lang in langs})
  c.data.tokenizer.update(path="", vocab_size=1024)  # the parent trains it; the rest reuse it

  c.optim.update(lr=1e-3, warmup_steps=20, weight_decay=0.1, b2=0.98, clip_norm=1.0)
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  c.checkpoint.update(every_steps=100, keep=2)
  c.eval.update(every_steps=1000, zeroshot_tasks=("colour", "shape"), num_images=300)

  if arg is None:
    return c
  if arg not in ARGS:
    raise ValueError(f"configs/clip_moe_multiplet.py: unknown argument {arg!r}; allowed: "
                     f"{', '.join(ARGS)}.")
  # Every later stage starts from the parent's weights (or the clusters') with a fresh
  # optimizer and the parent's tokenizer.
  c.init_from = f"big_clip:{ROOT}/parent"
  c.data.tokenizer.path = f"{ROOT}/parent/tokenizer/spm.model"
  c.optim.warmup_steps = 10
  c.total_steps = MOE_STEPS + len(CLUSTERS) * CLUSTER_STEPS  # the baselines
  if arg in CLUSTERS:  # CLIP-MoE's multiplet: the parent's MLPs tuned on one cluster
    c.total_steps = CLUSTER_STEPS
    c.data.languages = {lang: 1.0 for lang in CLUSTERS[arg]}
    c.optim.trainable = r"\.mlp\."
  if arg in ("moe", "upcycled"):
    # One expert per cluster in every block of both towers, top-2 of 3, capacity 1.25.
    for tower in ("image", "text"):
      c.model[tower].moe.update(experts=len(CLUSTERS), top_k=2, every_n_layers=1,
                                capacity_factor=1.25, load_balance=1e-2, router_z_loss=1e-3)
  if arg == "moe":
    c.total_steps = MOE_STEPS
    c.init_from = ",".join(f"big_clip:{ROOT}/{name}" for name in CLUSTERS)
  return c
