"""The embedded default dataset, generated in code (no download); file and tfds sources live
in `files.py`.

Each example is a 64x64 (any `image_size`) picture of 1-3 identical objects that differ in
shape, colour, size, count and position on a muted grey texture, with captions in nine
languages (`embedded_captions.py`). Example `index` of `split` is a pure function of
(seed, split, index): `np.random.default_rng([seed, split_id, index])` draws everything, so
any batch can be regenerated and an iterator's state is just a counter.

Attributes are made easy to see, because the default run trains a tiny model on 2 CPU cores
in minutes: saturated colours that the calm grey background never has, shapes ~14-24 px
across with a dark outline, all shapes of one size with the same area (so only the outline
tells them apart), objects that never touch (one per quadrant when there are several).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import numpy as np

from big_clip.data import embedded_captions

SHAPES = ("circle", "square", "triangle", "cross", "diamond")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
COUNTS = (1, 2, 3)
POSITIONS = ("left", "right", "top", "bottom", "centre")  # single objects only
NO_POSITION = -1  # several objects: one per quadrant, captions name no position

EMBEDDED_LANGUAGES: tuple[str, ...] = tuple(embedded_captions.LANGUAGES)
ZEROSHOT_TASKS = ("colour", "shape")
SPLITS = {"train": 0, "test": 1, "val": 2}

# RGB of each colour: saturated and far apart, so the dominant colour is unambiguous.
PALETTE = np.array([[220, 30, 30], [30, 170, 60], [40, 80, 230], [240, 215, 30],
                    [150, 50, 200], [250, 135, 20]], np.int16)
_COLOUR_JITTER = 12  # +- per channel, so the model learns colour names, not 6 exact RGBs
# Nominal object radius as a fraction of the image side: small ~7 px, large ~11 px at 64 px,
# so that even a small object spans about 2x2 patches of 8 px and its outline is visible.
_RADIUS = (0.115, 0.175)
_RADIUS_JITTER = 0.06  # relative
# How far each shape reaches from its centre, in nominal radii (see _shape_mask).
_EXTENT = (0.874, 0.775, 1.171, 1.085, 1.095)
# A dark outline around every object: an edge of the same polarity whatever the object's
# colour and the background's grey, so a shape looks alike in every colour. With it (and
# the calm background) a linear probe on a random-init ViT's embedding reads shape at 55%
# instead of 29% (chance 20%), and configs/default.py reaches 97-99% zero-shot shape
# accuracy in 1000 steps; without it shape stayed at chance for 1000 steps (the text tower
# learns to ignore shape words when the image tower cannot see shapes yet).
_OUTLINE_PX, _OUTLINE_GREY = 2, 25
_CAPTION_OMITS_SIZE = 0.25  # P(caption leaves the size out)
# Captions that name one attribute (40% in all). Zero-shot prompts name one attribute, and
# a caption naming only the shape has every other-shape image in the batch as a negative,
# whereas once colour is learned a full caption is told apart only from the few same-colour
# images. Measured with configs/default.py (zero-shot shape, worst language): these shares
# gave 95% at step 500 of 1000; half of them 77% at step 500 of 500.
_CAPTION_BARE_SHAPE = 0.2  # "circles."
_CAPTION_SHAPE_ONLY = 0.1  # "a drawing of circles."
_CAPTION_COLOUR_ONLY = 0.1  # "three red things."


# ---------------------------------------------------------------------------------------
# Rendering.
# ---------------------------------------------------------------------------------------
def split_id(split: str) -> int:
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; the embedded dataset has {sorted(SPLITS)}.")
  return SPLITS[split]


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, split_id(split), index])


@functools.lru_cache(maxsize=8)
def _upsample_matrix(low: int, size: int) -> np.ndarray:
  """[size, low] bilinear interpolation weights: a smooth texture from a low-res grid."""
  pos = (np.arange(size) + 0.5) * low / size - 0.5
  pos = np.clip(pos, 0, low - 1)
  lo = np.floor(pos).astype(int)
  hi = np.minimum(lo + 1, low - 1)
  frac = (pos - lo).astype(np.float32)
  mat = np.zeros((size, low), np.float32)
  mat[np.arange(size), lo] += 1 - frac
  mat[np.arange(size), hi] += frac
  return mat


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
  """Muted grey texture, float32 [H, W, 3]: faint blotches + grain, barely tinted
  (saturation of a few levels, versus >120 for every object colour). Kept calm on purpose:
  with a busier background (grey 85-165, stronger blotches) a randomly initialized ViT's
  embedding held half as much shape information, and a small CLIP never learned shape."""
  up = _upsample_matrix(4, size)
  blotches = up @ rng.standard_normal((4, 4), dtype=np.float32) @ up.T  # [H, W]
  grain = rng.standard_normal((size, size), dtype=np.float32)
  grey = rng.uniform(115, 140) + 4 * blotches + 2 * grain
  tint = rng.uniform(-4, 4, size=3).astype(np.float32)
  return grey[:, :, None] + tint


def _shape_mask(shape: int, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
  """Pixels inside `shape` of nominal radius `r`; dy [h, 1], dx [1, w] are offsets from its
  centre. Every shape covers the same area, 2.4 r^2, so that the amount of colour in an
  image tells size and count but nothing about shape: a model has to see the outline."""
  ady, adx = np.abs(dy), np.abs(dx)
  if shape == 0:  # circle: pi * 0.874^2 = 2.4
    return dy * dy + dx * dx <= (0.874 * r) ** 2
  if shape == 1:  # axis-aligned square: (2 * 0.775)^2 = 2.4
    return np.maximum(ady, adx) <= 0.775 * r
  if shape == 2:  # triangle pointing up, apex at -k, base at +0.75 k, half-base k:
    k = 1.171 * r  # 1.75 * 1.171^2 = 2.4
    return (dy <= 0.75 * k) & (adx <= (dy + k) / 1.75)
  if shape == 3:  # cross (plus sign), arms k long and 0.6 k thick: 2.04 * 1.085^2 = 2.4
    k = 1.085 * r
    arm = 0.3 * k
    return ((ady <= k) & (adx <= arm)) | ((adx <= k) & (ady <= arm))
  if shape == 4:  # diamond, the square turned 45 degrees: 2 * 1.095^2 = 2.4
    return ady + adx <= 1.095 * r
  raise ValueError(f"shape index {shape} out of range; shapes are {SHAPES}")


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
  """Binary dilation by the 4-neighbourhood, `steps` times."""
  for _ in range(steps):
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    mask = grown
  return mask


def _paint(image: np.ndarray, shape: int, cy: float, cx: float, r: float, extent: float,
           colour: np.ndarray) -> None:
  """Paints one outlined object in place, touching only its bounding box (fast)."""
  size = image.shape[0]
  reach = extent + _OUTLINE_PX + 1
  y0, y1 = max(0, int(cy - reach)), min(size, int(cy + reach) + 1)
  x0, x1 = max(0, int(cx - reach)), min(size, int(cx + reach) + 1)
  dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy)[:, None]
  dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx)[None, :]
  inside = _shape_mask(shape, dy, dx, r)
  window = image[y0:y1, x0:x1]
  window[_dilate(inside, _OUTLINE_PX)] = _OUTLINE_GREY
  window[inside] = colour


def _centres(rng: np.random.Generator, count: int, position: int, extent: float,
             size: int) -> list[tuple[float, float]]:
  """Object centres (y, x) that keep every object, reaching `extent` px from its centre,
  inside the image and apart."""
  half = size / 2
  if count == 1:
    # Offset from the centre towards `position`; jitter smaller than the offset so left
    # stays left of centre and top stays above it.
    offset = 0.25 * size
    along, across = rng.uniform(-0.03, 0.03) * size, rng.uniform(-0.08, 0.08) * size
    dy, dx = {0: (across, -offset + along), 1: (across, offset + along),
              2: (-offset + along, across), 3: (offset + along, across),
              4: (along, across)}[position]
    # Keep the object inside the image (1 px margin) whatever its extent.
    lo, hi = extent + _OUTLINE_PX + 1, size - extent - _OUTLINE_PX - 1
    return [(float(np.clip(half + dy, lo, hi)), float(np.clip(half + dx, lo, hi)))]
  # One object per quadrant, jittered but kept inside it with its outline: never touching.
  quadrants = rng.permutation(4)[:count]
  slack = max(0.0, size / 4 - extent - _OUTLINE_PX - 1)
  return [((q // 2) * half + size / 4 + rng.uniform(-slack, slack),
           (q % 2) * half + size / 4 + rng.uniform(-slack, slack)) for q in quadrants]


def random_attrs(rng: np.random.Generator) -> dict:
  """Uniformly drawn attributes of one example (see render_example)."""
  count = int(rng.choice(COUNTS))
  return {"shape": int(rng.integers(len(SHAPES))), "colour": int(rng.integers(len(COLOURS))),
          "size": int(rng.integers(len(SIZES))), "count": count,
          "position": int(rng.integers(len(POSITIONS))) if count == 1 else NO_POSITION}


def _render(rng: np.random.Generator, image_size: int
            ) -> tuple[np.ndarray, dict, np.ndarray]:
  attrs = random_attrs(rng)
  image = _background(rng, image_size)
  r = _RADIUS[attrs["size"]] * image_size * rng.uniform(1 - _RADIUS_JITTER, 1 + _RADIUS_JITTER)
  colour = PALETTE[attrs["colour"]] + rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, 3)
  extent = r * _EXTENT[attrs["shape"]]
  centres = _centres(rng, attrs["count"], attrs["position"], extent, image_size)
  for cy, cx in centres:
    _paint(image, attrs["shape"], cy, cx, r, extent, colour)
  # Each object's box (with its outline), from values already drawn: no extra draws, so
  # every existing field of every example stays the same.
  reach = extent + _OUTLINE_PX
  boxes = np.clip(np.array([[cx - reach, cy - reach, cx + reach, cy + reach]
                            for cy, cx in centres], np.float32) / image_size, 0.0, 1.0)
  return np.clip(image, 0, 255).astype(np.uint8), attrs, boxes


def _check_size(image_size: int) -> None:
  if image_size < 16:
    raise ValueError(f"image_size={image_size} is too small to draw shapes; use >= 16 "
                     "(config.data.image_size).")


def render_example(seed: int, split: str, index: int, image_size: int
                   ) -> tuple[np.ndarray, dict]:
  """(image uint8 [H, W, 3], attrs) of example `index` of `split`; a pure function.

  attrs: shape, colour, size (indices into SHAPES, COLOURS, SIZES), count (1-3) and
  position (index into POSITIONS, or NO_POSITION=-1 when there are several objects).
  """
  return render_with_boxes(seed, split, index, image_size)[:2]


def render_with_boxes(seed: int, split: str, index: int, image_size: int
                      ) -> tuple[np.ndarray, dict, np.ndarray]:
  """`render_example` and every object's box, float32 [count, 4] = [x0, y0, x1, y1]
  relative to the image (the shape's reach plus its outline)."""
  _check_size(image_size)
  return _render(example_rng(seed, split, index), image_size)


# ---------------------------------------------------------------------------------------
# Captions.
# ---------------------------------------------------------------------------------------
def _language(lang: str) -> embedded_captions.Language:
  if lang not in embedded_captions.LANGUAGES:
    raise ValueError(f"Language {lang!r} is not in the embedded dataset; available: "
                     f"{EMBEDDED_LANGUAGES} (config.data.languages).")
  return embedded_captions.LANGUAGES[lang]


def _scene(attrs: dict) -> embedded_captions.Scene:
  return embedded_captions.Scene(attrs["shape"], attrs["colour"], attrs["size"], attrs["count"],
                             attrs["position"])


def caption(attrs: dict, lang: str, rng: np.random.Generator) -> str:
  """A caption of `attrs` in `lang`: usually a random full template (sometimes without
  the size); sometimes only the shape noun, a shape-only or a colour-only phrase."""
  scene = _scene(attrs)
  return _caption_form(_language(lang), scene, rng)(scene)


# A caption's form: the same words for any scene ('scene -> text', None when the scene
# has no such template, e.g. a position template for several objects).
CaptionForm = Callable[[embedded_captions.Scene], "str | None"]


def _caption_form(language: embedded_captions.Language, scene: embedded_captions.Scene,
                  rng: np.random.Generator) -> CaptionForm:
  """The form `caption` draws for `scene`: the draws of `caption`, in its order."""
  draw = rng.random()
  if draw < _CAPTION_BARE_SHAPE:
    return language.bare_shape
  draw -= _CAPTION_BARE_SHAPE
  if draw < _CAPTION_SHAPE_ONLY + _CAPTION_COLOUR_ONLY:
    which = 1 if draw < _CAPTION_SHAPE_ONLY else 0  # (colour only, shape only)
    return lambda s: language.partial(s)[which]
  omit_size = rng.random() < _CAPTION_OMITS_SIZE
  k = int(rng.integers(len(language.full(scene, None if omit_size else scene.size))))

  def full(s: embedded_captions.Scene) -> str | None:
    options = language.full(s, None if omit_size else s.size)
    return options[k] if k < len(options) else None
  return full


# ---------------------------------------------------------------------------------------
# Attribute swaps (FG-CLIP 2's hard fine-grained negatives) and region captions.
# ---------------------------------------------------------------------------------------
SWAP_KINDS = ("colour", "shape", "size", "count", "position")


def swapped_scenes(scene: embedded_captions.Scene
                   ) -> list[tuple[str, embedded_captions.Scene]]:
  """(kind, scene) for every scene that differs from `scene` in exactly one attribute of
  SWAP_KINDS. A single object that becomes several loses its position; several that become
  one are put in the centre (any position is wrong for that image: its count is)."""
  out = [("colour", dataclasses.replace(scene, colour=c))
         for c in range(len(COLOURS)) if c != scene.colour]
  out += [("shape", dataclasses.replace(scene, shape=k))
          for k in range(len(SHAPES)) if k != scene.shape]
  out.append(("size", dataclasses.replace(scene, size=1 - scene.size)))
  for n in COUNTS:
    if n != scene.count:
      position = NO_POSITION if n > 1 else (scene.position if scene.count == 1 else 4)
      out.append(("count", dataclasses.replace(scene, count=n, position=position)))
  if scene.count == 1:
    out += [("position", dataclasses.replace(scene, position=p))
            for p in range(len(POSITIONS)) if p != scene.position]
  return out


def swapped_captions(form: CaptionForm, scene: embedded_captions.Scene
                     ) -> list[tuple[str, str]]:
  """(kind, caption) in `form` of every one-attribute swap of `scene` whose text differs
  from the scene's own caption (a form that never names the size has no size swap), one
  per distinct text."""
  own = form(scene)
  seen, out = {own}, []
  for kind, other in swapped_scenes(scene):
    text = form(other)
    if text is not None and text not in seen:
      seen.add(text)
      out.append((kind, text))
  return out


def caption_with_negatives(attrs: dict, lang: str, rng: np.random.Generator, k: int,
                           negative_rng: np.random.Generator) -> tuple[str, list[str]]:
  """(`caption(attrs, lang, rng)` with the same draws, `k` hard negatives): captions of the
  same form with one attribute swapped, drawn without replacement by `negative_rng`;
  '' pads when the form has fewer swaps (a bare shape noun has only shape and count)."""
  scene = _scene(attrs)
  form = _caption_form(_language(lang), scene, rng)
  swaps = swapped_captions(form, scene)
  picked = [swaps[i][1] for i in negative_rng.permutation(len(swaps))[:k]]
  return form(scene), picked + [""] * (k - len(picked))


def region_captions(attrs: dict, lang: str) -> list[str]:
  """Every caption of one object of `attrs` (each box holds one): the full templates with
  its size, no count and no position (a box's place is the box itself, and it moves with
  crops and flips)."""
  one = dataclasses.replace(_scene(attrs), count=1, position=NO_POSITION)
  return _language(lang).full(one, one.size)


def region_set(n: int, seed: int, image_size: int
               ) -> tuple[np.ndarray, list[np.ndarray], list[dict]]:
  """(images uint8 [n, H, W, 3], each image's boxes [count, 4], its attrs) from the
  held-out 'test' split (evals/regions.py)."""
  examples = [render_with_boxes(seed, "test", index, image_size) for index in range(n)]
  return (np.stack([e[0] for e in examples]), [e[2] for e in examples],
          [e[1] for e in examples])


def fine_grained_set(n: int, seed: int, image_size: int, lang: str
                     ) -> tuple[np.ndarray, list[str], list[list[tuple[str, str]]]]:
  """(images uint8 [n, H, W, 3] of the 'test' split, one full caption of each naming its
  size, and every (kind, caption) of that form with one attribute swapped) for the
  fine-grained test (evals/fine_grained.py): the template is drawn per image."""
  language = _language(lang)
  images, positives, siblings = [], [], []
  for index in range(n):
    image, attrs = render_example(seed, "test", index, image_size)
    scene = _scene(attrs)
    k = int(np.random.default_rng([seed, 0xF16, index]).integers(
        len(language.full(scene, scene.size))))
    form = lambda s, k=k: (lambda o: o[k] if k < len(o) else None)(language.full(s, s.size))
    images.append(image)
    positives.append(form(scene))
    siblings.append(swapped_captions(form, scene))
  return np.stack(images), positives, siblings


def regions(attrs: dict, boxes: np.ndarray, languages: Sequence[str]) -> list[dict]:
  """The example's `regions` field (data/regions.py): every object's box with its captions
  in `languages`."""
  captions = {lang: region_captions(attrs, lang) for lang in languages}
  return [{"box": [float(v) for v in box], "captions": captions} for box in boxes]


def zeroshot_prompts(lang: str) -> list[str]:
  """Every zero-shot prompt of `lang`, all tasks, classes and templates."""
  return [t.replace("{c}", name) for task in ZEROSHOT_TASKS
          for t in zeroshot_templates(task, lang) for name in zeroshot_classnames(task, lang)]


def sample_captions(n: int, seed: int, long_captions: bool = False) -> list[str]:
  """Text to train the embedded dataset's tokenizer on: `n` captions spread evenly over
  the languages, every zero-shot prompt, and a word-shuffled copy of each of these (with
  punctuation split off the words).

  Why the shuffled copies: sentencepiece seeds its pieces from maximal repeated substrings,
  and template text repeats whole phrases ("धूसर पृष्ठभूमि पर" always together), so without
  them the words inside fixed phrases never become pieces and such captions are spelled
  letter by letter (Hindi ran past 32 tokens). Word order does not matter to a tokenizer.

  `long_captions` adds n // 8 long English captions (config.data.long_captions > 0), drawn
  after the short ones so that the rest of the corpus is unchanged.
  """
  rng = np.random.default_rng([seed, 0x5E7])  # a stream of its own, apart from examples
  texts = [caption(random_attrs(rng), EMBEDDED_LANGUAGES[i % len(EMBEDDED_LANGUAGES)], rng)
           for i in range(n)]
  if long_captions:
    long_rng = np.random.default_rng([seed, 0x5E7, 0x10C])
    texts += [long_caption(random_attrs(long_rng), long_rng) for _ in range(n // 8)]
  texts += [p for lang in EMBEDDED_LANGUAGES for p in zeroshot_prompts(lang)]
  shuffled = [" ".join(rng.permutation(words)) for words in map(_words, texts)
              if len(words) > 1]
  return texts + shuffled


_PUNCTUATION = ".,:;!?。、，：।"


def _words(text: str) -> list[str]:
  """Whitespace-separated words, with sentence punctuation split off: "gris." -> "gris",
  "." (else the last word of a template only ever occurs glued to its full stop)."""
  words = []
  for word in text.split():
    stripped = word.rstrip(_PUNCTUATION)
    words += [stripped] if stripped == word else [stripped, word[len(stripped):]]
  return [w for w in words if w]


# ---------------------------------------------------------------------------------------
# Zero-shot classification on held-out images.
# ---------------------------------------------------------------------------------------
def _check_task(task: str) -> None:
  if task not in ZEROSHOT_TASKS:
    raise ValueError(f"Unknown zero-shot task {task!r}; allowed: {ZEROSHOT_TASKS} "
                     "(config.eval.zeroshot_tasks).")


def zeroshot_classnames(task: str, lang: str) -> list[str]:
  """Class names of `task` in `lang`; index = label (the order of COLOURS / SHAPES)."""
  _check_task(task)
  language = _language(lang)
  return list(language.colour_names if task == "colour" else language.shape_names)


def zeroshot_templates(task: str, lang: str) -> list[str]:
  """Prompt templates with a '{c}' slot, grammatical with `zeroshot_classnames(task, lang)`."""
  _check_task(task)
  language = _language(lang)
  return list(language.colour_templates if task == "colour" else language.shape_templates)


def zeroshot_set(task: str, n: int, seed: int, image_size: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [n, H, W, 3], labels int32 [n]) from the held-out 'test' split."""
  _check_task(task)
  images, labels = [], []
  for index in range(n):
    image, attrs = render_example(seed, "test", index, image_size)
    images.append(image)
    labels.append(attrs[task])
  return np.stack(images), np.asarray(labels, np.int32)


def attribute_names(attrs: dict) -> dict[str, str | int]:
  """Human-readable attrs, e.g. for logging sample batches."""
  position = attrs["position"]
  return {"shape": SHAPES[attrs["shape"]], "colour": COLOURS[attrs["colour"]],
          "size": SIZES[attrs["size"]], "count": attrs["count"],
          "position": POSITIONS[position] if position >= 0 else "none"}


def all_captions(attrs: dict, lang: str) -> Sequence[str]:
  """Every caption `caption()` can produce for `attrs` (tests, inspection)."""
  language = _language(lang)
  scene = _scene(attrs)
  return [*language.full(scene, scene.size), *language.full(scene, None),
          *language.partial(scene), language.bare_shape(scene)]


# ---------------------------------------------------------------------------------------
# Long captions (Long-CLIP's setting). Six English sentences, ~190 tokens: the
# count, size and position come early; then boilerplate that every image shares (how the
# picture is made); the colour and shape -- what tells most images apart -- come last, past
# the first 77 tokens, so a text tower that truncates at 77 never sees them.
# ---------------------------------------------------------------------------------------
_LONG_OPENINGS = (
    "this is a small synthetic picture that a computer program drew for a test of how well "
    "a model can read a long description from its first word to its very last word.",
    "here is a little synthetic picture, made by a computer program to test whether a model "
    "reads a long description all the way from the beginning to the very end.",
)
_LONG_BACKGROUNDS = (
    "the background is a calm grey texture with faint soft blotches and a little fine grain, "
    "and there are no other colours anywhere in it.",
    "behind everything lies a quiet grey texture, with some faint blotches and a fine grain, "
    "and it holds no other colour at all.",
)
_LONG_OUTLINES = (
    "every object in the picture is drawn with a dark outline about two pixels wide, so that "
    "its edges are easy to see against the grey, and all of the objects share one colour "
    "and one size.",
    "each object has a dark outline roughly two pixels wide that makes its edge stand out "
    "from the grey, and all objects in one picture have the same colour and the same size.",
)
_LONG_NOTHING_ELSE = (
    "nothing else is drawn: there is no text, no frame, no shadow and no light, and apart "
    "from the objects the picture looks the same from one corner to the other.",
    "there is nothing more to see: no writing, no border, no shadows and no lighting, and "
    "away from the objects every part of the picture looks alike.",
)
_LONG_COUNTS = ("one", "two", "three")
_LONG_PLACES = ("on the left side of the picture", "on the right side of the picture",
                "near the top of the picture", "near the bottom of the picture",
                "right in the centre of the picture")


def long_caption(attrs: dict, rng: np.random.Generator) -> str:
  """A long English caption of `attrs`: an opening, the count, size and position, shared
  boilerplate, then -- last, past the first 77 tokens -- the colour and the shape."""
  pick = lambda options: options[int(rng.integers(len(options)))]
  count, size = attrs["count"], SIZES[attrs["size"]]
  colour, (shape_sg, shape_pl) = COLOURS[attrs["colour"]], embedded_captions._EN_SHAPES[
      attrs["shape"]]
  if count == 1:
    where = (f"there is exactly one {size} object in the picture, and it sits "
             f"{_LONG_PLACES[attrs['position']]}.")
    late = (f"looking closely at that object at last, it is {colour}, and its shape is a "
            f"{shape_sg}: the picture shows one {colour} {shape_sg}.")
  else:
    n = _LONG_COUNTS[count - 1]
    where = (f"there are {n} {size} objects in the picture, each in its own quarter of it, "
             "and they never touch each other.")
    late = (f"looking closely at the objects at last, they are all {colour}, and their shape "
            f"is the same: the picture shows {n} {colour} {shape_pl}.")
  return " ".join([pick(_LONG_OPENINGS), where, pick(_LONG_BACKGROUNDS), pick(_LONG_OUTLINES),
                   pick(_LONG_NOTHING_ELSE), late])


LONG_CAPTION_LATE_WORDS = ("colour", "shape")  # the attrs a long caption names last


def long_caption_set(n: int, seed: int, image_size: int) -> tuple[np.ndarray, list[str]]:
  """(images uint8 [n, H, W, 3], one long caption each) from the held-out 'test' split."""
  images, captions = [], []
  for index in range(n):
    image, attrs = render_example(seed, "test", index, image_size)
    images.append(image)
    captions.append(long_caption(attrs, np.random.default_rng([seed, 0x10C, index])))
  return np.stack(images), captions


def every_text(languages: Sequence[str]) -> list[str]:
  """Every caption the embedded dataset can draw in `languages`, and every zero-shot prompt
  (so that training and the zero-shot eval both read from the cache)."""
  texts: dict[str, None] = {}
  for lang in languages:
    for shape in range(len(SHAPES)):
      for colour in range(len(COLOURS)):
        for size in range(len(SIZES)):
          for count in COUNTS:
            positions = range(len(POSITIONS)) if count == 1 else [NO_POSITION]
            for position in positions:
              attrs = dict(shape=shape, colour=colour, size=size, count=count,
                           position=position)
              texts.update(dict.fromkeys(all_captions(attrs, lang)))
    texts.update(dict.fromkeys(zeroshot_prompts(lang)))
  return list(texts)
