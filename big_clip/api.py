"""The user's door: load a trained model and embed images and text, or classify zero-shot.

    import big_clip
    model = big_clip.load("/tmp/big_clip_default")          # a workdir (newest checkpoint)
    model = big_clip.load("hf:/tmp/export_hf")              # a CLIPModel / SiglipModel folder
    model = big_clip.load("open_clip:/tmp/oc")              # an open_clip export folder
    img = model.encode_image(["cat.jpg", pil_image])        # [N, D], L2-normalized
    txt = model.encode_text(["a cat", "eine Katze"])        # [N, D], L2-normalized
    probs = model.zero_shot(["cat.jpg"], ["cat", "dog"])    # [N, K]

Everything goes through the evaluator's own pieces (`evals.towers.Towers`, the eval-time
resize + centre crop of `data.manifest`, `data.pipeline.normalize`, prompt ensembling of
`evals.towers.class_embeddings`), so an embedding here is the embedding the eval binary
scores.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any, Union

import jax
import ml_collections
import numpy as np
from PIL import Image

from big_clip import fileio, sharding
from big_clip import workdir as workdir_lib
from big_clip.convert import pretrained
from big_clip.data import manifest, pipeline, tokenizers
from big_clip.errors import UserError
from big_clip.evals import datasets, labels
from big_clip.evals import towers as towers_lib
from big_clip.models import adapt, two_tower

Images = Union[np.ndarray, Sequence[Union[str, os.PathLike, Image.Image, np.ndarray]]]
SOURCE_KINDS = ("hf", "open_clip")
HF_PREPROCESSOR = "preprocessor_config.json"


class LoadError(UserError, ValueError):
  """A model source that cannot be loaded: names the source and what to give instead."""


class InputError(UserError, ValueError):
  """Images, texts or class names the model cannot take: names the input and the fix."""


@dataclasses.dataclass
class Model:
  """A trained two-tower model with its tokenizer and its eval-time preprocessing."""
  config: ml_collections.ConfigDict
  params: Any                 # nnx pure dict of global arrays on `towers.mesh`
  towers: towers_lib.Towers   # jitted towers, tokenizer, image size, mean / std, batch size
  source: str
  step: int | None = None

  @property
  def tokenizer(self) -> Any:
    return self.towers.tokenizer

  @property
  def image_size(self) -> int:
    return self.towers.image_size

  @property
  def logit_scale(self) -> float:
    """exp(logit_scale), clipped at logit_scale_max as in training."""
    return float(min(np.exp(np.asarray(self.params["logit_scale"])),
                     self.config.model.logit_scale_max))

  @property
  def logit_bias(self) -> float:
    return float(np.asarray(self.params["logit_bias"]))

  # -------------------------------------------------------------------------------------------
  def image_set(self, images: Images) -> datasets.ImageSet:
    """`images` as the evaluator's lazy ImageSet (decoded per batch, in threads)."""
    size = self.image_size
    if isinstance(images, np.ndarray):
      if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise InputError(f"encode_image: an array must be uint8 [N, H, W, 3]; got "
                         f"{images.dtype} {list(images.shape)}.")
      images = list(images)
    images = list(images)

    crop = self.towers.crop  # NaFlex: the whole image, any shape

    def load(i: int) -> np.ndarray:
      return to_pixels(images[i], size, crop)

    return datasets.ImageSet([_name(x, i) for i, x in enumerate(images)], load, size)

  def encode_image(self, images: Images) -> np.ndarray:
    """[N, D] float32, L2-normalized. `images`: paths, PIL images, uint8 [H, W, 3] arrays, or
    one uint8 [N, H, W, 3] array; each resized (shorter side) and centre-cropped to the
    model's image size as the evaluator does. An image that cannot be decoded is an error
    naming it (`predict` skips such files instead)."""
    emb, failed = self.embed_images(images)
    if failed:
      raise InputError(next(iter(failed.values())))
    return emb

  def embed_images(self, images: Images) -> tuple[np.ndarray, dict[int, str]]:
    """([N, D] embeddings, {index: why} of the images that could not be decoded, whose rows
    are embeddings of a black image): `encode_image` without stopping at a bad file."""
    image_set = self.image_set(images)
    if not len(image_set):
      return np.zeros((0, self.config.model.embed_dim), np.float32), {}
    emb, _ = self.towers.images(self.params, image_set, desc=None)
    return emb, dict(image_set.failed)

  def encode_text(self, texts: Sequence[str]) -> np.ndarray:
    """[N, D] float32, L2-normalized, for captions in any language the tokenizer knows."""
    if isinstance(texts, str):
      raise TypeError("encode_text takes a list of strings; wrap one caption as [text].")
    if not len(texts):
      return np.zeros((0, self.config.model.embed_dim), np.float32)
    return self.towers.texts(self.params, self.tokenizer.encode(list(texts)))

  def class_embeddings(self, classnames: Sequence[str], templates: Sequence[str]
                       ) -> np.ndarray:
    """[K, D]: each class the renormalized mean of its prompts (CLIP §3.1.4 prompt
    ensembling), tokenized class-major exactly as evals/zeroshot.py does."""
    prompts = [t.replace("{c}", c) for c in classnames for t in templates]
    return towers_lib.class_embeddings(self.towers, self.params, self.tokenizer.encode(prompts),
                                       len(classnames))

  def probabilities(self, img_emb: np.ndarray, txt_emb: np.ndarray) -> np.ndarray:
    """[N, K]: softmax over the K texts of scale * cosine (CLIP); for a sigmoid-loss model
    each pair's own sigmoid(scale * cosine + bias), as SigLIP scores (rows need not sum
    to 1)."""
    logits = self.logit_scale * (img_emb.astype(np.float64) @ txt_emb.T.astype(np.float64))
    if self.config.loss.name == "sigmoid":
      return (1.0 / (1.0 + np.exp(-(logits + self.logit_bias)))).astype(np.float32)
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    return (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)

  def zero_shot(self, images: Images, classnames: Sequence[str] | Mapping[str, Sequence[str]],
                templates: Sequence[str] | Mapping[str, Sequence[str]] | str | None = None,
                ) -> np.ndarray | dict[str, np.ndarray]:
    """Probabilities [N, K] of each image for each class name.

    `classnames` is a list (English prompts unless `templates` says otherwise) or
    `{language: [names]}` (then the result is `{language: [N, K]}`). `templates` is a list of
    strings with a '{c}' slot, `{language: [templates]}`, a JSON file of that, or None for the
    evaluator's default (OpenAI's 80 ImageNet prompts; English fills in for other languages).
    """
    return self.classify(self.encode_image(images), classnames, templates)

  def classify(self, img_emb: np.ndarray,
               classnames: Sequence[str] | Mapping[str, Sequence[str]],
               templates: Sequence[str] | Mapping[str, Sequence[str]] | str | None = None,
               ) -> np.ndarray | dict[str, np.ndarray]:
    """`zero_shot` of image embeddings [N, D] already computed."""
    per_language = isinstance(classnames, Mapping)
    names = dict(classnames) if per_language else {labels.FALLBACK_LANGUAGE: classnames}
    for lang, lang_names in names.items():
      if (isinstance(lang_names, str) or not isinstance(lang_names, Sequence) or not lang_names
          or not all(isinstance(n, str) and n for n in lang_names)):
        raise InputError(f"zero_shot: the class names of {lang!r} must be a non-empty list "
                         f"of non-empty strings; got {lang_names!r}.")
    prompts = resolve_templates(templates, list(names))
    out = {lang: self.probabilities(img_emb, self.class_embeddings(list(lang_names),
                                                                   prompts[lang]))
           for lang, lang_names in names.items()}
    return out if per_language else out[labels.FALLBACK_LANGUAGE]


