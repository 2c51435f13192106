"""Model towers: checked against a float64 NumPy re-implementation of CLIP, plus the
properties other code relies on (masks, pooling, scan/remat, mixed precision, axes)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.special
from flax import nnx

import big_clip  # noqa: F401  (flax config)
from big_clip import config as config_lib
from big_clip import sharding
from big_clip.models import layers, text
from big_clip.models.two_tower import TwoTower

EOS, PAD = 3, 0
TOKENS = np.array([[5, 9, 7, EOS, PAD, PAD],
                   [4, EOS, PAD, PAD, PAD, PAD],
                   [8, 6, 11, 12, 10, EOS]], np.int32)


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """config.model of the schema (every key present), shrunk to a tiny model."""
  cfg = config_lib.base().model
  cfg.update(dict(
      embed_dim=8, dtype="float32", param_dtype="float32", remat=False, scan_layers=False,
      activation="gelu", logit_scale_init=float(np.log(1 / 0.07)), logit_scale_max=100.0,
      logit_bias_init=0.0,
      image=dict(image_size=8, patch_size=4, width=16, depth=2, heads=2, mlp_dim=32,
                 pool="cls"),
      text=dict(vocab_size=16, max_len=8, width=16, depth=2, heads=2, mlp_dim=32, pool="eos",
                eos_id=EOS, pad_id=PAD)))
  for key, value in overrides.items():  # "image.pool" -> cfg.image.pool
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


def build(seed: int = 0, **overrides) -> TwoTower:
  return TwoTower(tiny_config(**overrides), rngs=nnx.Rngs(seed))


def images(batch: int = 3, seed: int = 1) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (batch, 8, 8, 3))


# Jitted entry points: compiling a tiny model is faster than running it op by op.
embed = nnx.jit(lambda m, imgs, tokens: m(imgs, tokens))
embed_text = nnx.jit(lambda m, tokens: m.encode_text(tokens))
embed_image = nnx.jit(lambda m, imgs: m.encode_image(imgs))


@pytest.fixture(scope="module")
def model() -> TwoTower:
  return build()


# ----------------------------------------------------------------------------------------
# Float64 NumPy reference (OpenAI CLIP / HF CLIPModel forward, torch weight conventions).


def np_params(module: nnx.Module) -> dict[str, np.ndarray]:
  return {".".join(map(str, p)): np.asarray(v[...], np.float64)
          for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def ref_layer_norm(x, p, name):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-5) * p[f"{name}.scale"] + p[f"{name}.bias"]


def ref_linear(x, p, name):
  weight = p[f"{name}.kernel"].T  # torch layout [out, in]
  y = x @ weight.T
  return y + p[f"{name}.bias"] if f"{name}.bias" in p else y


def ref_attention(x, p, name, heads, causal):
  b, t, w = x.shape
  dh = w // heads
  q, k, v = (ref_linear(x, p, f"{name}.{n}").reshape(b, t, heads, dh).transpose(0, 2, 1, 3)
             for n in "qkv")
  logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dh)  # [B, H, T, T]
  if causal:
    logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  y = (probs @ v).transpose(0, 2, 1, 3).reshape(b, t, w)
  return ref_linear(y, p, f"{name}.out")


def ref_transformer(x, p, prefix, depth, heads, causal):
  gelu = lambda h: 0.5 * h * (1 + scipy.special.erf(h / np.sqrt(2)))  # exact GELU
  for i in range(depth):
    blk = f"{prefix}.blocks.{i}"
    x = x + ref_attention(ref_layer_norm(x, p, f"{blk}.ln_1"), p, f"{blk}.attn", heads, causal)
    h = gelu(ref_linear(ref_layer_norm(x, p, f"{blk}.ln_2"), p, f"{blk}.mlp.fc1"))
    x = x + ref_linear(h, p, f"{blk}.mlp.fc2")
  return x


def ref_normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def ref_pool_positions(tokens, pool):
  """Python loops, independent of text.pool_index."""
  out = []
  for row in tokens.tolist():
    if pool == "eos":
      out.append(row.index(EOS))
    elif pool == "last":
      out.append(max(i for i, tok in enumerate(row) if tok != PAD))
    else:
      out.append(row.index(max(row)))
  return np.array(out)


def ref_encode_text(p, tokens, cfg):
  c = cfg.text
  x = p["text.token_embedding.embedding"][tokens] + p["text.positional_embedding"][
      :tokens.shape[1]]
  x = ref_transformer(x, p, "text", c.depth, c.heads, causal=True)
  x = ref_layer_norm(x, p, "text.ln_final")
  pooled = x[np.arange(len(tokens)), ref_pool_positions(tokens, c.pool)]
  return ref_normalize(pooled @ p["text.proj.kernel"])


def ref_conv_stem(imgs, p):
  """3x3 stride-2 convolutions with zero padding 1, written as sums over the 9 taps, each
  followed by a LayerNorm over channels and exact GELU; then the 1x1 patch_embed."""
  gelu = lambda h: 0.5 * h * (1 + scipy.special.erf(h / np.sqrt(2)))
  x, i = imgs, 0
  while f"image.conv_stem.kernels.{i}" in p:
    k = p[f"image.conv_stem.kernels.{i}"]  # [3, 3, in, out]
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, w = x.shape[1] // 2, x.shape[2] // 2
    x = sum(padded[:, dy:dy + 2 * h:2, dx:dx + 2 * w:2] @ k[dy, dx]
            for dy in range(3) for dx in range(3))
    mu = x.mean(-1, keepdims=True)
    x = (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5)
    x = gelu(x * p[f"image.conv_stem.scales.{i}"] + p[f"image.conv_stem.biases.{i}"])
    i += 1
  return x.reshape(len(imgs), -1, x.shape[-1]) @ p["image.patch_embed.kernel"]


def ref_encode_image(p, imgs, cfg):
  c = cfg.image
  ps, w = c.patch_size, c.width
  if c.get("stem", "patch") == "conv":
    tokens = ref_conv_stem(imgs, p)
  else:
    # CLIP's conv1 with the torch weight [width, 3, p, p] (the layout export writes).
    conv = p["image.patch_embed.kernel"].reshape(ps, ps, 3, w).transpose(3, 2, 0, 1)
    g = c.image_size // ps
    tokens = np.stack([np.einsum("byxc,ocyx->bo", imgs[:, i * ps:(i + 1) * ps,
                                                     j * ps:(j + 1) * ps], conv)
                       for i in range(g) for j in range(g)], axis=1)
  cls = np.broadcast_to(p["image.class_embedding"], (len(imgs), 1, w))
  x = np.concatenate([cls, tokens], 1) + p["image.positional_embedding"]
  x = ref_layer_norm(x, p, "image.ln_pre")
  x = ref_transformer(x, p, "image", c.depth, c.heads, causal=False)
  return ref_normalize(ref_layer_norm(x[:, 0], p, "image.ln_post") @ p["image.proj.kernel"])


# ----------------------------------------------------------------------------------------


def test_encoders_return_unit_norm_float32_embeddings(model):
  img_emb, txt_emb = embed(model, images(), jnp.asarray(TOKENS))
  for emb in (img_emb, txt_emb):
    assert emb.shape == (3, 8) and emb.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-6)


@pytest.mark.parametrize("pool", ["eos", "last", "argmax"])
def test_text_tower_matches_float64_numpy_reference(pool):
  cfg = tiny_config(**{"text.pool": pool})
  m = TwoTower(cfg, rngs=nnx.Rngs(0))
  tokens = TOKENS.copy()
  if pool == "argmax":  # make the max id sit away from the EOS position
    tokens[0, 1] = 15
  want = ref_encode_text(np_params(m), tokens, cfg)
  np.testing.assert_allclose(embed_text(m, jnp.asarray(tokens)), want, atol=1e-5)


def test_image_tower_matches_float64_numpy_reference(model):
  imgs = images()
  want = ref_encode_image(np_params(model), np.asarray(imgs, np.float64), tiny_config())
  np.testing.assert_allclose(embed_image(model, imgs), want, atol=1e-5)


def test_conv_stem_tower_matches_float64_numpy_reference():
  m = build(**{"image.stem": "conv"})
  p = np_params(m)
  # patch 4 -> two stride-2 convolutions, channels max(8, width >> 2), max(8, width >> 1).
  assert [p[f"image.conv_stem.kernels.{i}"].shape for i in range(2)] == [(3, 3, 3, 8),
                                                                         (3, 3, 8, 8)]
  assert "image.conv_stem.kernels.2" not in p and p["image.patch_embed.kernel"].shape == (8, 16)
  imgs = images()
  want = ref_encode_image(p, np.asarray(imgs, np.float64), tiny_config(**{"image.stem": "conv"}))
  np.testing.assert_allclose(embed_image(m, imgs), want, atol=1e-5)


def test_text_is_causal_tokens_after_eos_do_not_matter(model):
  base = embed_text(model, jnp.asarray(TOKENS))
  after = TOKENS.copy()
  after[0, 4:] = [13, 14]  # after row 0's EOS (position 3)
  before = TOKENS.copy()
  before[0, 2] = 13  # before it
  np.testing.assert_allclose(embed_text(model, jnp.asarray(after)), base, atol=1e-6)
  changed = embed_text(model, jnp.asarray(before))
  assert np.abs(changed[0] - base[0]).max() > 1e-3
  np.testing.assert_allclose(changed[1:], base[1:], atol=1e-6)


def test_pool_index_picks_eos_last_nonpad_and_argmax():
  tokens = jnp.asarray([[5, 15, EOS, 7, PAD, PAD],  # a token after EOS before the padding
                        [EOS, 4, EOS, PAD, PAD, PAD],  # two EOS: 'eos' takes the first
                        [4, 5, 6, 7, 8, 9]])  # no padding, no EOS
  idx = lambda pool: text.pool_index(tokens, pool, eos_id=EOS, pad_id=PAD).tolist()
  assert idx("eos") == [2, 0, 0]
  assert idx("last") == [3, 2, 5]
  assert idx("argmax") == [1, 1, 5]


def test_shorter_text_uses_the_first_positions(model):
  padded = embed_text(model, jnp.asarray(TOKENS))
  np.testing.assert_allclose(embed_text(model, jnp.asarray(TOKENS[:1, :4])), padded[:1],
                             atol=1e-6)


def _loss(m: TwoTower, imgs, tokens):
  img_emb, txt_emb = m(imgs, tokens)
  return jnp.sum(img_emb @ txt_emb.T * jnp.arange(9.0).reshape(3, 3)), (img_emb, txt_emb)


def test_scan_and_remat_match_the_layer_loop_outputs_and_gradients(model):
  scanned = build(seed=7, scan_layers=True, remat=True)
  nnx.update(scanned, layers.stack_layers(nnx.state(model, nnx.Param)))
  imgs, tokens = images(), jnp.asarray(TOKENS)
  grad_fn = nnx.jit(nnx.value_and_grad(_loss, has_aux=True))
  (_, out_loop), grad_loop = grad_fn(model, imgs, tokens)
  (_, out_scan), grad_scan = grad_fn(scanned, imgs, tokens)
  for a, b in zip(out_loop, out_scan):
    np.testing.assert_allclose(a, b, atol=1e-6)
  graphdef, state = nnx.split(scanned)
  jaxpr = str(jax.make_jaxpr(lambda s: _loss(nnx.merge(graphdef, s), imgs, tokens))(state))
  assert jaxpr.count("scan[") == 2 and jaxpr.count("remat") == 2  # a scan per tower, remat
  want = dict(nnx.to_flat_state(layers.stack_layers(grad_loop)))
  got = {p: v[...] for p, v in nnx.to_flat_state(grad_scan)}
  assert set(got) == set(want)
  for path, g in got.items():
    np.testing.assert_allclose(g, want[path], rtol=1e-4, atol=1e-5, err_msg=str(path))
  # And back: unstacking the scanned params gives the per-layer layout.
  back = dict(nnx.to_flat_state(layers.unstack_layers(nnx.state(scanned, nnx.Param))))
  for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    np.testing.assert_array_equal(back[path], v[...])


@pytest.mark.parametrize("pool", ["cls", "map"])
def test_einsum_attention_matches_dot_product_attention_values_and_gradients(pool):
  """'einsum' (fused qkv, hand-written backward) against jax.nn.dot_product_attention on the
  same params: both towers (the text one causal) and the MAP head's cross-attention."""
  xla = build(attention_impl="xla", **{"image.pool": pool})
  ein = build(attention_impl="einsum", **{"image.pool": pool})
  assert {a.impl for a in (xla.image.blocks[0].attn, ein.image.blocks[0].attn)} == {
      "xla", "einsum"}
  imgs, tokens = images(), jnp.asarray(TOKENS)
  grad_fn = nnx.jit(nnx.value_and_grad(_loss, has_aux=True))
  (loss_x, out_x), grad_x = grad_fn(xla, imgs, tokens)
  (loss_e, out_e), grad_e = grad_fn(ein, imgs, tokens)
  np.testing.assert_allclose(loss_e, loss_x, rtol=1e-5)
  for a, b in zip(out_e, out_x):
    np.testing.assert_allclose(a, b, atol=1e-5)
  want = dict(nnx.to_flat_state(grad_x))
  for path, g in nnx.to_flat_state(grad_e):
    # float32 sums in another order: ~1e-5 apart on this CPU (1.8e-5 seen on one text-tower
    # gradient); a wrong backward is off by the gradient's own size.
    np.testing.assert_allclose(g[...], want[path][...], rtol=1e-4, atol=5e-5, err_msg=str(path))


