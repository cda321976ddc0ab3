"""The embedded synthetic source: coloured shapes on plain backgrounds, with LAION-schema metadata.

Two halves:

- Rendering (`render_shape`, `caption`, `vocabulary` and the palettes): pure functions other stages use too
  (the tiny tokenizer's vocabulary, the prompt-adherence score of `sample_grid`). Colours are few, highly
  saturated and far apart in RGB because the tiny VAE's colour fidelity capped colour adherence in the
  measured baseline (DESIGN.md section 4: green came back brown, purple dull). Every image gets a random
  size and position jitter so the model learns shapes, not one template.
- The metadata generator (`generate_synthetic`): a deterministic (seeded) LAION-schema parquet whose URLs
  point at the loopback image server (`sd_core.data.image_server`), with planted rows each filter must
  drop, duplicate URLs, URLs that 404 and images whose bytes are corrupt, all in known counts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from sd_core.atomic import write_parquet_atomic
from sd_core.config import FilterConfig

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (25, 200, 40),
    "blue": (30, 60, 235),
    "yellow": (245, 225, 20),
}

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "black": (10, 10, 10),
    "gray": (128, 128, 128),
}

# The jitter of `render_shape`: the shape's extent (share of the side) and its centre's largest move (share of
# the side). RENDER_VERSION changes whenever a render's pixels do (the image shards' code version and the tiny
# components' build settings carry it, so a changed world is re-rendered and re-fitted, not mixed with the old).
EXTENT_RANGE: tuple[float, float] = (0.50, 0.70)
MAX_SHIFT: float = 0.08
RENDER_VERSION = 2

# The fixed words of every synthetic caption ("a {color} {shape} on a {background} background").
_TEMPLATE_WORDS: tuple[str, ...] = ("a", "on", "background")


def caption(shape: str, color: str, background: str) -> str:
    """The caption of one synthetic image, e.g. ``"a red circle on a white background"``."""
    _check(shape, color, background)
    return f"a {color} {shape} on a {background} background"


def vocabulary() -> list[str]:
    """Every word a synthetic caption can contain, sorted and without duplicates."""
    return sorted(set(_TEMPLATE_WORDS) | set(SHAPES) | set(COLORS) | set(BACKGROUNDS))


def render_shape(shape: str, color: str, background: str, size: int = 64, seed: int = 0) -> Image.Image:
    """Render one RGB image of ``size``×``size``: a ``color`` ``shape`` on a ``background`` background.

    ``seed`` drives the jitter: the shape's extent is `EXTENT_RANGE` of the image side and its centre moves
    by up to `MAX_SHIFT` of the side, so it always stays fully inside the image. Same arguments → identical
    pixels.
    """
    _check(shape, color, background)
    if size < 8:
        raise ValueError(f"size must be at least 8 px, got {size}")
    rng = random.Random(f"{shape}/{color}/{background}/{size}/{seed}")
    # Draw at 4× and downsample: anti-aliased edges without relying on PIL's per-primitive AA.
    scale = 4
    big = size * scale
    img = Image.new("RGB", (big, big), BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    extent = rng.uniform(*EXTENT_RANGE) * big
    half = extent / 2
    max_shift = max(0.0, min(MAX_SHIFT * big, big / 2 - half - 0.03 * big))
    cx = big / 2 + rng.uniform(-max_shift, max_shift)
    cy = big / 2 + rng.uniform(-max_shift, max_shift)
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
    elif shape == "triangle":
        # Equilateral, pointing up, centred on its bounding box.
        h = extent * math.sqrt(3) / 2
        top = cy - h / 2
        draw.polygon([(cx, top), (cx - half, top + h), (cx + half, top + h)], fill=fill)
    else:  # pragma: no cover - _check guards this
        raise AssertionError(shape)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def _check(shape: str, color: str, background: str) -> None:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {list(SHAPES)}")
    if color not in COLORS:
        raise ValueError(f"unknown color {color!r}; expected one of {list(COLORS)}")
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; expected one of {list(BACKGROUNDS)}")


# ------------------------------------------------------------------------------ metadata generator
# URLs are written with this placeholder host (the `.invalid` TLD never resolves, RFC 2606). The loopback
# server's port changes from run to run, so the metadata and the filtered parts carry the placeholder and stay
# byte-identical across runs; `image_shards` starts the server for the duration of one download and rewrites
# the placeholder to the live `http://127.0.0.1:PORT` only in the url file it hands img2dataset.
SYNTHETIC_BASE_URL = "http://shapes.sd-pipeline.invalid"

# Share of the rows planted for each funnel stage (at least one row each): rows that stage must drop.
_PLANT_RATES: dict[str, float] = {
    "url": 0.005,
    "min_aesthetic": 0.03,
    "min_similarity": 0.03,
    "min_side": 0.03,
    "aspect": 0.03,
    "caption_len": 0.03,
    "max_pwatermark": 0.03,
    "safety": 0.03,
    "dedup_url": 0.04,
}
_MISSING_RATE = 0.02  # URLs that answer 404
_CORRUPT_RATE = 0.01  # URLs that answer 200 with bytes no decoder accepts


@dataclass(frozen=True)
class SyntheticManifest:
    """What `generate_synthetic` wrote and planted; tests compare the pipeline's counts with these.

    ``planted``: funnel stage → rows planted to be dropped by exactly that stage, in funnel order.
    ``missing`` / ``corrupt``: rows that pass every filter but whose URL answers 404 / serves corrupt bytes.
    ``good``: rows that pass every filter and download fine.
    """

    path: Path
    rows: int
    seed: int
    good: int
    missing: int
    corrupt: int
    planted: dict[str, int]

    @property
    def rows_out(self) -> int:
        """Rows the filter keeps: every good, missing and corrupt row."""
        return self.good + self.missing + self.corrupt

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["path"] = str(self.path)
        d["rows_out"] = self.rows_out
        return d


def shape_url(shape: str, color: str, background: str, width: int, height: int, seed: int,
              base_url: str = SYNTHETIC_BASE_URL, kind: str = "shapes") -> str:
    """The URL of one synthetic image; the image server renders it from the path alone."""
    return f"{base_url}/{kind}/{shape}/{color}/{background}/{width}x{height}/{seed}.png"


def render_url_path(path: str) -> Image.Image:
    """Render the image a ``/shapes/...`` URL path names (the inverse of `shape_url`).

    The shape is drawn at the short side and centred on a ``width``×``height`` canvas of the background
    colour, so a centre crop keeps the whole shape.
    """
    parts = path.strip("/").split("/")
    if len(parts) != 6 or parts[0] != "shapes" or not parts[5].endswith(".png"):
        raise ValueError(f"not a synthetic image path: {path!r}")
    _, shape, color, background, dims, name = parts
    w_s, _, h_s = dims.partition("x")
    width, height, seed = int(w_s), int(h_s), int(name[: -len(".png")])
    if not (8 <= width <= 4096 and 8 <= height <= 4096):
        raise ValueError(f"image size out of range: {dims}")
    side = min(width, height)
    shape_img = render_shape(shape, color, background, size=side, seed=seed)
    if width == height:
        return shape_img
    canvas = Image.new("RGB", (width, height), BACKGROUNDS[background])
    canvas.paste(shape_img, ((width - side) // 2, (height - side) // 2))
    return canvas


def _hash64(url: str | None, text: str | None) -> int:
    """A stable int64 per (url, caption), like LAION's ``hash`` column (which is mmh3 of the same)."""
    digest = hashlib.blake2b(f"{url or ''}\x00{text or ''}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def plant_counts(rows: int) -> tuple[dict[str, int], int, int]:
    """How many rows of ``rows`` are planted per funnel stage, and how many 404 / corrupt URLs."""
    planted = {stage: max(1, round(rows * rate)) for stage, rate in _PLANT_RATES.items()}
    missing = max(1, round(rows * _MISSING_RATE))
    corrupt = max(1, round(rows * _CORRUPT_RATE))
    good = rows - sum(planted.values()) - missing - corrupt
    if good < 1:
        raise ValueError(f"synthetic_rows={rows} is too small to plant every case; use at least 60 rows")
    return planted, missing, corrupt


@dataclass(frozen=True)
class _Limits:
    """The filter thresholds the generated rows are placed around: ``cfg``'s, or a fixed stand-in where a
    filter is disabled (every row still needs values on a known side of some threshold)."""

    min_side: int
    aesthetic: float
    similarity: float
    pwatermark: float
    punsafe: float
    aspect: tuple[float, float]
    caption_len: tuple[int, int]

    @classmethod
    def of(cls, cfg: FilterConfig, image_size: int) -> _Limits:
        def given(value: Any, default: Any) -> Any:
            return value if value is not None else default

        return cls(
            min_side=max(image_size, cfg.min_side or 0),
            aesthetic=given(cfg.min_aesthetic, 5.0),
            similarity=given(cfg.min_similarity, 0.25),
            pwatermark=given(cfg.max_pwatermark, 0.5),
            punsafe=given(cfg.max_punsafe, 0.5),
            aspect=(given(cfg.min_aspect, 0.5), given(cfg.max_aspect, 2.0)),
            caption_len=(given(cfg.min_caption_len, 20), given(cfg.max_caption_len, 300)),
        )


@dataclass
class _RowSampler:
    """Draws metadata rows from one seeded generator. Every row, clean or spoiled, consumes the generator in a
    fixed order, which is what makes the whole file reproducible from the seed."""

    rng: np.random.Generator
    limits: _Limits
    base_url: str

    def good(self, i: int, kind: str = "shapes") -> dict[str, Any]:
        """A row that passes every filter; ``kind`` picks what its URL serves (shapes, missing, corrupt)."""
        rng, lim = self.rng, self.limits
        shape = SHAPES[rng.integers(len(SHAPES))]
        color = list(COLORS)[rng.integers(len(COLORS))]
        bg = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
        w = int(round(lim.min_side * rng.uniform(1.0, 1.5)))
        h = int(round(min(max(w / rng.uniform(0.8, 1.25), lim.min_side), 1.5 * lim.min_side)))
        return {
            "URL": shape_url(shape, color, bg, w, h, i, base_url=self.base_url, kind=kind),
            "TEXT": caption(shape, color, bg),
            "WIDTH": w,
            "HEIGHT": h,
            "similarity": float(rng.uniform(lim.similarity + 0.01, lim.similarity + 0.12)),
            "punsafe": float(rng.uniform(0.0, 0.8 * lim.punsafe)),
            "pwatermark": float(rng.uniform(0.0, 0.8 * lim.pwatermark)),
            "aesthetic": float(rng.uniform(lim.aesthetic + 0.05, lim.aesthetic + 1.5)),
        }

    def spoil(self, row: dict[str, Any], stage: str, nth: int) -> dict[str, Any]:
        """Make ``row`` fail ``stage`` (the first planted row of a numeric stage gets a NULL instead)."""
        rng, lim = self.rng, self.limits
        if stage == "url":
            row["URL"] = None
        elif stage == "min_aesthetic":
            row["aesthetic"] = None if nth == 0 else float(lim.aesthetic - rng.uniform(0.1, 2.0))
        elif stage == "min_similarity":
            row["similarity"] = None if nth == 0 else float(lim.similarity - rng.uniform(0.01, 0.1))
        elif stage == "min_side":
            small = int(rng.integers(max(1, lim.min_side // 2), lim.min_side))
            row["WIDTH" if nth % 2 else "HEIGHT"] = small
            if nth == 0:
                row["WIDTH"] = None
        elif stage == "aspect":
            lo, hi = lim.aspect
            if nth % 2:
                row["WIDTH"] = int(row["HEIGHT"] * hi * rng.uniform(1.1, 1.5)) + 1
            else:
                row["HEIGHT"] = int(row["WIDTH"] / (lo * rng.uniform(0.6, 0.9))) + 1
        elif stage == "caption_len":
            lo, hi = lim.caption_len
            if nth == 0:
                row["TEXT"] = None
            elif nth % 2:
                row["TEXT"] = row["TEXT"][: max(0, lo - 1)].rstrip()
            else:
                row["TEXT"] = ", ".join([row["TEXT"]] * (hi // len(row["TEXT"]) + 2))
        elif stage == "max_pwatermark":
            row["pwatermark"] = None if nth == 0 else float(rng.uniform(lim.pwatermark, 1.0))
        elif stage == "safety":
            row["punsafe"] = None if nth == 0 else float(rng.uniform(lim.punsafe, 1.0))
        else:  # pragma: no cover
            raise AssertionError(stage)
        return row


_LAION_SCHEMA = pa.schema([
    ("URL", pa.string()), ("TEXT", pa.string()), ("WIDTH", pa.int32()), ("HEIGHT", pa.int32()),
    ("similarity", pa.float64()), ("hash", pa.int64()), ("punsafe", pa.float32()),
    ("pwatermark", pa.float32()), ("aesthetic", pa.float32()),
])


def generate_synthetic(
    out_path: str | os.PathLike[str],
    rows: int,
    seed: int = 0,
    image_size: int = 64,
    filter_config: FilterConfig | None = None,
    base_url: str = SYNTHETIC_BASE_URL,
) -> SyntheticManifest:
    """Write a LAION-schema parquet of ``rows`` synthetic rows to ``out_path`` (atomically) and return
    what was planted.

    Columns and types follow ``laion/laion2B-en-aesthetic``: URL, TEXT (string), WIDTH, HEIGHT (int32),
    similarity (float64), hash (int64), punsafe, pwatermark, aesthetic (float32). Planted rows are placed
    relative to ``filter_config``'s thresholds (default: the tiny profile's), each failing exactly its
    stage and passing every earlier one, so the filter's funnel must equal ``planted`` exactly. Same
    arguments → byte-identical file.
    """
    cfg = filter_config or FilterConfig(min_side=image_size)
    planted, n_missing, n_corrupt = plant_counts(rows)
    rng = np.random.default_rng(seed)
    sampler = _RowSampler(rng, _Limits.of(cfg, image_size), base_url)
    # Rows are drawn in this order (clean, planted rejects, broken URLs), then shuffled: the seed fixes all.
    n_good = rows - sum(planted.values()) - n_missing - n_corrupt
    good = [sampler.good(i) for i in range(n_good)]
    rejects = _planted_rejects(sampler, planted, first_id=n_good)
    broken = _broken_urls(sampler, n_missing, n_corrupt, first_id=n_good + len(rejects))
    table_rows = _shuffle_with_duplicates(rng, good, good + rejects + broken, planted["dedup_url"])
    manifest = SyntheticManifest(path=Path(out_path), rows=len(table_rows), seed=seed, good=n_good,
                                 missing=n_missing, corrupt=n_corrupt, planted=planted)
    write_parquet_atomic(_laion_table(table_rows, manifest), Path(out_path))
    return manifest


def _planted_rejects(sampler: _RowSampler, planted: dict[str, int], first_id: int) -> list[dict[str, Any]]:
    """The rows each row-level stage must drop, in funnel order (``dedup_url``'s are copies, added later)."""
    rejects = []
    for stage, n in planted.items():
        if stage == "dedup_url":
            continue
        for k in range(n):
            rejects.append(sampler.spoil(sampler.good(first_id + len(rejects)), stage, k))
    return rejects


def _broken_urls(sampler: _RowSampler, missing: int, corrupt: int, first_id: int) -> list[dict[str, Any]]:
    """Rows that pass every filter but whose URL answers 404 (``missing``) or serves corrupt bytes."""
    kinds = ["missing"] * missing + ["corrupt"] * corrupt
    return [sampler.good(first_id + k, kind=kind) for k, kind in enumerate(kinds)]


def _shuffle_with_duplicates(rng: np.random.Generator, good: list[dict[str, Any]], body: list[dict[str, Any]],
                             n_dupes: int) -> list[dict[str, Any]]:
    """``body`` in a seeded random order, plus ``n_dupes`` exact copies of distinct ``good`` rows, each
    inserted somewhere after its original (so de-duplication keeps the original)."""
    shuffled = [body[j] for j in rng.permutation(len(body))]
    pos = {id(r): p for p, r in enumerate(shuffled)}
    sources = rng.choice(len(good), size=n_dupes, replace=False)
    inserts = sorted(((int(rng.integers(pos[id(good[s])] + 1, len(shuffled) + 1)), int(s)) for s in sources),
                     reverse=True)
    for at, s in inserts:
        shuffled.insert(at, dict(good[s]))
    return shuffled


def _laion_table(table_rows: list[dict[str, Any]], manifest: SyntheticManifest) -> pa.Table:
    """The rows as a LAION-schema table, each with its ``hash``, and the manifest (less its path, so the bytes
    are the same wherever the file is written) in the key-value metadata `read_manifest` reads."""
    for r in table_rows:
        r["hash"] = _hash64(r["URL"], r["TEXT"])
    table = pa.Table.from_pylist(table_rows, schema=_LAION_SCHEMA)
    stored = {k: v for k, v in manifest.to_json().items() if k != "path"}
    meta = {b"sd_pipeline.synthetic": json.dumps(stored).encode()}
    return table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The planted counts `generate_synthetic` stored in a parquet's key-value metadata, if any."""
    md = pq.read_schema(path).metadata or {}
    raw = md.get(b"sd_pipeline.synthetic")
    return json.loads(raw) if raw else None


def served_by_synthetic_server(part: Path) -> bool:
    """Whether a shard part points at the embedded synthetic images (so its download needs the loopback
    `ImageServer` running)."""
    urls = pq.read_table(part, columns=["url"]).column("url")
    return any(u is not None and u.startswith(SYNTHETIC_BASE_URL + "/") for u in urls.to_pylist())