def resolve_templates(templates: Sequence[str] | Mapping[str, Sequence[str]] | str | None,
                      languages: Sequence[str]) -> dict[str, list[str]]:
  """{language: templates} from any of the forms `Model.zero_shot` takes."""
  if templates is None or isinstance(templates, (str, os.PathLike)):
    return labels.load_templates(templates and os.fspath(templates), languages)
  if isinstance(templates, Mapping):
    return labels.parse_templates(templates, languages, "templates")
  return labels.parse_templates({lang: list(templates) for lang in languages}, languages,
                                "templates")


def to_pixels(image: Any, size: int, crop: bool = True) -> np.ndarray:
  """One image (path, PIL image, uint8 [H, W, 3]) -> uint8 [size, size, 3]: the eval-time
  transform (shorter side resized bicubic, centre crop; `data.manifest`); with `crop=False`
  (NaFlex models) the whole RGB image at its own size. ValueError names an image that cannot
  be decoded."""
  if isinstance(image, (str, os.PathLike)):
    path = os.fspath(image)
    if workdir_lib.is_remote(path):
      return manifest.read_image(path, size, crop)
    try:
      with open(path, "rb") as f:
        data = f.read()
    except OSError as e:
      raise ValueError(f"image {path!r} could not be read ({e.strerror or e}).") from e
    try:
      return manifest.decode_image(data, size, path, crop)
    except ValueError as e:  # its message speaks of manifests; say what it is here
      cause = e.__cause__ or e
      raise ValueError(f"image {path!r} could not be decoded ({type(cause).__name__}: "
                       f"{cause}).") from e
  if isinstance(image, np.ndarray):
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
      raise InputError(f"an image array must be uint8 [H, W, 3]; got {image.dtype} "
                       f"{list(image.shape)}.")
    if image.shape[:2] == (size, size) or not crop:
      return image
    image = Image.fromarray(image)
  if isinstance(image, Image.Image):
    rgb = image.convert("RGB")
    return manifest.resize_center_crop(rgb, size) if crop else np.asarray(rgb, np.uint8)
  raise TypeError(f"an image must be a path, a PIL image or a uint8 array; got "
                  f"{type(image).__name__}.")


