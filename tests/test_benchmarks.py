"""The benchmark's FLOP counter and its PyTorch peer, against independent references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks import flops, train_step
from big_clip import losses
from big_clip.models import two_tower


def tiny_config():
  c = train_step.model_config("small", global_batch=4, dtype="float32", scan_layers=False,
                              remat=False)
  c.model.image.update(image_size=32, patch_size=8, width=32, depth=2, heads=2, mlp_dim=64)
  c.model.text.update(vocab_size=64, max_len=12, width=48, depth=3, heads=4, mlp_dim=96)
  c.model.embed_dim = 16
  c.data.update(image_size=32, max_len=12)
  return c


def jaxpr_matmul_flops(jaxpr) -> int:
  """2 * MACs of every dot_general in a jaxpr, recursing into nested jaxprs."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
      lhs, rhs = (v.aval.shape for v in eqn.invars)
      contract = int(np.prod([lhs[d] for d in lc]))
      batch = int(np.prod([lhs[d] for d in lb]))
      free_l = int(np.prod(lhs)) // contract // batch
      free_r = int(np.prod(rhs)) // contract // batch
      total += 2 * batch * free_l * free_r * contract
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          total += jaxpr_matmul_flops(inner)
  return total


@pytest.mark.parametrize("patch_dropout", [0.0, 0.5])
def test_analytic_flops_equal_the_matmuls_xla_traces(patch_dropout):
  c = tiny_config()
  c.model.image.patch_dropout = patch_dropout
  model = two_tower.init_fn(c.model, c.seed)()
  images = jnp.zeros((4, 32, 32, 3), jnp.float32)
  tokens = jnp.full((4, 12), 5, jnp.int32).at[:, -1].set(c.model.text.eos_id)
  noise = jax.random.uniform(jax.random.key(0), (4, 16)) if patch_dropout else None

  def forward_loss(images, tokens):
    img, txt = model(images, tokens, noise)
    scale, _ = model.scale_and_bias()
    # The CLIP loss as open_clip writes it, with its two [B, B] products (image->text and
    # text->image logits) as flops.py counts them; the production loss tiles them (its
    # exactness is test_losses.py's job).
    per_image, per_text = scale * img @ txt.T, scale * txt @ img.T
    return (jax.nn.logsumexp(per_image, 1) + jax.nn.logsumexp(per_text, 1)
            - 2 * jnp.diagonal(per_image)).mean()

  traced = jaxpr_matmul_flops(jax.make_jaxpr(forward_loss)(images, tokens).jaxpr)
  assert flops.train_step_flops(c.model, 4) == 3 * traced


def test_torch_peer_is_the_same_size_as_our_model():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  c = tiny_config()
  ours = sum(x.size for x in jax.tree.leaves(nnx.state(two_tower.init_fn(c.model, c.seed)(), nnx.Param)))
  theirs = sum(p.numel() for p in
               transformers.CLIPModel(train_step.hf_clip_config(c.model)).parameters())
  train_step.check_same_size(ours, theirs)  # raises if they differ
  assert ours == theirs + 1  # our logit_bias
  with pytest.raises(RuntimeError, match="Parameter counts differ"):
    train_step.check_same_size(ours + 1, theirs)
  del torch


def test_loss_benchmark_rows_and_its_baselines(tmp_path):
  """benchmarks/loss_memory.py: the baselines are the same losses (checked inside); the naive
  one holds the B x B logits on every device and the pre-tiling ones a b x B (softmax) or
  b x b (sigmoid) block, so each needs more memory than the tiled loss; the JSON rows carry
  the documented keys."""
  import json

  from benchmarks import loss_memory

  out = tmp_path / "rows.json"
  rows = loss_memory.main(["--batches", "256,512", "--dim", "16", "--no-accum",
                           "--json", str(out)])
  assert json.loads(out.read_text()) == rows
  names = ("naive", "softmax", "softmax:gathered", "sigmoid", "sigmoid:block", "grouped:2",
           "grouped:4")
  assert [(r["global_batch"], r["loss"]) for r in rows] == [
      (b, name) for b in (256, 512) for name in names]
  for r in rows:
    assert {"loss", "global_batch", "devices", "temp_bytes", "seconds"} <= r.keys()
    assert r["devices"] == jax.device_count() and r["seconds"] > 0
  temp = {(r["global_batch"], r["loss"]): r["temp_bytes"] for r in rows}
  # B x B floats per device vs b x B (softmax) and b x b at a time (sigmoid): 1/8 and less.
  assert temp[(512, "softmax:gathered")] * 4 <= temp[(512, "naive")]
  assert temp[(512, "sigmoid:block")] < temp[(512, "softmax:gathered")]
  # Tiled: neither gathered keys nor a whole block saved per ring step.
  assert temp[(512, "softmax")] < temp[(512, "softmax:gathered")]
  assert temp[(512, "sigmoid")] < temp[(512, "sigmoid:block")]
  # Doubling the batch quadruples the naive memory.
  assert temp[(512, "naive")] >= 3 * temp[(256, "naive")]


def test_long_caption_bound_is_the_mean_of_one_over_the_group_size():
  """benchmarks/long_caption_bounds.py: captions whose image shares the read attributes
  with m images get 1/m; hand-counted on 4 images (groups of 2, 1, 1)."""
  from benchmarks import long_caption_bounds

  attrs = [dict(count=1, size=0), dict(count=1, size=0), dict(count=2, size=0),
           dict(count=1, size=1)]
  assert long_caption_bounds.r1_bound(attrs, ("count", "size")) == (0.5 + 0.5 + 1 + 1) / 4
  assert long_caption_bounds.r1_bound(attrs, ("size",)) == (1 / 3 * 3 + 1) / 4


def test_torch_patch_dropout_keeps_the_class_token_and_distinct_patches():
  torch = pytest.importorskip("torch")
  tokens = torch.randn(3, 1 + 49, 8)
  kept = train_step.torch_patch_dropout(0.75)(None, None, tokens)
  assert kept.shape == (3, 1 + 12, 8)  # open_clip: int(49 * 0.25) = 12 patches
  assert torch.equal(kept[:, 0], tokens[:, 0])
  for b in range(3):  # each kept token is one of this image's patches, none twice
    match = (kept[b, 1:, None] == tokens[b, None, 1:]).all(-1)  # [12, 49]
    assert match.sum(1).eq(1).all() and match.sum(0).le(1).all()


def test_bad_patch_dropout_flag_names_it():
  with pytest.raises(ValueError, match="--patch_dropout='0.5,1'"):
    train_step.main(["--patch_dropout", "0.5,1", "--no_torch"])


def test_moe_language_shares_count_the_top_k_choices_of_real_tokens_only():
  from benchmarks import moe_languages

  # Layer 1: token 0 picks experts 0, 1; token 1 picks 2, 0; token 2 is padding.
  layer_1 = np.array([[[3.0, 2.0, 1.0], [2.0, 1.0, 3.0], [1.0, 3.0, 2.0]]])
  layer_2 = np.array([[[0.0, 1.0, 2.0], [0.0, 2.0, 1.0], [9.0, 8.0, 0.0]]])  # 2, 1; 1, 2
  real = np.array([[True, True, False]])
  shares = moe_languages.expert_shares([layer_1, layer_2], real, top_k=2)
  np.testing.assert_allclose(shares, [(0.5 + 0) / 2, (0.25 + 0.5) / 2, (0.25 + 0.5) / 2])
