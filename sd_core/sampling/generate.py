"""Sampling: DDIM with classifier-free guidance, and the `sd generate` command.

    images = generate(unet, text_encoder, tokenizer, vae, ["a red circle on a white background"], seed=0)

The loop is the one of diffusers' ``StableDiffusionPipeline`` (the tests check pixel parity against it on an
export of the same weights): tokenize to the tokenizer's max length, text embedding = last hidden state,
unconditional embedding = the empty prompt "" (the convention the trainer's CFG dropout uses) or the negative
prompt, latents ~ N(0, I), then for every DDIM timestep one UNet call on the batch [uncond; cond] and
ε = ε_u + g·(ε_c − ε_u), finally ``vae.decode(latents / scaling_factor)`` and [-1, 1] → uint8 PIL.

Seeds: image i gets its own ``torch.Generator`` (CPU) seeded with ``seed + i`` when ``seed`` is an int, or with
``seed[i]`` when a list is given. That generator draws the image's initial latents and, for eta > 0, its DDIM
noise. So an image depends only on (prompt, negative prompt, its seed, settings), never on its batch
neighbours, the batch size or the device's RNG; diffusers gives the same image when handed the same list of
generators (``generator=[torch.Generator().manual_seed(s) for s in seeds]``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from sd_core.config import (DATA_ROOT_ENV, PROFILE_ENV, ConfigError, Profile, SampleConfig, field_arg, get_profile,
                            json_object_arg, positive_int_arg)
from sd_core.encoding.components import encode_text, load_components, tokenize, vae_downsampling
from sd_core.model.schedulers import DDIMScheduler, DDPMScheduler, sampler_for
from sd_core.model.unet import UNetModel
from sd_core.training import checkpoint as ckpt_mod
from sd_core.training.checkpoint import CheckpointConfig, CheckpointError

__all__ = ["CheckpointError", "CompatibilityError", "SamplingBundle", "check_compatible", "encode_prompts",
           "generate", "generate_main", "image_grid", "load_for_sampling", "make_generators", "pick_device",
           "sample_settings"]


class CompatibilityError(ValueError):
    """The UNet, text encoder, tokenizer and VAE (or a checkpoint and a profile) do not fit together."""


# ------------------------------------------------------------------------------------------- helpers
def pick_device(requested: str | None = None) -> torch.device:
    """``requested`` if given, else CUDA, else Apple MPS, else CPU."""
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype | None:
    """``auto`` → bf16 on CUDA, None (keep fp32) elsewhere; ``fp32`` / ``bf16`` / ``fp16`` as named."""
    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _module_device_dtype(module: Any) -> tuple[torch.device, torch.dtype]:
    for p in module.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def _unet_in_channels(unet: Any) -> int:
    cfg = unet.config
    return int(getattr(cfg, "in_ch", None) or getattr(cfg, "in_channels"))


def _unet_ctx_dim(unet: Any) -> int:
    cfg = unet.config
    return int(getattr(cfg, "ctx_dim", None) or getattr(cfg, "cross_attention_dim"))


def unet_caller(unet: Any) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``f(x, t, ctx) -> eps`` for our ``UNetModel`` or a diffusers ``UNet2DConditionModel``."""
    if hasattr(unet.config, "ctx_dim"):  # ours
        return lambda x, t, ctx: unet(x, t, ctx)
    return lambda x, t, ctx: unet(x, t, encoder_hidden_states=ctx, return_dict=False)[0]


