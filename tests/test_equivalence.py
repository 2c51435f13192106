"""big_clip's train step equals the same optimization written in PyTorch.

A small random transformers CLIPModel / SiglipModel is saved with `save_pretrained` and
imported through `big_clip.convert.pretrained.from_hf`; then big_clip's compiled train step and a PyTorch
loop written out here run the same 5 steps on the same batches: open_clip's CLIP loss or
SigLIP's sigmoid loss, AdamW with CLIP's weight-decay mask, global-norm clipping and a
warmup-cosine schedule. Compared: each step's loss and pre-clip gradient norm, the step-1
gradient of every tensor (read from Adam's first moment: after one step mu = (1 - b1) times
the clipped gradient, so a wrong gradient scale, e.g. 1/n_devices twice or a doubled loss,
shows here although AdamW's update would hide it) and every parameter after step 5.
"""

import functools
import math

import jax
import numpy as np
import pytest

from big_clip import sharding, steps
from big_clip.convert import pretrained
from big_clip.models import adapt
from big_clip.convert import hf
from test_train import adam_first_moment

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

EOS, PAD = 3, 0
STEPS, BATCH, MAX_LEN, IMAGE = 5, 16, 8, 8
# eps 1e-3, not CLIP's 1e-6: Adam divides the float32 noise of the key biases (whose
# gradient is 0 analytically, see `mismatches`) by eps, which at 1e-6 moves them by
# different ~1e-3 on each side; every real gradient here is far above 1e-3.
OPTIM = dict(lr=1e-2, warmup_steps=2, b1=0.9, b2=0.98, eps=1e-3, weight_decay=0.2,
             end_lr_ratio=0.1)
TOTAL_STEPS = 8  # the cosine runs to step 8, so the 5 steps see warmup and decay
# Clipping bites on the first steps and not on the last ones (asserted below).
CLIP_NORM = {"clip": 20.0, "siglip": 13.0}


# ---------------------------------------------------------------------------------------------
# The models and batches.
# ---------------------------------------------------------------------------------------------
def random_hf_model(kind: str):
  text = dict(vocab_size=50, hidden_size=12, intermediate_size=24, num_hidden_layers=1,
              num_attention_heads=2, max_position_embeddings=MAX_LEN, eos_token_id=EOS,
              pad_token_id=PAD, bos_token_id=2)
  vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, image_size=IMAGE, patch_size=4)
  torch.manual_seed(0)
  if kind == "clip":
    model = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(text, hidden_act="gelu"), vision_config=dict(vision, hidden_act="gelu"),
        projection_dim=8))
  else:
    model = transformers.SiglipModel(transformers.SiglipConfig(
        text_config=dict(text, projection_size=16), vision_config=vision))
    with torch.no_grad():
      # big_clip keeps SigLIP's patch bias folded into the position table (one tensor);
      # fixed at 0 here, the two models have the same trainable parameters.
      model.vision_model.embeddings.patch_embedding.bias.zero_()
      model.logit_scale.fill_(math.log(10.0))
      model.logit_bias.fill_(-10.0)
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():  # random init leaves biases 0 and LayerNorms 1: a dropped one would hide
    for name, p in model.named_parameters():
      if "patch_embedding.bias" not in name and "logit" not in name:
        p.add_(0.05 * torch.randn(p.shape, generator=gen))
  return model


def batches(seed: int = 0) -> list[dict[str, np.ndarray]]:
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(STEPS):
    text = rng.integers(4, 50, size=(BATCH, MAX_LEN)).astype(np.int32)
    for i, n in enumerate(rng.integers(2, MAX_LEN, size=BATCH)):
      text[i, n], text[i, n + 1:] = EOS, PAD
    out.append({"image": rng.normal(size=(BATCH, IMAGE, IMAGE, 3)).astype(np.float32),
                "text": text})
  return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """kind -> the folder of its save_pretrained model (written once per module)."""
  out = {}
  for kind in ("clip", "siglip"):
    path = str(tmp_path_factory.mktemp(kind))
    random_hf_model(kind).save_pretrained(path)
    out[kind] = path
  return out


# ---------------------------------------------------------------------------------------------
# PyTorch: the optimization written out.
# ---------------------------------------------------------------------------------------------
def lr_at(step: int) -> float:
  """optax.warmup_cosine_decay_schedule at update `step` (0-based), written out."""
  peak, warmup = OPTIM["lr"], OPTIM["warmup_steps"]
  if step < warmup:
    return peak * step / warmup
  end = peak * OPTIM["end_lr_ratio"]
  t = (step - warmup) / (TOTAL_STEPS - warmup)
  return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * t))


