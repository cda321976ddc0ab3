"""The one typed configuration of sd-pipeline.

Every tunable number lives here, in frozen dataclasses grouped by the stage that reads it, and two named
presets bundle them into a `Profile`:

- ``tiny`` (the default): the embedded synthetic-shapes dataset served on 127.0.0.1, 64 px images, small
  locally built VAE and text encoder, a few-million-parameter UNet; runs end to end on 2 CPU cores.
- ``sd15``: real LAION-Aesthetics metadata, 512 px, ``stabilityai/sd-vae-ft-mse``,
  ``openai/clip-vit-large-patch14`` and the 859,520,964-parameter SD 1.5 UNet on CUDA.

Why dataclasses and not Dagster ``Config``: ``sd_core`` has no Dagster imports, so the trainer, the CLI and
the tests read the same objects. The Dagster layer selects a profile by name (resource config or the
``SD_PROFILE`` environment variable) and applies overrides with :func:`Profile.with_overrides`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import functools
import math
import numbers
import os
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

PROFILE_ENV = "SD_PROFILE"
DATA_ROOT_ENV = "SD_DATA_ROOT"
DEFAULT_DATA_ROOT = "data"


# ---------------------------------------------------------------------------------------- validation
class ConfigError(ValueError):
    """A config value of the wrong type or outside its range. The message names the section, the field, the
    value and what is allowed ("train.batch_size = -4: must be an integer >= 1"), whichever path it came in
    by: a preset, a run config's overrides, a CLI flag (`field_arg`) or `dataclasses.replace`."""


@dataclass(frozen=True)
class Limit:
    """What a field may hold beyond its annotated type: a numeric range (for a tuple field: each item's), a
    set of allowed values, and, for tuples, whether they may be empty.

    Declared once per field: in its dataclass's ``LIMITS`` table, or as ``dataclasses.field(metadata=
    {"min": 1})`` (keys ``min``/``max`` inclusive, ``gt``/``lt`` exclusive, ``choices``, ``nonempty``, or
    ``limit`` holding a `Limit`). A field with neither is still checked against its annotation.
    """

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[Any, ...] | None = None
    nonempty: bool = False

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any]) -> "Limit | None":
        if "limit" in md:
            return md["limit"]
        keys = {"min", "max", "gt", "lt", "choices", "nonempty"} & set(md)
        if not keys:
            return None
        return cls(lo=md.get("gt", md.get("min")), hi=md.get("lt", md.get("max")), lo_open="gt" in md,
                   hi_open="lt" in md, choices=tuple(md["choices"]) if "choices" in md else None,
                   nonempty=bool(md.get("nonempty", False)))

    def admits(self, v: Any) -> bool:
        """Whether one (scalar) value lies within the limit."""
        if self.choices is not None:
            return v in self.choices
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        return self.hi is None or not (v > self.hi or (self.hi_open and v == self.hi))

    def describe(self) -> str:
        """The limit in words: ">= 1", "> 0", "in [0, 1)", "one of 'a', 'b'" ("" when unbounded)."""
        if self.choices is not None:
            return "one of " + ", ".join(map(repr, self.choices))
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return ""


def at_least(lo: float, *, nonempty: bool = False) -> Limit:
    return Limit(lo=lo, nonempty=nonempty)


def above(lo: float) -> Limit:
    return Limit(lo=lo, lo_open=True)


def within(lo: float, hi: float, *, hi_open: bool = False) -> Limit:
    return Limit(lo=lo, hi=hi, hi_open=hi_open)


def one_of(*choices: Any) -> Limit:
    return Limit(choices=choices)


class _Mismatch(Exception):
    """A value does not fit its field (internal: `check_value` turns it into a `ConfigError`)."""


_NONE = type(None)
_KINDS = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", Path: "a path"}


def _optional_base(hint: Any) -> tuple[Any, bool]:
    """``X | None`` → (X, True); anything else → (hint, False)."""
    if get_origin(hint) in (Union, types.UnionType):
        args = get_args(hint)
        rest = [a for a in args if a is not _NONE]
        if len(rest) == 1 and len(args) == 2:
            return rest[0], True
    return hint, False


def _tuple_item(hint: Any) -> Any:
    """The item type of ``tuple[X, ...]`` (Any for other tuple forms)."""
    args = get_args(hint)
    return args[0] if len(args) == 2 and args[1] is Ellipsis else Any


def _conform(hint: Any, value: Any, limit: Limit | None) -> Any:
    """``value`` as the field stores it (ints widened to float, lists to tuples, str to Path), or `_Mismatch`.
    Never parses strings: "abc" or "4" for an int field is a mismatch, and so is True (a bool) for an int."""
    base, optional = _optional_base(hint)
    if value is None:
        if optional:
            return None
        raise _Mismatch
    if get_origin(base) is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
            raise _Mismatch
        if limit is not None and limit.nonempty and not value:
            raise _Mismatch
        item_limit = dataclasses.replace(limit, nonempty=False) if limit is not None else None
        return tuple(_conform(_tuple_item(base), v, item_limit) for v in value)
    value = _conform_scalar(base, value)
    if limit is not None and not limit.admits(value):
        raise _Mismatch
    return value


