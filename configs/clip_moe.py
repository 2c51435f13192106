r"""CLIP-MoE: a dense multilingual CLIP ViT-B/16 upcycled into mixture-of-experts towers.

Zhang et al. 2024 (CLIP-MoE) and sparse upcycling (Komatsuzaki et al. 2023): every second
MLP of both towers becomes 8 experts, each a copy of the dense run's MLP (expert weights
`[8, ...]` sharded over the `expert` mesh axis), with a fresh, small router; tokens go to
their top-2 experts (gates renormalized over the two, so the upcycled model starts exactly
as the dense one), capacity 1.25x, Switch load balancing 1e-2 and ST-MoE z-loss 1e-3. The
dense run is e.g. configs/clip_vit_b32.py retrained at patch 16 on the same tokenizer.
docs/moe.md describes the diversified-multiplet chain (several dense runs -> the experts).

On a v5e-256 pod (32 FSDP x 8 expert; the batch is split over all 256 chips):

  gcloud compute tpus tpu-vm ssh $TPU --worker=all --command "cd big_clip && \
    python -m big_clip.train --config configs/clip_moe.py --workdir gs://$BUCKET/clip_moe"

`--config configs/clip_moe.py:local` is a tiny MoE model (4 experts, random init) on the
embedded data, for a CPU smoke test.

Compiled for a v5e-256 (python -m big_clip.plan --config configs/clip_moe.py --topology
v5e:16x16; benchmarks/RESULTS.md): 3.71 GiB per chip of 16 (temporaries 2.91 GiB) with the
shard_map all-to-all dispatch (moe.dispatch='all_to_all'); per chip and step 740 MiB of
all-gathers (the FSDP weights), 160 MiB of all-reduces, 192 MiB of ring permutes and
4.1 GiB of expert all-to-alls (72: 12 MoE layers x 2 forward, 2 remat, 2 backward). With
GSPMD's einsum dispatch it did not fit: 18.1 GiB (17.0 with optim.grad_accum_steps=2, and
~860 GiB of all-gathers: the router logits and slot masks gathered over the batch).
"""

from big_clip import config as config_lib


ARGS = ("local",)  # what get_config(arg) takes besides None


def get_config(arg: str | None = None):
  c = config_lib.base()
  c.seed = 0
  c.total_steps = 60_000  # an upcycling fine-tune: ~2B samples at 32k
  c.log_every = 100
  c.init_from = "big_clip:gs://YOUR_BUCKET/clip_b16_dense"  # the dense parent run

  # every_n_layers=2 gives two block types: the stack is not scanned.
  c.model.update(embed_dim=512, dtype="bfloat16", remat=True, scan_layers=False,
                 activation="gelu")
  c.model.image.update(image_size=224, patch_size=16, width=768, depth=12, heads=12,
                       mlp_dim=3072, pool="cls")
  c.model.text.update(vocab_size=64000, max_len=77, width=512, depth=12, heads=8,
                      mlp_dim=2048, pool="eos")
  for tower in ("image", "text"):
    c.model[tower].moe.update(experts=8, top_k=2, every_n_layers=2, capacity_factor=1.25,
                              router_z_loss=1e-3, load_balance=1e-2, upcycle_noise=0.0,
                              dispatch="all_to_all")

  c.loss.name = "softmax"
  c.data.update(source="shards:gs://YOUR_BUCKET/multilingual/{00000..41407}.tar",
                global_batch=32768, image_size=224, max_len=77,
                languages={"en": 1.0, "de": 1.0, "fr": 1.0, "zh": 1.0, "ru": 1.0})
  c.data.tokenizer.update(path="gs://YOUR_BUCKET/tokenizers/spm_multi_64k.model",
                          vocab_size=64000)

  c.optim.update(lr=2e-4, warmup_steps=2000, weight_decay=0.2, b1=0.9, b2=0.98, eps=1e-6,
                 clip_norm=1.0)
  c.mesh.update(data=1, fsdp=-1, tensor=1, expert=8, multihost="auto")
  c.checkpoint.update(every_steps=2000, keep=3, use_async=True)
  c.eval.update(every_steps=5_000)

  if arg == "local":
    config_lib.shrink_for_local(c)
    c.init_from = ""
    c.model.image.patch_size = 16
    c.model.update(embed_dim=64)
    c.model.image.update(width=64, heads=2, mlp_dim=128)
    c.model.text.update(width=64, heads=2, mlp_dim=128)
    for tower in ("image", "text"):
      c.model[tower].moe.update(experts=4)
    c.data.languages = {"en": 1.0, "de": 1.0, "ru": 1.0, "zh": 1.0}
    c.mesh.update(expert=1)
  elif arg:
    raise ValueError(f"configs/clip_moe.py: unknown argument {arg!r}; allowed: {', '.join(ARGS)}.")
  return c