def decays(name: str, p) -> bool:
  """CLIP's weight-decay mask: weight matrices and the token table; not norms, biases,
  position tables, the class token, the MAP probe or the logit scale/bias."""
  return name.endswith("weight") and p.ndim >= 2 and "position_embedding" not in name


def torch_loss(model, kind: str, batch: dict[str, np.ndarray]):
  out = model(input_ids=torch.tensor(batch["text"], dtype=torch.long),
              pixel_values=torch.tensor(batch["image"].transpose(0, 3, 1, 2)))
  img, txt = out.image_embeds, out.text_embeds  # L2-normalized
  n = img.shape[0]
  if kind == "clip":  # open_clip ClipLoss
    logits = model.logit_scale.exp() * img @ txt.T
    labels = torch.arange(n)
    return (torch.nn.functional.cross_entropy(logits, labels)
            + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
  # SigLIP (Zhai et al. 2023, Alg. 1): -1/B sum_ij log sigmoid(z_ij * logits_ij)
  logits = model.logit_scale.exp() * img @ txt.T + model.logit_bias
  signs = 2 * torch.eye(n) - 1
  return -torch.nn.functional.logsigmoid(signs * logits).sum() / n


@functools.lru_cache(maxsize=None)
def torch_run(path: str, kind: str, grad_accum: int) -> dict:
  """Losses, pre-clip gradient norms, step-1 (clipped) gradients and final params, both
  in big_clip's flat layout. `grad_accum` > 1: torch's own accumulation (backward per
  micro-batch of rows i, i + k, ...; the mean of their gradients)."""
  cls = transformers.CLIPModel if kind == "clip" else transformers.SiglipModel
  model = cls.from_pretrained(path).train()
  params = {n: p for n, p in model.named_parameters()}
  if kind == "siglip":
    params.pop("vision_model.embeddings.patch_embedding.bias").requires_grad_(False)
  groups = [{"params": [p for n, p in params.items() if decays(n, p)],
             "weight_decay": OPTIM["weight_decay"]},
            {"params": [p for n, p in params.items() if not decays(n, p)], "weight_decay": 0.0}]
  opt = torch.optim.AdamW(groups, lr=0.0, betas=(OPTIM["b1"], OPTIM["b2"]), eps=OPTIM["eps"])
  config, _ = pretrained.from_hf(path)
  to_ours = lambda tensors: hf.import_state(
      {**{n: t.detach().numpy().copy() for n, t in tensors.items()},
       **({"vision_model.embeddings.patch_embedding.bias": np.zeros(16, np.float32)}
          if kind == "siglip" else {})}, config.model, kind, "torch")[0]
  losses, norms, grads1 = [], [], None
  for step, batch in enumerate(batches()):
    opt.zero_grad()
    loss = 0.0
    for i in range(grad_accum):
      micro = {k: v[i::grad_accum] for k, v in batch.items()}
      micro_loss = torch_loss(model, kind, micro) / grad_accum
      micro_loss.backward()
      loss += float(micro_loss.detach())
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params.values()))
    if step == 0:
      grads1 = to_ours({n: p.grad for n, p in params.items()})
    with torch.no_grad():  # optax.clip_by_global_norm
      if norm > CLIP_NORM[kind]:
        for p in params.values():
          p.grad.mul_(CLIP_NORM[kind] / norm)
    for group in opt.param_groups:
      group["lr"] = lr_at(step)
    opt.step()
    if kind == "clip":  # open_clip: clamp the temperature parameter after each update
      with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    losses.append(loss)
    norms.append(float(norm))
  return {"loss": losses, "grad_norm": norms, "grads1": grads1,
          "params": to_ours(dict(params))}