def _conform_scalar(hint: Any, value: Any) -> Any:
    if get_origin(hint) is Literal:
        if not any(value == a and type(value) is type(a) for a in get_args(hint)):
            raise _Mismatch
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise _Mismatch
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # True is an int to Python
            raise _Mismatch
        return int(value)
    if hint is str:
        if not isinstance(value, str):
            raise _Mismatch
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _Mismatch
        try:
            value = float(value)
        except OverflowError:
            raise _Mismatch from None
        if not math.isfinite(value):  # nan would slip through every range comparison
            raise _Mismatch
        return value
    if hint is Path:
        if not isinstance(value, (str, os.PathLike)):
            raise _Mismatch
        return Path(value)
    if isinstance(hint, type) and hint is not Any and not isinstance(value, hint):
        raise _Mismatch
    return value


def _describe(hint: Any, limit: Limit | None) -> str:
    """What a field accepts, in words: "an integer >= 1, or None", "a non-empty list of ...", ..."""
    base, optional = _optional_base(hint)
    if get_origin(base) is tuple:
        item_limit = dataclasses.replace(limit, nonempty=False) if limit is not None else None
        lead = "a non-empty list" if limit is not None and limit.nonempty else "a list"
        text = f"{lead} whose items are each {_describe(_tuple_item(base), item_limit)}"
    elif get_origin(base) is Literal:
        text = "one of " + ", ".join(map(repr, get_args(base)))
    elif limit is not None and limit.choices is not None:
        text = limit.describe()
    else:
        kind = _KINDS.get(base) or (f"a {base.__name__}" if isinstance(base, type) else "a value")
        text = f"{kind} {limit.describe() if limit is not None else ''}".strip()
    return f"{text}, or None" if optional else text


def _string_hint(hint: Any, value: Any) -> str:
    """A pointer for the classic YAML slip: a number that arrived as a string ("1e-4" in YAML 1.1)."""
    base, _ = _optional_base(hint)
    if not isinstance(value, str) or base not in (int, float):
        return ""
    try:
        float(value)
    except ValueError:
        return ""
    return " (got a string: write the number unquoted; YAML reads 1e-4 as a string, 1.0e-4 as a number)"


@functools.cache
def _field_specs(cls: type) -> dict[str, tuple[Any, Limit | None]]:
    """Per field of config dataclass ``cls``: (resolved annotation, limit). The ``LIMITS`` table may only name
    fields (a typo in it is a programming error, raised on first use)."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    table = getattr(cls, "LIMITS", {})
    stray = sorted(set(table) - set(fields))
    if stray:
        raise TypeError(f"{cls.__name__}.LIMITS names no field {stray}")
    return {name: (hints[name], Limit.from_metadata(f.metadata) or table.get(name)) for name, f in fields.items()}


def _section_of(cls: type) -> str:
    """The profile section a config class is read under ("train" for TrainConfig; "profile" for Profile)."""
    if cls is Profile:
        return "profile"
    for name, (hint, _) in _field_specs(Profile).items():
        if hint is cls:
            return name
    return cls.__name__


def check_value(cls: type, name: str, value: Any) -> Any:
    """``value`` checked for field ``name`` of config dataclass ``cls`` (type from its annotation, range from
    its limit) and normalised as the field stores it; a `ConfigError` naming section, field, value and range
    otherwise."""
    hint, limit = _field_specs(cls)[name]
    try:
        return _conform(hint, value, limit)
    except _Mismatch:
        raise ConfigError(f"{_section_of(cls)}.{name} = {value!r}: must be {_describe(hint, limit)}"
                          f"{_string_hint(hint, value)}") from None


def parse_field(cls: type, name: str, text: str) -> Any:
    """A command-line string for field ``name`` of ``cls``: read as the field's type ("4" → 4, "1e-4" → 1e-4,
    "a,b" → ("a", "b") for tuples), then checked by `check_value` like every other way a value comes in."""
    hint, _ = _field_specs(cls)[name]
    base, optional = _optional_base(hint)
    if optional and text.strip().lower() in ("none", "null"):
        return check_value(cls, name, None)
    if get_origin(base) is tuple:
        item = _tuple_item(base)
        return check_value(cls, name, [_parse_scalar(item, t.strip()) for t in text.split(",") if t.strip()])
    return check_value(cls, name, _parse_scalar(base, text))


def _parse_scalar(hint: Any, text: str) -> Any:
    """``text`` as an int / float / bool when the type asks for one; unparseable text stays a string, which
    `check_value` then refuses by name."""
    try:
        if hint is int:
            return int(text)
        if hint is float:
            return float(text)
    except ValueError:
        return text
    if hint is bool and text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def field_arg(cls: type, name: str) -> Callable[[str], Any]:
    """An argparse ``type=`` for field ``name`` of ``cls`` (`parse_field`); argparse then reports "argument
    --flag: train.lr = -1.0: must be a finite number > 0", naming flag and field."""

    def parse(text: str) -> Any:
        try:
            return parse_field(cls, name, text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = f"{cls.__name__}.{name}"
    return parse


def positive_int_arg(text: str) -> int:
    """An argparse ``type=`` for a count >= 1 that is not a config field (``sd generate --num-images``,
    ``sd train --stop-after``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def json_object_arg(text: str) -> dict[str, Any]:
    """An argparse ``type=`` for a JSON object (``--overrides`` of `sd train`, `sd generate`, `sd export-diffusers`)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"invalid JSON ({e.msg} at {e.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {type(value).__name__}")
    return value


