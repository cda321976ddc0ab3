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

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

PROFILE_ENV = "SD_PROFILE"
DATA_ROOT_ENV = "SD_DATA_ROOT"
DEFAULT_DATA_ROOT = "data"


# --------------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class UNetConfig:
    """Shape of the denoising UNet; names follow the seed write-up and CompVis ``openaimodel.py``.

    ``ch_mults``: width of each resolution level as a multiple of ``ch`` (level 1 = full latent resolution,
    each further level halves it). ``attn_lvls``: the levels, counted from 1, whose blocks carry a
    SpatialTransformer; the middle block always has one. So SD 1.5's ``attn_lvls=(1, 2, 3)`` puts attention
    at 64, 32 and 16 (latent px) and none at 8, which is what gives its 859,520,964 parameters (0-based,
    attention at 32, 16 and 8 instead, it would be 1,020,594,564). ``heads``: attention heads per
    SpatialTransformer (head width = channels // heads), like CompVis ``num_heads`` and diffusers'
    ``attention_head_dim`` in SD 1.x configs. ``t_dim`` = 4 x ``ch``.
    """

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
        n = len(self.ch_mults)
        bad_lvls = [lvl for lvl in self.attn_lvls if not 1 <= lvl <= n]
        if bad_lvls:
            raise ValueError(f"UNetConfig.attn_lvls {bad_lvls} out of range: levels are counted 1..{n} (len(ch_mults))")
        for mult in self.ch_mults:
            width = mult * self.ch
            if width % self.norm_groups:
                raise ValueError(f"UNetConfig: width {width} (ch x {mult}) not divisible by norm_groups={self.norm_groups}")
            if width % self.heads:
                raise ValueError(f"UNetConfig: width {width} (ch x {mult}) not divisible by heads={self.heads}")

    @property
    def t_dim(self) -> int:
        """Width of the time embedding (4 × ch, as in SD)."""
        return 4 * self.ch

    @classmethod
    def sd15(cls) -> "UNetConfig":
        return cls(ch=320, ch_mults=(1, 2, 4, 4), res_blks=2, attn_lvls=(1, 2, 3), heads=8, ctx_dim=768)

    @classmethod
    def tiny(cls) -> "UNetConfig":
        """4.1M parameters: one CPU training step (AdamW, batch 32, 16×16 latents, 16 context tokens) takes
        ~0.2 s on 2 cores. No attention at the full 16×16 level: at this size it would cost ~2× the time."""
        return cls(ch=32, ch_mults=(1, 2, 4), res_blks=1, attn_lvls=(2, 3), heads=4, ctx_dim=64)


# ---------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class SourceConfig:
    """Where `laion_metadata` comes from.

    kind: ``synthetic`` (embedded shapes served on loopback), ``parquet`` (in ``uri``: a local file, folder or
    glob, an ``http(s)://`` URL of one file, or a pyarrow filesystem URI such as ``s3://bucket/dir/*.parquet``)
    or ``hf`` (a Hugging Face dataset repo id in ``uri``, optionally followed by a file pattern:
    ``org/name`` or ``org/name/data/*.parquet``; fetched with ``huggingface_hub.snapshot_download``).
    ``synthetic_*``: rows, seed and base image side of the embedded source (`sd_core.data.synthetic`).
    """

    kind: Literal["synthetic", "parquet", "hf"] = "synthetic"
    uri: str | None = None
    hf_revision: str | None = None
    synthetic_rows: int = 1200
    synthetic_seed: int = 0
    synthetic_image_size: int = 64


@dataclass(frozen=True)
class FilterConfig:
    """The seeds' quality filters, applied in field order below (the funnel order). ``None`` disables a filter.

    Bounds are inclusive (``aesthetic >= min_aesthetic``, ``min_aspect <= width/height <= max_aspect``,
    caption length in characters) except the probabilities, which must stay strictly below their maximum
    (``pwatermark < max_pwatermark``). Safety: ``NSFW in nsfw_allowed`` for files that carry the
    laion2B-en ``NSFW`` string column, else ``punsafe < max_punsafe``. A NULL (or NaN) fails its filter;
    rows without a URL are always dropped; duplicates by URL keep the first row (file order, row order).
    """

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


@dataclass(frozen=True)
class DownloadConfig:
    """img2dataset settings for `image_shards`, and the rows per shard part of `filtered_metadata`."""

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


# ------------------------------------------------------------------------------------ frozen models
@dataclass(frozen=True)
class ComponentsConfig:
    """The frozen VAE, text encoder and tokenizer: hub ids or local directories, loaded one way
    (`sd_core.encoding.components.load_components`).

    ``build_tiny``: build small components into ``{data_root}/components`` from the synthetic data (tiny
    profile) instead of loading pretrained ones; they are then loaded from there by the same code path.
    The ``tiny_*`` and ``vae_fit_*`` fields shape that build only: a word-level tokenizer over the synthetic
    vocabulary, a seeded random ``CLIPTextModel`` (hidden = ``UNetConfig.ctx_dim``) and an ``AutoencoderKL``
    with ``tiny_vae_channels`` (len - 1 halvings: 64 px → 16×16 latents) fitted for ``vae_fit_steps`` steps
    or ``vae_fit_seconds``, whichever comes first. ``tokenizer`` empty: same source as ``text_encoder``.
    """

    vae: str = "stabilityai/sd-vae-ft-mse"
    text_encoder: str = "openai/clip-vit-large-patch14"
    tokenizer: str = "openai/clip-vit-large-patch14"
    build_tiny: bool = False
    max_length: int = 77
    seed: int = 0
    tiny_text_layers: int = 2
    tiny_text_heads: int = 4
    tiny_vae_channels: tuple[int, ...] = (16, 32, 32)
    tiny_vae_layers_per_block: int = 1
    tiny_vae_norm_groups: int = 1  # GroupNorm groups; few groups keep absolute colour (see sd_core.encoding.vae_fit)
    vae_fit_seconds: float = 180.0  # tiny VAE fitting budget (wall clock)
    vae_fit_steps: int | None = None  # cap on fitting steps (None: the time budget alone)
    vae_fit_batch_size: int = 16
    vae_fit_lr: float = 3e-3


