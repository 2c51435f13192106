"""The caption-language table every source samples from: `config.data.languages` (language ->
weight) in a fixed order, so that sampling never depends on how the mapping was ordered or
serialized."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def language_table(languages: Mapping[str, float], order: Sequence[str] | None = None
                   ) -> tuple[tuple[str, ...], np.ndarray]:
  """(languages with a positive weight, their weights) in `order` (the embedded data's
  canonical order; a language outside it is an error), or sorted when `order` is None (file
  sources, whose languages are whatever the captions carry)."""
  weights_in = {lang: float(w) for lang, w in languages.items()}
  if any(w < 0 for w in weights_in.values()):
    raise ValueError(f"config.data.languages={dict(languages)} has a negative weight; weights "
                     "are non-negative with a positive sum.")
  if order is not None:
    unknown = sorted(set(weights_in) - set(order))
    if unknown:
      raise ValueError(f"config.data.languages names {unknown}, which the embedded dataset "
                       f"does not have; available: {tuple(order)}.")
  candidates = order if order is not None else sorted(weights_in)
  names = tuple(lang for lang in candidates if weights_in.get(lang, 0.0) > 0)
  if not names:
    raise ValueError(f"config.data.languages={dict(languages)} needs at least one language "
                     "with a positive weight.")
  return names, np.array([weights_in[lang] for lang in names], np.float64)
