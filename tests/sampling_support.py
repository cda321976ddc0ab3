"""Tiny real components for the sampling tests (built directly, no hub, a few hundred kB each).

Used until/unless `sd_core.encoding.components` provides builders; the models are real transformers/diffusers classes,
so the same code paths run as with SD 1.5's components.
"""

from __future__ import annotations

import torch

MAX_LEN = 16


def tiny_tokenizer():
    from sd_core.encoding.components import build_tiny_tokenizer
    from sd_core.data.synthetic import vocabulary

    return build_tiny_tokenizer(vocabulary(), MAX_LEN)


def tiny_text_encoder(seed: int = 0, hidden: int = 64):
    from sd_core.encoding.components import build_tiny_text_encoder

    return build_tiny_text_encoder(len(tiny_tokenizer()), hidden, layers=2, heads=4, max_length=MAX_LEN, seed=seed)


def tiny_vae(seed: int = 0, scaling_factor: float = 0.5):
    """A 32 px → 4×8×8 AutoencoderKL (random weights: the tests check arithmetic, not image quality)."""
    from diffusers import AutoencoderKL

    from sd_core.encoding.components import tiny_vae_config

    torch.manual_seed(seed)
    cfg = tiny_vae_config((8, 16, 16), layers_per_block=1, image_size=32)
    cfg["scaling_factor"] = scaling_factor
    return AutoencoderKL(**cfg).eval()


def tiny_unet_config(ctx_dim: int = 64):
    from sd_core.config import UNetConfig

    return UNetConfig(ch=16, ch_mults=(1, 2), res_blks=1, attn_lvls=(1, 2), heads=2, ctx_dim=ctx_dim, norm_groups=8)


def tiny_unet(seed: int = 0, ctx_dim: int = 64):
    """Our tiny UNet with non-zero output layers (a fresh one predicts eps = 0, which would make every test
    of guidance or prompts vacuous)."""
    from sd_core.model.unet import UNetModel

    torch.manual_seed(seed)
    unet = UNetModel(tiny_unet_config(ctx_dim))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.ndim > 1 and not p.abs().sum():  # the zero-initialised projections
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return unet.eval()


def components(seed: int = 0):
    return dict(unet=tiny_unet(seed), text_encoder=tiny_text_encoder(seed), tokenizer=tiny_tokenizer(),
                vae=tiny_vae(seed))


def save_components(root, seed: int = 0, vae_scaling: float = 0.5):
    """Write tiny text encoder / tokenizer / VAE where a tiny profile loads them from
    (``{root}/components/{text_encoder,tokenizer,vae}``); returns the in-memory components."""
    from pathlib import Path

    comps = components(seed)
    base = Path(root) / "components"
    comps["text_encoder"].save_pretrained(base / "text_encoder")
    comps["tokenizer"].save_pretrained(base / "tokenizer")
    comps["vae"].save_pretrained(base / "vae")
    (base / "build.json").write_text('{"profile": "tiny", "note": "test components"}')
    return comps


def save_tiny_checkpoint(run_dir, unet, step: int = 10, lineage=None, with_ema: bool = True):
    """A checkpoint in the trainer's format (``sd_core.training.checkpoint.save_checkpoint``) whose config.json
    record holds ``lineage`` (CheckpointConfig fields); the EMA weights are the UNet's weights × 1 (so EMA and
    live weights agree unless a test changes them)."""
    from sd_core.training.checkpoint import CheckpointConfig, save_checkpoint

    sd = unet.state_dict()
    return save_checkpoint(run_dir, CheckpointConfig(step=step, unet=unet.config, **dict(lineage or {})),
                           unet_state=sd, ema_state=sd if with_ema else None, train_state={"step": step})
