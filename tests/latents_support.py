"""Shared helpers for the latent-cache / encoding / components tests: what the tiny VAE must reach, the
production components' configs, copying the session's built components (the ``tiny_built`` fixture,
tests/conftest.py) into a data root, and synthetic shard tars."""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path

from sd_core.config import Profile

# The tests' tiny components use the VAE fit the package ships (the tiny profile's default settings: loaded in
# about a second, sd_core.encoding.shipped_vae) instead of fitting one per test worker (80 steps took 28-85 s
# each). The fit itself stays tested: tests/test_shipped_vae.py runs `sd components tiny-vae` and
# tests/test_demo.py fits configs/demo-fast.yaml's 4 steps through Dagster. The floors below are what any
# tiny VAE must reach on held-out renders and cached-latent round trips ("reconstructs recognisably": chance
# colour accuracy is 0.25); the shipped fit reads 24.1 dB and colour 1.00.
PSNR_FLOOR_DB = 8.5
COLOUR_FLOOR = 0.5

OVERRIDES: dict = {}  # the tiny profile as it is: its VAE settings are the shipped fit's

# The real configs of the production components (copied from their hub repos' config.json).
SD_VAE_FT_MSE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "sample_size": 256, "scaling_factor": 0.18215,
}
CLIP_VIT_L14_TEXT = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "projection_dim": 768,
    "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "attention_dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 1.0,
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}


def install_components(src: Path, profile: Profile) -> None:
    """Copy a built components directory into ``profile``'s data root."""
    if profile.components_dir.exists():
        shutil.rmtree(profile.components_dir)
    shutil.copytree(src, profile.components_dir)


def write_synthetic_tar(path: Path, n: int, seed: int = 0, size: int = 64, corrupt: tuple[int, ...] = (),
                        extras: bool = False) -> list[dict]:
    """An img2dataset-like WebDataset tar of synthetic renders: per sample ``.jpg``, ``.txt``, ``.json``.

    ``corrupt``: sample positions whose image bytes are garbage. ``extras``: also add one PNG sample and one
    non-square JPEG (exercises decoding of other formats and the resize/centre crop). Returns per sample
    {key, caption, image (PIL) or None}.
    """
    import webdataset as wds
    from PIL import Image

    from sd_core.data import synthetic as S

    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = []
    with wds.TarWriter(str(path)) as w:
        for i in range(n):
            shape, color, bg = rng.choice(S.SHAPES), rng.choice(list(S.COLORS)), rng.choice(list(S.BACKGROUNDS))
            img = S.render_shape(shape, color, bg, size=size, seed=seed * 100_000 + i)
            ext = "jpg"
            if extras and i == 1:
                ext = "png"
            if extras and i == 2:  # wider than tall: resized to `size` high, centre-cropped
                wide = Image.new("RGB", (size * 2, size), S.BACKGROUNDS[bg])
                wide.paste(img, (size // 2, 0))
                img_to_write = wide
            else:
                img_to_write = img
            buf = io.BytesIO()
            img_to_write.save(buf, "PNG" if ext == "png" else "JPEG", quality=95)
            data = b"\xff\xd8\xff garbage, not an image" if i in corrupt else buf.getvalue()
            key = f"{seed:04d}{i:05d}"
            cap = S.caption(shape, color, bg)
            w.write({"__key__": key, ext: data, "txt": cap,
                     "json": json.dumps({"key": key, "caption": cap, "status": "success"}).encode()})
            out.append({"key": key, "caption": cap, "image": None if i in corrupt else img})
    return out
