"""LLM2CLIP's caption-contrastive (CC) stage and the chain to stage 2: bidirectional attention
(HF parity), the CC loss and MNTP against float64 NumPy, LoRA merging and export, the cache
refusing the pre-CC LLM's features, and the stages run end to end on CPU."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from big_clip import config as config_lib
from big_clip import sharding, steps, train
from big_clip.convert import llm_export
from big_clip.data import text_cache
from big_clip.losses import caption_contrast, mntp
from big_clip.models import adapt, llm
from test_llm import (SENTENCES, TINY, _save_hf, features, llama, llm_config,  # noqa: F401
                      make_tower, qwen)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_module(path, name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _ref_info_nce(a, b, scale):
  """float64 symmetric InfoNCE of L2-normalized rows (CLIP, Radford et al. 2021, Fig. 3)."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  a, b = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (a, b))
  z = scale * a @ b.T
  lse = lambda z: np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
  return float(np.mean(lse(z) - np.diag(z)) / 2 + np.mean(lse(z.T) - np.diag(z)) / 2)


def _ref_mntp(logits, tokens, selected):
  """float64: token i from logits of position i - 1, mean over the selected positions."""
  total, count = 0.0, 0
  for b in range(tokens.shape[0]):
    for i in range(1, tokens.shape[1]):
      if selected[b, i]:
        z = np.asarray(logits[b, i - 1], np.float64)
        total += np.log(np.exp(z - z.max()).sum()) + z.max() - z[tokens[b, i]]
        count += 1
  return total / max(count, 1)


# ---------------------------------------------------------------------------------------------
# Bidirectional attention.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen"])
def test_bidirectional_equals_transformers_with_an_all_ones_4d_mask(family, request):
  folder, hf_model = request.getfixturevalue(family)
  tokens = np.random.default_rng(0).integers(4, 64, size=(3, 10)).astype(np.int32)
  valid = np.ones_like(tokens, bool)
  run = lambda tower: np.asarray(nnx.jit(lambda d, t, v: d(t, v))(
      tower.decoder, jnp.asarray(tokens), jnp.asarray(valid)))
  ours = run(make_tower(llm_config(folder, attention="bidirectional")))
  causal = run(make_tower(llm_config(folder)))
  with torch.no_grad():  # transformers takes a boolean 4-D mask as-is: True = may attend
    ref = hf_model(input_ids=torch.tensor(tokens, dtype=torch.long),
                   attention_mask=torch.ones(3, 1, 10, 10, dtype=torch.bool)
                   ).last_hidden_state.numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
  assert np.abs(causal - ref).max() > 1e-2  # the causal tower is another function


# ---------------------------------------------------------------------------------------------
# The CC loss and MNTP.
# ---------------------------------------------------------------------------------------------
def test_caption_loss_and_its_gradient_match_float64_numpy_on_8_devices():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(2, 16, 24)).astype(np.float32)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  assert sharding.data_parallel_size(mesh) == 8
  fn = jax.jit(jax.value_and_grad(lambda a, b: caption_contrast.caption_loss(
      a, b, jnp.float32(7.0), mesh=mesh)))
  placed = sharding.place_batch({"a": a, "b": b}, mesh)
  value, grad = fn(placed["a"], placed["b"])
  np.testing.assert_allclose(float(value), _ref_info_nce(a, b, 7.0), rtol=1e-5)
  eps, a64 = 1e-5, a.astype(np.float64)
  for i, j in [(0, 0), (5, 3), (15, 23)]:  # central differences of the float64 reference
    up, down = a64.copy(), a64.copy()
    up[i, j] += eps
    down[i, j] -= eps
    fd = (_ref_info_nce(up, b, 7.0) - _ref_info_nce(down, b, 7.0)) / (2 * eps)
    np.testing.assert_allclose(float(grad[i, j]), fd, rtol=1e-3, atol=1e-6)


