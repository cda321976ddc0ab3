"""What makes latents stale, known without loading a model: the frozen components' sources and version, the
digest of the components on disk, the latents' code version and a shard's encode status.

Its own module, free of torch, because the Dagster code location computes the `frozen_components` and
`latents` code versions when it loads (every ``dagster`` command, the webserver, the daemon and each run load
it): importing `sd_core.encoding.components` or `sd_core.encoding.encode` there would import torch, about 1.5 s
of each load on a 2-core Zen 5 (BENCHMARKS.md, session 17).

- `component_sources`: where the VAE, text encoder and tokenizer load from (the tiny build's folders, or the
  configured hub ids / local directories).
- `components_version`: a hash of what decides the latents' meaning from config alone; `components_digest`:
  of what is on disk (``build.json``'s weight digest for the tiny build, configs and sizes of local folders).
- `latents_code_version`, `shard_status`: a shard's latents against the cache manifest ("missing", "stale: ...").
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sd_core.config import Profile
from sd_core.data.synthetic import vocabulary
from sd_core.encoding.shipped_vae import vae_fit_settings

BUILD_FILE = "build.json"
BUILD_FORMAT = 1
ENCODE_FORMAT = "e1"  # bump when encoding itself changes (preprocessing, posterior mean, cache layout)


@dataclass(frozen=True)
class ComponentSources:
    """Where each component is loaded from: a hub id or a local directory."""

    vae: str
    text_encoder: str
    tokenizer: str


def component_sources(profile: Profile) -> ComponentSources:
    """The tiny profile's built directories, else the configured ids/dirs."""
    c = profile.components
    if c.build_tiny:
        d = profile.components_dir
        return ComponentSources(str(d / "vae"), str(d / "text_encoder"), str(d / "tokenizer"))
    return ComponentSources(c.vae, c.text_encoder, c.tokenizer or c.text_encoder)


def components_version(profile: Profile) -> str:
    """A short hash of what decides the latents' meaning and is known from config alone: the component
    sources (for the tiny profile: the build settings), the encode resolution, ``max_length``. Part of the
    `latents` asset's ``code_version``; the built weights themselves are covered by `components_digest`."""
    c = profile.components
    if c.build_tiny:
        src: dict[str, Any] = {"tiny": tiny_build_settings(profile)}
    else:
        src = {"vae": c.vae, "text_encoder": c.text_encoder, "tokenizer": c.tokenizer or c.text_encoder}
    src.update(resolution=profile.encode.resolution, max_length=c.max_length)
    return hashlib.sha256(json.dumps(src, sort_keys=True).encode()).hexdigest()[:12]


def components_digest(profile: Profile) -> str:
    """A digest of the components actually on disk: the tiny build's weight digest, a local directory's
    configs and weight sizes, or "" for hub ids (their id is in `components_version`)."""
    c = profile.components
    if c.build_tiny:
        info = read_build_info(profile.components_dir)
        return str(info.get("digest", "")) if info else ""
    h = hashlib.sha256()
    local = False
    for src in (c.vae, c.text_encoder, c.tokenizer or c.text_encoder):
        p = Path(src)
        if p.is_dir():
            local = True
            for f in sorted(p.rglob("*")):
                if f.is_file():
                    h.update(f.relative_to(p).as_posix().encode())
                    h.update(f.read_bytes() if f.suffix == ".json" else str(f.stat().st_size).encode())
    return h.hexdigest()[:12] if local else ""


def read_build_info(components_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    p = Path(components_dir) / BUILD_FILE
    if not p.exists():
        return None
    with open(p) as f:
        return json.load(f)


def tiny_build_settings(profile: Profile) -> dict[str, Any]:
    """The settings a tiny build depends on (its fingerprint; the VAE fit's are `vae_fit_settings`, the
    weights digest in build.json covers the result)."""
    c = profile.components
    return {
        "format": BUILD_FORMAT,
        "vocabulary": _vocabulary(),
        "max_length": c.max_length,
        "text_hidden": profile.unet.ctx_dim,
        "text_layers": c.tiny_text_layers,
        "text_heads": c.tiny_text_heads,
        **vae_fit_settings(profile),
        "vae_shipped_fit": c.vae_shipped_fit,  # turning it off fits here instead of reusing the shipped weights
    }


def _vocabulary() -> list[str]:
    return list(vocabulary())


# ------------------------------------------------------------------------------------------ latents
def latents_code_version(profile: Profile) -> str:
    """The version of a shard's latents under ``profile``: the encode format plus the components' version
    (VAE / text encoder / tokenizer sources, resolution, max_length), so a VAE change makes every shard stale."""
    return f"{ENCODE_FORMAT}-{components_version(profile)}"


def tar_version(path: Path) -> str:
    """Cheap identity of a shard tar: size and mtime (img2dataset rewrites the whole file)."""
    st = path.stat()
    return f"{st.st_size}-{st.st_mtime_ns}"


def shard_status(profile: Profile, entry: dict[str, Any] | None, tar_path: Path, digest: str) -> str | None:
    """Why shard needs (re-)encoding: "missing", "stale: ..." or None when its cache is current."""
    if entry is None:
        return "missing"
    want = latents_code_version(profile)
    if entry.get("code_version") != want:
        return f"stale: code version {entry.get('code_version')} != {want}"
    if digest and entry.get("components_digest") != digest:
        return f"stale: components {entry.get('components_digest')} != {digest}"
    if tar_path.exists() and entry.get("source_version") not in (None, tar_version(tar_path)):
        return "stale: shard tar changed"
    return None