def check_compatible(unet: Any, text_encoder: Any, vae: Any, tokenizer: Any = None) -> None:
    """Raise :class:`CompatibilityError` naming both sides when the components cannot work together."""
    problems = []
    hidden = int(text_encoder.config.hidden_size)
    ctx_dim = _unet_ctx_dim(unet)
    if hidden != ctx_dim:
        problems.append(f"text encoder hidden size is {hidden} but the UNet expects a context width (ctx_dim) of "
                        f"{ctx_dim}")
    lat = int(vae.config.latent_channels)
    in_ch = _unet_in_channels(unet)
    if lat != in_ch:
        problems.append(f"VAE has {lat} latent channels but the UNet expects in_ch={in_ch}")
    if tokenizer is not None:
        vocab = int(text_encoder.config.vocab_size)
        if len(tokenizer) > vocab:
            problems.append(f"tokenizer has {len(tokenizer)} tokens but the text encoder's vocab_size is {vocab}")
    if problems:
        raise CompatibilityError("components do not fit together: " + "; ".join(problems))


def make_generators(seed: int | Sequence[int], n: int) -> list[torch.Generator]:
    """One CPU generator per image: ``seed + i`` for an int seed, ``seed[i]`` for a list."""
    if isinstance(seed, (int, np.integer)):
        seeds = [int(seed) + i for i in range(n)]
    else:
        seeds = [int(s) for s in seed]
        if len(seeds) != n:
            raise ValueError(f"got {len(seeds)} seeds for {n} prompts")
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


@torch.no_grad()
def encode_prompts(text_encoder: Any, tokenizer: Any, prompts: Sequence[str], max_length: int | None = None,
                   device: torch.device | None = None) -> torch.Tensor:
    """Text context for ``prompts``: the training stack's tokenization (``sd_core.encoding.components.tokenize``: BOS,
    words, EOS, padded/truncated to ``max_length``, default the tokenizer's ``model_max_length``) and the text
    encoder's last hidden state (``sd_core.encoding.components.encode_text``), which is what
    ``StableDiffusionPipeline.encode_prompt`` computes too."""
    max_length = int(max_length or tokenizer.model_max_length)
    ids = tokenize(tokenizer, list(prompts), max_length)
    ctx = encode_text(text_encoder, ids)
    return ctx if device is None else ctx.to(device)


