"""The caption-pair term (config.loss.text_pair_weight, config.data.pair_language): batches
carry another caption of each image in the pivot language, and the train step's loss is the
image-text loss plus the weighted text-text loss, as written out in float64 NumPy."""

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from big_clip import config as config_lib
from big_clip import sharding, steps
from big_clip.data import pipeline, embedded

MAX_LEN, EOS = 64, 3


class ByteTokenizer:
  """UTF-8 bytes -> ids 4..259, then EOS: readable back, no model to train."""
  max_len = MAX_LEN

  def encode(self, texts):
    out = np.zeros((len(texts), MAX_LEN), np.int32)
    for row, text in enumerate(texts):
      ids = [b + 4 for b in text.encode("utf-8")][:MAX_LEN - 1] + [EOS]
      out[row, :len(ids)] = ids
    return out


def decode(row: np.ndarray) -> str:
  return bytes(int(i) - 4 for i in row if i > EOS).decode("utf-8")


def tiny_config() -> ml_collections.ConfigDict:
  c = config_lib.base()
  c.total_steps = 2
  c.model.update(embed_dim=8)
  c.model.image.update(image_size=16, patch_size=8, width=16, depth=1, heads=2, mlp_dim=32)
  c.model.text.update(vocab_size=260, max_len=MAX_LEN, width=16, depth=1, heads=2, mlp_dim=32,
                      eos_id=EOS)
  c.data.update(global_batch=8, image_size=16, max_len=MAX_LEN)
  c.data.languages = {"de": 1.0, "fr": 1.0}
  c.data.update(pair_language="en")
  c.loss.text_pair_weight = 0.7
  return c


def test_embedded_batches_pair_each_caption_with_an_english_one_of_the_same_image():
  c = tiny_config()
  config_lib.validate(c)
  paired = next(pipeline.make(c.data, 0, 1, tokenizer=ByteTokenizer(), seed=0, prefetch=0))
  c.data.pair_language = ""
  plain = next(pipeline.make(c.data, 0, 1, tokenizer=ByteTokenizer(), seed=0, prefetch=0))
  assert "text_pair" not in plain
  np.testing.assert_array_equal(paired["image"], plain["image"])  # a stream of its own:
  np.testing.assert_array_equal(paired["text"], plain["text"])  # nothing else changes
  for index, row in enumerate(paired["text_pair"]):
    _, attrs = embedded.render_example(0, "train", index, 16)
    english = {embedded.caption(attrs, "en", np.random.default_rng([index, k]))
               .encode()[:MAX_LEN - 1].decode() for k in range(300)}
    assert decode(row) in english, (index, decode(row))  # English, of the same image
  assert len({decode(r) for r in paired["text_pair"]}) > 4


def numpy_softmax_loss(a: np.ndarray, b: np.ndarray, scale: float) -> float:
  """Symmetric InfoNCE on unit rows, float64."""
  logits = scale * a @ b.T
  def ce(z):
    z = z - z.max(1, keepdims=True)
    return -np.mean(np.diag(z) - np.log(np.exp(z).sum(1)))
  return 0.5 * (ce(logits) + ce(logits.T))


@pytest.mark.parametrize("devices", [1, 8])
def test_train_step_loss_is_image_text_plus_weighted_text_pair_loss(devices):
  c = tiny_config()
  mesh = sharding.make_mesh(dict(data=devices, fsdp=1, tensor=1),
                            devices=jax.devices()[:devices])
  batch = next(pipeline.make(c.data, 0, 1, tokenizer=ByteTokenizer(), seed=0, prefetch=0))
  setup = steps.build(c, mesh)
  params = jax.device_get(setup.state["params"])
  _, metrics = setup.step(setup.state, sharding.place_batch(batch, mesh))

  model = nnx.merge(setup.graphdef, params)
  f64 = lambda x: np.asarray(x, np.float64)
  img, txt = (f64(e) for e in model(batch["image"], batch["text"]))
  pair = f64(model.encode_text(batch["text_pair"]))
  scale = float(model.scale_and_bias()[0])
  image_text, text_pair = numpy_softmax_loss(img, txt, scale), numpy_softmax_loss(txt, pair,
                                                                                 scale)
  np.testing.assert_allclose(float(metrics["loss"]), image_text + 0.7 * text_pair, rtol=1e-5)
  assert text_pair > 0.1  # the pair term is really in it
  # Each term is logged on its own, before weighting.
  np.testing.assert_allclose(float(metrics["loss/contrastive"]), image_text, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss/text_pair"]), text_pair, rtol=1e-5)


def test_pair_keys_go_together_and_are_validated():
  c = tiny_config()
  c.data.pair_language = ""
  with pytest.raises(config_lib.ConfigError, match=r"text_pair_weight=0\.7.*pair_language=''"):
    config_lib.validate(c)
  c = tiny_config()
  c.loss.text_pair_weight = 0.0
  with pytest.raises(config_lib.ConfigError, match="go together"):
    config_lib.validate(c)
  c = tiny_config()
  c.loss.accum_steps = 2
  with pytest.raises(config_lib.ConfigError, match="text_pair_weight"):
    config_lib.validate(c)
  c = tiny_config()
  c.model.text.llm.cache_dir = "/tmp/cache"
  with pytest.raises(config_lib.ConfigError, match="cache_dir.*caption pairs"):
    config_lib.validate(c)
  c = tiny_config()
  c.data.pair_language = "xx"
  with pytest.raises(ValueError, match=r"pair_language='xx'.*available"):
    pipeline.make(c.data, 0, 1, tokenizer=ByteTokenizer(), seed=0)