def field_choices(cls: type, name: str) -> tuple[Any, ...] | None:
    """The allowed values of a field (its ``Literal`` or its limit's choices), e.g. for argparse ``choices=``."""
    hint, limit = _field_specs(cls)[name]
    base, _ = _optional_base(hint)
    if get_origin(base) is Literal:
        return get_args(base)
    return limit.choices if limit is not None else None


class Checked:
    """Base of every config dataclass: ``__post_init__`` checks each field against its annotation and limit
    (`check_value`), so a value is checked once, where it enters, whichever way it enters. Subclasses declare
    ranges in ``LIMITS`` (field name → `Limit`); a field not named there gets its type checked only."""

    LIMITS: ClassVar[Mapping[str, Limit]] = {}

    def __post_init__(self) -> None:
        for name in _field_specs(type(self)):
            value = getattr(self, name)
            conformed = check_value(type(self), name, value)
            if conformed is not value:
                object.__setattr__(self, name, conformed)  # frozen: the normalised form (float, tuple, Path)


# --------------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class UNetConfig(Checked):
    """Shape of the denoising UNet; names follow the seed write-up and CompVis ``openaimodel.py``.

    ``ch_mults``: width of each resolution level as a multiple of ``ch`` (level 1 = full latent resolution,
    each further level halves it). ``attn_lvls``: the levels, counted from 1, whose blocks carry a
    SpatialTransformer; the middle block always has one. So SD 1.5's ``attn_lvls=(1, 2, 3)`` puts attention
    at 64, 32 and 16 (latent px) and none at 8, which is what gives its 859,520,964 parameters (0-based,
    attention at 32, 16 and 8 instead, it would be 1,020,594,564). ``heads``: attention heads per
    SpatialTransformer (head width = channels // heads), like CompVis ``num_heads`` and diffusers'
    ``attention_head_dim`` in SD 1.x configs. ``t_dim`` = 4 x ``ch``.
    """

    LIMITS = {"in_ch": at_least(1), "out_ch": at_least(1), "ch": at_least(1), "res_blks": at_least(1),
              "attn_lvls": at_least(1), "ch_mults": at_least(1, nonempty=True), "heads": at_least(1),
              "ctx_dim": at_least(1), "transformer_depth": at_least(1), "norm_groups": at_least(1),
              "dropout": within(0, 1, hi_open=True)}

    in_ch: int = 4
    out_ch: int = 4
    ch: int = 320
    res_blks: int = 2
    attn_lvls: tuple[int, ...] = (1, 2, 3)
    ch_mults: tuple[int, ...] = (1, 2, 4, 4)
    heads: int = 8
    ctx_dim: int = 768
    transformer_depth: int = 1
    norm_groups: int = 32
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()  # types and ranges first, so the checks below compare numbers
        n = len(self.ch_mults)
        bad_lvls = [lvl for lvl in self.attn_lvls if not 1 <= lvl <= n]
        if bad_lvls:
            raise ConfigError(f"UNetConfig.attn_lvls {bad_lvls} out of range: levels are counted 1..{n} (len(ch_mults))")
        for mult in self.ch_mults:
            width = mult * self.ch
            if width % self.norm_groups:
                raise ConfigError(f"UNetConfig: width {width} (ch x {mult}) not divisible by norm_groups={self.norm_groups}")
            if width % self.heads:
                raise ConfigError(f"UNetConfig: width {width} (ch x {mult}) not divisible by heads={self.heads}")

    @property
    def t_dim(self) -> int:
        """Width of the time embedding (4 × ch, as in SD)."""
        return 4 * self.ch

    @classmethod
    def sd15(cls) -> "UNetConfig":
        return cls(ch=320, ch_mults=(1, 2, 4, 4), res_blks=2, attn_lvls=(1, 2, 3), heads=8, ctx_dim=768)

    @classmethod
    def tiny(cls) -> "UNetConfig":
        """617,140 parameters, two levels on the 8×8 latents of the tiny VAE (64 px / 8, as in SD), attention
        at both. On 16×16 latents the UNet's training step was ~2.5× the cost for the same network, and the
        8×8 model reads the whole prompt better (0.98-1.00 against 0.93-0.95 with the earlier three-level,
        2.35M-parameter UNet on 16×16 latents): BENCHMARKS.md, session 16. Attention at the full latent
        resolution costs little at 8×8 and is what keeps the squares' corners. `ch` 24 (BENCHMARKS.md, session
        14); 8 GroupNorm groups because 32 does not divide 24."""
        return cls(ch=24, ch_mults=(1, 2), res_blks=1, attn_lvls=(1, 2), heads=4, ctx_dim=64, norm_groups=8)