# ---------------------------------------------------------------------------------------------
# big_clip: the real import path and the real compiled train step.
# ---------------------------------------------------------------------------------------------
def big_clip_run(path: str, kind: str, mesh_shape: tuple[int, int], **accum) -> dict:
  config, params = pretrained.from_hf(path)
  config.total_steps = TOTAL_STEPS
  config.data.global_batch = BATCH
  config.optim.update(clip_norm=CLIP_NORM[kind], **OPTIM)
  for key, value in accum.items():  # loss.accum_steps / optim.grad_accum_steps
    section, name = key.split("__")
    config[section][name] = value
  data, fsdp = mesh_shape
  mesh = sharding.make_mesh({"data": data, "fsdp": fsdp, "tensor": 1},
                            devices=jax.devices()[:data * fsdp])
  setup = steps.build(config, mesh)
  state = setup.state
  state["params"] = sharding.place_like(params, state["params"])
  losses, norms, grads1 = [], [], None
  for step, batch in enumerate(batches()):
    state, metrics = setup.step(state, sharding.place_batch(batch, mesh))
    losses.append(float(metrics["loss"]))
    norms.append(float(metrics["grad_norm"]))
    if step == 0:
      # mu = (1 - b1) * the clipped gradient; undo the clipping with the reported norm.
      unclip = max(norms[0] / CLIP_NORM[kind], 1.0) / (1 - OPTIM["b1"])
      grads1 = jax.tree.map(lambda m: m * unclip,
                            adapt.flat_params(adam_first_moment(state["opt"])))
  return {"loss": losses, "grad_norm": norms, "grads1": grads1,
          "params": adapt.flat_params(state["params"])}


def mismatches(ours: dict, theirs: dict) -> list[str]:
  """What differs beyond the tolerances: losses and gradient norms rel 1e-5, each step-1
  gradient tensor rel 1e-4 (of its norm), each final parameter 1e-4."""
  bad = []
  if not np.allclose(ours["loss"], theirs["loss"], rtol=1e-5, atol=0):
    bad.append(f"loss {ours['loss']} != {theirs['loss']}")
  if not np.allclose(ours["grad_norm"], theirs["grad_norm"], rtol=1e-5, atol=0):
    bad.append(f"grad_norm {ours['grad_norm']} != {theirs['grad_norm']}")
  assert set(ours["grads1"]) == set(theirs["grads1"]) == set(theirs["params"])
  # The key biases' gradient is 0 analytically (a key bias adds the same q.b to a query's
  # every logit), so both sides hold float32 noise (~1e-9): hence an absolute floor far
  # below any real gradient (the smallest other tensor's is ~3e-3).
  floor = 1e-7 * theirs["grad_norm"][0]
  for name, want in theirs["grads1"].items():
    err = np.linalg.norm(ours["grads1"][name] - want)
    if err > 1e-4 * np.linalg.norm(want) + floor:
      bad.append(f"gradient of {name}: rel error {err / np.linalg.norm(want):.2e}")
  for name, want in theirs["params"].items():
    if not np.allclose(ours["params"][name], want, rtol=1e-4, atol=1e-4):
      bad.append(f"{name} after step {STEPS}: max error "
                 f"{np.abs(ours['params'][name] - want).max():.2e}")
  return bad


def check_reference_is_informative(ref: dict, kind: str) -> None:
  """The comparison can fail: clipping bites on step 1 and not on the last steps, no
  gradient is 0."""
  assert ref["grad_norm"][0] > CLIP_NORM[kind] > min(ref["grad_norm"]), ref["grad_norm"]
  zero = [n for n, g in ref["grads1"].items() if not np.any(g) and n != "logit_bias"]
  assert not zero, zero


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mesh_shape", [(1, 1), (4, 2)], ids=["1_device", "8_devices"])
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_train_step_equivalence_with_pytorch(saved, kind, mesh_shape):
  ref = torch_run(saved[kind], kind, 1)
  check_reference_is_informative(ref, kind)
  assert mismatches(big_clip_run(saved[kind], kind, mesh_shape), ref) == []


@pytest.mark.parametrize("accum", ["loss__accum_steps", "optim__grad_accum_steps"])
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_accumulation_equivalence_with_pytorch_on_8_devices(saved, kind, accum):
  # loss.accum_steps (gradient cache) keeps the whole batch one contrastive batch: exactly
  # the plain full-batch step. optim.grad_accum_steps: torch's accumulation of 2 backwards.
  ref = torch_run(saved[kind], kind, 2 if accum.startswith("optim") else 1)
  assert mismatches(big_clip_run(saved[kind], kind, (4, 2), **{accum: 2}), ref) == []


def test_equivalence_harness_sees_a_doubled_loss(saved, monkeypatch):
  """The comparison fails on a loss scaled by 2: in the losses and in the gradients."""
  from big_clip import losses

  real = losses.from_config
  monkeypatch.setattr(losses, "from_config",
                      lambda cfg: lambda *a, **k: 2 * real(cfg)(*a, **k))
  bad = mismatches(big_clip_run(saved["clip"], "clip", (1, 1)),
                   torch_run(saved["clip"], "clip", 1))
  assert any(b.startswith("loss") for b in bad)
  assert any(b.startswith("grad_norm") for b in bad)
  assert any(b.startswith("gradient of") for b in bad)