def test_attention_impl_auto_is_xla_on_every_platform():
  assert layers.attention_impl("auto", "cpu") == "xla"
  assert layers.attention_impl("auto", "gpu") == layers.attention_impl("auto", "tpu") == "xla"
  assert layers.attention_impl("xla", "cpu") == "xla"
  with pytest.raises(ValueError, match="config.model.attention_impl='flash'"):
    layers.attention_impl("flash")


def test_bfloat16_compute_is_close_to_float32_and_params_stay_float32(model):
  bf16 = build(dtype="bfloat16")
  params = nnx.to_flat_state(nnx.state(bf16, nnx.Param))
  assert all(v[...].dtype == jnp.float32 for _, v in params)
  for (_, a), (_, b) in zip(params, nnx.to_flat_state(nnx.state(model, nnx.Param))):
    np.testing.assert_array_equal(a[...], b[...])  # same init; only the compute differs
  imgs, tokens = images(), jnp.asarray(TOKENS)
  for lo, hi in zip(embed(bf16, imgs, tokens), embed(model, imgs, tokens)):
    assert lo.dtype == jnp.float32
    np.testing.assert_allclose(lo, hi, atol=2e-2)


def test_scale_is_exp_of_the_parameter_which_is_clamped_after_updates(model):
  scale, bias = model.scale_and_bias()
  np.testing.assert_allclose(scale, 1 / 0.07, rtol=1e-6)
  assert bias == 0.0 and scale.dtype == bias.dtype == jnp.float32

  def scale_and_grad(log_scale):
    m = nnx.clone(model)
    m.logit_scale.set_value(jnp.float32(log_scale))
    grads = nnx.grad(lambda m: m.scale_and_bias()[0])(m)
    return m.scale_and_bias()[0], grads["logit_scale"][...]

  # No clipping in the forward pass: the gradient d e^s stays, also past the cap...
  np.testing.assert_allclose(scale_and_grad(np.log(1000.0)), (1000.0, 1000.0), rtol=1e-5)
  np.testing.assert_allclose(scale_and_grad(np.log(20.0)), (20.0, 20.0), rtol=1e-5)
  # ...the parameter itself is clamped to [0, ln logit_scale_max] after each update.
  from big_clip.models.two_tower import clamp_logit_scale

  cfg = ml_collections.ConfigDict({"logit_scale_max": 100.0})
  for value, want in ((7.0, np.log(100.0)), (-1.0, 0.0), (3.0, 3.0)):
    params = {"logit_scale": jnp.float32(value), "other": jnp.ones(2)}
    out = clamp_logit_scale(params, cfg)
    np.testing.assert_allclose(out["logit_scale"], want, rtol=1e-6)
    assert out["other"] is params["other"]


