"""Prompt adherence for the tiny profile: does the generated shape have the colour the prompt names?

The colour reading itself is `sd_core.evaluation.prompt_scorer` (one implementation for this score and the
`checkpoint_eval` asset's colour / shape / background accuracies; its module docstring gives the steps and
thresholds). This module keeps the colour-only score `sample_grid` reports: the share of images whose
dominant colour equals the colour word in the prompt, chance level 1 / number of colours (0.25 for the
4-colour synthetic palette). "No colour" (``None``) counts as a miss, so an untrained model's noise scores 0.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from sd_core.data.synthetic import COLORS
from sd_core.evaluation.prompt_scorer import DEFAULT_SETTINGS, background_colour, parse_prompt, read_colour

__all__ = ["AdherenceResult", "adherence", "background_colour", "default_palette", "dominant_colour",
           "prompt_colour"]


def default_palette() -> dict[str, tuple[int, int, int]]:
    return dict(COLORS)


def dominant_colour(
    image: Image.Image | np.ndarray,
    palette: Mapping[str, tuple[int, int, int]] | None = None,
    **thresholds: float,
) -> str | None:
    """The palette colour (by hue) of the shape that stands out from a plain background, or None.
    ``thresholds``: fields of `sd_core.evaluation.prompt_scorer.ScorerSettings` (e.g. ``fg_threshold=60``)."""
    settings = dataclasses.replace(DEFAULT_SETTINGS, **thresholds) if thresholds else DEFAULT_SETTINGS
    return read_colour(image, settings, palette or default_palette())


def prompt_colour(prompt: str, palette: Mapping[str, tuple[int, int, int]] | None = None) -> str | None:
    """The first palette colour word in ``prompt`` (e.g. "red" in "a red circle on a white background")."""
    return parse_prompt(prompt, palette or default_palette()).colour


@dataclass
class AdherenceResult:
    score: float  # share of scored images whose dominant colour matches the prompt
    n: int  # images scored (prompts naming a palette colour)
    chance: float  # 1 / number of palette colours
    predicted: list[str | None] = field(default_factory=list)
    expected: list[str | None] = field(default_factory=list)

    @property
    def above_chance(self) -> bool:
        return self.score > self.chance

    def as_metadata(self) -> dict[str, float | int]:
        return {"adherence": round(self.score, 4), "adherence_n": self.n, "adherence_chance": round(self.chance, 4)}


def adherence(
    images: Sequence[Image.Image | np.ndarray],
    prompts: Sequence[str],
    palette: Mapping[str, tuple[int, int, int]] | None = None,
) -> AdherenceResult:
    """Score ``images`` against the colour words of ``prompts`` (same length). Prompts naming no palette colour
    are skipped; with none left the score is NaN."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    palette = palette or default_palette()
    expected = [prompt_colour(p, palette) for p in prompts]
    predicted = [dominant_colour(img, palette) if exp else None for img, exp in zip(images, expected)]
    scored = [(p, e) for p, e in zip(predicted, expected) if e is not None]
    score = float(np.mean([p == e for p, e in scored])) if scored else float("nan")
    return AdherenceResult(score=score, n=len(scored), chance=1.0 / len(palette), predicted=predicted,
                           expected=expected)