def test_mntp_masks_and_labels_match_a_reference():
  rng = np.random.default_rng(1)
  tokens = rng.integers(4, 50, size=(6, 12)).astype(np.int32)
  tokens[1, 8:] = -1  # right padding
  tokens[2, :3] = -1  # left padding: its first real token is at position 3
  valid = tokens != -1
  key = jax.random.key(3)
  masked, selected = jax.jit(lambda t, v: mntp.mask_tokens(key, t, v, 0.3, 1))(tokens, valid)
  masked, selected = np.asarray(masked), np.asarray(selected)
  u = np.asarray(jax.random.uniform(key, tokens.shape))  # the same draws
  first = np.zeros_like(valid)
  first[np.arange(6), np.argmax(valid, 1)] = True
  want = (u < 0.3) & valid & ~first
  np.testing.assert_array_equal(selected, want)
  np.testing.assert_array_equal(masked, np.where(want, 1, tokens))
  assert 0 < want.sum() < valid.sum() and not selected[:, 0].any() and not selected[2, 3]
  logits = rng.normal(size=(6, 12, 50)).astype(np.float32)
  np.testing.assert_allclose(float(mntp.loss(jnp.asarray(logits), tokens, selected)),
                             _ref_mntp(logits, tokens, want), rtol=1e-5)
  assert float(mntp.loss(jnp.asarray(logits), tokens, np.zeros_like(want))) == 0.0


@pytest.fixture(scope="module")
def llama_lm(tmp_path_factory):
  """(folder, torch LlamaForCausalLM): the tiny Llama with its (untied) LM head."""
  folder = str(tmp_path_factory.mktemp("llama_lm"))
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(**TINY, eos_token_id=3, bos_token_id=2)
  return folder, _save_hf(transformers.LlamaForCausalLM(cfg), folder)