@dataclass(frozen=True)
class EncodeConfig:
    """Latent encoding of one shard (`sd_core.encoding.encode.encode_shard`).

    ``resolution``: images are resized (shorter side) and centre-cropped to this square. ``decode_workers``:
    JPEG-decoding worker processes feeding each encoder process. ``num_gpus``: encoder processes, one per
    GPU (None: every visible GPU; on CPU always one process). ``autocast_bf16``: bf16 autocast on CUDA.
    """

    resolution: int = 512
    batch_size: int = 32
    decode_workers: int = 2
    num_gpus: int | None = None  # None: every visible GPU, or one CPU process
    autocast_bf16: bool = True


# ----------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TrainConfig:
    """The training recipe (seeds + DESIGN.md section 5), read by `sd_core.train` (every field has a flag).

    Steps are optimiser steps of ``batch_size`` (per process) × ``grad_accum`` × processes samples;
    ``max_steps`` and ``epochs`` both bound the run (whichever ends first; ``None`` = unbounded by it).
    LR: linear warmup over ``warmup_steps``, then cosine to ``lr × min_lr_ratio`` at the last step.
    ``min_snr_gamma=None`` trains on the unweighted ε-MSE. ``val_share`` of the samples (by a hash of
    shard and row) is held out; ``val_max_samples`` of them are scored every ``val_every`` steps.
    ``nproc_per_node`` (the `unet_checkpoint` asset's torchrun): ``None`` = the visible GPU count, or 1 on CPU.
    ``num_workers``: DataLoader processes reading the latent cache (``None``: 4 on CUDA, 0 on CPU).
    """

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
    cfg_dropout: float = 0.1
    ema_decay: float = 0.9999
    grad_clip: float = 1.0
    grad_ckpt: bool = False
    compile: bool = False
    channels_last: bool = False
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


# ----------------------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class SampleConfig:
    """Fixed prompts and seeds of the `sample_grid` asset (and the defaults of `sd generate`).

    The grid has one row per prompt and one column per seed: cell (r, c) is ``prompts[r]`` sampled with seed
    ``seeds[c]`` (one generator per image, see `sd_core.sampling.generate`), so grids of different checkpoints compare
    cell by cell. DDIM with ``steps`` steps and ``eta``; classifier-free guidance ``guidance`` against the
    empty prompt, or ``negative_prompt`` when set. ``height``/``width`` in pixels (multiples of the VAE's
    downsampling). For the tiny profile every prompt names one colour of `sd_core.data.synthetic.COLORS`, which
    the prompt-adherence score (`sd_core.sampling.adherence`) checks.
    """

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
    height: int = 512
    width: int = 512


# ------------------------------------------------------------------------------------------ profile
@dataclass(frozen=True)
class Profile:
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
                batch_size=32, lr=1e-3, warmup_steps=50, max_steps=1500, min_snr_gamma=5.0, ema_decay=0.999,
                checkpoint_every=500, log_every=25, val_every=250, val_share=0.05, val_max_samples=256,
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

        Unknown sections or fields are a ``ValueError`` naming them, so a typo in a YAML run config is
        caught instead of silently ignored.
        """
        if not overrides:
            return self
        changes: dict[str, Any] = {}
        sections = {f.name: f for f in dataclasses.fields(self)}
        for key, value in overrides.items():
            if key not in sections:
                raise ValueError(f"unknown profile section {key!r}; expected one of {sorted(sections)}")
            current = getattr(self, key)
            if dataclasses.is_dataclass(current):
                changes[key] = _replace_checked(current, value, section=key)
            elif key == "data_root":
                changes[key] = Path(value)
            else:
                changes[key] = value
        return dataclasses.replace(self, **changes)


def _replace_checked(obj: Any, values: dict[str, Any], section: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"profile section {section!r} must be a mapping, got {type(values).__name__}")
    names = {f.name: f for f in dataclasses.fields(obj)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} in profile section {section!r}; expected {sorted(names)}")
    coerced = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return dataclasses.replace(obj, **coerced)


PROFILES = {"tiny": Profile.tiny, "sd15": Profile.sd15}


def get_profile(
    name: str | None = None,
    data_root: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Profile:
    """Resolve a profile: explicit name, else ``$SD_PROFILE``, else ``tiny``; data root likewise
    (``$SD_DATA_ROOT``, else ``./data``)."""
    name = name or os.environ.get(PROFILE_ENV) or "tiny"
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r} (from {PROFILE_ENV} or config); expected one of {sorted(PROFILES)}")
    root = data_root or os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT
    return PROFILES[name](root).with_overrides(overrides)
