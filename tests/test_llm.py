"""LLM text towers: HF parity (Llama, Qwen2), pooling, LoRA/freezing, sharding, the embedding
cache, and training with configs/llm2clip.py. Tiny random models, saved here; no download."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from big_clip import config as config_lib
from big_clip import optim, sharding, steps, train
from big_clip.data import text_cache, tokenizers
from big_clip.models import llm, two_tower

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SENTENCES = [
    "a red circle on a grey background .", "two blue squares in the corners .",
    "a small green triangle at the top left , drawn with a dark outline .",
    "three yellow crosses .", "a large purple diamond on the right .",
    "an orange circle in the centre of the picture .", "diamonds .",
]
TINY = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
EOS = 3


def _tokenizer_json(path):
  """A word-level tokenizer.json trained on SENTENCES, Llama-like: BOS prepended."""
  from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

  tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(
      special_tokens=["[PAD]", "[UNK]", "[BOS]", "[EOS]"]))
  tok.post_processor = processors.TemplateProcessing(single="[BOS] $A",
                                                     special_tokens=[("[BOS]", 2)])
  tok.save(str(path))
  assert tok.get_vocab_size() <= TINY["vocab_size"]


def _save_hf(model, folder, **kwargs):
  torch.manual_seed(1)
  with torch.no_grad():  # move norms off 1 and biases off 0, so their loading is tested
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(folder, **kwargs)
  _tokenizer_json(os.path.join(folder, "tokenizer.json"))
  return model.eval()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  """(folder, torch model): Llama-3-style (GQA, rope_theta 5e5, llama3 rope scaling), saved
  as sharded safetensors + index."""
  folder = str(tmp_path_factory.mktemp("llama"))
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      **TINY, eos_token_id=EOS, bos_token_id=2,
      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
      rope_theta=500000.0)
  model = _save_hf(transformers.LlamaModel(cfg), folder, max_shard_size="40KB")
  assert os.path.exists(os.path.join(folder, llm.INDEX_FILE))
  return folder, model


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
  """(folder, torch model): Qwen2 (q/k/v biases), one model.safetensors."""
  folder = str(tmp_path_factory.mktemp("qwen"))
  torch.manual_seed(0)
  model = _save_hf(transformers.Qwen2Model(transformers.Qwen2Config(**TINY, eos_token_id=EOS)),
                   folder)
  assert os.path.exists(os.path.join(folder, llm.SINGLE_FILE))
  return folder, model


def llm_config(path, **llm_overrides):
  c = config_lib.base()
  c.model.embed_dim = 32
  c.model.image.update(image_size=32, patch_size=8, width=32, depth=1, heads=2, mlp_dim=64)
  c.model.text.update(kind="llm", max_len=12, vocab_size=64, width=32, depth=2, heads=4,
                      mlp_dim=64)
  c.model.text.llm.update(path=path, **llm_overrides)
  c.data.update(global_batch=8, image_size=32, max_len=12)
  c.optim.update(lr=1e-2, warmup_steps=0, schedule="warmup_constant")
  config_lib.validate(c)
  return c


def make_tower(config):
  tower = llm.LlmTextTower(config.model, rngs=nnx.Rngs(params=0))
  if config.model.text.llm.path:
    llm.load_into(tower, config.model.text.llm.path)
  return tower


def features(tower, tokens):
  """tower.features(tokens), jitted (one compile instead of one per eager op)."""
  return np.asarray(nnx.jit(lambda t, x: t.features(x))(tower, jnp.asarray(tokens)))


def _padded_tokens(folder, max_len=12):
  """Right-padded HF tokens of SENTENCES, plus one left-padded row (positions still count
  from the first real token)."""
  tok = tokenizers.HfTokenizer(os.path.join(folder, "tokenizer.json"), max_len,
                               pad_id=llm.PAD_ID)
  tokens = tok.encode(SENTENCES[:4])
  left = np.full((1, max_len), llm.PAD_ID, np.int32)
  ids = tokens[1][tokens[1] >= 0]
  left[0, max_len - len(ids):] = ids
  return np.concatenate([tokens, left])


@pytest.mark.parametrize("family", ["llama", "qwen"])
def test_last_hidden_states_equal_transformers_with_padding(family, request):
  folder, hf_model = request.getfixturevalue(family)
  tokens = _padded_tokens(folder)
  valid = tokens != llm.PAD_ID
  assert (~valid).any(axis=1).sum() == 4  # padded rows, plus one cut to max_len
  tower = make_tower(llm_config(folder))
  ours = np.asarray(nnx.jit(lambda d, t, v: d(t, v))(tower.decoder, jnp.asarray(tokens),
                                                    jnp.asarray(valid)))
  positions = np.maximum(np.cumsum(valid, 1) - 1, 0)
  with torch.no_grad():
    ref = hf_model(input_ids=torch.tensor(np.where(valid, tokens, 0)),
                   attention_mask=torch.tensor(valid.astype(np.int64)),
                   position_ids=torch.tensor(positions)).last_hidden_state.numpy()
  np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=1e-4)
  assert np.abs(ref[valid]).max() > 0.5  # not a trivially small output


def test_pooling_matches_numpy():
  rng = np.random.default_rng(0)
  hidden = rng.normal(size=(3, 6, 5)).astype(np.float32)
  tokens = np.array([[2, 7, 3, 9, -1, -1], [2, 3, 5, 3, 8, -1], [2, 5, 6, 7, 8, 9]], np.int32)
  valid = tokens != -1
  want = {
      "mean": np.stack([hidden[i, valid[i]].mean(0) for i in range(3)]),
      "last": hidden[np.arange(3), [3, 4, 5]],
      "eos": hidden[np.arange(3), [2, 3, 5]],  # the last EOS; no EOS -> last token
  }
  for name, expected in want.items():
    got = llm.pool(jnp.asarray(hidden), jnp.asarray(tokens), jnp.asarray(valid), name, eos_id=3)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, err_msg=name)


def test_hf_tokenizer_pads_with_minus_one_and_appends_eos(llama):
  folder, _ = llama
  tok = tokenizers.HfTokenizer(os.path.join(folder, "tokenizer.json"), 6, eos_id=EOS,
                               append_eos=True, pad_id=llm.PAD_ID)
  out = tok.encode(["three yellow crosses .", SENTENCES[2]])
  vocab = json.load(open(os.path.join(folder, "tokenizer.json")))["model"]["vocab"]
  assert out[0].tolist() == [2, vocab["three"], vocab["yellow"], vocab["crosses"], vocab["."],
                             EOS]
  assert out[1, -1] == EOS and (out[1] >= 0).all()  # cut, EOS kept last
  short = tokenizers.HfTokenizer(os.path.join(folder, "tokenizer.json"), 8,
                               pad_id=llm.PAD_ID).encode(["diamonds ."])
  assert short[0].tolist() == [2, vocab["diamonds"], vocab["."]] + [-1] * 5


def _flat(tree):
  return {"/".join(map(str, k)): v for k, v in nnx.traversals.flatten_mapping(tree).items()}


def test_lora_at_init_equals_the_base_and_only_lora_and_adapter_train(llama):
  folder, _ = llama
  tokens = jnp.asarray(_padded_tokens(folder))
  base = make_tower(llm_config(folder))
  lora = make_tower(llm_config(folder, lora_rank=2, lora_targets=llm.LORA_TARGETS))
  np.testing.assert_allclose(features(lora, tokens), features(base, tokens), rtol=1e-6,
                             atol=1e-6)
  trainable = {p for p, on in _flat(optim.trainable_mask(lora)).items() if on}
  assert trainable and all(p.split("/")[-1] in ("lora_a", "lora_b") or p.startswith("adapter/")
                           for p in trainable), sorted(trainable)
  assert sum(p.endswith("lora_b") for p in trainable) == 2 * len(llm.LORA_TARGETS)
  # An unfrozen random-init decoder (an LLM tower trained in-repo) trains everything.
  scratch = llm_config("", freeze=False, kv_heads=2, pooling="eos")
  mask = _flat(optim.trainable_mask(nnx.eval_shape(
      lambda: llm.LlmTextTower(scratch.model, rngs=nnx.Rngs(0)))))
  assert "decoder/layers/1/mlp/up_proj/kernel" in mask and all(mask.values())



def test_bfloat16_tower_stores_frozen_weights_in_bf16_and_stays_close_to_float32(qwen):
  folder, _ = qwen
  tokens = jnp.asarray(_padded_tokens(folder))
  config = llm_config(folder, dtype="bfloat16", lora_rank=2)
  config.model.remat = True
  bf16 = make_tower(config)
  assert bf16.decoder.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16
  assert bf16.decoder.layers[0].self_attn.q_proj.lora_b[...].dtype == jnp.float32  # trainable
  want = features(make_tower(llm_config(folder)), tokens)
  got = features(bf16, tokens)
  assert np.abs(got - want).max() < 0.02 * np.abs(want).max()


def test_tower_on_fsdp2_x_tensor4_equals_one_device(llama):
  folder, _ = llama
  config = llm_config(folder, pooling="last")
  captions = SENTENCES + ["a red square ."]
  one = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  eight = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
  want = text_cache.compute_features(config.model, captions, 12, one, batch_size=8)
  got = text_cache.compute_features(config.model, captions, 12, eight, batch_size=8)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # ...and the weights really were split over both axes.
  abstract = nnx.state(nnx.eval_shape(lambda: llm.LlmTextTower(config.model,
                                                               rngs=nnx.Rngs(0))))
  specs = _flat(nnx.to_pure_dict(sharding.state_shardings(abstract, eight)))
  assert tuple(specs["decoder/layers/0/self_attn/q_proj/kernel"].spec) == ("fsdp", "tensor")
  assert tuple(specs["decoder/layers/0/mlp/down_proj/kernel"].spec) == ("tensor", "fsdp")


def _rewrite(src, dst, edit):
  """A copy of the model folder `src` whose model.safetensors went through `edit(dict)`."""
  import shutil

  from safetensors.numpy import load_file, save_file

  shutil.copytree(src, dst)
  tensors = load_file(os.path.join(src, llm.SINGLE_FILE))
  edit(tensors)
  save_file(tensors, os.path.join(dst, llm.SINGLE_FILE))
  return str(dst)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("layers.1.mlp.up_proj.weight"), r"layers/1/mlp/up_proj/kernel"),
    (lambda t: t.update({"layers.0.self_attn.rotary.weight": np.zeros(2, np.float32)}),
     r"Unexpected tensor 'layers\.0\.self_attn\.rotary\.weight'"),
    (lambda t: t.update({"layers.0.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)}),
     r"'layers\.0\.self_attn\.k_proj\.weight'.*shape \[64, 64\].*expects \[32, 64\]"),
])
def test_a_bad_checkpoint_names_the_tensor(qwen, tmp_path, edit, message):
  folder = _rewrite(qwen[0], tmp_path / "bad", edit)
  tower = llm.LlmTextTower(llm_config(folder).model, rngs=nnx.Rngs(0))
  with pytest.raises(llm.CheckpointError, match=message):
    llm.load_into(tower, folder)


@pytest.fixture(scope="module")
def llama_cache(llama, tmp_path_factory):
  folder, _ = llama
  cache_dir = str(tmp_path_factory.mktemp("cache"))
  captions = SENTENCES + ["a red square .", "a red circle on a grey background ."]  # a repeat
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  text_cache.build(llm_config(folder, adapter_hidden=16).model, captions, 12, cache_dir, mesh,
                   batch_size=8, shard_size=5)
  return cache_dir


def test_a_stale_cache_is_refused_naming_what_changed(llama, llama_cache):
  folder, _ = llama
  index = json.load(open(os.path.join(llama_cache, text_cache.INDEX)))
  assert index["count"] == 8 and len(index["shards"]) == 2
  assert len(text_cache.for_llm(llm_config(folder, cache_dir=llama_cache).model, 12)) == 8
  with pytest.raises(text_cache.StaleCacheError, match=r"pooling.*'mean' vs run 'last'"):
    text_cache.for_llm(llm_config(folder, cache_dir=llama_cache, pooling="last").model, 12)
  with pytest.raises(text_cache.StaleCacheError, match=r"max_len"):
    text_cache.for_llm(llm_config(folder, cache_dir=llama_cache).model, 10)
  key = text_cache.cache_key(folder, "mean", 12, "float32")
  with pytest.raises(text_cache.StaleCacheError, match=r"different tokenizer"):
    text_cache.CachedFeatures(llama_cache, dict(key, tokenizer="0" * 64))
  with pytest.raises(KeyError, match="not in the embedding cache"):
    text_cache.CachedFeatures(llama_cache, key).encode(["an unseen caption"])


@pytest.fixture(scope="module")
def one_step_live_and_cached(llama, llama_cache):
  """One train step on the same batch: (a) the live frozen LLM with LoRA (B = 0 at init, so
  the same function as the base) and (b) the cached features of the same LLM.
  Returns [(initial params, loss, params after, optimizer state paths)] for (a), (b)."""
  folder, _ = llama
  live = llm_config(folder, adapter_hidden=16, lora_rank=2, lora_targets=("q_proj", "down_proj"))
  cached = llm_config(folder, adapter_hidden=16, cache_dir=llama_cache)
  for config in (live, cached):
    # clip_norm 0: the global norm would include LoRA's gradients. eps 1 (and lr 1): the
    # first Adam step is ~g / (|g| + 1), smooth in g, so params after the step compare the
    # gradients; with eps 1e-6 it is ~sign(g), which flips on gradients at rounding level.
    config.optim.update(clip_norm=0.0, eps=1.0, lr=1.0, weight_decay=0.0)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  captions = SENTENCES + ["a red square ."]
  images = np.random.default_rng(0).normal(size=(8, 32, 32, 3)).astype(np.float32)
  results = []
  for config in (live, cached):
    text = text_cache.for_llm(config.model, 12).encode(captions)
    setup = steps.build(config, mesh)
    init = _flat(jax.device_get(setup.state["params"]))
    opt_paths = [jax.tree_util.keystr(p) for p, _ in
                 jax.tree_util.tree_flatten_with_path(setup.state["opt"])[0]]
    state, metrics = setup.step(setup.state, sharding.place_batch(
        {"image": images, "text": text}, mesh))
    results.append((init, float(metrics["loss"]), _flat(jax.device_get(state["params"])),
                    opt_paths))
  return results


def test_training_on_cached_features_equals_training_with_the_frozen_llm(
    one_step_live_and_cached):
  (init_live, loss_live, live, _), (init_cached, loss_cached, cached, _) = \
      one_step_live_and_cached
  assert set(init_cached) == {p for p in init_live if not p.startswith("text/decoder/")}
  for path in init_cached:  # the same start, without the decoder
    np.testing.assert_array_equal(init_cached[path], init_live[path])
  np.testing.assert_allclose(loss_cached, loss_live, rtol=1e-5)
  for path in init_cached:  # ...and the same update
    np.testing.assert_allclose(cached[path], live[path], rtol=1e-4, atol=1e-6)
  assert np.abs(cached["text/adapter/fc2/kernel"]
                - init_cached["text/adapter/fc2/kernel"]).max() > 1e-4


def test_a_train_step_moves_lora_and_adapter_but_not_the_frozen_base(one_step_live_and_cached):
  before, _, after, opt_paths = one_step_live_and_cached[0]
  assert not any("decoder" in p and "lora" not in p for p in opt_paths)  # no Adam state
  assert any("lora_b" in p for p in opt_paths)
  for path, value in before.items():
    if path.endswith("lora_a") or path == "logit_bias":  # grad 0 while B = 0; the softmax
      continue  # loss is invariant to the bias
    moved = np.abs(after[path] - value).max() > 0
    frozen = path.startswith("text/decoder/") and "lora" not in path
    assert moved != frozen, path


LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 rope_theta=500000.0, rms_norm_eps=1e-5, eos_token_id=128001)


def test_memory_plan_of_the_8b_recipe(tmp_path):
  """The parameter counts that configs/llm2clip.py's memory plan is built on. Two of the 32
  layers are built (abstractly) and checked against transformers' own count; the totals add
  30 more copies of a layer."""
  two_layers = dict(LLAMA3_8B, num_hidden_layers=2)
  with open(tmp_path / "config.json", "w") as f:
    json.dump({"model_type": "llama", **two_layers}, f)
  config = llm_config(str(tmp_path), lora_rank=16, lora_targets=llm.LORA_TARGETS,
                      adapter_hidden=4096, dtype="bfloat16")
  config.model.embed_dim = 1024
  state = nnx.state(nnx.eval_shape(lambda: llm.LlmTextTower(config.model, rngs=nnx.Rngs(0))))
  frozen = _flat(nnx.to_pure_dict(nnx.state(state, llm.Frozen)))
  trainable = _flat(nnx.to_pure_dict(nnx.state(state, nnx.Param)))
  count = lambda flat, keep=lambda p: True: sum(v.size for p, v in flat.items() if keep(p))
  with torch.device("meta"):
    hf = transformers.LlamaModel(transformers.LlamaConfig(**two_layers))
  assert count(frozen) == sum(p.numel() for p in hf.parameters())  # HF's own count
  assert {np.dtype(v.dtype) for v in frozen.values()} == {np.dtype(jnp.bfloat16)}
  per_layer = lambda flat, keep=lambda p: True: count(
      flat, lambda p: p.startswith("decoder/layers/0/") and keep(p))
  base = count(frozen) + 30 * per_layer(frozen)
  lora = 32 * per_layer(trainable, lambda p: "lora" in p)
  adapter = count(trainable, lambda p: p.startswith("adapter/"))
  assert (round(base / 1e9, 2), round(2 * base / 1e9, 1)) == (7.50, 15.0)  # bf16 bytes
  assert round(per_layer(frozen) / 1e6) == 218
  assert (round(lora / 1e6, 1), round(adapter / 1e6, 1)) == (41.9, 21.0)
  assert (round(16 * lora / 1e9, 2), round(16 * adapter / 1e9, 2)) == (0.67, 0.34)


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
  from big_clip.data import embedded

  path = str(tmp_path_factory.mktemp("spm") / "spm.model")
  tokenizers.train_spm(embedded.sample_captions(n=1000, seed=0), path, vocab_size=1024)
  return path


@pytest.mark.slow
def test_llm2clip_local_trains_two_steps_and_leaves_the_frozen_base_alone(tmp_path, spm_path):
  spec = importlib.util.spec_from_file_location("llm2clip",
                                                os.path.join(ROOT, "configs", "llm2clip.py"))
  recipe = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(recipe)
  config = recipe.get_config("local")
  config.total_steps = 2
  config.eval.zeroshot_tasks = ()  # the eval compiles are not what this test is about
  config.data.tokenizer.path = spm_path
  result = train.train(config, str(tmp_path))
  assert result["step"] == 2 and np.isfinite(result["metrics"]["loss"])
  assert os.path.exists(tmp_path / "checkpoints" / "2")
  # Initialized as train.build does (jitted: eager init differs in the last bit).
  init = _flat(jax.jit(lambda: nnx.to_pure_dict(nnx.state(two_tower.init_fn(config.model, config.seed)())))())
  final = _flat(jax.device_get(result["params"]))
  decoder = [p for p in init if p.startswith("text/decoder/")]
  assert decoder and all(np.array_equal(final[p], init[p]) for p in decoder if "lora" not in p)
  assert np.abs(final["text/decoder/layers/0/mlp/up_proj/lora_b"]).max() > 0
  assert not np.array_equal(final["text/adapter/fc1/kernel"], init["text/adapter/fc1/kernel"])