def test_token_logits_equal_transformers_lm_head(llama_lm):
  folder, hf_model = llama_lm
  tokens = np.random.default_rng(0).integers(4, 64, size=(2, 7)).astype(np.int32)
  tower = make_tower(llm_config(folder, lm_head=True))
  hidden, _ = tower.hidden_states(jnp.asarray(tokens))
  with torch.no_grad():
    ref = hf_model(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(np.asarray(tower.token_logits(hidden)), ref, atol=1e-4, rtol=1e-4)
  with pytest.raises(llm.CheckpointError, match="ForCausalLM"):  # a base model has no head
    make_tower(llm_config(_base_only(folder), lm_head=True))


def _base_only(folder):
  """A copy of `folder` without lm_head.weight."""
  from safetensors.numpy import load_file, save_file

  out = folder + "_base"
  os.makedirs(out, exist_ok=True)
  tensors = load_file(os.path.join(folder, llm.SINGLE_FILE))
  save_file({k: v for k, v in tensors.items() if k != llm.LM_HEAD},
            os.path.join(out, llm.SINGLE_FILE))
  for name in ("config.json", "tokenizer.json"):
    with open(os.path.join(folder, name)) as src, open(os.path.join(out, name), "w") as dst:
      dst.write(src.read())
  return out


@pytest.fixture(scope="module")
def cc_config(llama_lm):
  folder, _ = llama_lm
  c = llm_config(folder, attention="bidirectional", lora_rank=2, lm_head=True,
                 lora_targets=("q_proj", "v_proj", "down_proj"))
  c.loss.update(caption_contrast=True, mntp_weight=0.5, mntp_mask_prob=0.3, mntp_mask_id=1)
  c.data.update(pair_language="en", global_batch=8)
  c.evals = ()
  config_lib.validate(c)
  return c


def _cc_batch(folder):
  from big_clip.data import tokenizers

  tok = tokenizers.HfTokenizer(os.path.join(folder, "tokenizer.json"), 12, pad_id=llm.PAD_ID)
  text = tok.encode(SENTENCES + ["a red square ."])
  pair = tok.encode(SENTENCES[1:] + ["a red square .", SENTENCES[0]])
  images = np.zeros((8, 32, 32, 3), np.float32)
  return {"image": images, "text": text, "text_pair": pair}


@pytest.mark.slow  # compiles a decoder step on 8 devices and its one-device gradient
def test_cc_train_step_on_8_devices_matches_numpy_and_one_device_gradients(llama_lm, cc_config):
  """The step's loss at init = float64 InfoNCE of the tower's pooled features + 0.5 x MNTP of
  its logits on the masked text (masked as the step masks); its gradient norm (clip_norm 0:
  the raw gradient's) = that of the loss differentiated on one device without a mesh."""
  folder, _ = llama_lm
  cc_config.optim.clip_norm = 0.0
  batch = _cc_batch(folder)
  tower = make_tower(cc_config)
  for path in ("q_proj", "v_proj"):  # LoRA B off zero, so LoRA is in the forward pass
    proj = getattr(tower.decoder.layers[0].self_attn, path)
    proj.lora_b[...] = 0.1 * jnp.ones_like(proj.lora_b[...])
  full = {**batch, **caption_contrast.mntp_inputs(cc_config, jnp.int32(0),
                                                  jnp.asarray(batch["text"]), llm.PAD_ID)}
  log_scale = jnp.float32(cc_config.model.logit_scale_init)
  graphdef, params, rest = nnx.split(tower, nnx.Param, ...)

  def one_device(params, log_scale):
    t = nnx.merge(graphdef, params, rest)
    loss, _ = caption_contrast.loss(t, full, jnp.exp(log_scale), mesh=None, mntp_weight=0.5)
    feats = [t.features(full[k]) for k in ("text", "text_pair")]
    return loss, (feats, t.token_logits(t.hidden_states(full["text_mntp"])[0]))

  (loss, (feats, logits)), grads = jax.jit(jax.value_and_grad(
      one_device, argnums=(0, 1), has_aux=True))(params, log_scale)
  ref = (_ref_info_nce(*feats, float(np.exp(log_scale)))
         + 0.5 * _ref_mntp(np.asarray(logits), batch["text"], np.asarray(full["mntp_selected"])))
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
  grad_norm = float(np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads))))
  assert grad_norm > 0

  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  setup = steps.build(cc_config, mesh)
  state_params = dict(setup.state["params"])
  state_params["text"] = sharding.place_like(
      jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(tower))), state_params["text"])
  _, metrics = setup.step(dict(setup.state, params=state_params),
                          sharding.place_batch(batch, mesh))
  np.testing.assert_allclose(float(metrics["loss"]), ref, rtol=1e-4)
  assert float(metrics["loss/mntp"]) > 0 and float(metrics["loss/caption_contrast"]) > 0
  np.testing.assert_allclose(float(metrics["grad_norm"]), grad_norm, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Stage 1 -> stage 2: the LoRA-merged export and the embedding cache.
# ---------------------------------------------------------------------------------------------
LORA = dict(attention="bidirectional", lora_rank=2, lora_alpha=4.0,
            lora_targets=("q_proj", "v_proj", "down_proj"))


@pytest.fixture(scope="module")
def cc_run(llama, tmp_path_factory):
  """(workdir, tower): a CC run's checkpoint (written directly), its LoRA B off zero."""
  from big_clip.convert import pretrained
  from big_clip.models import two_tower

  folder, _ = llama
  config = llm_config(folder, **LORA)
  config.loss.caption_contrast = True
  config.data.pair_language = "en"
  model = two_tower.init_fn(config.model)()
  llm.load_into(model.text, folder)
  rng = np.random.default_rng(0)
  for layer in model.text.decoder.layers:
    for proj in (layer.self_attn.q_proj, layer.self_attn.v_proj, layer.mlp.down_proj):
      proj.lora_b[...] = jnp.asarray(0.2 * rng.normal(size=proj.lora_b[...].shape), jnp.float32)
  workdir = str(tmp_path_factory.mktemp("cc_run"))
  pretrained.write_import(config, nnx.to_pure_dict(nnx.state(model)), workdir, "test")
  return workdir, model.text


@pytest.fixture(scope="module")
def cc_llm(cc_run, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("cc_llm"))
  return out, llm_export.export_cc_llm(cc_run[0], out)


def test_the_exported_merged_llm_computes_what_the_lora_tower_did(llama, cc_run, cc_llm):
  folder, _ = llama
  tokens = np.asarray(_cc_batch(folder)["text"])
  with_lora = features(cc_run[1], tokens)
  merged = features(make_tower(llm_config(cc_llm[0], attention="bidirectional")), tokens)
  np.testing.assert_allclose(merged, with_lora, atol=1e-5, rtol=1e-5)
  base = features(make_tower(llm_config(folder, attention="bidirectional")), tokens)
  assert np.abs(base - with_lora).max() > 1e-3  # the LoRA does change the features
  section = cc_llm[1]
  assert section["attention"] == "bidirectional" and section["step"] == 0
  assert section["lora_merged"]["rank"] == 2 and len(section["weights_sha256"]) == 64
  with pytest.raises(config_lib.ConfigError, match="attention='bidirectional'"):
    make_tower(llm_config(cc_llm[0]))  # it learned bidirectional attention


def test_the_cache_refuses_features_of_the_pre_cc_llm(llama, cc_llm, tmp_path):
  folder, _ = llama
  pre_cc = str(tmp_path / "pre_cc_cache")
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  text_cache.build(llm_config(folder, attention="bidirectional").model, SENTENCES, 12, pre_cc,
                   mesh, batch_size=8)
  stage2 = llm_config(cc_llm[0], attention="bidirectional", cache_dir=pre_cc)
  with pytest.raises(text_cache.StaleCacheError, match=r"weights: cache 'sizes:.*' vs run "
                     rf"'sha256:{cc_llm[1]['weights_sha256']}'"):
    text_cache.for_llm(stage2.model, 12)
  post_cc = str(tmp_path / "post_cc_cache")
  text_cache.build(stage2.model, SENTENCES, 12, post_cc, mesh, batch_size=8)
  stage2.model.text.llm.cache_dir = post_cc
  assert len(text_cache.for_llm(stage2.model, 12)) == len(SENTENCES)
  # A LoRA trained further (same names and sizes, other weights) is another key as well.
  key = text_cache.cache_key(cc_llm[0], "mean", 12, "float32", "bidirectional")
  assert key["weights"] == f"sha256:{cc_llm[1]['weights_sha256']}"
  with pytest.raises(text_cache.StaleCacheError, match="attention"):
    text_cache.for_llm(llm_config(folder, cache_dir=pre_cc).model, 12)


def test_init_from_a_cc_run_points_to_the_export(cc_run):
  with pytest.raises(adapt.ImportMismatchError, match="tools/export_llm.py"):
    adapt.load_big_clip(f"big_clip:{cc_run[0]}", llm_config("").model)


@pytest.mark.slow
def test_the_llm2clip_stages_run_end_to_end_on_cpu(tmp_path):
  """make_tiny_llm -> CC (configs/llm2clip_cc.py:local) -> export -> cache -> adapter
  (configs/llm2clip.py:local_cc), 2 steps each."""
  tiny = _load_module("tools/make_tiny_llm.py", "make_tiny_llm").write_tiny_llm(
      str(tmp_path / "tiny"), vocab_size=256, width=32, depth=1, heads=2)
  cc = _load_module("configs/llm2clip_cc.py", "llm2clip_cc").get_config("local")
  cc.total_steps, cc.data.global_batch = 2, 8
  cc.data.languages = {"en": 1.0}  # pairs en-en: the cache below needs English only
  cc.model.text.llm.path = tiny
  result = train.train(cc, str(tmp_path / "cc"))
  assert np.isfinite(result["metrics"]["loss/caption_contrast"])
  assert result["metrics"]["loss/mntp"] > 0
  section = llm_export.export_cc_llm(str(tmp_path / "cc"), str(tmp_path / "cc_llm"))
  assert section["step"] == 2
  stage2 = _load_module("configs/llm2clip.py", "llm2clip").get_config("local_cc")
  stage2.total_steps, stage2.data.languages = 2, {"en": 1.0}
  stage2.evals = ()
  stage2.model.text.llm.update(path=str(tmp_path / "cc_llm"), cache_dir=str(tmp_path / "cache"))
  from big_clip.data import embedded

  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  text_cache.build(stage2.model, embedded.every_text(["en"]), stage2.data.max_len,
                   str(tmp_path / "cache"), mesh, batch_size=512)
  result = train.train(stage2, str(tmp_path / "adapter"))
  assert result["step"] == 2 and np.isfinite(result["metrics"]["loss"])
