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
from big_clip import optim, sharding, train
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


def _padded_tokens(folder, max_len=12):
  """Right-padded HF tokens of SENTENCES, plus one left-padded row (positions still count
  from the first real token)."""
  tok = tokenizers.HfTokenizer(os.path.join(folder, "tokenizer.json"), max_len)
  tokens = tok.encode(SENTENCES[:4])
  left = np.full((1, max_len), tokenizers.HF_PAD_ID, np.int32)
  ids = tokens[1][tokens[1] >= 0]
  left[0, max_len - len(ids):] = ids
  return np.concatenate([tokens, left])


@pytest.mark.parametrize("family", ["llama", "qwen"])
def test_last_hidden_states_equal_transformers_with_padding(family, request):
  folder, hf_model = request.getfixturevalue(family)
  tokens = _padded_tokens(folder)
  valid = tokens != tokenizers.HF_PAD_ID
  assert (~valid).any(axis=1).sum() == 4  # padded rows, plus one cut to max_len
  tower = make_tower(llm_config(folder))
  ours = np.asarray(tower.decoder(jnp.asarray(tokens), jnp.asarray(valid)))
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
                               append_eos=True)
  out = tok.encode(["three yellow crosses .", SENTENCES[2]])
  vocab = json.load(open(os.path.join(folder, "tokenizer.json")))["model"]["vocab"]
  assert out[0].tolist() == [2, vocab["three"], vocab["yellow"], vocab["crosses"], vocab["."],
                             EOS]
  assert out[1, -1] == EOS and (out[1] >= 0).all()  # cut, EOS kept last
  short = tokenizers.HfTokenizer(os.path.join(folder, "tokenizer.json"), 8).encode(["diamonds ."])
  assert short[0].tolist() == [2, vocab["diamonds"], vocab["."]] + [-1] * 5
