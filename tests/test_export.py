"""Export to / import from PyTorch, checked against transformers and open_clip on CPU.

Every model here is random (no download) and perturbed so that no bias is zero and no
LayerNorm scale is one: a dropped or transposed tensor changes the numbers.
"""

import importlib
import importlib.util
import json
import math
import os
import sys
import types

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

import big_clip  # noqa: F401  (flax config)
from big_clip import config as config_lib
from big_clip import export, sharding
from big_clip.convert import pretrained
from big_clip.models import adapt
from big_clip.convert import hf, tables
from big_clip.models.two_tower import TwoTower

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

EOS, PAD = 3, 0
CLIP_TOKENS = np.array([[5, 9, 7, EOS, PAD, PAD, PAD, PAD],
                        [4, EOS, PAD, PAD, PAD, PAD, PAD, PAD],
                        [8, 6, 11, 12, 10, 13, 14, EOS]], np.int32)
SIGLIP_TOKENS = np.array([[5, 9, 7, EOS, PAD, PAD, PAD, PAD],
                          [8, 6, 11, 12, 10, 13, 14, EOS]], np.int32)


def tiny_config(kind: str = "clip", scan: bool = False) -> ml_collections.ConfigDict:
  """Text width 12 != image width 16 != embed_dim 8 (CLIP): a transposed kernel fails."""
  c = config_lib.base()
  c.model.update(embed_dim=8, scan_layers=scan, dtype="float32", param_dtype="float32",
                 activation="quick_gelu")
  c.model.image.update(image_size=8, patch_size=4, width=16, depth=2, heads=2, mlp_dim=32,
                       pool="cls")
  c.model.text.update(vocab_size=50, max_len=8, width=12, depth=2, heads=2, mlp_dim=24,
                      pool="eos", eos_id=EOS, pad_id=PAD)
  c.data.update(image_size=8, max_len=8)
  if kind == "siglip":  # the SigLIP layout (configs/siglip_vit_b16.py)
    c.loss.name = "sigmoid"
    c.model.update(embed_dim=16, activation="gelu_tanh", ln_eps=1e-6,
                   logit_scale_init=math.log(10.0), logit_bias_init=-10.0)
    c.model.image.update(pool="map", ln_pre=False, proj=False)
    c.model.text.update(pool="final", causal=False, proj_bias=True)
  config_lib.validate(c)
  return c


def random_params(config, seed: int = 0) -> dict:
  """Random values for every parameter of the model (NumPy: no per-shape compilation):
  nonzero biases, LayerNorm scales != 1, fan-in scaled matrices. Softmax models keep
  logit_bias at 0, as training does (the loss gives it no gradient)."""
  rng = np.random.default_rng(seed)
  out = {}
  for path, a in adapt.abstract_flat(config.model).items():
    if path == "logit_scale":
      value = np.log(1 / 0.07) + rng.normal()
    elif path == "logit_bias":
      value = 0.0 if config.loss.name == "softmax" else -10 + rng.normal()
    elif path.endswith(".scale"):  # LayerNorm
      value = 1 + 0.1 * rng.normal(size=a.shape)
    elif len(a.shape) >= 2:
      value = rng.normal(size=a.shape) * a.shape[-2] ** -0.5
    else:
      value = 0.1 * rng.normal(size=a.shape)
    out[path] = np.asarray(value, np.float32)
  return tables.unflatten(out)


