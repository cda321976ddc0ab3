"""Prompt accuracy for the tiny profile: colour, shape and background read off the generated pixels.

Every synthetic image is one shape of one palette colour on a plain achromatic background
(`sd_core.data.synthetic`), and never touches the border. So, per image:

1. **Background** = the per-channel median of the outer ring (1/16 of the side, at least 1 px), named by the
   nearest `BACKGROUNDS` colour (RGB). If fewer than ``min_plain_border`` of the ring's pixels lie within
   ``fg_threshold`` of that median, there is no plain background (noise, texture): nothing is read.
2. **Foreground** = pixels farther than ``fg_threshold`` (RGB Euclidean, 0-255) from the background. Fewer
   than ``min_pixels`` of them, or more than ``max_fg_share`` of the image: no shape and no colour.
3. **Colour**: the foreground's chromatic pixels (HSV saturation ≥ ``min_saturation``, value ≥ ``min_value``;
   the achromatic backgrounds and anti-aliased edges drop out) each vote for the palette colour of nearest
   hue; the winner needs ``min_vote_share`` of the votes. Hue, not RGB, because a briefly trained model and
   the tiny VAE get hue right long before saturation and brightness (DESIGN.md section 4).
4. **Shape**: the largest connected foreground component, cut at half the image's contrast (the 50 % crossing
   of anti-aliased edges, so the mask's area is the shape's), and its *bounding-box fill ratio*: area /
   box area = 1 for a square, π/4 ≈ 0.785 for a circle, 1/2 for a triangle. Thresholds sit between the
   ranges measured on true renders (triangle 0.49-0.54, circle 0.76-0.82, square 0.95-1.0 at 64 px).
   A component touching the border is not a synthetic shape: no shape.

Anything not read (``None``) counts as a miss, so an untrained model's noise scores 0, not chance. Chance
levels are 1 / number of values per attribute, and their product for the whole prompt.

The scorers are calibrated by :func:`calibrate`: on true renders of every (colour, shape, background) each
attribute must score ≥ 0.99 (a test), and on the tiny VAE's reconstructions of the same renders, the ceiling a
model decoded by that VAE can reach; both are reported next to a checkpoint's scores.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from sd_core.data.synthetic import BACKGROUNDS, COLORS, SHAPES, caption, render_shape

ATTRIBUTES = ("colour", "shape", "background")


@dataclass(frozen=True)
class ScorerSettings:
    """The thresholds of the steps in the module docstring."""

    fg_threshold: float = 60.0
    min_saturation: float = 0.35
    min_value: float = 0.2
    min_pixels: int = 8
    min_plain_border: float = 0.6
    max_fg_share: float = 0.85
    min_vote_share: float = 0.6
    max_triangle_fill: float = 0.66  # fill ratio below this: triangle
    min_square_fill: float = 0.90  # at or above this: square; in between: circle


DEFAULT_SETTINGS = ScorerSettings()


@dataclass(frozen=True)
class Reading:
    """What one image shows; ``None`` where it could not be read."""

    colour: str | None
    shape: str | None
    background: str | None
    fill_ratio: float | None = None


@dataclass(frozen=True)
class PromptTarget:
    """What a prompt asks for: its first colour, shape and background words (``None`` where it names none)."""

    colour: str | None
    shape: str | None
    background: str | None


# ------------------------------------------------------------------------------------------ pixels
def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    return np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)


def _ring(arr: np.ndarray) -> np.ndarray:
    """The pixels of the image's outer ring (1/16 of the side, at least 1 px), (N, 3)."""
    h, w = arr.shape[:2]
    k = max(1, min(h, w) // 16)
    return np.concatenate([arr[:k].reshape(-1, 3), arr[-k:].reshape(-1, 3),
                           arr[:, :k].reshape(-1, 3), arr[:, -k:].reshape(-1, 3)])


def background_colour(arr: np.ndarray) -> np.ndarray:
    """Per-channel median of the image's outer ring (H, W, 3) → (3,)."""
    return np.median(_ring(np.asarray(arr, dtype=np.float32)), axis=0)


def _plain_background(arr: np.ndarray, s: ScorerSettings) -> np.ndarray | None:
    """The background colour, or None when the ring is not one plain colour."""
    ring = _ring(arr)
    bg = np.median(ring, axis=0)
    if (np.sqrt(((ring - bg) ** 2).sum(-1)) <= s.fg_threshold).mean() < s.min_plain_border:
        return None
    return bg


def _nearest_name(rgb: np.ndarray, palette: Mapping[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    ref = np.asarray([palette[n] for n in names], dtype=np.float32)
    return names[int(np.argmin(((ref - rgb) ** 2).sum(-1)))]


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


def _colour_of(arr: np.ndarray, fg: np.ndarray, s: ScorerSettings,
               palette: Mapping[str, tuple[int, int, int]]) -> str | None:
    """The palette colour whose hue most chromatic foreground pixels have (step 3), or None."""
    h, sat, v = _rgb_to_hsv(arr[fg] / 255.0)
    keep = (sat >= s.min_saturation) & (v >= s.min_value)
    if keep.sum() < s.min_pixels:
        return None
    names = list(palette)
    hues = np.array([colorsys.rgb_to_hsv(*(np.asarray(palette[n], dtype=float) / 255.0))[0] for n in names])
    dist = np.abs(h[keep][:, None] - hues[None, :])
    dist = np.minimum(dist, 1.0 - dist)  # hue is circular
    votes = np.bincount(dist.argmin(1), minlength=len(names))
    best = int(votes.argmax())
    return names[best] if votes[best] >= s.min_vote_share * votes.sum() else None


def _shape_of(dist: np.ndarray, s: ScorerSettings) -> tuple[str | None, float | None]:
    """(shape, bounding-box fill ratio) of the largest component at half contrast (step 4)."""
    mask = dist > max(0.5 * float(np.percentile(dist, 99.5)), 0.5 * s.fg_threshold)
    labels, n = ndimage.label(mask)
    if n == 0:
        return None, None
    sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
    blob = labels == int(np.argmax(sizes)) + 1
    ys, xs = np.nonzero(blob)
    h, w = blob.shape
    if ys.min() == 0 or xs.min() == 0 or ys.max() == h - 1 or xs.max() == w - 1 or blob.sum() < s.min_pixels:
        return None, None
    fill = float(blob.sum()) / float((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    if fill < s.max_triangle_fill:
        return "triangle", fill
    return ("square" if fill >= s.min_square_fill else "circle"), fill


def read_image(image: Image.Image | np.ndarray, settings: ScorerSettings = DEFAULT_SETTINGS,
               palette: Mapping[str, tuple[int, int, int]] | None = None) -> Reading:
    """Colour, shape and background of one image (see the module docstring for the steps)."""
    palette = palette or COLORS
    arr = _as_array(image)
    bg = _plain_background(arr, settings)
    if bg is None:
        return Reading(None, None, None)
    background = _nearest_name(bg, BACKGROUNDS)
    dist = np.sqrt(((arr - bg) ** 2).sum(-1))
    fg = dist > settings.fg_threshold
    if fg.sum() < settings.min_pixels or fg.mean() > settings.max_fg_share:
        return Reading(None, None, background)
    shape, fill = _shape_of(dist, settings)
    return Reading(_colour_of(arr, fg, settings, palette), shape, background, fill)


def read_colour(image: Image.Image | np.ndarray, settings: ScorerSettings = DEFAULT_SETTINGS,
                palette: Mapping[str, tuple[int, int, int]] | None = None) -> str | None:
    """The shape's palette colour alone (what `sd_core.sampling.adherence` scores)."""
    palette = palette or COLORS
    arr = _as_array(image)
    bg = _plain_background(arr, settings)
    if bg is None:
        return None
    fg = np.sqrt(((arr - bg) ** 2).sum(-1)) > settings.fg_threshold
    if fg.sum() < settings.min_pixels or fg.mean() > settings.max_fg_share:
        return None
    return _colour_of(arr, fg, settings, palette)


# ----------------------------------------------------------------------------------------- prompts
def _first_word(prompt: str, words: Sequence[str]) -> str | None:
    for word in prompt.lower().replace(",", " ").split():
        if word in words:
            return word
    return None


def parse_prompt(prompt: str, palette: Mapping[str, tuple[int, int, int]] | None = None) -> PromptTarget:
    """The colour, shape and background a synthetic caption names (``"a red circle on a white background"``).
    The background is the first background word after "on", so "a white ..." is never read as one."""
    colour = _first_word(prompt, list(palette or COLORS))
    _, on, rest = prompt.lower().partition(" on ")
    return PromptTarget(colour, _first_word(prompt, SHAPES), _first_word(rest, list(BACKGROUNDS)) if on else None)


# ----------------------------------------------------------------------------------------- scoring
def chance_levels(palette: Mapping[str, tuple[int, int, int]] | None = None) -> dict[str, float]:
    """The accuracy of guessing uniformly: 1 / values per attribute, and their product for the whole prompt."""
    levels = {"colour": 1.0 / len(palette or COLORS), "shape": 1.0 / len(SHAPES),
              "background": 1.0 / len(BACKGROUNDS)}
    levels["whole"] = float(np.prod(list(levels.values())))
    return levels


@dataclass
class PromptAccuracy:
    """Share of images whose colour / shape / background (and all three: ``whole``) match their prompt."""

    n: int
    accuracy: dict[str, float]  # colour, shape, background, whole
    chance: dict[str, float]
    readings: list[Reading] = field(default_factory=list)
    targets: list[PromptTarget] = field(default_factory=list)

    def as_metadata(self, prefix: str = "accuracy/") -> dict[str, float]:
        return {f"{prefix}{k}": round(v, 4) for k, v in self.accuracy.items()}


def prompt_accuracy(images: Sequence[Image.Image | np.ndarray], prompts: Sequence[str],
                    settings: ScorerSettings = DEFAULT_SETTINGS) -> PromptAccuracy:
    """Score ``images`` against their ``prompts`` (same length; each prompt must name all three attributes)."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    targets = [parse_prompt(p) for p in prompts]
    for p, t in zip(prompts, targets):
        if None in (t.colour, t.shape, t.background):
            raise ValueError(f"prompt {p!r} does not name a colour, shape and background of the synthetic world")
    readings = [read_image(img, settings) for img in images]
    hits = {a: [getattr(r, a) == getattr(t, a) for r, t in zip(readings, targets)] for a in ATTRIBUTES}
    hits["whole"] = [all(h) for h in zip(*(hits[a] for a in ATTRIBUTES))]
    accuracy = {k: float(np.mean(v)) if v else float("nan") for k, v in hits.items()}
    return PromptAccuracy(len(images), accuracy, chance_levels(), readings, targets)


# ------------------------------------------------------------------------------- the fixed prompt set
def evaluation_set(seeds_per_prompt: int) -> list[tuple[str, int]]:
    """(prompt, seed) for every (colour, shape, background) of the synthetic world × seeds 0..n-1, in a fixed
    order: the prompt set every checkpoint of the tiny profile is scored on."""
    if seeds_per_prompt < 1:
        raise ValueError(f"seeds_per_prompt must be at least 1, got {seeds_per_prompt}")
    return [(caption(shape, colour, bg), seed) for colour in COLORS for shape in SHAPES for bg in BACKGROUNDS
            for seed in range(seeds_per_prompt)]


def true_renders(size: int, seeds_per_prompt: int) -> tuple[list[Image.Image], list[str]]:
    """The synthetic renderer's own images of the evaluation set (render seed = the set's seed)."""
    images, prompts = [], []
    for prompt, seed in evaluation_set(seeds_per_prompt):
        t = parse_prompt(prompt)
        images.append(render_shape(t.shape, t.colour, t.background, size=size, seed=seed))
        prompts.append(prompt)
    return images, prompts


def vae_reconstructions(vae: Any, images: Sequence[Image.Image], batch_size: int = 64) -> list[Image.Image]:
    """``images`` encoded (posterior mean) and decoded by ``vae``, as PIL images: what the VAE lets through."""
    import torch

    from sd_core.encoding.vae_fit import reconstruct
    from sd_core.sampling.generate import latents_to_pil

    param = next(vae.parameters())
    x = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)
    x = (x.float() / 127.5 - 1.0).to(param.device, param.dtype)
    return latents_to_pil(reconstruct(vae, x, batch_size=batch_size).float())


@dataclass
class Calibration:
    """The scorers on true renders (must be ≥ 0.99 per attribute) and on the VAE's reconstructions (the
    ceiling of a model decoded by that VAE)."""

    true_renders: PromptAccuracy
    vae_reconstructions: PromptAccuracy | None

    def as_metadata(self) -> dict[str, float]:
        md = self.true_renders.as_metadata("ceiling/true_renders/")
        if self.vae_reconstructions is not None:
            md.update(self.vae_reconstructions.as_metadata("ceiling/vae/"))
        return md


def calibrate(size: int, seeds_per_prompt: int, vae: Any = None) -> Calibration:
    """Score the true renders of the evaluation set, and their reconstructions by ``vae`` when given."""
    images, prompts = true_renders(size, seeds_per_prompt)
    recon = prompt_accuracy(vae_reconstructions(vae, images), prompts) if vae is not None else None
    return Calibration(prompt_accuracy(images, prompts), recon)