@pytest.mark.parametrize("scan", [False, True])
def test_every_matrix_param_has_logical_axes_and_scanned_ones_lead_with_layers(scan):
  m = nnx.eval_shape(lambda: build(scan_layers=scan, **{"image.pool": "map",
                                                       "image.stem": "conv"}))
  specs = nnx.to_flat_state(nnx.get_partition_spec(nnx.state(m, nnx.Param)))
  shapes = dict(nnx.to_flat_state(nnx.state(m, nnx.Param)))
  known = {name for name, _ in sharding.RULES}
  for path, spec in specs:
    spec, ndim = tuple(spec.get_value()), len(shapes[path].shape)
    assert len(spec) == ndim and set(spec) - {None} <= known, (path, spec)
    if ndim >= 2:
      assert any(a not in (None, "layers") for a in spec), (path, spec)
    in_stack = "blocks" in path
    assert (spec[:1] == ("layers",)) == (scan and in_stack), (path, spec)


@pytest.mark.parametrize("pool", ["map", "gap"])
def test_map_and_gap_pooling_give_unit_norm_embeddings_unlike_cls(model, pool):
  m = build(**{"image.pool": pool})
  emb = embed_image(m, images())
  assert emb.shape == (3, 8)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-6)
  assert "class_embedding" not in nnx.state(m.image)
  assert nnx.state(m.image)["positional_embedding"][...].shape == (4, 16)  # no class token
  # Same params where they share names, yet the pooled feature differs from 'cls'.
  cls = dict(nnx.to_flat_state(nnx.state(model.image, nnx.Param)))
  shared = [p for p, v in nnx.to_flat_state(nnx.state(m.image, nnx.Param))
            if p in cls and v[...].shape == cls[p][...].shape]
  nnx.update(m.image, nnx.State.from_flat_path({p: cls[p] for p in shared}))
  assert np.abs(embed_image(m, images()) - embed_image(model, images())).max() > 1e-2