def big_clip_outputs(config, params, images, tokens):
  """(image embeddings, text embeddings, logits image x text) of our model."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: TwoTower(config.model, rngs=nnx.Rngs(0))))

  @jax.jit
  def forward(params, images, tokens):
    state = nnx.state(nnx.eval_shape(lambda: TwoTower(config.model, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, params)
    model = nnx.merge(graphdef, state)
    img, txt = model(images, tokens)
    scale, bias = model.scale_and_bias()
    return img, txt, scale * img @ txt.T + bias

  return tuple(np.asarray(x) for x in forward(params, images, tokens))


def images(n: int = 2, seed: int = 3) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(n, 8, 8, 3)).astype(np.float32)


def torch_outputs(model, images_nhwc, tokens):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                pixel_values=torch.tensor(images_nhwc.transpose(0, 3, 1, 2)))
  return out.image_embeds.numpy(), out.text_embeds.numpy(), out.logits_per_image.numpy()


def assert_outputs_close(ours, theirs):
  for name, a, b in zip(("image embeddings", "text embeddings", "logits"), ours, theirs):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0, err_msg=name)


def perturb_torch(model, seed: int) -> None:
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=gen))


def random_hf_model(kind: str, path: str):
  """A random transformers CLIPModel / SiglipModel of small size, saved with save_pretrained."""
  text = dict(vocab_size=50, hidden_size=12, intermediate_size=24, num_hidden_layers=2,
              num_attention_heads=2, max_position_embeddings=8, eos_token_id=EOS,
              pad_token_id=PAD, bos_token_id=2)
  vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, image_size=8, patch_size=4)
  if kind == "clip":
    model = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(text, hidden_act="gelu"), vision_config=dict(vision, hidden_act="gelu"),
        projection_dim=8))
  else:
    model = transformers.SiglipModel(transformers.SiglipConfig(
        text_config=dict(text, projection_size=16), vision_config=vision))
  perturb_torch(model, seed=1)
  if kind == "siglip":
    with torch.no_grad():
      model.logit_scale.fill_(math.log(10.0))
      model.logit_bias.fill_(-10.0)
  model.eval().save_pretrained(path)
  return model


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_random_transformers_model_imports_with_equal_embeddings_and_logits(tmp_path, kind):
  hf_model = random_hf_model(kind, str(tmp_path))
  config, params = pretrained.from_hf(str(tmp_path))
  assert config.loss.name == {"clip": "softmax", "siglip": "sigmoid"}[kind]
  tokens = CLIP_TOKENS if kind == "clip" else SIGLIP_TOKENS
  assert_outputs_close(big_clip_outputs(config, params, images(), tokens),
                       torch_outputs(hf_model, images(), tokens))


@pytest.mark.parametrize("kind,scan,max_len", [("clip", False, 8), ("clip", True, 248),
                                                ("siglip", True, 8)])
def test_export_loads_in_transformers_with_equal_outputs_and_reimports_identically(
    tmp_path, kind, scan, max_len):
  config = tiny_config(kind, scan)
  config.model.text.max_len = max_len  # 248: a Long-CLIP position table carries over
  params = random_params(config)
  cls = pretrained.to_hf(params, config, str(tmp_path))
  hf_model, info = getattr(transformers, cls).from_pretrained(str(tmp_path),
                                                              output_loading_info=True)
  assert cls == {"clip": "CLIPModel", "siglip": "SiglipModel"}[kind]
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert hf_model.text_model.embeddings.position_embedding.weight.shape[0] == max_len
  tokens = CLIP_TOKENS if kind == "clip" else SIGLIP_TOKENS
  assert_outputs_close(big_clip_outputs(config, params, images(), tokens),
                       torch_outputs(hf_model.eval(), images(), tokens))
  # Export -> import is the identity on every parameter (scanned layout included).
  _, back = pretrained.from_hf(str(tmp_path), config)
  flat, flat_back = tables.flatten(params), tables.flatten(back)
  assert flat.keys() == flat_back.keys()
  for k in flat:
    np.testing.assert_array_equal(np.asarray(flat[k]), flat_back[k], err_msg=k)


def test_imported_workdir_restores_and_reexports_the_same_tensors(tmp_path):
  random_hf_model("clip", str(tmp_path / "hf"))
  config, params = pretrained.from_hf(str(tmp_path / "hf"))
  pretrained.write_import(config, params, str(tmp_path / "run"), "hf:test")
  restored_config, restored, step = adapt.read_run(str(tmp_path / "run"))
  assert step == 0 and restored_config.model.to_dict() == config.model.to_dict()
  pretrained.to_hf(restored, restored_config, str(tmp_path / "again"))
  original, again = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("hf", "again"))
  assert original.keys() == again.keys()
  for k in original:
    np.testing.assert_array_equal(original[k], again[k], err_msg=k)
  # config.init_from='big_clip:WORKDIR' reads the same parameters into a scanned model.
  scanned = ml_collections.ConfigDict(config.to_dict())
  scanned.model.scan_layers = True
  loaded = pretrained.load_init(f"big_clip:{tmp_path / 'run'}", scanned)
  np.testing.assert_array_equal(loaded["image"]["blocks"]["mlp"]["fc1"]["kernel"][1],
                                params["image"]["blocks"][1]["mlp"]["fc1"]["kernel"])


# ---------------------------------------------------------------------------------------------
# Bad input: errors name the tensor, the setting, the shapes.
# ---------------------------------------------------------------------------------------------
def test_a_tensor_of_the_wrong_shape_is_named_with_both_shapes(tmp_path):
  random_hf_model("clip", str(tmp_path))
  weights = load_file(str(tmp_path / "model.safetensors"))
  key = "text_model.encoder.layers.1.mlp.fc1.weight"
  weights[key] = np.zeros((20, 12), np.float32)  # intermediate 24 -> 20
  save_file(weights, str(tmp_path / "model.safetensors"))
  with pytest.raises(adapt.ImportMismatchError,
                     match=r"text\.blocks\.1\.mlp\.fc1\.kernel \(from text_model\.encoder\."
                           r"layers\.1\.mlp\.fc1\.weight\) has shape \(12, 20\); the model "
                           r"expects \(12, 24\)"):
    pretrained.from_hf(str(tmp_path))


def test_missing_and_unexpected_tensors_are_named(tmp_path):
  random_hf_model("clip", str(tmp_path))
  weights = load_file(str(tmp_path / "model.safetensors"))
  weights.pop("vision_model.post_layernorm.bias")
  weights["vision_model.extra.weight"] = np.zeros((2,), np.float32)
  save_file(weights, str(tmp_path / "model.safetensors"))
  with pytest.raises(adapt.ImportMismatchError,
                     match=r"missing tensor\(s\) \['vision_model\.post_layernorm\.bias'\]; "
                           r"unexpected tensor\(s\) \['vision_model\.extra\.weight'\]"):
    pretrained.from_hf(str(tmp_path))


def test_a_config_that_disagrees_with_the_checkpoint_names_the_setting(tmp_path):
  random_hf_model("clip", str(tmp_path))
  config = tiny_config("clip")  # quick_gelu; the checkpoint uses exact GELU
  with pytest.raises(adapt.ImportMismatchError,
                     match=r"needs config\.model\.activation='gelu', the config has 'quick_gelu'"):
    pretrained.from_hf(str(tmp_path), config)


def test_a_longer_text_position_table_asks_for_stretching():
  config = tiny_config("clip")
  flat = adapt.flat_params(random_params(config))
  flat["text.positional_embedding"] = np.zeros((248, 12), np.float32)  # Long-CLIP length
  with pytest.raises(adapt.ImportMismatchError,
                     match=r"text\.positional_embedding has 248 positions but config\.model\."
                           r"text\.max_len=8.*stretching"):
    adapt.import_params(flat, config.model)


def test_a_shorter_text_position_table_is_stretched_on_import():
  """Long-CLIP §3.1 on import: 24 -> 36 positions, the first 20 rows kept bit for bit."""
  short, long = tiny_config("clip"), tiny_config("clip")
  for c, n in ((short, 24), (long, 36)):
    c.model.text.max_len = c.data.max_len = n
  flat = adapt.flat_params(random_params(short))
  table = flat["text.positional_embedding"]
  got = adapt.flat_params(adapt.import_params(flat, long.model))
  stretched = got["text.positional_embedding"]
  assert stretched.shape == (36, 12)
  np.testing.assert_array_equal(stretched[:20], table[:20])
  # Independent check: row 20 + 4i + r interpolates rows 20 + i and 21 + i at r / 4.
  i, r = 1, 2
  np.testing.assert_allclose(stretched[20 + 4 * i + r],
                             (1 - r / 4) * table[20 + i] + r / 4 * table[21 + i], atol=1e-6)
  assert all(np.array_equal(got[k], flat[k]) for k in flat if k != "text.positional_embedding")


def test_settings_a_target_cannot_represent_are_named():
  config = tiny_config("clip")
  config.loss.name = "sigmoid"  # -> SiglipModel, but the towers are CLIP's
  with pytest.raises(pretrained.ExportError, match=r"SiglipModel: config\.model\.image\.pool='cls'"):
    pretrained.to_hf(random_params(config), config, "/nonexistent")
  siglip = tiny_config("siglip")
  with pytest.raises(pretrained.ExportError,
                     match=r"open_clip: config\.model\.image\.pool='map'"):
    pretrained.to_open_clip(random_params(siglip), siglip, "/nonexistent")
  conv = tiny_config("clip")
  conv.model.image.stem = "conv"
  for to, target in ((pretrained.to_hf, "CLIPModel"), (pretrained.to_open_clip, "open_clip")):
    with pytest.raises(pretrained.ExportError, match=rf"{target}: .*image\.stem='conv'"):
      to(random_params(conv), conv, "/nonexistent")
  moe = tiny_config("clip")
  moe.model.text.moe.experts = 2
  for to, target in ((pretrained.to_hf, "CLIPModel"), (pretrained.to_open_clip, "open_clip")):
    with pytest.raises(pretrained.ExportError, match=rf"{target}: .*text\.moe\.experts=2"):
      to(random_params(moe), moe, "/nonexistent")


# ---------------------------------------------------------------------------------------------
# open_clip.
# ---------------------------------------------------------------------------------------------
def open_clip_model_module():
  """`open_clip.model` (the CLIP class), also where open_clip's package __init__ cannot be
  imported (it imports torchvision for its transforms; CI installs open_clip --no-deps)."""
  if "open_clip.model" in sys.modules:
    return sys.modules["open_clip.model"]
  spec = importlib.util.find_spec("open_clip")
  if spec is None:
    pytest.skip("open_clip_torch is not installed (pip install --no-deps open_clip_torch)")
  try:
    return importlib.import_module("open_clip").model
  except ImportError:
    sys.modules.pop("open_clip", None)
  package = types.ModuleType("open_clip")  # the package without running its __init__
  package.__path__ = list(spec.submodule_search_locations)
  sys.modules["open_clip"] = package
  # open_clip/utils.py imports torchvision's FrozenBatchNorm2d (used for ResNet towers only);
  # a stand-in for the duration of the import, removed so nothing else sees it.
  stubs = {n: types.ModuleType(n) for n in ("torchvision", "torchvision.ops",
                                            "torchvision.ops.misc")}
  stubs["torchvision.ops.misc"].FrozenBatchNorm2d = type("FrozenBatchNorm2d", (), {})
  added = [n for n in stubs if n not in sys.modules]
  sys.modules.update({n: stubs[n] for n in added})
  try:
    return importlib.import_module("open_clip.model")
  finally:
    for n in added:
      sys.modules.pop(n)


@pytest.mark.parametrize("variant", ["clip", "siglip_text"])
def test_open_clip_loads_the_export_strictly_with_equal_outputs_and_imports_back(
    tmp_path, variant):
  oc = open_clip_model_module()
  config = tiny_config("clip", scan=variant == "clip")
  if variant == "siglip_text":  # SigLIP-style text tower and settings on a CLIP image tower
    config.loss.name = "sigmoid"
    config.model.update(activation="gelu_tanh", ln_eps=1e-6, logit_bias_init=-10.0)
    config.model.image.ln_pre = False
    config.model.text.update(pool="final", causal=False, proj_bias=True)
  params = random_params(config)
  model_cfg = pretrained.to_open_clip(params, config, str(tmp_path))
  with open(tmp_path / "open_clip_config.json") as f:
    assert json.load(f)["model_cfg"] == model_cfg
  model = oc.CLIP(**model_cfg).eval()  # what open_clip.create_model('local-dir:...') builds
  weights = load_file(str(tmp_path / "open_clip_model.safetensors"))
  model.load_state_dict({k: torch.tensor(v) for k, v in weights.items()}, strict=True)
  tokens = CLIP_TOKENS if variant == "clip" else SIGLIP_TOKENS

  def open_clip_outputs():
    with torch.no_grad():
      img = model.encode_image(torch.tensor(images().transpose(0, 3, 1, 2)), normalize=True)
      txt = model.encode_text(torch.tensor(tokens, dtype=torch.long), normalize=True)
      logits = model.get_logits(torch.tensor(images().transpose(0, 3, 1, 2)),
                                torch.tensor(tokens, dtype=torch.long))[0]
    return img.numpy(), txt.numpy(), logits.numpy()

  assert_outputs_close(big_clip_outputs(config, params, images(), tokens), open_clip_outputs())
  # An open_clip model with other weights imports to the same outputs.
  perturb_torch(model, seed=5)
  save_file({k: v.contiguous().numpy() for k, v in model.state_dict().items()},
            str(tmp_path / "open_clip_model.safetensors"))
  imported_config, imported = pretrained.from_open_clip(str(tmp_path))
  assert_outputs_close(big_clip_outputs(imported_config, imported, images(), tokens),
                       open_clip_outputs())


# ---------------------------------------------------------------------------------------------
# Recipes and training.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe,cls", [("default.py", "CLIPModel"),
                                        ("clip_vit_b32.py", "CLIPModel"),
                                        ("siglip_vit_b16.py", "SiglipModel"),
                                        ("siglip2_naflex.py", "Siglip2Model")])
def test_recipes_are_exportable_to_their_transformers_class(recipe, cls):
  spec = importlib.util.spec_from_file_location(
      recipe[:-3], os.path.join(os.path.dirname(__file__), "..", "configs", recipe))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  kind = hf.kind_for_loss(config.loss.name, config.model.image.naflex)
  hf.check_exportable(config.model, kind)  # raises naming any setting it cannot represent
  assert hf.ARCHITECTURES[kind] == cls


def test_imported_params_are_placed_with_the_train_state_shardings(tmp_path):
  """train.py's init_from: load_pretrained, then place_like the freshly initialized params."""
  from big_clip import sharding
  from big_clip.models import two_tower

  config = tiny_config("clip", scan=True)
  config.mesh.update(data=2, fsdp=4)
  params = random_params(config)
  pretrained.to_hf(params, config, str(tmp_path))
  mesh = sharding.make_mesh(dict(data=2, fsdp=4, tensor=1))
  _, abstract, shardings = two_tower.abstract_params(config.model, mesh)
  like = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)
  placed = sharding.place_like(pretrained.load_init(f"hf:{tmp_path}", config), like)
  kernel = placed["image"]["blocks"]["mlp"]["fc1"]["kernel"]  # [layers, embed->fsdp, mlp]
  assert kernel.sharding == like["image"]["blocks"]["mlp"]["fc1"]["kernel"].sharding
  assert kernel.sharding.shard_shape(kernel.shape)[1] == kernel.shape[1] // 4
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(placed), params)