def latents_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """VAE output in [-1, 1], (B, 3, H, W) → PIL images (the rounding of diffusers' image processor)."""
    arr = (images / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    arr = (arr * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arr]


# ------------------------------------------------------------------------------------------ generate
@torch.no_grad()
def generate(
    unet: nn.Module,
    text_encoder: nn.Module,
    tokenizer: Any,
    vae: nn.Module,
    prompts: str | Sequence[str],
    negative_prompts: str | Sequence[str] | None = None,
    steps: int = 30,
    guidance: float = 7.5,
    eta: float = 0.0,
    guidance_min_timestep: int = 0,
    seed: int | Sequence[int] = 0,
    height: int = 512,
    width: int = 512,
    scaling_factor: float | None = None,
    batch_size: int | None = None,
    max_length: int | None = None,
    progress: bool = False,
    output: str = "pil",
    scheduler: DDIMScheduler | None = None,
) -> list[Image.Image] | torch.Tensor:
    """Generate one image per prompt with DDIM (``steps``, ``eta``) and classifier-free guidance.

    ``negative_prompts``: one string for all, or one per prompt; None = the empty prompt. ``guidance`` = 1
    skips the unconditional pass (the result is the same); so do the timesteps below ``guidance_min_timestep``,
    which use the conditional prediction alone (`SampleConfig`). ``scaling_factor``: the latent scaling the UNet was
    trained with; default ``vae.config.scaling_factor``. ``batch_size``: images per UNet batch (default all;
    the result does not depend on it). Models are used on the device and dtype they are on; latents and the
    scheduler run in float32, the UNet input is cast to the UNet's dtype. See the module docstring for seeds.
    ``output="latent"`` skips the VAE decode and returns the final (scaled) latents, (N, C, h, w) float32.
    ``scheduler``: the sampler matching the model's training schedule (`SamplingBundle.sampler`); default SD
    1.x's DDIM (ε-prediction, leading spacing).
    """
    if output not in ("pil", "latent"):
        raise ValueError(f"output must be 'pil' or 'latent', got {output!r}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        return []
    negatives = _negatives_for(negative_prompts, len(prompts))
    check_compatible(unet, text_encoder, vae, tokenizer)
    shape = _latent_shape(unet, vae, height, width)
    scaling = float(scaling_factor if scaling_factor is not None else vae.config.scaling_factor)
    do_cfg = guidance != 1.0
    gens = make_generators(seed, len(prompts))
    scheduler = scheduler or DDIMScheduler()
    scheduler.set_timesteps(steps)
    bs = batch_size or len(prompts)
    images: list[Image.Image] = []
    final_latents: list[torch.Tensor] = []
    for start in range(0, len(prompts), bs):
        sl = slice(start, start + bs)
        ctx = _guidance_context(text_encoder, tokenizer, prompts[sl], negatives[sl] if do_cfg else None, max_length)
        latents = _initial_latents(gens[sl], shape, _module_device_dtype(unet)[0], scheduler.init_noise_sigma)
        latents = _denoise(unet, scheduler, latents, ctx, guidance=guidance if do_cfg else None, eta=eta,
                           guidance_min_timestep=guidance_min_timestep, generators=gens[sl], progress=progress)
        if output == "latent":
            final_latents.append(latents)
        else:
            images.extend(_decode_to_pil(vae, latents, scaling))
    return torch.cat(final_latents) if output == "latent" else images


def sample_settings(cfg: SampleConfig) -> dict[str, Any]:
    """`generate`'s keyword arguments for a profile's `SampleConfig` (negative prompt, steps, guidance and
    its interval, eta, image size): the one place the grid, the evaluation and `sd generate` read them."""
    return {"negative_prompts": cfg.negative_prompt, "steps": cfg.steps, "guidance": cfg.guidance, "eta": cfg.eta,
            "guidance_min_timestep": cfg.guidance_min_timestep, "height": cfg.height, "width": cfg.width}


def _negatives_for(negative_prompts: str | Sequence[str] | None, n: int) -> list[str]:
    """One negative prompt per prompt: the empty prompt (what the trainer's CFG dropout trains on), one string
    for all, or the given list."""
    if negative_prompts is None:
        return [""] * n
    if isinstance(negative_prompts, str):
        return [negative_prompts] * n
    negatives = list(negative_prompts)
    if len(negatives) != n:
        raise ValueError(f"got {len(negatives)} negative prompts for {n} prompts")
    return negatives


def _latent_shape(unet: Any, vae: Any, height: int, width: int) -> tuple[int, int, int, int]:
    """The shape of one image's initial latents, (1, C, h, w); the image size must be a multiple of the VAE's
    downsampling."""
    factor = vae_downsampling(vae.config.block_out_channels)
    if height % factor or width % factor:
        raise ValueError(f"height and width must be multiples of {factor} (the VAE's downsampling), "
                         f"got {height}×{width}")
    return (1, _unet_in_channels(unet), height // factor, width // factor)


def _guidance_context(text_encoder: Any, tokenizer: Any, prompts: Sequence[str], negatives: Sequence[str] | None,
                      max_length: int | None) -> torch.Tensor:
    """The text context of one batch: the prompts' embeddings, preceded by the negatives' ([uncond; cond], the
    order of diffusers' pipeline); ``negatives`` None (no guidance) gives the prompts' embeddings alone."""
    te_device = _module_device_dtype(text_encoder)[0]
    cond = encode_prompts(text_encoder, tokenizer, prompts, max_length, te_device)
    if negatives is None:
        return cond
    uncond = encode_prompts(text_encoder, tokenizer, negatives, cond.shape[1], te_device)
    return torch.cat([uncond, cond])


def _initial_latents(generators: Sequence[torch.Generator], shape: tuple[int, ...], device: torch.device,
                     init_noise_sigma: float) -> torch.Tensor:
    """x_T: each image's latents drawn from its own generator (float32 on the CPU, so the draw does not depend
    on the device), scaled to the scheduler's initial noise level."""
    latents = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]).to(device)
    return latents * init_noise_sigma


def _denoise(unet: Any, scheduler: DDIMScheduler, latents: torch.Tensor, ctx: torch.Tensor, *,
             guidance: float | None, eta: float, guidance_min_timestep: int, generators: Sequence[torch.Generator],
             progress: bool) -> torch.Tensor:
    """The DDIM loop: at every timestep one UNet call and one scheduler step. With a ``guidance`` scale the
    call runs on [latents; latents] against [uncond; cond] and ε = ε_u + g·(ε_c − ε_u), at timesteps
    t >= ``guidance_min_timestep``; below them, and for None (guidance 1), on the latents against cond alone.
    ``generators`` draw each image's step noise for eta > 0."""
    device, unet_dtype = _module_device_dtype(unet)
    call = unet_caller(unet)
    ctx = ctx.to(device=device, dtype=unet_dtype)
    cond = ctx.chunk(2)[1] if guidance is not None else ctx
    timesteps = scheduler.timesteps
    if progress:
        from tqdm.auto import tqdm

        timesteps = tqdm(timesteps, desc="ddim", leave=False)
    for t in timesteps:
        if guidance is not None and int(t) >= guidance_min_timestep:
            eps_u, eps_c = call(torch.cat([latents] * 2).to(unet_dtype), t.to(device).expand(2 * len(latents)),
                                ctx).float().chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        else:
            eps = call(latents.to(unet_dtype), t.to(device).expand(len(latents)), cond).float()
        latents = scheduler.step(eps, t, latents, eta=eta, generator=generators if eta > 0 else None)
    return latents


def _decode_to_pil(vae: Any, latents: torch.Tensor, scaling: float) -> list[Image.Image]:
    """Unscale the final latents and decode them with the VAE, on its device and in its dtype."""
    vae_device, vae_dtype = _module_device_dtype(vae)
    decoded = vae.decode((latents / scaling).to(device=vae_device, dtype=vae_dtype)).sample
    return latents_to_pil(decoded.float())


def image_grid(images: Sequence[Image.Image], rows: int, labels: Sequence[str] | None = None,
               label_width: int | None = None) -> Image.Image:
    """Tile ``images`` row by row into a ``rows``-row grid, with an optional text label left of each row."""
    if not images:
        raise ValueError("no images for a grid")
    cols = math.ceil(len(images) / rows)
    w, h = images[0].size
    from PIL import ImageDraw, ImageFont

    try:  # a label size that stays readable from 64 px to 512 px tiles (Pillow >= 10.1)
        font = ImageFont.load_default(size=max(10, h // 16))
    except TypeError:  # pragma: no cover - older Pillow
        font = ImageFont.load_default()
    pad = 4
    lw = 0
    if labels:
        lw = label_width or max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(s, font=font)) for s in labels) + 2 * pad
    grid = Image.new("RGB", (lw + cols * w, rows * h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(img, (lw + c * w, r * h))
    if labels:
        for r, text in enumerate(labels[:rows]):
            draw.text((pad, r * h + h // 2), text, fill=(0, 0, 0), font=font, anchor="lm")
    return grid


# -------------------------------------------------------------------------------- loading a checkpoint
@dataclass
class SamplingBundle:
    """Everything :func:`generate` needs, loaded from a checkpoint and a profile's components."""

    unet: Any
    text_encoder: Any
    tokenizer: Any
    vae: Any
    scaling_factor: float
    checkpoint: Path
    step: int | None
    ema: bool
    config: CheckpointConfig | None = None  # the checkpoint's config.json (lineage included); None: a bare file
    max_length: int | None = None

    def sampler(self) -> DDIMScheduler:
        """The DDIM sampler for the schedule this checkpoint was trained on (its recorded train config; SD 1.x's
        for a bare file or a checkpoint from before the setting existed)."""
        return sampler_for(*schedule_of(self.config))

    def noise_schedule(self) -> DDPMScheduler:
        """The training schedule this checkpoint was trained on."""
        prediction_type, zero_snr = schedule_of(self.config)
        return DDPMScheduler(zero_terminal_snr=zero_snr, prediction_type=prediction_type)


def schedule_of(config: CheckpointConfig | None) -> tuple[str, bool]:
    """(prediction type, zero terminal SNR) recorded in a checkpoint's train config; SD 1.x's when absent."""
    train = (config.train if config is not None else None) or {}
    return str(train.get("prediction_type") or "epsilon"), bool(train.get("zero_terminal_snr", False))


def _expected_shape_report(weights: dict[str, torch.Tensor], unet_config: Any) -> str:
    """Which tensors differ in shape / are missing / unexpected, against a UNet built from ``unet_config``."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in UNetModel(unet_config).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in weights.items()}
    bad = [f"{k}: checkpoint {got[k]}, expected {expected[k]}" for k in expected if k in got and got[k] != expected[k]]
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    parts = []
    if bad:
        parts.append(f"{len(bad)} shape mismatch(es): " + "; ".join(bad[:6]) + (" …" if len(bad) > 6 else ""))
    if missing:
        parts.append(f"{len(missing)} missing: {missing[:6]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {unexpected[:6]}")
    return "; ".join(parts)


def _mismatch_report(path: Path, use_ema: bool, fallback_config: Any) -> tuple[str, Path, Any]:
    """(shape report, weights file, UNet config) for a checkpoint whose weights did not load."""
    weights_file, ckpt_cfg = ckpt_mod.weights_path(path, use_ema)
    sd, meta = ckpt_mod.load_weights(weights_file)
    try:
        ucfg = ckpt_mod.stored_unet_config(weights_file, meta, ckpt_cfg)
    except ckpt_mod.MissingUNetConfigError:
        ucfg = fallback_config
    return _expected_shape_report(sd, ucfg), weights_file, ucfg


def _load_components(profile: Any, device: torch.device) -> tuple[Any, Any, Any]:
    """(text_encoder, tokenizer, vae) of a profile via ``sd_core.encoding.components.load_components``; a missing tiny
    build becomes a :class:`CompatibilityError` that says what to run."""
    try:
        comps = load_components(profile, device=device)
    except FileNotFoundError as exc:
        raise CompatibilityError(f"profile {profile.name!r}: {exc}") from exc
    except OSError as exc:  # from_pretrained on a missing local dir / unreachable hub id
        raise CompatibilityError(f"profile {profile.name!r}: cannot load its components ({exc})") from exc
    return comps.text_encoder, comps.tokenizer, comps.vae


def _checkpoint_record(path: Path) -> tuple[Path, CheckpointConfig | None]:
    """(checkpoint directory, its config.json record) of a checkpoint, run directory or weights file; a bare
    ``.safetensors`` file is its own "directory" and has the record beside it, if any."""
    if path.is_file() and path.suffix == ".safetensors":
        beside = path.parent / ckpt_mod.CONFIG_FILE
        return path, (ckpt_mod.read_config_file(beside) if beside.exists() else None)
    ckpt_dir = ckpt_mod.resolve_checkpoint(path)
    return ckpt_dir, ckpt_mod.read_config(ckpt_dir)


def _sampling_profile(profile: Any, data_root: str | Path | None, record: CheckpointConfig | None,
                      overrides: dict[str, Any] | None = None) -> Profile:
    """The profile to sample with: an explicit one, else ``$SD_PROFILE``, else the one the checkpoint was trained
    with; its data root: explicit, else ``$SD_DATA_ROOT``, else the one whose components the trainer recorded
    (when that folder still exists), else ``./data``."""
    if isinstance(profile, Profile):
        return profile
    if profile is None and not os.environ.get(PROFILE_ENV) and record is not None:
        profile = record.profile
    if data_root is None and not os.environ.get(DATA_ROOT_ENV) and record is not None and record.text is not None:
        comp = Path(record.text.components) if record.text.components else None
        if comp is not None and comp.name == "components" and comp.is_dir():
            data_root = comp.parent
    return get_profile(profile, data_root, overrides)


def _load_unet_for(path: Path, profile: Profile, use_ema: bool, device: torch.device,
                   dtype: torch.dtype | None) -> Any:
    """The checkpoint's UNet; a weights file without a config is read with the profile's UNet config, and
    weights that do not fit their config are refused with a report of the tensors that differ."""
    try:
        try:
            return ckpt_mod.load_unet(path, ema=use_ema, device=device, dtype=dtype)
        except ckpt_mod.MissingUNetConfigError:
            return ckpt_mod.load_unet(path, ema=use_ema, device=device, dtype=dtype, config=profile.unet)
    except ckpt_mod.DamagedCheckpointError:
        raise  # hash mismatch / NaN weights: the refusal names the file; a shape report would only mislead
    except (CheckpointError, RuntimeError) as exc:
        report, weights_file, ucfg = _mismatch_report(path, use_ema, profile.unet)
        if not report:
            raise
        raise CheckpointError(f"checkpoint {weights_file} does not match its UNet config {ucfg}: {report}") from exc


def load_for_sampling(
    checkpoint: str | Path,
    profile: Any = None,
    data_root: str | Path | None = None,
    device: str | torch.device | None = None,
    use_ema: bool = True,
    dtype: torch.dtype | None = None,
    overrides: dict[str, Any] | None = None,
) -> SamplingBundle:
    """Load a checkpoint's UNet (EMA weights by default) and the profile's frozen components, and check that
    they fit (context width, latent channels, vocabulary). Errors name the checkpoint and the expected shapes.

    ``profile``: a ``Profile``, a profile name, or None: then ``$SD_PROFILE``, else the profile the checkpoint
    was trained with (its ``config.json``), else ``tiny``. ``data_root``: None → ``$SD_DATA_ROOT``, else the
    data root of the components the trainer recorded (``text.components``) when that folder still exists,
    else ``./data``. So ``sd generate --checkpoint RUN_DIR`` works without further flags on the machine that
    trained it.
    """
    dev = pick_device(str(device) if device is not None else None)
    path = Path(checkpoint)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    ckpt_dir, record = _checkpoint_record(path)
    profile = _sampling_profile(profile, data_root, record, overrides)
    unet = _load_unet_for(path, profile, use_ema, dev, dtype)
    te, tok, vae = _load_components(profile, dev)
    try:
        check_compatible(unet, te, vae, tok)
    except CompatibilityError as exc:
        hint = f"; the checkpoint was trained with profile {record.profile!r}" if record and record.profile else ""
        raise CompatibilityError(
            f"checkpoint {ckpt_dir} does not fit profile {profile.name!r}'s components: {exc} (checkpoint UNet: "
            f"ctx_dim={unet.config.ctx_dim}, in_ch={unet.config.in_ch}; profile UNet: ctx_dim={profile.unet.ctx_dim}, "
            f"in_ch={profile.unet.in_ch}){hint}. Pass --profile/--data-root of the run that trained it."
        ) from exc
    if ckpt_dir == path and path.is_file():  # a bare weights file
        ema_used = path.name == ckpt_mod.EMA_FILE
    else:
        ema_used = use_ema and (ckpt_dir / ckpt_mod.EMA_FILE).exists()
    trained_length = record.text.max_length if record is not None and record.text is not None else None
    return SamplingBundle(
        unet=unet, text_encoder=te, tokenizer=tok, vae=vae,
        scaling_factor=(record.scaling_factor if record else None) or float(vae.config.scaling_factor),
        checkpoint=ckpt_dir, step=record.step if record else None, ema=bool(ema_used), config=record,
        max_length=trained_length or profile.components.max_length)


# ------------------------------------------------------------------------------------------ the CLI
def _safe_name(text: str, limit: int = 60) -> str:
    keep = "".join(ch if ch.isalnum() else "_" for ch in text.strip().lower())
    return "_".join(filter(None, keep.split("_")))[:limit] or "image"


def add_component_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that pick the weights and components for a checkpoint (shared by `sd generate` and
    `sd export-diffusers`, so both resolve a checkpoint the same way)."""
    parser.add_argument("--profile", default=None,
                        help="profile of the components (default: $SD_PROFILE, else the checkpoint's, else tiny)")
    parser.add_argument("--data-root", default=None,
                        help="data root holding components/ (default: $SD_DATA_ROOT, else the components folder the "
                             "trainer recorded, else ./data)")
    parser.add_argument("--no-ema", action="store_true", help="use the live weights instead of the EMA weights")
    parser.add_argument("--overrides", type=json_object_arg, default=None,
                        help="profile overrides as JSON, as in a run config's `overrides` (e.g. the components of a "
                             'run trained with other sources: \'{"components": {"vae": "/models/vae", ...}}\')')



class _UsageError(ValueError):
    """A command-line argument that cannot be used (reported as ``sd generate: ...``, exit code 2)."""



def _sample_arg(name: str) -> Callable[[str], Any]:
    """The argparse ``type=`` of a flag that stands for ``SampleConfig.name``: parsed and range-checked by the
    config's own check (`sd_core.config.field_arg`), so ``--steps 0`` and ``--guidance nan`` fail in argparse
    exactly as ``sample.steps: 0`` in a run config does."""
    return field_arg(SampleConfig, name)


def _generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sd generate",
        description="Generate images from a trained checkpoint with DDIM + classifier-free guidance. "
                    "Image i of a run uses seed SEED + i (one generator per image), so the same command "
                    "always writes the same images.",
    )
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint directory (step_XXXXXXXX), run directory (uses 'latest') or .safetensors file")
    parser.add_argument("--which", choices=["latest", "best"], default="latest",
                        help="with a run directory: its latest checkpoint (default) or the best one by the "
                             "checkpoint_eval scores in RUN_DIR/eval_scores.json")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt")
    src.add_argument("--batch", help="a text file with one prompt per line (blank lines and #comments skipped)")
    parser.add_argument("--negative", default=None, help="negative prompt (default: the empty prompt)")
    parser.add_argument("--num-images", type=positive_int_arg, default=1, help="images per prompt (default 1)")
    parser.add_argument("--steps", type=_sample_arg("steps"), default=None,
                        help="DDIM steps, 1-1000 (default: the profile's, 30)")
    parser.add_argument("--guidance", type=_sample_arg("guidance"), default=None,
                        help="CFG scale, finite and >= 0 (default: the profile's, 7.5)")
    parser.add_argument("--eta", type=_sample_arg("eta"), default=None,
                        help="DDIM eta, 0 = deterministic, 1 = as noisy as DDPM (default: the profile's)")
    parser.add_argument("--guidance-min-timestep", type=_sample_arg("guidance_min_timestep"), default=None,
                        help="apply CFG only at timesteps >= this, 0-999 (default: the profile's; 0 = every step)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image (default 0)")
    parser.add_argument("--height", type=_sample_arg("height"), default=None,
                        help="image height, a multiple of the VAE's downsampling (default: the profile's)")
    parser.add_argument("--width", type=_sample_arg("width"), default=None,
                        help="image width, a multiple of the VAE's downsampling (default: the profile's)")
    parser.add_argument("--out", default="outputs", help="output folder (default ./outputs)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, mps or cpu (default: first available)")
    add_component_arguments(parser)
    parser.add_argument("--batch-size", type=positive_int_arg, default=8, help="images per UNet batch (default 8)")
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                        help="UNet weights dtype (default auto: bf16 on CUDA, fp32 elsewhere); latents and the "
                             "scheduler always run in fp32")
    return parser


def _image_prompts(args: argparse.Namespace) -> list[str]:
    """One prompt per image to write: --prompt or the lines of --batch, each repeated --num-images times."""
    if args.prompt is not None:
        prompts = [args.prompt]
    else:
        batch = Path(args.batch)
        if not batch.is_file():
            raise _UsageError(f"prompt file not found: {batch}")
        lines = [ln.strip() for ln in batch.read_text().splitlines()]
        prompts = [ln for ln in lines if ln and not ln.startswith("#")]
        if not prompts:
            raise _UsageError(f"{batch} holds no prompts")
    return [p for p in prompts for _ in range(args.num_images)]


def _image_size(parser: argparse.ArgumentParser, args: argparse.Namespace, sample_cfg: SampleConfig,
                bundle: SamplingBundle) -> tuple[int, int]:
    """(height, width): the flags' or the profile's, each a multiple of the latent factor: the VAE's
    downsampling times the UNet's (its levels halve the latents), only known once both are loaded (sd15:
    8 × 8 = 64 px). Otherwise an argparse error (exit 2) naming the flag, or the profile field."""
    vae_factor = vae_downsampling(bundle.vae.config.block_out_channels)
    unet_factor = 2 ** (len(getattr(bundle.unet.config, "ch_mults", (1,))) - 1)
    factor = vae_factor * unet_factor
    sizes = []
    for name in ("height", "width"):
        flag_value = getattr(args, name)
        value = flag_value if flag_value is not None else getattr(sample_cfg, name)
        if value % factor:
            origin = f"argument --{name}" if flag_value is not None else f"sample.{name} (the profile's; pass --{name})"
            parser.error(f"{origin}: must be a positive multiple of {factor} (the VAE's downsampling {vae_factor} x "
                         f"the UNet's {unet_factor}), got {value}")
        sizes.append(value)
    return sizes[0], sizes[1]


def _which_checkpoint(args: argparse.Namespace) -> str | Path:
    """--checkpoint itself, or with ``--which best`` the best-scored checkpoint of that run (the scores that
    `checkpoint_eval` wrote); a run without scores is a usage error naming the scores file."""
    if args.which != "best":
        return args.checkpoint
    from sd_core.evaluation.checkpoint_eval import EvaluationError, best_checkpoint  # imports this module

    try:
        best = best_checkpoint(args.checkpoint)
    except EvaluationError as exc:
        raise _UsageError(f"--which best: {exc}") from exc
    print(f"sd generate: best checkpoint of {args.checkpoint}: {best}", file=sys.stderr)
    return best


def generate_main(argv: list[str] | None = None) -> int:
    """`sd generate`: write one PNG per prompt (× --num-images) into --out."""
    parser = _generate_parser()
    args = parser.parse_args(argv)
    try:
        prompts = _image_prompts(args)
        device = pick_device(args.device)
        bundle = load_for_sampling(_which_checkpoint(args), profile=args.profile, data_root=args.data_root,
                                   device=device, use_ema=not args.no_ema, dtype=resolve_dtype(args.dtype, device),
                                   overrides=args.overrides)
        sample_cfg = get_profile(args.profile, args.data_root, args.overrides).sample
    except (_UsageError, CheckpointError, CompatibilityError, ConfigError) as exc:  # ConfigError: e.g. SD_PROFILE
        print(f"sd generate: {exc}", file=sys.stderr)
        return 2
    height, width = _image_size(parser, args, sample_cfg, bundle)
    settings = sample_settings(sample_cfg)
    flags = {"negative_prompts": args.negative, "steps": args.steps, "guidance": args.guidance, "eta": args.eta,
             "guidance_min_timestep": args.guidance_min_timestep, "height": height, "width": width}
    settings.update({k: v for k, v in flags.items() if v is not None})
    images = generate(bundle.unet, bundle.text_encoder, bundle.tokenizer, bundle.vae, prompts, seed=args.seed,
                      scaling_factor=bundle.scaling_factor, batch_size=args.batch_size, max_length=bundle.max_length,
                      scheduler=bundle.sampler(), **settings)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, (prompt, img) in enumerate(zip(prompts, images)):
        path = out / f"{i:04d}_seed{args.seed + i}_{_safe_name(prompt)}.png"
        img.save(path)
        print(path)
    return 0