@pytest.mark.parametrize("scan", [False, True])
def test_sharded_forward_on_8_devices_matches_unsharded(model, scan):
  sharded = build(seed=7, scan_layers=scan, remat=scan)
  params = nnx.state(model, nnx.Param)
  nnx.update(sharded, layers.stack_layers(params) if scan else params)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  graphdef, state = nnx.split(sharded)
  batch = (images(4), jnp.asarray(np.tile(TOKENS, (2, 1))[:4]))
  with jax.set_mesh(mesh):
    state = jax.device_put(state, sharding.state_shardings(state, mesh))
    assert state["text"]["proj"]["kernel"][...].sharding.spec[0] == "fsdp"  # really sharded
    placed = jax.device_put(batch, sharding.batch_sharding(mesh))
    img_emb, txt_emb = jax.jit(lambda s, b: nnx.merge(graphdef, s)(*b))(state, placed)
  want_img, want_txt = embed(model, *batch)
  np.testing.assert_allclose(img_emb, want_img, atol=1e-5)
  np.testing.assert_allclose(txt_emb, want_txt, atol=1e-5)


@pytest.mark.parametrize("key,value,message", [
    ("image.pool", "foo", "config.model.image.pool='foo'; allowed: cls, map, gap"),
    ("image.stem", "resnet", "config.model.image.stem='resnet'; allowed: patch, conv"),
    ("text.pool", "first", "config.model.text.pool='first'; allowed: eos, last, argmax"),
    ("text.heads", 3, "config.model.text.width=16 is not divisible by config.model.text.heads=3"),
    ("activation", "relu", "config.model.activation='relu'; allowed: gelu, quick_gelu"),
    ("dtype", "float16", "config.model.dtype='float16'; allowed: float32, bfloat16"),
])
def test_bad_config_raises_value_error_naming_the_key(key, value, message):
  with pytest.raises(ValueError, match=message.replace(".", r"\.")):
    nnx.eval_shape(lambda: build(**{key: value}))