def _name(image: Any, index: int) -> str:
  return os.fspath(image) if isinstance(image, (str, os.PathLike)) else f"image[{index}]"


# ---------------------------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------------------------
def load(source: str, *, step: int | None = None, ema: bool = True) -> Model:
  """A big_clip workdir (its newest checkpoint, or `step`), `hf:PATH` (a transformers
  CLIPModel / SiglipModel folder, e.g. from `big_clip.export --format hf`) or
  `open_clip:PATH` (an open_clip folder as `big_clip.export --format open_clip` writes).

  A workdir whose run kept a weight EMA (config.optim.ema_decay > 0) loads the EMA;
  `ema=False` loads the raw weights."""
  source = os.fspath(source)
  kind, _, path = source.partition(":")
  if kind in SOURCE_KINDS and path:
    for name, value, default in (("step", step, None), ("ema", ema, True)):
      if value != default:
        raise LoadError(f"load({source!r}, {name}={value}): a {kind} folder holds one set of "
                        f"weights; {name} applies to a big_clip workdir only.")
    return _load_pretrained(kind, path)
  return _load_workdir(source, step, ema)


def _mesh() -> jax.sharding.Mesh:
  return sharding.mesh_from_config({"data": -1, "fsdp": 1, "tensor": 1})


def _load_workdir(workdir: str, step: int | None, ema: bool) -> Model:
  if not fileio.exists(workdir_lib.config_path(workdir)):
    raise LoadError(f"{workdir!r} is not a big_clip workdir (no {workdir_lib.CONFIG_FILE}); "
                    "give a training workdir, hf:PATH or open_clip:PATH.")
  mesh = _mesh()
  config, params, step = adapt.read_run(workdir, step, mesh, ema=ema)
  if (config.model.text.kind != "llm" and not config.data.tokenizer.path
      and not fileio.exists(workdir_lib.tokenizer_path(workdir))):
    raise LoadError(f"{workdir}: no tokenizer (config.data.tokenizer.path is empty and "
                    f"{workdir_lib.tokenizer_path(workdir)} does not exist); copy the run's "
                    "spm.model there.")
  tokenizer = pipeline.build_tokenizer(config, workdir)
  return _model(config, params, tokenizer, mesh, workdir, step)


def _load_pretrained(kind: str, path: str) -> Model:
  if not fileio.isdir(path):
    raise LoadError(f"{kind}:{path}: no such folder.")
  config, params = (pretrained.from_hf if kind == "hf" else pretrained.from_open_clip)(path)
  _preprocessing(kind, path, config)
  spm = os.path.join(path, "spm.model")
  if not fileio.exists(spm):
    raise LoadError(f"{kind}:{path} has no spm.model; big_clip embeds text with the "
                    "sentencepiece model its exports carry (copy the run's spm.model there).")
  tokenizer = tokenizers.SpmTokenizer(spm, config.data.max_len)
  mesh = _mesh()
  _, abstract, shardings = two_tower.abstract_params(config.model, mesh)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
  return _model(config, sharding.place_like(params, target), tokenizer, mesh,
                f"{kind}:{path}", None)


def _preprocessing(kind: str, path: str, config: ml_collections.ConfigDict) -> None:
  """The folder's own image size / mean / std where it states them (open_clip's
  preprocess_cfg, transformers' preprocessor_config.json), else config's defaults (CLIP's)."""
  if kind == "open_clip":
    pp = fileio.read_json(os.path.join(path, "open_clip_config.json")).get("preprocess_cfg", {})
    mean, std = pp.get("mean"), pp.get("std")
  else:
    pp_path = os.path.join(path, HF_PREPROCESSOR)
    pp = fileio.read_json(pp_path) if fileio.exists(pp_path) else {}
    mean, std = pp.get("image_mean"), pp.get("image_std")
  if mean and std:
    config.data.update(mean=tuple(mean), std=tuple(std))


def _model(config, params, tokenizer, mesh, source, step) -> Model:
  graphdef, _, _ = two_tower.abstract_params(config.model, mesh)
  towers = towers_lib.Towers.build(config, tokenizer, graphdef, mesh)
  return Model(config, params, towers, source, step)