# ---------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class SourceConfig(Checked):
    """Where `laion_metadata` comes from.

    kind: ``synthetic`` (embedded shapes served on loopback), ``parquet`` (in ``uri``: a local file, folder or
    glob, an ``http(s)://`` URL of one file, or a pyarrow filesystem URI such as ``s3://bucket/dir/*.parquet``)
    or ``hf`` (a Hugging Face dataset repo id in ``uri``, optionally followed by a file pattern:
    ``org/name`` or ``org/name/data/*.parquet``; fetched with ``huggingface_hub.snapshot_download``).
    ``synthetic_*``: rows, seed and base image side of the embedded source (`sd_core.data.synthetic`).
    """

    LIMITS = {"synthetic_rows": at_least(1), "synthetic_seed": at_least(0), "synthetic_image_size": at_least(1)}

    kind: Literal["synthetic", "parquet", "hf"] = "synthetic"
    uri: str | None = None
    hf_revision: str | None = None
    synthetic_rows: int = 1200
    synthetic_seed: int = 0
    synthetic_image_size: int = 64


@dataclass(frozen=True)
class FilterConfig(Checked):
    """The seeds' quality filters, applied in field order below (the funnel order). ``None`` disables a filter.

    Bounds are inclusive (``aesthetic >= min_aesthetic``, ``min_aspect <= width/height <= max_aspect``,
    caption length in characters) except the probabilities, which must stay strictly below their maximum
    (``pwatermark < max_pwatermark``). Safety: ``NSFW in nsfw_allowed`` for files that carry the
    laion2B-en ``NSFW`` string column, else ``punsafe < max_punsafe``. A NULL (or NaN) fails its filter;
    rows without a URL are always dropped; duplicates by URL keep the first row (file order, row order).

    URL policy (`sd_core.data.url_policy`, the funnel stage ``url_policy`` right after ``url``, and again at
    download time after DNS): only ``http``/``https`` URLs to public addresses; ``file:``, ``data:``,
    ``ftp:``, ``localhost`` and loopback, link-local, private or unspecified addresses are dropped.
    ``allow_hosts`` lists the exceptions, e.g. ``["10.0.0.5:8080", "images.internal", "10.1.0.0/16"]``
    (``host``, ``host:port``, an IP, ``[IPv6]:port`` or a network; a name matches exactly and, when
    downloading, also the addresses it resolves to). Empty by default: the tiny profile's loopback image
    server is allowed for its own downloads only, by its live ``127.0.0.1:PORT``, and nothing else on
    loopback.
    """

    LIMITS = {"min_aesthetic": within(0, 10), "min_similarity": within(-1, 1), "min_side": at_least(0),
              "min_aspect": above(0), "max_aspect": above(0), "min_caption_len": at_least(0),
              "max_caption_len": at_least(0), "max_pwatermark": within(0, 1), "max_punsafe": within(0, 1),
              "nsfw_allowed": one_of("UNLIKELY", "UNSURE", "NSFW")}  # laion2B-en's NSFW values

    min_aesthetic: float | None = 6.5
    min_similarity: float | None = 0.28
    min_side: int | None = 512
    min_aspect: float | None = 0.5
    max_aspect: float | None = 2.0
    min_caption_len: int | None = 20
    max_caption_len: int | None = 300
    max_pwatermark: float | None = 0.5
    max_punsafe: float | None = 0.5
    nsfw_allowed: tuple[str, ...] = ("UNLIKELY",)
    dedup_by_url: bool = True
    allow_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()  # types first: allow_hosts is a tuple of strings below
        from sd_core.data.url_policy import parse_allow_entry  # the one parser, also used where URLs are fetched

        for entry in self.allow_hosts:
            try:
                parse_allow_entry(entry)
            except ValueError as e:
                raise ConfigError(f"filter.allow_hosts: {e}") from None


