"""The caption decoder and its loss (config.loss.caption): a float64 NumPy reference of the
decoder, the token loss ignoring padding, greedy decoding consistent with teacher forcing,
and the train step on 8 devices equal to 1 device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from flax import nnx

from big_clip import config as config_lib
from big_clip import sharding, steps
from big_clip.losses import caption
from big_clip.models import decoder as decoder_lib
from big_clip.models import two_tower

PAD, EOS = 0, 3


def model_config(**decoder):
  cfg = config_lib.base().model
  cfg.update(dict(embed_dim=8, activation="gelu"))
  cfg.image.update(image_size=8, patch_size=4, width=12, depth=1, heads=2, mlp_dim=16)
  cfg.text.update(vocab_size=16, max_len=6, width=8, depth=1, heads=2, mlp_dim=16,
                  eos_id=EOS, pad_id=PAD)
  cfg.decoder.update({**dict(width=8, depth=2, heads=2, mlp_dim=16), **decoder})
  return cfg


@pytest.fixture(scope="module")
def model():
  m = two_tower.TwoTower(model_config(), rngs=nnx.Rngs(params=0))
  # Non-trivial LayerNorm / bias parameters, so a reference that skips one would differ.
  rng = np.random.default_rng(0)
  for path, v in nnx.to_flat_state(nnx.state(m.decoder, nnx.Param)):
    if path[-1] in ("bias", "scale"):
      v[...] = v[...] + 0.1 * rng.normal(size=v[...].shape).astype(np.float32)
  return m


# ---------------------------------------------------------------- float64 NumPy reference
def ref_decoder(p, image_tokens, tokens, parallel, heads, depth):
  ln = lambda x, n: ((x - x.mean(-1, keepdims=True))
                     / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * p[n + ".scale"]
                     + p[n + ".bias"])
  lin = lambda x, n: x @ p[n + ".kernel"] + p[n + ".bias"]
  gelu = lambda h: 0.5 * h * (1 + scipy.special.erf(h / np.sqrt(2)))

  def attn(x, kv, n, allowed):  # allowed [B, T, S]
    b, t, w = x.shape
    split = lambda y: y.reshape(b, -1, heads, w // heads).transpose(0, 2, 1, 3)
    q, k, v = split(lin(x, n + ".q")), split(lin(kv, n + ".k")), split(lin(kv, n + ".v"))
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(w // heads)
    logits = np.where(allowed[:, None], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return lin((probs @ v).transpose(0, 2, 1, 3).reshape(b, t, w), n + ".out")

  b, length = tokens.shape
  inputs = np.concatenate([np.broadcast_to(p["bos_embedding"], (b, 1, p["bos_embedding"].size)),
                           p["token_embedding.embedding"][tokens[:, :-1]]], axis=1)
  inputs = np.where(parallel[:, None, None], p["mask_embedding"], inputs)
  x = inputs + p["positional_embedding"][:length]
  image = lin(ln(image_tokens, "image_ln"), "image_proj")
  causal = np.tril(np.ones((length, length), bool))
  self_allowed = causal[None] | parallel[:, None, None]
  cross_allowed = np.ones((b, length, image.shape[1]), bool)
  for i in range(depth):
    blk = f"blocks.{i}"
    x = x + attn(ln(x, blk + ".ln_1"), ln(x, blk + ".ln_1"), blk + ".self_attn", self_allowed)
    x = x + attn(ln(x, blk + ".ln_2"), image, blk + ".cross_attn", cross_allowed)
    x = x + lin(gelu(lin(ln(x, blk + ".ln_3"), blk + ".mlp.fc1")), blk + ".mlp.fc2")
  return lin(ln(x, "ln_final"), "head")


def test_decoder_matches_float64_numpy_reference_in_both_modes(model):
  rng = np.random.default_rng(0)
  image_tokens = rng.normal(size=(3, 5, 12)).astype(np.float32)
  tokens = np.array([[5, 9, EOS, PAD, PAD, PAD], [7, 4, 4, 12, 11, EOS],
                     [6, EOS, PAD, PAD, PAD, PAD]], np.int32)
  parallel = np.array([False, True, False])
  p = {".".join(map(str, k)): np.asarray(v[...], np.float64)
       for k, v in nnx.to_flat_state(nnx.state(model.decoder, nnx.Param))}
  got = nnx.jit(lambda d, i, t, par: d(i, t, par))(model.decoder, image_tokens, tokens,
                                                   parallel)
  want = ref_decoder(p, image_tokens.astype(np.float64), tokens, parallel, heads=2, depth=2)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # parallel=None is teacher forcing for every row.
  got_ar = nnx.jit(lambda d, i, t: d(i, t))(model.decoder, image_tokens, tokens)
  want_ar = ref_decoder(p, image_tokens.astype(np.float64), tokens, np.zeros(3, bool), 2, 2)
  np.testing.assert_allclose(got_ar, want_ar, rtol=1e-4, atol=1e-5)
  assert np.abs(want_ar[1] - want[1]).max() > 1e-2  # the parallel row did differ


# ---------------------------------------------------------------- the token loss
def test_token_loss_is_the_mean_over_valid_tokens_and_ignores_padding():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(4, 6, 16)) * 3
  targets = rng.integers(4, 16, size=(4, 6))
  valid = np.arange(6)[None] < np.array([[2], [6], [1], [4]])
  log_p = logits - scipy.special.logsumexp(logits, -1, keepdims=True)
  nll = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
  want = nll[valid].mean()  # over the tokens of the batch, not a mean of per-caption means
  got = caption.token_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(targets),
                           jnp.asarray(valid))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # Anything at padded positions, logits or labels, leaves the loss as it was.
  logits2 = np.where(valid[..., None], logits, rng.normal(size=logits.shape) * 50)
  targets2 = np.where(valid, targets, rng.integers(0, 16, size=targets.shape))
  got2 = caption.token_loss(jnp.asarray(logits2, jnp.float32), jnp.asarray(targets2),
                            jnp.asarray(valid))
  np.testing.assert_allclose(float(got2), float(got), rtol=1e-6)
  # ...and a changed valid logit does change it (not vacuous).
  logits2[1, 3, targets[1, 3]] += 5.0
  assert abs(float(caption.token_loss(jnp.asarray(logits2, jnp.float32), jnp.asarray(targets2),
                                      jnp.asarray(valid))) - float(got)) > 1e-3


def test_caption_loss_ignores_what_follows_the_eos(model):
  # The pad tokens after EOS are inputs only at padded positions (teacher forcing shifts
  # right), so rewriting them as other ids (not pad: those would count) changes nothing.
  rng = np.random.default_rng(2)
  image_tokens = jnp.asarray(rng.normal(size=(2, 5, 12)), jnp.float32)
  tokens = np.array([[5, 9, EOS, PAD, PAD, PAD], [7, 4, EOS, PAD, PAD, PAD]], np.int32)
  f = nnx.jit(lambda d, i, t: caption.loss(d, i, t, pad_id=PAD))
  base = float(f(model.decoder, image_tokens, tokens))
  logits = np.asarray(nnx.jit(lambda d, i, t: d(i, t))(model.decoder, image_tokens, tokens),
                      np.float64)
  log_p = logits - scipy.special.logsumexp(logits, -1, keepdims=True)
  want = -np.mean([log_p[b, t, tokens[b, t]] for b in range(2) for t in range(3)])
  np.testing.assert_allclose(base, want, rtol=1e-5)


# ---------------------------------------------------------------- greedy decoding
def test_greedy_decode_agrees_with_the_teacher_forced_argmax(model):
  imgs = jax.random.normal(jax.random.key(3), (4, 8, 8, 3))
  caps = np.asarray(nnx.jit(lambda m, x: m.caption(x, 6))(model, imgs))
  teacher_forced = nnx.jit(lambda m, x, t: jnp.argmax(m.decoder(m.image.features(x)[1], t), -1))
  argmax = np.asarray(teacher_forced(model, imgs, jnp.asarray(caps)))
  for row, best in zip(caps, argmax):
    n = list(row).index(EOS) + 1 if EOS in row else len(row)
    np.testing.assert_array_equal(row[:n], best[:n])  # each token is the argmax given its prefix
    assert (row[n:] == PAD).all()
  parallel = np.asarray(nnx.jit(lambda m, x: m.caption(x, 6, parallel=True))(model, imgs))
  assert parallel.shape == (4, 6)


# ---------------------------------------------------------------- config
@pytest.mark.parametrize("change, message", [
    ({"model.decoder.depth": 0}, "go together"),
    ({"loss.accum_steps": 2}, "accum_steps"),
    ({"loss.caption.parallel_fraction": 0.0}, "parallel_fraction"),
    ({"loss.caption.mode": "beam"}, "allowed: ar, parallel"),
])
def test_bad_caption_configs_name_the_key(change, message):
  c = config_lib.base()
  c.loss.caption.weight = 1.0
  c.model.decoder.depth = 2
  for key, value in change.items():
    section, _, name = key.rpartition(".")
    node = c
    for part in section.split("."):
      node = node[part]
    node[name] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c)


# ---------------------------------------------------------------- the train step
def step_config():
  c = config_lib.base()
  c.model.embed_dim = 16
  c.model.image.update(image_size=16, patch_size=8, width=16, depth=1, heads=2, mlp_dim=32)
  c.model.text.update(vocab_size=64, max_len=8, width=16, depth=1, heads=2, mlp_dim=32)
  c.model.decoder.update(width=16, depth=1, heads=2, mlp_dim=32)
  c.loss.caption.update(weight=0.5, mode="parallel", parallel_fraction=0.5)
  c.data.update(global_batch=16, image_size=16, max_len=8)
  c.optim.update(warmup_steps=1, clip_norm=0.0)
  return c


def caption_batch(c, seed=0):
  rng = np.random.default_rng(seed)
  b, l = c.data.global_batch, c.data.max_len
  text = rng.integers(4, c.model.text.vocab_size, size=(b, l)).astype(np.int32)
  for i, n in enumerate(rng.integers(1, l, size=b)):
    text[i, n], text[i, n + 1:] = EOS, PAD
  return {"image": rng.normal(size=(b, 16, 16, 3)).astype(np.float32), "text": text}


def first_step_grads(c, mesh, batch):
  """(metrics, gradients read from Adam's first moment after one step), as numpy."""
  import optax

  setup = steps.build(c, mesh)
  state, metrics = setup.step(setup.state, sharding.place_batch(batch, mesh))
  adam = [s for s in jax.tree.leaves(state["opt"], is_leaf=lambda s: isinstance(
      s, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)]
  return jax.device_get(metrics), jax.device_get(adam[0].mu)


def test_caption_train_step_on_8_devices_equals_1_device():
  # The caption term does not depend on the contrastive loss; sigmoid (softmax is the
  # default everywhere else) with a data x fsdp x tensor mesh: vocab and heads sharded.
  c = step_config()
  c.loss.name = "sigmoid"
  batch = caption_batch(c)
  one = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  eight = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  m1, g1 = first_step_grads(c, one, batch)
  m8, g8 = first_step_grads(c, eight, batch)
  for key in ("loss", "loss/contrastive", "loss/caption"):
    np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5)
  # total = contrastive + weight * caption, each logged on its own.
  np.testing.assert_allclose(m1["loss"], m1["loss/contrastive"] + 0.5 * m1["loss/caption"],
                             rtol=1e-6)
  assert 0.5 * np.log(64) < m1["loss/caption"] < 2 * np.log(64)  # ~uniform over the vocab
  atol = 1e-6 * max(np.abs(g).max() for g in jax.tree.leaves(g1))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=atol), g8, g1)
  assert np.abs(g1["decoder"]["head"]["kernel"]).max() > 0  # the decoder is trained


# ---------------------------------------------------------------- export
def test_export_writes_the_towers_only_and_says_so(tmp_path, caplog):
  from safetensors.numpy import load_file

  from big_clip.convert import pretrained

  c = config_lib.base()
  c.model = model_config(depth=1)
  c.model.update(activation="quick_gelu")
  c.data.update(image_size=8, max_len=6)
  c.loss.caption.weight = 1.0
  params = nnx.to_pure_dict(nnx.state(two_tower.TwoTower(c.model, rngs=nnx.Rngs(params=0))))
  with caplog.at_level("WARNING"):
    pretrained.to_hf(params, c, str(tmp_path / "with"))
  assert "exporting the image and text towers only" in caplog.text
  plain = config_lib.base()
  plain.update(c.to_dict())
  plain.model.decoder.depth, plain.loss.caption.weight = 0, 0.0
  towers = {k: v for k, v in params.items() if k != "decoder"}
  pretrained.to_hf(towers, plain, str(tmp_path / "without"))
  got, want = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("with", "without"))
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
