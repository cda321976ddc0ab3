"""`sd export-diffusers`: write a checkpoint as a diffusers ``StableDiffusionPipeline`` folder.

    sd export-diffusers --checkpoint data/checkpoints/<run>/<step> --out exported/
    python -c "from diffusers import StableDiffusionPipeline as P; P.from_pretrained('exported/')"

The folder holds our UNet converted with :func:`sd_core.model.convert.to_diffusers` (EMA weights by default), the
profile's VAE (its ``scaling_factor`` set to the one the latents were trained with), text encoder and
tokenizer, and a ``DDIMScheduler`` configured exactly as :class:`sd_core.model.schedulers.DDIMScheduler` (SD 1.x:
scaled-linear betas 0.00085 → 0.012, ``leading`` spacing, ``steps_offset=1``, ``set_alpha_to_one=False``; for a
run trained with v-prediction on a zero-terminal-SNR schedule, the matching ``prediction_type``,
``rescale_betas_zero_snr`` and ``trailing`` spacing: `SamplingBundle.sampler`).
No safety checker is written (``requires_safety_checker=False``), so ``from_pretrained(DIR)`` needs no extra
arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from sd_core.atomic import atomic_dir
from sd_core.encoding.components import vae_downsampling
from sd_core.model.convert import to_diffusers
from sd_core.model.schedulers import DDIMScheduler
from sd_core.sampling.generate import CompatibilityError, add_component_arguments, check_compatible, load_for_sampling
from sd_core.training.checkpoint import CheckpointError


def build_pipeline(unet: Any, text_encoder: Any, tokenizer: Any, vae: Any, scaling_factor: float | None = None,
                   max_length: int | None = None, sampler: DDIMScheduler | None = None):
    """A diffusers ``StableDiffusionPipeline`` around our UNet (converted) and the given components.

    ``scaling_factor`` is written into the VAE config and ``max_length`` into the tokenizer's
    ``model_max_length``: the pipeline reads both from there, so they must be the ones the UNet was trained
    with. ``sampler``: our DDIM sampler for the UNet's training schedule, written as the pipeline's scheduler
    (default SD 1.x's)."""
    from diffusers import DDIMScheduler as DiffusersDDIM
    from diffusers import StableDiffusionPipeline

    check_compatible(unet, text_encoder, vae, tokenizer)
    if scaling_factor is not None and float(vae.config.scaling_factor) != float(scaling_factor):
        vae.register_to_config(scaling_factor=float(scaling_factor))
    if max_length is not None:
        tokenizer.model_max_length = int(max_length)
    latent_size = None
    sample_size = getattr(vae.config, "sample_size", None)
    if sample_size:
        size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
        latent_size = int(size) // vae_downsampling(vae.config.block_out_channels)
    d_unet = to_diffusers(unet, sample_size=latent_size or 64)
    cfg = {k: v for k, v in (sampler or DDIMScheduler()).config_dict().items() if not k.startswith("_")}
    scheduler = DiffusersDDIM(**cfg)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=d_unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def export_pipeline(unet: Any, text_encoder: Any, tokenizer: Any, vae: Any, out_dir: str | os.PathLike[str],
                    scaling_factor: float | None = None, max_length: int | None = None,
                    safe_serialization: bool = True, sampler: DDIMScheduler | None = None) -> Path:
    """Write the diffusers folder to ``out_dir`` (atomically: a temporary sibling folder renamed into place;
    an existing ``out_dir`` is replaced). Returns the path."""
    out = Path(out_dir)
    pipe = build_pipeline(unet, text_encoder, tokenizer, vae, scaling_factor, max_length, sampler)
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=safe_serialization)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sd export-diffusers",
        description="Export a checkpoint as a diffusers StableDiffusionPipeline folder "
                    "(loads with StableDiffusionPipeline.from_pretrained(OUT)).",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or file (see `sd generate --help`)")
    parser.add_argument("--out", required=True, help="output folder (replaced if it exists)")

    add_component_arguments(parser)
    args = parser.parse_args(argv)

    try:
        bundle = load_for_sampling(args.checkpoint, profile=args.profile, data_root=args.data_root,
                                   device="cpu", use_ema=not args.no_ema, overrides=args.overrides)
    except (CheckpointError, CompatibilityError, ValueError) as exc:  # ValueError: a bad --overrides field
        print(f"sd export-diffusers: {exc}", file=sys.stderr)
        return 2
    out = export_pipeline(bundle.unet, bundle.text_encoder, bundle.tokenizer, bundle.vae, args.out,
                          scaling_factor=bundle.scaling_factor, max_length=bundle.max_length,
                          sampler=bundle.sampler())
    print(f"wrote {out} (UNet from {bundle.checkpoint}, {'EMA' if bundle.ema else 'raw'} weights)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