@dataclass(frozen=True)
class DownloadConfig(Checked):
    """img2dataset settings for `image_shards`, and the rows per shard part of `filtered_metadata`.

    Which URLs may be fetched is not set here: downloads enforce the same URL policy as the filter, with
    `FilterConfig.allow_hosts` as its exceptions (plus the live loopback server for the synthetic source),
    at every request, redirect and socket connect of img2dataset's processes (`sd_core.data.download_guard`).
    """

    LIMITS = {"shard_size": at_least(1), "image_size": at_least(1),
              "resize_mode": one_of("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"),
              "encode_quality": within(1, 100), "processes_count": at_least(1), "thread_count": at_least(1),
              "timeout_s": at_least(1), "retries": at_least(0), "watchdog_s": above(0), "max_runtime_s": above(0),
              "distributor": one_of("multiprocessing", "pyspark")}  # no ray: without it img2dataset does nothing

    shard_size: int = 10_000
    image_size: int = 512
    resize_mode: str = "center_crop"  # img2dataset: no, border, keep_ratio, keep_ratio_largest, center_crop
    encode_quality: int = 95
    processes_count: int = 1
    thread_count: int = 16
    timeout_s: int = 10
    retries: int = 0
    watchdog_s: float = 600.0  # kill a shard download whose output makes no progress for this long
    max_runtime_s: float | None = None  # kill a shard download that runs longer than this in total
    distributor: str = "multiprocessing"  # img2dataset's; pyspark: one Spark session per shard (`make spark`)
    spark_master: str = "local[2]"  # pyspark only: local[N], or a cluster's spark://HOST:7077


# ------------------------------------------------------------------------------------ frozen models
@dataclass(frozen=True)
class ComponentsConfig(Checked):
    """The frozen VAE, text encoder and tokenizer: hub ids or local directories, loaded one way
    (`sd_core.encoding.components.load_components`).

    ``build_tiny``: build small components into ``{data_root}/components`` from the synthetic data (tiny
    profile) instead of loading pretrained ones; they are then loaded from there by the same code path.
    The ``tiny_*`` and ``vae_fit_*`` fields shape that build only: a word-level tokenizer over the synthetic
    vocabulary, a seeded random ``CLIPTextModel`` (hidden = ``UNetConfig.ctx_dim``) and an ``AutoencoderKL``
    with ``tiny_vae_channels`` (len - 1 halvings: 64 px → 8×8 latents) fitted for ``vae_fit_steps`` steps
    of ``vae_fit_batch_size`` renders (a step budget: the same VAE on every machine, however fast).
    ``vae_shipped_fit``: where the repository ships the fit of exactly these settings
    (`sd_core.encoding.shipped_vae`, the default settings' ~8-minute fit), load it instead of fitting here.
    ``tokenizer`` empty: same source as ``text_encoder``.
    """

    LIMITS = {"max_length": at_least(2), "seed": at_least(0), "tiny_text_layers": at_least(1),  # 2: BOS + EOS
              "tiny_text_heads": at_least(1), "tiny_vae_channels": at_least(1, nonempty=True),
              "tiny_vae_layers_per_block": at_least(1), "tiny_vae_norm_groups": at_least(1),
              "vae_fit_steps": at_least(0), "vae_fit_batch_size": at_least(1),
              "vae_fit_lr": above(0)}

    vae: str = "stabilityai/sd-vae-ft-mse"
    text_encoder: str = "openai/clip-vit-large-patch14"
    tokenizer: str = "openai/clip-vit-large-patch14"
    build_tiny: bool = False
    max_length: int = 77
    seed: int = 0
    tiny_text_layers: int = 2
    tiny_text_heads: int = 4
    tiny_vae_channels: tuple[int, ...] = (16, 32, 32, 32)  # three halvings: 8×8 latents (BENCHMARKS.md, session 16)
    tiny_vae_layers_per_block: int = 1
    tiny_vae_norm_groups: int = 1  # GroupNorm groups; few groups keep absolute colour (see sd_core.encoding.vae_fit)
    vae_fit_steps: int = 3200  # 29.8 dB; the prompt scorer reads all of its reconstructions right (1600: 0.93)
    vae_fit_batch_size: int = 16
    vae_fit_lr: float = 3e-3
    vae_shipped_fit: bool = True


@dataclass(frozen=True)
class EncodeConfig(Checked):
    """Latent encoding of one shard (`sd_core.encoding.encode.encode_shard`).

    ``resolution``: images are resized (shorter side) and centre-cropped to this square. ``decode_workers``:
    JPEG-decoding worker processes feeding each encoder process. ``num_gpus``: encoder processes, one per
    GPU (None: every visible GPU; on CPU always one process). ``precision``: ``bf16`` (autocast) or ``fp32``;
    None = bf16 on CUDA, fp32 elsewhere (`sd_core.accel`).
    """

    LIMITS = {"resolution": at_least(1), "batch_size": at_least(1), "decode_workers": at_least(0),
              "num_gpus": at_least(1)}

    resolution: int = 512
    batch_size: int = 32
    decode_workers: int = 2
    num_gpus: int | None = None  # None: every visible GPU, or one CPU process
    precision: Literal["fp32", "bf16"] | None = None  # None: bf16 autocast on CUDA, fp32 elsewhere


