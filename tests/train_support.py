"""Fixtures for the trainer tests: the tiny profile's text components (tokenizer + small CLIPTextModel, built
with `sd_core.encoding.components`' own builders, no VAE fitting) and a small synthetic latent cache with structure a
UNet can learn (each latent is a caption-dependent pattern plus a little noise)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from sd_core.config import Profile

# a smaller UNet than the tiny profile's, so each test step costs a few tens of ms
SMALL_UNET = {"unet": {"ch": 16, "ch_mults": [1, 2], "res_blks": 1, "attn_lvls": [2], "heads": 2, "norm_groups": 8}}

COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle"]
BACKGROUNDS = ["white", "black"]


def build_text_components(profile: Profile) -> object:
    """Save a tiny tokenizer and text encoder to ``{components_dir}/{tokenizer,text_encoder}``; returns the
    tokenizer."""
    from sd_core.encoding import components as C
    from sd_core.data.synthetic import vocabulary

    c = profile.components
    tok = C.build_tiny_tokenizer(vocabulary(), c.max_length)
    te = C.build_tiny_text_encoder(len(tok), profile.unet.ctx_dim, c.tiny_text_layers, c.tiny_text_heads,
                                   c.max_length, c.seed)
    d = profile.components_dir
    tok.save_pretrained(d / "tokenizer")
    te.save_pretrained(d / "text_encoder")
    return tok


def write_synthetic_latents(profile: Profile, tokenizer, shards: Sequence[str] = ("00000", "00001"),
                            per_shard: int = 48, latent_shape: tuple[int, int, int] = (4, 16, 16),
                            seed: int = 0) -> Path:
    """Write ``shards`` of ``per_shard`` latents each to ``profile.latents_dir`` (via `write_shard`)."""
    from sd_core.encoding.components import tokenize
    from sd_core.encoding.latent_cache import write_shard

    rng = np.random.default_rng(seed)
    C, H, W = latent_shape
    yy, xx = np.mgrid[0:H, 0:W] / max(H - 1, 1) * 2 - 1
    masks = {"circle": (xx**2 + yy**2 < 0.4).astype(np.float32),
             "square": ((abs(xx) < 0.55) & (abs(yy) < 0.55)).astype(np.float32),
             "triangle": ((yy > -0.6) & (abs(xx) < (yy + 0.6) / 2)).astype(np.float32)}
    colour_vec = {c: rng.normal(0, 1, C).astype(np.float32) for c in COLOURS}
    bg_vec = {b: rng.normal(0, 0.5, C).astype(np.float32) for b in BACKGROUNDS}
    for si, shard in enumerate(shards):
        lat, keys, caps = [], [], []
        for i in range(per_shard):
            c, s, b = COLOURS[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))], \
                BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
            m = masks[s]
            x = m[None] * colour_vec[c][:, None, None] + (1 - m[None]) * bg_vec[b][:, None, None]
            lat.append(x + rng.normal(0, 0.05, x.shape).astype(np.float32))
            keys.append(f"{shard}{i:05d}")
            caps.append(f"a {c} {s} on a {b} background")
        ids = tokenize(tokenizer, caps, profile.components.max_length).numpy()
        write_shard(profile.latents_dir, shard, np.stack(lat), keys, caps, ids, vae="synthetic",
                    resolution=64, scaling_factor=1.0)
    return profile.latents_dir


_BUILT: dict[str, Path] = {}  # one build per pytest process, copied into each test module's data root


def make_tiny_data(profile: Profile) -> Path:
    """Text components + the default synthetic latent cache in ``profile.data_root`` (built once per test
    session, then copied)."""
    import shutil

    src = _BUILT.get("root")
    if src is not None and src.exists():
        for sub in ("components", "latents"):
            shutil.copytree(src / sub, profile.data_root / sub)
        return profile.latents_dir
    tok = build_text_components(profile)
    write_synthetic_latents(profile, tok)
    _BUILT["root"] = profile.data_root
    return profile.latents_dir


def train_argv(profile: Profile, out: Path, *extra: str, **flags) -> list[str]:
    """Arguments for ``sd_core.train.main`` on the tiny profile with small, fast settings (flags override)."""
    base = {"profile": profile.name, "data-root": str(profile.data_root), "output-dir": str(out),
            "batch-size": 8, "max-steps": 6, "warmup-steps": 2, "log-every": 1, "checkpoint-every": 3,
            "val-every": 3, "val-share": 0.1, "val-max-samples": 16, "lr": 1e-3, "seed": 0}
    base.update({k.replace("_", "-"): v for k, v in flags.items()})
    argv: list[str] = []
    for k, v in base.items():
        if v is None:
            continue
        argv += [f"--{k}", str(v)]
    return argv + list(extra)
