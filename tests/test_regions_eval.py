"""The region-retrieval and fine-grained evaluators with oracle towers: embeddings that
encode the true attributes (read from the generator, not from the evaluator) must score
100%, chance must match a direct count, and a blind model must score about chance."""

import itertools

import ml_collections
import numpy as np
import pytest

from big_clip import config as config_lib
from big_clip.data import embedded, embedded_captions
from big_clip.evals import fine_grained, regions, specs

N, SEED, SIZE = 24, 0, 32
LANGS = ("en", "zh")


class IdTokenizer:
  """Each distinct text -> its own id (one token): the fake towers look texts up by id."""

  def __init__(self):
    self.texts: list[str] = []

  def encode(self, texts):
    ids = []
    for t in texts:
      if t not in self.texts:
        self.texts.append(t)
      ids.append(self.texts.index(t))
    return np.array(ids)[:, None]


def _one_hot(values, sizes):
  """Concatenated one-hots; a value None leaves its block zero."""
  out = []
  for v, n in zip(values, sizes):
    block = np.zeros(n)
    if v is not None:
      block[v] = 1
    out.append(block)
  return np.concatenate(out)


SIZES = (len(embedded.SHAPES), len(embedded.COLOURS), len(embedded.SIZES), 4, 6)


def _scene_code(shape, colour, size, count=None, position=None):
  return _one_hot([shape, colour, size, count, None if position is None else position + 1],
                  SIZES)


def _caption_scenes(lang):
  """Every full caption naming the size -> the attributes it states (position None where
  the same text is written for several positions)."""
  language = embedded_captions.LANGUAGES[lang]
  seen: dict[str, set] = {}
  for shape, colour, size, count in itertools.product(
      range(5), range(6), range(2), embedded.COUNTS):
    for position in (range(5) if count == 1 else [embedded.NO_POSITION]):
      scene = embedded_captions.Scene(shape, colour, size, count, position)
      for text in language.full(scene, size):
        seen.setdefault(text, set()).add((shape, colour, size, count, position))
  # Each attribute the text pins down, None where the same text fits several values.
  agreed = lambda values: values.pop() if len(values) == 1 else None
  return {text: tuple(agreed({s[k] for s in scenes}) for k in range(5))
          for text, scenes in seen.items()}


class OracleTowers:
  def __init__(self, blind=False):
    self.tokenizer, self.blind = IdTokenizer(), blind
    self.region_fn = object()  # present: the evaluator only checks it exists

  def images(self, params, images, desc):
    del params, desc
    codes = []
    for i in range(len(images)):
      a = embedded.render_example(SEED, "test", i, SIZE)[1]
      codes.append(_scene_code(a["shape"], a["colour"], a["size"], a["count"] - 1,
                               a["position"]))
    return np.array(codes) * (0 if self.blind else 1) + 1e-3, np.ones(len(images), bool)

  def regions(self, params, images, boxes, desc):  # each box -> the object it holds
    del params, desc
    out = np.zeros((*boxes.shape[:2], sum(SIZES)))
    for i in range(len(images)):
      _, a, b = embedded.render_with_boxes(SEED, "test", i, SIZE)
      np.testing.assert_array_equal(boxes[i, :len(b)], b)
      out[i, :len(b)] = _scene_code(a["shape"], a["colour"], a["size"])
    return out

  def texts(self, params, tokens, desc=None):
    del params, desc
    out = []
    for (t,) in tokens:
      text = self.tokenizer.texts[t]
      lang = next(l for l in LANGS if text in _CAPTIONS[l] or text in _REGION_CAPTIONS[l])
      if text in _CAPTIONS[lang]:  # region captions are among them (one object)
        shape, colour, size, count, position = _CAPTIONS[lang][text]
        out.append(_scene_code(shape, colour, size, None if count is None else count - 1,
                               position))
      else:
        out.append(_scene_code(*_REGION_CAPTIONS[lang][text]))
    return np.array(out)


_CAPTIONS = {l: _caption_scenes(l) for l in LANGS}
_REGION_CAPTIONS = {l: {t: (s, c, z) for s, c, z in itertools.product(range(5), range(6), range(2))
                        for t in embedded.region_captions(dict(shape=s, colour=c, size=z,
                                                               count=1, position=-1), l)}
                    for l in LANGS}


def _config():
  c = config_lib.base()
  c.seed, c.data.image_size = SEED, SIZE
  c.data.languages = ml_collections.ConfigDict({l: 1.0 for l in LANGS})
  return c


@pytest.mark.parametrize("blind", [False, True])
def test_fine_grained_scores_the_oracle_perfect_and_a_blind_model_near_chance(blind):
  spec = specs.parse(f"fine_grained:embedded,limit={N}")
  rows = fine_grained.Evaluator(spec, _config(), OracleTowers(blind), "m").run(None)
  per_lang = [r for r in rows if r["language"] in LANGS]
  assert [r["language"] for r in per_lang] == list(LANGS) and rows[-1]["language"] == "mean"
  for r in per_lang:
    m = r["metrics"]
    _, _, siblings = embedded.fine_grained_set(N, SEED, SIZE, r["language"])
    assert m["chance"] == pytest.approx(np.mean([1 / (1 + len(s)) for s in siblings]))
    if blind:  # every caption scores the same: the right one never strictly wins
      assert m["acc1"] == 0.0
    else:
      assert m["acc1"] == 1.0 and m["acc_colour"] == 1.0 and m["acc_shape"] == 1.0


def test_region_retrieval_scores_the_oracle_perfect_and_counts_chance():
  spec = specs.parse(f"regions:embedded,limit={N}")
  towers = OracleTowers()
  rows = regions.Evaluator(spec, _config(), towers, "m").run(None)
  keys = [(a["shape"], a["colour"], a["size"]) for i in range(N)
          for a in [embedded.render_example(SEED, "test", i, SIZE)[1]] for _ in range(a["count"])]
  chance = np.mean([np.mean([k == other for other in keys]) for k in keys])
  for r in rows[:len(LANGS)]:
    assert r["metrics"]["text_to_region_acc1"] == 1.0
    assert r["metrics"]["region_to_text_acc1"] == 1.0
    assert r["metrics"]["chance"] == pytest.approx(chance)
    assert r["num_regions"] == len(keys)


def test_region_eval_without_a_prompter_says_how_to_get_one():
  towers = OracleTowers()
  towers.region_fn = None
  with pytest.raises(ValueError, match="region prompter"):
    regions.Evaluator(specs.parse("regions:embedded"), _config(), towers, "m")
