"""Shared helpers for the latent-cache / encoding / components tests (helper "latents").

The tiny components are built once per test session (a short VAE fit: `FIT_STEPS` steps) into a session
directory and copied into each test's data root, where `build_tiny_components` recognises them as current
(same settings) instead of fitting again.
"""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path

from sd_core.config import Profile

# A short fit for tests: enough for recognisable shapes and colours, cheap on 2 CPU cores.
FIT_STEPS = 80
FIT_SECONDS = 900.0  # only a safety cap: the step count decides the fit, so the PSNR floor holds on a busy machine
# What the test fit must reach on held-out renders and on cached-latent round trips. Measured after 80 steps
# (28-85 s on 1 thread): 12.6 dB / colour accuracy 0.78 in one run, 9.5 dB / 0.94 in another; the short
# fit sits where backgrounds are being learned, and CPU float differences between runs (oneDNN) move it
# a lot. The 180 s `make demo` fit measured 15.8 dB, colour 0.82, background 0.99 (183 steps, 1 thread).
# So these floors prove "reconstructs recognisably" (chance colour accuracy is 0.25), not demo quality.
PSNR_FLOOR_DB = 8.5
COLOUR_FLOOR = 0.5

OVERRIDES = {"components": {"vae_fit_steps": FIT_STEPS, "vae_fit_seconds": FIT_SECONDS}}


def tiny_profile(data_root: Path) -> Profile:
    return Profile.tiny(data_root).with_overrides(OVERRIDES)


def build_session_components(base: Path) -> Path:
    """Build (or reuse) the tiny components under ``base/data/components``; returns that directory."""
    from sd_core.encoding.components import build_tiny_components

    import torch

    p = tiny_profile(base / "data")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # least CPU time; 2 OpenMP threads on a shared, busy 2-core box mostly spin
    try:
        build_tiny_components(p, log=None)
    finally:
        torch.set_num_threads(threads)
    return p.components_dir


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