# ----------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TrainConfig(Checked):
    """The training recipe (seeds + DESIGN.md section 5), read by `sd_core.train` (every field has a flag).

    Steps are optimiser steps of ``batch_size`` (per process) × ``grad_accum`` × processes samples;
    ``max_steps`` and ``epochs`` both bound the run (whichever ends first; ``None`` = unbounded by it).
    LR: linear warmup over ``warmup_steps``, then cosine to ``lr × min_lr_ratio`` at the last step.
    ``min_snr_gamma=None`` trains on the unweighted ε-MSE. ``val_share`` of the samples (by a hash of
    shard and row) is held out; ``val_max_samples`` of them are scored every ``val_every`` steps.
    ``nproc_per_node`` (the `unet_checkpoint` asset's torchrun): ``None`` = the visible GPU count, or 1 on CPU.
    ``num_workers``: DataLoader processes reading the latent cache (``None``: 4 on CUDA, 0 on CPU).
    ``precision``: ``bf16`` (autocast, fp32 weights) or ``fp32``; None = bf16 on CUDA, fp32 elsewhere.
    """

    LIMITS = {"batch_size": at_least(1), "grad_accum": at_least(1), "lr": above(0), "min_lr_ratio": within(0, 1),
              "weight_decay": at_least(0), "warmup_steps": at_least(0), "max_steps": at_least(1),
              "epochs": at_least(1), "seed": at_least(0), "min_snr_gamma": above(0),
              "noise_offset": at_least(0), "cfg_dropout": within(0, 1, hi_open=True), "ema_decay": within(0, 1), "grad_clip": above(0),
              "checkpoint_every": at_least(1), "keep_last": at_least(1), "log_every": at_least(1),
              "val_share": within(0, 1, hi_open=True), "val_every": at_least(1), "val_max_samples": at_least(0),
              "num_workers": at_least(0), "nproc_per_node": at_least(1),
              "wandb_mode": one_of("offline", "online", "disabled")}

    batch_size: int = 32  # per process
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.01
    weight_decay: float = 1e-2
    warmup_steps: int = 500
    max_steps: int | None = 10_000
    epochs: int | None = None
    seed: int = 0
    min_snr_gamma: float | None = 5.0
    # Offset noise: each image's noise gets a per-channel constant of this std. With plain Gaussian noise a
    # noised latent's channel means still show the clean image's means at every training timestep (SD's
    # terminal SNR is not zero), so the model reads global colour (the background) off its input instead of
    # learning it from the caption, and at sampling, from pure noise, picks it at random.
    noise_offset: float = 0.0
    # What the UNet predicts (ε as SD 1.x, or v) and whether the schedule ends at ᾱ = 0 (needs v): a zero
    # terminal SNR removes the clean image's trace from the noisiest training inputs, so the caption alone
    # must decide overall colour (`sd_core.model.schedulers`). Both are recorded in every checkpoint and
    # select the sampler (DDIM, trailing spacing with a zero terminal SNR) and the exported scheduler config.
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    zero_terminal_snr: bool = False
    cfg_dropout: float = 0.1
    ema_decay: float = 0.9999
    grad_clip: float = 1.0
    grad_ckpt: bool = False
    compile: bool = False
    channels_last: bool = False
    precision: Literal["fp32", "bf16"] | None = None  # None: bf16 autocast on CUDA, fp32 elsewhere
    checkpoint_every: int = 1000
    keep_last: int = 3
    log_every: int = 50
    val_share: float = 0.02
    val_every: int = 500
    val_max_samples: int = 1024
    num_workers: int | None = None
    nproc_per_node: int | None = None  # None: visible GPU count, or 1 on CPU
    wandb: bool = False
    wandb_mode: str = "offline"
    wandb_project: str = "sd-pipeline"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":
            raise ConfigError("train.zero_terminal_snr = True needs train.prediction_type = 'v_prediction' "
                              "(ε-prediction is undefined where the schedule reaches ᾱ = 0)")


# ----------------------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class SampleConfig(Checked):
    """Fixed prompts and seeds of the `sample_grid` asset (and the defaults of `sd generate`).

    The grid has one row per prompt and one column per seed: cell (r, c) is ``prompts[r]`` sampled with seed
    ``seeds[c]`` (one generator per image, see `sd_core.sampling.generate`), so grids of different checkpoints compare
    cell by cell. DDIM with ``steps`` steps and ``eta`` (0 deterministic, 1 as noisy as DDPM); classifier-free
    guidance ``guidance`` against the empty prompt, or ``negative_prompt`` when set, at the timesteps
    t >= ``guidance_min_timestep`` only; below it the conditional prediction alone (0: every step, SD's usual;
    "guidance in a limited interval", Kynkäänniemi et al. 2024). ``height``/``width`` in pixels (multiples of the VAE's
    downsampling). For the tiny profile every prompt names one colour of `sd_core.data.synthetic.COLORS`, which
    the prompt-adherence score (`sd_core.sampling.adherence`) checks.
    """

    LIMITS = {"prompts": Limit(nonempty=True), "seeds": at_least(0, nonempty=True), "steps": within(1, 1000),
              "guidance": at_least(0), "eta": at_least(0), "guidance_min_timestep": within(0, 999),
              "height": at_least(1), "width": at_least(1)}

    prompts: tuple[str, ...] = (
        "a photograph of an astronaut riding a horse",
        "a watercolor painting of a lighthouse at dusk",
        "a bowl of fruit on a wooden table",
        "a red sports car in the rain",
    )
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    negative_prompt: str | None = None
    steps: int = 30
    guidance: float = 7.5
    eta: float = 0.0
    guidance_min_timestep: int = 0
    height: int = 512
    width: int = 512


