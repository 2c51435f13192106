"""Vocabularies and grammar of the embedded dataset's captions, one block per language.

A caption describes a `Scene` (shape, colour, size, count and, for a single object, its
position). Each language writes its own noun phrases with the agreement its grammar needs --
German gender and case endings, French/Spanish gender and number, Russian counting
(два + genitive plural adjective + genitive singular noun), Arabic dual and non-human plural
(feminine singular adjectives, number polarity for 3), Hindi marked adjectives and oblique
case, Chinese/Japanese measure words and counters -- and several templates with different
word orders, so that the text tower has to learn the concepts rather than one string.

Every language also defines its zero-shot prompts: class names in the form that the prompt
templates need and that also occurs in the training captions (tests check both).

Indices follow `embedded.py`: shape (circle, square, triangle, cross, diamond), colour
(red, green, blue, yellow, purple, orange), size (small, large), count 1..3, position
(left, right, top, bottom, centre) or -1 when the caption must not mention one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Callable, Optional


@dataclasses.dataclass(frozen=True)
class Scene:
  shape: int
  colour: int
  size: int
  count: int  # 1, 2 or 3
  position: int  # index into POSITIONS, or -1: no position to mention


@dataclasses.dataclass(frozen=True)
class Language:
  # All captions that describe the whole scene; `size` is None when the caption omits it.
  full: Callable[[Scene, Optional[int]], list[str]]
  # Captions naming only the colour ([0]) or only the shape ([1], one vs several but no
  # number): weak captions close to what zero-shot prompts say, so a prompt naming one
  # attribute lands near the images.
  partial: Callable[[Scene], tuple[str, str]]
  # The shape noun alone, in the scene's number ("circles."): an alt-text-like caption whose
  # text embedding depends on the shape word alone, a clear shape target from step 0.
  bare_shape: Callable[[Scene], str]
  colour_names: tuple[str, ...]
  colour_templates: tuple[str, ...]
  shape_names: tuple[str, ...]
  shape_templates: tuple[str, ...]


def _cap(text: str) -> str:
  return text[:1].upper() + text[1:]


def _bare_noun(nouns: Sequence[tuple[str, str]], stop: str = ".",
               capitalize: bool = True) -> Callable[[Scene], str]:
  """`Language.bare_shape` from (singular, plural) nouns per shape."""
  def bare_shape(s: Scene) -> str:
    noun = nouns[s.shape][s.count > 1]
    return (_cap(noun) if capitalize else noun) + stop
  return bare_shape


# ----------------------------------------------------------------------------------------
# English
# ----------------------------------------------------------------------------------------
_EN_SHAPES = (("circle", "circles"), ("square", "squares"), ("triangle", "triangles"),
              ("cross", "crosses"), ("diamond", "diamonds"))
_EN_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
_EN_SIZES = ("small", "large")
_EN_COUNTS = ("", "two", "three")
_EN_POS = ("on the left", "on the right", "at the top", "at the bottom", "in the centre")


def _en_det(s: Scene, next_word: str) -> str:
  if s.count > 1:
    return _EN_COUNTS[s.count - 1]
  return "an" if next_word[0] in "aeiou" else "a"


def _en_np(s: Scene, size: Optional[int]) -> str:
  words = ([_EN_SIZES[size]] if size is not None else []) + [_EN_COLOURS[s.colour]]
  words.append(_EN_SHAPES[s.shape][s.count > 1])
  return " ".join([_en_det(s, words[0])] + words)


def _en_full(s: Scene, size: Optional[int]) -> list[str]:
  np_ = _en_np(s, size)
  noun = _EN_SHAPES[s.shape][s.count > 1]
  subject = f"the {noun}" if s.count == 1 else f"the {_EN_COUNTS[s.count - 1]} {noun}"
  be = "is" if s.count == 1 else "are"
  props = (f"{_EN_SIZES[size]} and " if size is not None else "") + _EN_COLOURS[s.colour]
  out = [f"{np_}.", f"a photo of {np_}.", f"an image with {np_}.",
         f"{np_} on a grey background.", f"{subject} {be} {props}."]
  if s.position >= 0:
    out += [f"there is {np_} {_EN_POS[s.position]}.",
            f"{np_} {_EN_POS[s.position]} of the image."]
  return out


def _en_partial(s: Scene) -> tuple[str, str]:
  colour = _EN_COLOURS[s.colour]
  thing = "thing" if s.count == 1 else "things"
  sg, pl = _EN_SHAPES[s.shape]
  shape = f"a {sg}" if s.count == 1 else pl
  return f"{_en_det(s, colour)} {colour} {thing}.", f"a drawing of {shape}."


ENGLISH = Language(
    full=_en_full, partial=_en_partial,
    bare_shape=_bare_noun(_EN_SHAPES, capitalize=False),  # English captions are lower case
    colour_names=_EN_COLOURS,
    colour_templates=("a photo of something {c}.", "something {c}.", "the object is {c}."),
    shape_names=tuple(sg for sg, _ in _EN_SHAPES),
    shape_templates=("a photo of a {c}.", "a {c}.", "a picture of a {c}."),
)

# ----------------------------------------------------------------------------------------
# German: adjective endings after ein/eine (nom. -er/-es/-e, dat. -en), strong plural after
# a numeral (nom. -e, dat. -en with dative-plural nouns).
# ----------------------------------------------------------------------------------------
# (gender, singular, plural, dative plural)
_DE_SHAPES = (("m", "Kreis", "Kreise", "Kreisen"), ("n", "Quadrat", "Quadrate", "Quadraten"),
              ("n", "Dreieck", "Dreiecke", "Dreiecken"), ("n", "Kreuz", "Kreuze", "Kreuzen"),
              ("f", "Raute", "Rauten", "Rauten"))
# 'lila' and 'orange' are not declined in standard German; 'violett' and 'orangefarben' are.
_DE_COLOURS = ("rot", "grün", "blau", "gelb", "violett", "orangefarben")
_DE_COLOUR_NOUNS = ("Rot", "Grün", "Blau", "Gelb", "Violett", "Orange")  # "etwas in Rot"
_DE_SIZES = ("klein", "groß")
_DE_COUNTS = ("", "zwei", "drei")
_DE_POS = ("Links", "Rechts", "Oben", "Unten", "In der Mitte")
_DE_NOM_SG = {"m": ("ein", "er", "der"), "n": ("ein", "es", "das"), "f": ("eine", "e", "die")}


def _de_np(s: Scene, size: Optional[int], case: str) -> str:
  gender, sg, pl, dat_pl = _DE_SHAPES[s.shape]
  stems = ([_DE_SIZES[size]] if size is not None else []) + [_DE_COLOURS[s.colour]]
  if s.count == 1:
    article, nom_ending, _ = _DE_NOM_SG[gender]
    if case == "dat":
      article, ending = ("einer" if gender == "f" else "einem"), "en"
    else:
      ending = nom_ending
    noun = sg
  else:
    article = _DE_COUNTS[s.count - 1]
    ending, noun = ("en", dat_pl) if case == "dat" else ("e", pl)
  return " ".join([article] + [stem + ending for stem in stems] + [noun])


def _de_full(s: Scene, size: Optional[int]) -> list[str]:
  gender, sg, pl, _ = _DE_SHAPES[s.shape]
  if s.count == 1:
    subject, be = f"{_DE_NOM_SG[gender][2]} {sg}", "ist"
    bare = f"{_DE_NOM_SG[gender][0]} {sg}"
  else:
    subject, be = f"die {_DE_COUNTS[s.count - 1]} {pl}", "sind"
    bare = f"{_DE_COUNTS[s.count - 1]} {pl}"
  props = (f"{_DE_SIZES[size]} und " if size is not None else "") + _DE_COLOURS[s.colour]
  nom = _de_np(s, size, "nom")
  out = [f"{_cap(nom)}.", f"Ein Foto mit {_de_np(s, size, 'dat')}.",
         f"{_cap(nom)} auf grauem Hintergrund.", f"{_cap(subject)} {be} {props}.",
         f"{_cap(bare)}, {_DE_SIZES[s.size]} und {_DE_COLOURS[s.colour]}."]
  if s.position >= 0:
    out.append(f"{_DE_POS[s.position]} ist {nom}.")
  return out


def _de_partial(s: Scene) -> tuple[str, str]:
  gender, sg, _, dat_pl = _DE_SHAPES[s.shape]
  with_shape = f"{'einer' if gender == 'f' else 'einem'} {sg}" if s.count == 1 else dat_pl
  return f"Etwas in {_DE_COLOUR_NOUNS[s.colour]}.", f"Ein Bild mit {with_shape}."


GERMAN = Language(
    full=_de_full, partial=_de_partial,
    bare_shape=_bare_noun([(sg, pl) for _, sg, pl, _ in _DE_SHAPES]),
    colour_names=_DE_COLOURS,
    colour_templates=("Ein Foto von etwas, das {c} ist.", "Das Objekt ist {c}.",
                      "Etwas, das {c} ist."),
    shape_names=tuple(f"{_DE_NOM_SG[g][0]} {sg}" for g, sg, _, _ in _DE_SHAPES),
    shape_templates=("Auf dem Bild ist {c}.", "Das ist {c}.", "Ein Foto: {c}."),
)

# ----------------------------------------------------------------------------------------
# French: size before the noun, colour after, both agree in gender and number;
# 'croix' is invariable in the plural, 'orange' is an invariable colour.
# ----------------------------------------------------------------------------------------
_FR_SHAPES = (("m", "cercle", "cercles"), ("m", "carré", "carrés"),
              ("m", "triangle", "triangles"), ("f", "croix", "croix"),
              ("m", "losange", "losanges"))
# (masc. sg, fem. sg, masc. pl, fem. pl)
_FR_COLOURS = (("rouge", "rouge", "rouges", "rouges"), ("vert", "verte", "verts", "vertes"),
               ("bleu", "bleue", "bleus", "bleues"), ("jaune", "jaune", "jaunes", "jaunes"),
               ("violet", "violette", "violets", "violettes"),
               ("orange", "orange", "orange", "orange"))
_FR_SIZES = (("petit", "petite", "petits", "petites"), ("grand", "grande", "grands", "grandes"))
_FR_COUNTS = ("", "deux", "trois")
_FR_POS = ("à gauche", "à droite", "en haut", "en bas", "au centre")


def _romance_form(shapes: tuple, s: Scene) -> int:
  """Index into the (masc. sg, fem. sg, masc. pl, fem. pl) forms of French/Spanish words."""
  return int(shapes[s.shape][0] == "f") + 2 * int(s.count > 1)


def _romance_det_noun(shapes: tuple, s: Scene, one: tuple[str, str],
                      counts: tuple[str, ...]) -> tuple[str, str]:
  """(article or numeral, noun in the right number); `one` = (masc., fem.) 'a'."""
  gender, sg, pl = shapes[s.shape]
  if s.count == 1:
    return one[gender == "f"], sg
  return counts[s.count - 1], pl


def _fr_form(s: Scene) -> int:
  return _romance_form(_FR_SHAPES, s)


def _fr_det_noun(s: Scene) -> tuple[str, str]:
  return _romance_det_noun(_FR_SHAPES, s, ("un", "une"), _FR_COUNTS)


def _fr_de(phrase: str) -> str:
  """'de' + phrase, elided before a vowel: d'un cercle, d'orange, de deux cercles."""
  return f"d'{phrase}" if phrase[0] in "aeiouy" else f"de {phrase}"


def _fr_np(s: Scene, size: Optional[int]) -> str:
  det, noun = _fr_det_noun(s)
  form = _fr_form(s)
  words = [det] + ([_FR_SIZES[size][form]] if size is not None else [])
  return " ".join(words + [noun, _FR_COLOURS[s.colour][form]])


def _fr_full(s: Scene, size: Optional[int]) -> list[str]:
  form = _fr_form(s)
  _, noun = _fr_det_noun(s)
  if s.count == 1:
    subject, be = f"{'la' if form == 1 else 'le'} {noun}", "est"
  else:
    subject, be = f"les {_FR_COUNTS[s.count - 1]} {noun}", "sont"
  props = ((f"{_FR_SIZES[size][form]} et " if size is not None else "")
           + _FR_COLOURS[s.colour][form])
  np_ = _fr_np(s, size)
  out = [f"{_cap(np_)}.", f"Une photo {_fr_de(np_)}.", f"{_cap(np_)} sur un fond gris.",
         f"{_cap(subject)} {be} {props}."]
  if s.position >= 0:
    out.append(f"Il y a {np_} {_FR_POS[s.position]}.")
  return out


def _fr_partial(s: Scene) -> tuple[str, str]:
  det, noun = _fr_det_noun(s)
  shape = f"{det} {noun}" if s.count == 1 else noun  # "d'un cercle", "de cercles"
  return (f"Quelque chose {_fr_de(_FR_COLOURS[s.colour][0])}.", f"Un dessin {_fr_de(shape)}.")


FRENCH = Language(
    full=_fr_full, partial=_fr_partial,
    bare_shape=_bare_noun([(sg, pl) for _, sg, pl in _FR_SHAPES]),
    colour_names=tuple(c[0] for c in _FR_COLOURS),
    # No 'de {c}' here: 'orange' would need the elided "d'orange".
    colour_templates=("Une photo d'un objet {c}.", "Un objet {c}.", "C'est un objet {c}."),
    shape_names=tuple(f"{'une' if g == 'f' else 'un'} {sg}" for g, sg, _ in _FR_SHAPES),
    shape_templates=("Sur l'image, il y a {c}.", "C'est {c}.", "Une image montrant {c}."),
)

# ----------------------------------------------------------------------------------------
# Spanish: noun, colour, size -- all agree; 'naranja' used as an invariable colour.
# ----------------------------------------------------------------------------------------
_ES_SHAPES = (("m", "círculo", "círculos"), ("m", "cuadrado", "cuadrados"),
              ("m", "triángulo", "triángulos"), ("f", "cruz", "cruces"),
              ("m", "rombo", "rombos"))
_ES_COLOURS = (("rojo", "roja", "rojos", "rojas"), ("verde", "verde", "verdes", "verdes"),
               ("azul", "azul", "azules", "azules"),
               ("amarillo", "amarilla", "amarillos", "amarillas"),
               ("morado", "morada", "morados", "moradas"),
               ("naranja", "naranja", "naranja", "naranja"))
_ES_SIZES = (("pequeño", "pequeña", "pequeños", "pequeñas"),
             ("grande", "grande", "grandes", "grandes"))
_ES_COUNTS = ("", "dos", "tres")
_ES_POS = ("a la izquierda", "a la derecha", "arriba", "abajo", "en el centro")


def _es_form(s: Scene) -> int:
  return _romance_form(_ES_SHAPES, s)


def _es_det_noun(s: Scene) -> tuple[str, str]:
  return _romance_det_noun(_ES_SHAPES, s, ("un", "una"), _ES_COUNTS)


def _es_np(s: Scene, size: Optional[int]) -> str:
  det, noun = _es_det_noun(s)
  form = _es_form(s)
  words = [det, noun, _ES_COLOURS[s.colour][form]]
  return " ".join(words + ([_ES_SIZES[size][form]] if size is not None else []))


def _es_full(s: Scene, size: Optional[int]) -> list[str]:
  form = _es_form(s)
  _, noun = _es_det_noun(s)
  article = ("el", "la", "los", "las")[form]
  if s.count == 1:
    subject, be = f"{article} {noun}", "es"
  else:
    subject, be = f"{article} {_ES_COUNTS[s.count - 1]} {noun}", "son"
  props = ((f"{_ES_SIZES[size][form]} y " if size is not None else "")
           + _ES_COLOURS[s.colour][form])
  np_ = _es_np(s, size)
  out = [f"{_cap(np_)}.", f"Una foto de {np_}.", f"{_cap(np_)} sobre un fondo gris.",
         f"{_cap(subject)} {be} {props}."]
  if s.position >= 0:
    out.append(f"Hay {np_} {_ES_POS[s.position]}.")
  return out


def _es_partial(s: Scene) -> tuple[str, str]:
  det, noun = _es_det_noun(s)
  shape = f"{det} {noun}" if s.count == 1 else noun
  return f"Algo de color {_ES_COLOURS[s.colour][0]}.", f"Una imagen de {shape}."


SPANISH = Language(
    full=_es_full, partial=_es_partial,
    bare_shape=_bare_noun([(sg, pl) for _, sg, pl in _ES_SHAPES]),
    colour_names=tuple(c[0] for c in _ES_COLOURS),
    colour_templates=("Una foto de algo {c}.", "Un objeto {c}.", "Algo {c}."),
    shape_names=tuple(f"{'una' if g == 'f' else 'un'} {sg}" for g, sg, _ in _ES_SHAPES),
    shape_templates=("Una foto de {c}.", "En la imagen hay {c}.", "Es {c}."),
)

# ----------------------------------------------------------------------------------------
# Russian: all five shape nouns are masculine. After два/три: genitive plural adjectives
# and genitive singular noun; instrumental after "с".
# ----------------------------------------------------------------------------------------
# (nom. sg, gen. sg, instr. sg, nom. pl, instr. pl)
_RU_SHAPES = (("круг", "круга", "кругом", "круги", "кругами"),
              ("квадрат", "квадрата", "квадратом", "квадраты", "квадратами"),
              ("треугольник", "треугольника", "треугольником", "треугольники",
               "треугольниками"),
              ("крест", "креста", "крестом", "кресты", "крестами"),
              ("ромб", "ромба", "ромбом", "ромбы", "ромбами"))
# (nom. sg masc., gen. pl, instr. sg masc., nom. pl, instr. pl)
_RU_COLOURS = (("красный", "красных", "красным", "красные", "красными"),
               ("зелёный", "зелёных", "зелёным", "зелёные", "зелёными"),
               ("синий", "синих", "синим", "синие", "синими"),
               ("жёлтый", "жёлтых", "жёлтым", "жёлтые", "жёлтыми"),
               ("фиолетовый", "фиолетовых", "фиолетовым", "фиолетовые", "фиолетовыми"),
               ("оранжевый", "оранжевых", "оранжевым", "оранжевые", "оранжевыми"))
_RU_SIZES = (("маленький", "маленьких", "маленьким", "маленькие", "маленькими"),
             ("большой", "больших", "большим", "большие", "большими"))
_RU_COUNTS = (("", ""), ("два", "двумя"), ("три", "тремя"))  # (nominative, instrumental)
_RU_POS = ("Слева", "Справа", "Сверху", "Снизу", "В центре")


def _ru_np(s: Scene, size: Optional[int], case: str) -> str:
  adjectives = ([_RU_SIZES[size]] if size is not None else []) + [_RU_COLOURS[s.colour]]
  noun = _RU_SHAPES[s.shape]
  if case == "nom":
    # Singular: nominative; 2-3: genitive plural adjective + genitive singular noun.
    a, n = (0, 0) if s.count == 1 else (1, 1)
  else:
    a, n = (2, 2) if s.count == 1 else (4, 4)
  count = _RU_COUNTS[s.count - 1][case == "ins"]
  words = ([count] if count else []) + [adj[a] for adj in adjectives] + [noun[n]]
  return " ".join(words)


def _ru_full(s: Scene, size: Optional[int]) -> list[str]:
  nom = _ru_np(s, size, "nom")
  if s.count == 1:
    props = ((f"{_RU_SIZES[size][0]} и " if size is not None else "")
             + _RU_COLOURS[s.colour][0])
    predicate = f"{_cap(_RU_SHAPES[s.shape][0])} {props}."
  else:
    props = ((f"{_RU_SIZES[size][3]} и " if size is not None else "")
             + _RU_COLOURS[s.colour][3])
    every = "оба" if s.count == 2 else "все"
    predicate = (f"На картинке {_RU_COUNTS[s.count - 1][0]} {_RU_SHAPES[s.shape][1]}, "
                 f"{every} {props}.")
  out = [f"{_cap(nom)}.", f"Фотография с {_ru_np(s, size, 'ins')}.",
         f"{_cap(nom)} на сером фоне.", predicate]
  if s.position >= 0:
    out.append(f"{_RU_POS[s.position]} {nom}.")
  return out


def _ru_partial(s: Scene) -> tuple[str, str]:
  if s.count == 1:
    return (f"Этот предмет {_RU_COLOURS[s.colour][0]}.",
            f"Картинка с {_RU_SHAPES[s.shape][2]}.")
  return f"Эти предметы {_RU_COLOURS[s.colour][3]}.", f"Картинка с {_RU_SHAPES[s.shape][4]}."


RUSSIAN = Language(
    full=_ru_full, partial=_ru_partial,
    bare_shape=_bare_noun([(n[0], n[3]) for n in _RU_SHAPES]),
    colour_names=tuple(c[0] for c in _RU_COLOURS),
    colour_templates=("На фото {c} предмет.", "Это {c} объект.", "Цвет предмета: {c}."),
    shape_names=tuple(n[0] for n in _RU_SHAPES),
    shape_templates=("На фото {c}.", "Это {c}.", "Изображение: {c}."),
)

# ----------------------------------------------------------------------------------------
# Chinese: numeral + measure word 个 (两 before a measure word), colour + 的, size + noun.
# ----------------------------------------------------------------------------------------
_ZH_SHAPES = ("圆形", "正方形", "三角形", "十字形", "菱形")
_ZH_COLOURS = ("红色", "绿色", "蓝色", "黄色", "紫色", "橙色")
_ZH_SIZES = ("小", "大")
_ZH_COUNTS = ("一", "两", "三")
_ZH_POS = ("左边", "右边", "上方", "下方", "中间")


def _zh_np(s: Scene, size: Optional[int]) -> str:
  size_word = _ZH_SIZES[size] if size is not None else ""
  return f"{_ZH_COUNTS[s.count - 1]}个{_ZH_COLOURS[s.colour]}的{size_word}{_ZH_SHAPES[s.shape]}"


def _zh_full(s: Scene, size: Optional[int]) -> list[str]:
  np_ = _zh_np(s, size)
  this = "这个" if s.count == 1 else f"这{_ZH_COUNTS[s.count - 1]}个"
  size_part = f"，很{_ZH_SIZES[size]}" if size is not None else ""
  out = [f"{np_}。", f"照片里有{np_}。", f"灰色背景上有{np_}。",
         f"{this}{_ZH_SHAPES[s.shape]}是{_ZH_COLOURS[s.colour]}的{size_part}。"]
  if s.position >= 0:
    out += [f"{_ZH_POS[s.position]}有{np_}。", f"画面{_ZH_POS[s.position]}有{np_}。"]
  return out


def _zh_partial(s: Scene) -> tuple[str, str]:
  count = _ZH_COUNTS[s.count - 1]
  several = "一个" if s.count == 1 else "几个"  # 几个: "several"
  return f"{count}个{_ZH_COLOURS[s.colour]}的东西。", f"图中有{several}{_ZH_SHAPES[s.shape]}。"


CHINESE = Language(
    full=_zh_full, partial=_zh_partial,
    bare_shape=_bare_noun([(n, n) for n in _ZH_SHAPES], "。"),
    colour_names=_ZH_COLOURS,
    colour_templates=("一张{c}物体的照片。", "一个{c}的物体。", "这个东西是{c}的。"),
    shape_names=_ZH_SHAPES,
    shape_templates=("一张{c}的照片。", "这是一个{c}。", "一幅{c}的图画。"),
)

# ----------------------------------------------------------------------------------------
# Japanese: attributive adjectives (赤い / 緑の), counter つ, topic/location particles.
# ----------------------------------------------------------------------------------------
_JA_SHAPES = ("円", "正方形", "三角形", "十字", "ひし形")
_JA_COLOURS = ("赤い", "緑の", "青い", "黄色い", "紫の", "オレンジ色の")  # attributive
_JA_COLOUR_NOUNS = ("赤", "緑", "青", "黄色", "紫", "オレンジ色")
_JA_SIZES = ("小さな", "大きな")
_JA_SIZES_ADVERBIAL = ("小さく", "大きく")
_JA_COUNTS = ("一つ", "二つ", "三つ")
_JA_POS = ("左側", "右側", "上部", "下部", "中央")


def _ja_bare_np(s: Scene, size: Optional[int]) -> str:
  size_word = _JA_SIZES[size] if size is not None else ""
  return f"{size_word}{_JA_COLOURS[s.colour]}{_JA_SHAPES[s.shape]}"


def _ja_full(s: Scene, size: Optional[int]) -> list[str]:
  bare = _ja_bare_np(s, size)
  counted_prefix = "" if s.count == 1 else f"{_JA_COUNTS[s.count - 1]}の"
  counted = counted_prefix + bare
  shape = counted_prefix + _JA_SHAPES[s.shape]
  colour = _JA_COLOUR_NOUNS[s.colour]
  if size is not None:
    predicate = f"{shape}は{_JA_SIZES_ADVERBIAL[size]}、色は{colour}です。"
  else:
    predicate = f"{shape}の色は{colour}です。"
  out = [f"{counted}。", f"{counted}の写真。",
         f"灰色の背景に{bare}が{_JA_COUNTS[s.count - 1]}あります。", predicate]
  if s.position >= 0:
    out.append(f"画像の{_JA_POS[s.position]}に{bare}があります。")
  return out


def _ja_partial(s: Scene) -> tuple[str, str]:
  several = "一つ" if s.count == 1 else "いくつか"  # いくつか: "several"
  return f"何か{_JA_COLOURS[s.colour]}もの。", f"{_JA_SHAPES[s.shape]}が{several}あります。"


JAPANESE = Language(
    full=_ja_full, partial=_ja_partial,
    bare_shape=_bare_noun([(n, n) for n in _JA_SHAPES], "。"),
    colour_names=_JA_COLOURS,
    colour_templates=("{c}ものの写真。", "{c}物体。", "これは{c}ものです。"),
    shape_names=_JA_SHAPES,
    shape_templates=("{c}の写真。", "これは{c}です。", "{c}の絵。"),
)

# ----------------------------------------------------------------------------------------
# Arabic: adjectives follow the noun and agree; dual nouns take dual adjectives; plurals of
# non-human nouns take feminine singular adjectives; 3 takes the opposite gender of the
# singular noun (ثلاث دوائر, ثلاثة مربعات). Only nominative constructions are used, so the
# dual endings never change case.
# ----------------------------------------------------------------------------------------
# (gender, singular, dual nominative, plural)
_AR_SHAPES = (("f", "دائرة", "دائرتان", "دوائر"), ("m", "مربع", "مربعان", "مربعات"),
              ("m", "مثلث", "مثلثان", "مثلثات"), ("m", "صليب", "صليبان", "صلبان"),
              ("m", "معين", "معينان", "معينات"))
# (masc. sg, fem. sg, masc. dual, fem. dual)
_AR_COLOURS = (("أحمر", "حمراء", "أحمران", "حمراوان"), ("أخضر", "خضراء", "أخضران", "خضراوان"),
               ("أزرق", "زرقاء", "أزرقان", "زرقاوان"), ("أصفر", "صفراء", "أصفران", "صفراوان"),
               ("بنفسجي", "بنفسجية", "بنفسجيان", "بنفسجيتان"),
               ("برتقالي", "برتقالية", "برتقاليان", "برتقاليتان"))
_AR_SIZES = (("صغير", "صغيرة", "صغيران", "صغيرتان"), ("كبير", "كبيرة", "كبيران", "كبيرتان"))
_AR_POS = ("على اليسار", "على اليمين", "في الأعلى", "في الأسفل", "في الوسط")


def _ar_form(s: Scene) -> int:
  """Which adjective form agrees with the noun phrase."""
  feminine = _AR_SHAPES[s.shape][0] == "f"
  if s.count == 2:
    return 3 if feminine else 2
  if s.count == 3:
    return 1  # non-human plural: feminine singular
  return 1 if feminine else 0


def _ar_noun(s: Scene, definite: bool = False) -> str:
  gender, sg, dual, pl = _AR_SHAPES[s.shape]
  prefix = "ال" if definite else ""
  if s.count < 3:
    return prefix + (sg if s.count == 1 else dual)
  three = "ثلاث" if gender == "f" else "ثلاثة"  # number polarity
  return f"{prefix}{pl} {prefix}{three}" if definite else f"{three} {pl}"


def _ar_np(s: Scene, size: Optional[int]) -> str:
  form = _ar_form(s)
  adjectives = ([_AR_SIZES[size][form]] if size is not None else [])
  return " ".join([_ar_noun(s)] + adjectives + [_AR_COLOURS[s.colour][form]])


def _ar_full(s: Scene, size: Optional[int]) -> list[str]:
  form = _ar_form(s)
  props = ((f"{_AR_SIZES[size][form]} و" if size is not None else "")
           + _AR_COLOURS[s.colour][form])
  np_ = _ar_np(s, size)
  out = [f"{np_}.", f"في الصورة {np_}.", f"{np_} على خلفية رمادية.",
         f"{_ar_noun(s, definite=True)} {props}."]
  if s.position >= 0:
    out.append(f"هناك {np_} {_AR_POS[s.position]}.")
  return out


def _ar_partial(s: Scene) -> tuple[str, str]:
  _, sg, _, pl = _AR_SHAPES[s.shape]
  return f"شيء {_AR_COLOURS[s.colour][0]}.", f"صورة فيها {sg if s.count == 1 else pl}."


ARABIC = Language(
    full=_ar_full, partial=_ar_partial,
    bare_shape=_bare_noun([(sg, pl) for _, sg, _, pl in _AR_SHAPES]),
    colour_names=tuple(c[0] for c in _AR_COLOURS),
    colour_templates=("صورة لشيء {c}.", "شيء {c}.", "جسم {c} اللون."),
    shape_names=tuple(sg for _, sg, _, _ in _AR_SHAPES),
    shape_templates=("صورة {c}.", "في الصورة {c}.", "هناك {c} في الصورة."),
)

# ----------------------------------------------------------------------------------------
# Hindi: all five shape nouns are unmarked masculine; marked adjectives (-ा) take -े in the
# plural and the oblique case; the oblique plural noun takes -ों before a postposition.
# ----------------------------------------------------------------------------------------
_HI_SHAPES = ("वृत्त", "वर्ग", "त्रिभुज", "क्रॉस", "समचतुर्भुज")
# (direct singular, plural or oblique)
_HI_COLOURS = (("लाल", "लाल"), ("हरा", "हरे"), ("नीला", "नीले"), ("पीला", "पीले"),
               ("बैंगनी", "बैंगनी"), ("नारंगी", "नारंगी"))
_HI_SIZES = (("छोटा", "छोटे"), ("बड़ा", "बड़े"))
_HI_COUNTS = ("एक", "दो", "तीन")
_HI_ALL_OF = ("", "दोनों", "तीनों")
_HI_POS = ("बाईं ओर", "दाईं ओर", "ऊपर", "नीचे", "बीच में")


def _hi_np(s: Scene, size: Optional[int], oblique: bool) -> str:
  form = int(s.count > 1 or oblique)
  adjectives = ([_HI_SIZES[size]] if size is not None else []) + [_HI_COLOURS[s.colour]]
  noun = _HI_SHAPES[s.shape] + ("ों" if oblique and s.count > 1 else "")
  return " ".join([_HI_COUNTS[s.count - 1]] + [a[form] for a in adjectives] + [noun])


def _hi_full(s: Scene, size: Optional[int]) -> list[str]:
  form = int(s.count > 1)
  be = "है" if s.count == 1 else "हैं"
  props = ((f"{_HI_SIZES[size][form]} और " if size is not None else "")
           + _HI_COLOURS[s.colour][form])
  subject = _HI_SHAPES[s.shape]
  if s.count > 1:
    subject = f"{_HI_ALL_OF[s.count - 1]} {subject}"  # दोनों / तीनों: both / all three
  direct = _hi_np(s, size, oblique=False)
  out = [f"{direct}।", f"{_hi_np(s, size, oblique=True)} की तस्वीर।",
         f"धूसर पृष्ठभूमि पर {direct} {be}।", f"{subject} {props} {be}।"]
  if s.position >= 0:
    out.append(f"{_HI_POS[s.position]} {direct} {be}।")
  return out


def _hi_partial(s: Scene) -> tuple[str, str]:
  shape = (f"एक {_HI_SHAPES[s.shape]} है" if s.count == 1
           else f"कई {_HI_SHAPES[s.shape]} हैं")  # कई: "several"
  return (f"{_HI_COLOURS[s.colour][1]} रंग का आकार।",  # oblique before रंग का
          f"तस्वीर में {shape}।")


HINDI = Language(
    full=_hi_full, partial=_hi_partial,
    bare_shape=_bare_noun([(n, n) for n in _HI_SHAPES], "।"),
    colour_names=tuple(c[0] for c in _HI_COLOURS),
    colour_templates=("एक {c} आकार।", "यह आकार {c} है।", "तस्वीर में एक {c} आकार है।"),
    shape_names=_HI_SHAPES,
    shape_templates=("एक {c} की तस्वीर।", "यह एक {c} है।", "तस्वीर में एक {c} है।"),
)

LANGUAGES: dict[str, Language] = {
    "en": ENGLISH, "de": GERMAN, "fr": FRENCH, "es": SPANISH, "ru": RUSSIAN,
    "zh": CHINESE, "ja": JAPANESE, "ar": ARABIC, "hi": HINDI,
}
