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


def sd15_like_checkpoint(profile, tmp_path):
    """A small random ``CLIPModel`` saved under ``tmp_path/clip``, the profile switched to a non-synthetic
    source (so evaluation takes the sd15 CLIP path) and a random checkpoint of its UNet: the pieces the CLIP
    metrics need, at a size that scores in seconds. Returns (profile, clip_dir, checkpoint dir)."""
    import dataclasses

    from transformers import CLIPConfig, CLIPModel

    from sd_core.model.unet import UNetModel

    torch.manual_seed(0)
    clip_dir = tmp_path / "clip"
    CLIPModel(CLIPConfig(
        text_config={"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "patch_size": 8, "image_size": 32},
        projection_dim=16)).save_pretrained(clip_dir)
    sd15_like = profile.with_overrides({"source": {"kind": "parquet", "uri": "unused.parquet"}})
    lineage = {"latents_dir": str(profile.latents_dir), "shards": ("00000", "00001"), "scaling_factor": 1.0,
               "train": dataclasses.asdict(profile.train), "profile": "tiny"}
    ckpt = save_tiny_checkpoint(tmp_path / "run", UNetModel(profile.unet), step=3, lineage=lineage)
    return sd15_like, clip_dir, ckpt