# ------------------------------------------------------------------------------------------ profile
@dataclass(frozen=True)
class Profile(Checked):
    """One named bundle of every stage's config plus the data root everything is written under."""

    name: str
    data_root: Path
    source: SourceConfig = field(default_factory=SourceConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    components: ComponentsConfig = field(default_factory=ComponentsConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    # The storage layout of DESIGN.md section 3, in one place.
    @property
    def metadata_dir(self) -> Path:
        return self.data_root / "metadata"

    @property
    def filtered_dir(self) -> Path:
        return self.data_root / "filtered"

    @property
    def shards_dir(self) -> Path:
        return self.data_root / "shards"

    @property
    def latents_dir(self) -> Path:
        return self.data_root / "latents"

    @property
    def components_dir(self) -> Path:
        return self.data_root / "components"

    @property
    def checkpoints_dir(self) -> Path:
        return self.data_root / "checkpoints"

    @property
    def samples_dir(self) -> Path:
        return self.data_root / "samples"

    @property
    def dagster_home(self) -> Path:
        return self.data_root / "dagster_home"

    @classmethod
    def tiny(cls, data_root: str | os.PathLike[str] = DEFAULT_DATA_ROOT) -> "Profile":
        return cls(
            name="tiny",
            data_root=Path(data_root),
            # 2000 synthetic rows → 1,490 pass the filters (planted rejects: sd_core.data.synthetic) → 3 shards
            # of ≤ 500 rows, 1,430 images of 64-96 px; ~15 s of img2dataset per shard on 2 cores.
            source=SourceConfig(kind="synthetic", synthetic_rows=2000, synthetic_image_size=64),
            filter=FilterConfig(min_side=64),
            download=DownloadConfig(shard_size=500, image_size=64, thread_count=8, timeout_s=5, watchdog_s=120.0),
            components=ComponentsConfig(vae="", text_encoder="", tokenizer="", build_tiny=True, max_length=16),
            encode=EncodeConfig(resolution=64, batch_size=64, decode_workers=1),
            unet=UNetConfig.tiny(),
            train=TrainConfig(
                # noise_offset 0.4: on small latents a channel's mean noise is only 1/side (1/16 on the earlier
                # 16×16 latents), so 0.1 (diffusers' usual) left the clean background readable off the noisiest
                # inputs: background accuracy 0.42 at 600 steps, 0.96 with 0.4 (BENCHMARKS.md, the demo's
                # levers); on today's 8×8 latents backgrounds read 1.00 with it
                # 2 processes × 16 (global batch 32), one OpenMP thread each: 99 samples/s idle and 57 next to
                # a busy process on 2 cores, where one process × 2 threads gave ~90 and 2.5 (its threads
                # spin-wait for each other): benchmarks/bench_train_threads.py
                # Min-SNR γ 2 (SD's recipe: 5) and 1250 steps: whole prompt 0.95-0.99 over two runs and two seed
                # sets, where γ 5 read 0.92 / 0.93 at 1250 steps and 0.94-0.98 at 1500; unweighted (γ 0) 0.66.
                # Fewer steps lose the squares' corners first (BENCHMARKS.md, session 9; on 8×8 latents 1000
                # steps read 0.93 / 0.97 where 1250 read 0.98 / 1.00: session 16).
                # One checkpoint, the final one: checkpoint_eval scores every checkpoint (~45 s of 144 images on a
                # 2-core Zen 3) and the demo's mid-run one never was its best; the price: an interrupted demo
                # restarts its 1250 steps (BENCHMARKS.md, session 10).
                batch_size=16, nproc_per_node=2,
                lr=1e-3, warmup_steps=50, max_steps=1250, min_snr_gamma=2.0, noise_offset=0.4,
                ema_decay=0.999, checkpoint_every=1250, log_every=25, val_every=250, val_share=0.05,
                val_max_samples=256,
                num_workers=0,
            ),
            sample=SampleConfig(
                prompts=(
                    "a red circle on a white background",
                    "a green square on a black background",
                    "a blue triangle on a gray background",
                    "a yellow circle on a black background",
                ),
                seeds=(0, 1, 2, 3),
                # Stochastic sampling with guidance only at t >= 500: the demo's whole-prompt accuracy 0.73 → 0.99
                # on the same checkpoint. Full guidance at low noise rounded the squares' corners (they read as
                # circles); deterministic DDIM kept the early, round guess (BENCHMARKS.md, the demo's sampler).
                # 50 steps, not 30: at eta 1 each step adds fresh noise, and more, smaller steps keep more
                # squares square (shape 0.91 / 0.94 / 0.96 / 0.97 at 30 / 40 / 50 / 75 steps on one checkpoint).
                steps=50,
                guidance=5.0,
                eta=1.0,
                guidance_min_timestep=500,
                height=64,
                width=64,
            ),
        )

    @classmethod
    def sd15(cls, data_root: str | os.PathLike[str] = DEFAULT_DATA_ROOT) -> "Profile":
        return cls(
            name="sd15",
            data_root=Path(data_root),
            source=SourceConfig(kind="hf", uri="ChristophSchuhmann/improved_aesthetics_6.5plus"),
            filter=FilterConfig(),
            download=DownloadConfig(),
            components=ComponentsConfig(),
            encode=EncodeConfig(resolution=512),
            unet=UNetConfig.sd15(),
            train=TrainConfig(batch_size=128, grad_accum=2, grad_ckpt=True, compile=True, wandb=True,
                              wandb_mode="online"),
            sample=SampleConfig(),
        )

    def with_overrides(self, overrides: dict[str, Any] | None) -> "Profile":
        """Return a copy with nested overrides applied, e.g. ``{"filter": {"min_aesthetic": 6.0}}``.

        Unknown sections or fields are a `ConfigError` (a ``ValueError``) naming them, so a typo in a YAML run
        config is caught instead of silently ignored; so is a value of the wrong type or out of range
        (`Checked`: "train.batch_size = -4: must be an integer >= 1").
        """
        if not overrides:
            return self
        if not isinstance(overrides, Mapping):
            raise ConfigError(f"profile overrides must be a mapping of sections, got {type(overrides).__name__}")
        changes: dict[str, Any] = {}
        sections = {f.name: f for f in dataclasses.fields(self)}
        for key, value in overrides.items():
            if key not in sections:
                raise ConfigError(f"unknown profile section {key!r}; expected one of {sorted(sections)}")
            current = getattr(self, key)
            if dataclasses.is_dataclass(current):
                changes[key] = _replace_checked(current, value, section=key)
            else:  # name, data_root: checked (and data_root made a Path) by Profile.__post_init__
                changes[key] = value
        return dataclasses.replace(self, **changes)


def _replace_checked(obj: Any, values: dict[str, Any], section: str) -> Any:
    """``obj`` with the fields in ``values`` replaced; the new instance's `Checked.__post_init__` checks (and
    normalises: lists → tuples, ints → floats) every value."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"profile section {section!r} must be a mapping, got {type(values).__name__}")
    names = {f.name: f for f in dataclasses.fields(obj)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown field(s) {unknown} in profile section {section!r}; expected {sorted(names)}")
    return dataclasses.replace(obj, **values)


def setting_changes(before: Profile, after: Profile, names: tuple[str, ...]) -> list[str]:
    """Which of the settings ``names`` (a section, ``"train"``, or one field, ``"encode.precision"``) differ
    from ``before`` to ``after``, one ``"section.field old -> new"`` per field: what decides whether an asset
    made with ``before`` is stale under ``after`` (`make demo` re-runs it, and says why)."""
    sections = {f.name for f in dataclasses.fields(Profile)} - {"name", "data_root"}
    changes: list[str] = []
    for name in names:
        section, _, only = name.partition(".")
        if section not in sections:
            raise ConfigError(f"unknown setting {name!r}: a profile section ({', '.join(sorted(sections))}) "
                              "or section.field")
        old, new = getattr(before, section), getattr(after, section)
        fields = [only] if only else [f.name for f in dataclasses.fields(old)]
        for f in fields:
            if not hasattr(old, f):
                raise ConfigError(f"unknown setting {name!r}: section {section!r} has no field {f!r}")
            if getattr(old, f) != getattr(new, f):
                changes.append(f"{section}.{f} {getattr(old, f)!r} -> {getattr(new, f)!r}")
    return changes


PROFILES = {"tiny": Profile.tiny, "sd15": Profile.sd15}


def get_profile(
    name: str | None = None,
    data_root: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Profile:
    """Resolve a profile: explicit name, else ``$SD_PROFILE``, else ``tiny``; data root likewise
    (``$SD_DATA_ROOT``, else ``./data``)."""
    origin = "profile" if name else PROFILE_ENV  # where a bad name came from, for the message
    name = name or os.environ.get(PROFILE_ENV) or "tiny"
    if name not in PROFILES:
        raise ConfigError(f"unknown profile {name!r} (from {origin}): must be one of {', '.join(sorted(PROFILES))}")
    root = data_root or os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT
    return PROFILES[name](root).with_overrides(overrides)
