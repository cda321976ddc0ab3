"""Prompt adherence for the tiny profile: does the generated shape have the colour the prompt names?

For each image:

1. Background colour = the per-channel median of the image's outer ring (1/16 of the side, at least 1 px).
   Synthetic shapes never touch the border (``render_shape`` keeps them inside), so the ring is background.
   If fewer than ``min_plain_border`` of the ring's pixels lie within ``fg_threshold`` of that colour, the
   image has no plain background (noise, texture): no colour.
2. Foreground = pixels farther than ``fg_threshold`` (RGB Euclidean, 0-255 scale) from that colour. A
   foreground covering more than ``max_fg_share`` of the image is not a shape on a background: no colour.
3. Of the foreground pixels, keep the chromatic ones (HSV saturation ≥ ``min_saturation`` and value ≥
   ``min_value``): every background in the synthetic set (white, black, gray) is achromatic, so the anti-aliased
   edges and a grey/black/white cast drop out.
4. Each kept pixel votes for the palette colour with the nearest hue (circular distance); the dominant colour is
   the winner if it has at least ``min_vote_share`` of the votes (a multi-coloured blob has no dominant colour).
   Fewer than ``min_pixels`` kept pixels → no colour.

"No colour" (``None``) counts as a miss, so an untrained model's noise scores 0, not chance.

Hue rather than RGB distance because a briefly trained model gets a colour's hue right long before its exact
shade and brightness (a dark red is still red, a dull green is still green), and because the tiny VAE's
colour errors are mostly in saturation and brightness (DESIGN.md section 4).

The score is the share of images whose dominant colour equals the colour word in the prompt; chance level is
1 / number of colours (0.25 for the 4-colour synthetic palette).
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from sd_core.data.synthetic import COLORS


def default_palette() -> dict[str, tuple[int, int, int]]:
    return dict(COLORS)


def _hues(palette: Mapping[str, tuple[int, int, int]]) -> tuple[list[str], np.ndarray]:
    names = list(palette)
    hues = np.array([colorsys.rgb_to_hsv(*(np.asarray(palette[n], dtype=float) / 255.0))[0] for n in names])
    return names, hues


def _rgb_to_hsv(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised RGB (…, 3) in [0, 1] → (h, s, v), h in [0, 1)."""
    r, g, b = arr[..., 0], arr[..., 1], arr[..., 2]
    mx, mn = arr.max(-1), arr.min(-1)
    d = mx - mn
    s = np.where(mx > 0, d / np.maximum(mx, 1e-12), 0.0)
    dd = np.maximum(d, 1e-12)
    h = np.where(mx == r, ((g - b) / dd) % 6, np.where(mx == g, (b - r) / dd + 2, (r - g) / dd + 4)) / 6.0
    h = np.where(d > 0, h, 0.0)
    return h % 1.0, s, mx


def _ring(arr: np.ndarray) -> np.ndarray:
    """The pixels of the image's outer ring (1/16 of the side, at least 1 px), (N, 3)."""
    h, w = arr.shape[:2]
    k = max(1, min(h, w) // 16)
    return np.concatenate([arr[:k].reshape(-1, 3), arr[-k:].reshape(-1, 3),
                           arr[:, :k].reshape(-1, 3), arr[:, -k:].reshape(-1, 3)])


def background_colour(arr: np.ndarray) -> np.ndarray:
    """Per-channel median of the image's outer ring (H, W, 3) → (3,)."""
    return np.median(_ring(np.asarray(arr, dtype=np.float32)), axis=0)


def dominant_colour(
    image: Image.Image | np.ndarray,
    palette: Mapping[str, tuple[int, int, int]] | None = None,
    fg_threshold: float = 60.0,
    min_saturation: float = 0.35,
    min_value: float = 0.2,
    min_pixels: int = 8,
    min_plain_border: float = 0.6,
    max_fg_share: float = 0.85,
    min_vote_share: float = 0.6,
) -> str | None:
    """The palette colour (by hue) of the shape that stands out from a plain background, or None (see the
    module docstring for the steps and thresholds)."""
    palette = palette or default_palette()
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    ring = _ring(arr)
    bg = np.median(ring, axis=0)
    if (np.sqrt(((ring - bg) ** 2).sum(-1)) <= fg_threshold).mean() < min_plain_border:
        return None
    fg = np.sqrt(((arr - bg) ** 2).sum(-1)) > fg_threshold
    if fg.sum() < min_pixels or fg.mean() > max_fg_share:
        return None
    h, s, v = _rgb_to_hsv(arr[fg] / 255.0)
    keep = (s >= min_saturation) & (v >= min_value)
    if keep.sum() < min_pixels:
        return None
    names, hues = _hues(palette)
    dist = np.abs(h[keep][:, None] - hues[None, :])
    dist = np.minimum(dist, 1.0 - dist)
    votes = np.bincount(dist.argmin(1), minlength=len(names))
    best = int(votes.argmax())
    if votes[best] < min_vote_share * votes.sum():
        return None
    return names[best]


def prompt_colour(prompt: str, palette: Mapping[str, tuple[int, int, int]] | None = None) -> str | None:
    """The first palette colour word in ``prompt`` (e.g. "red" in "a red circle on a white background")."""
    palette = palette or default_palette()
    for word in prompt.lower().replace(",", " ").split():
        if word in palette:
            return word
    return None


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
