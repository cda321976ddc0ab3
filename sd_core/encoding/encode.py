"""Encoding one image shard (a WebDataset tar from img2dataset) into the latent cache.

Pipeline of `encode_shard`:

1. *Decode* in parallel worker processes: a ``torch.utils.data.DataLoader`` over an iterable that reads the
   tar with webdataset (0.2.x: ``shardshuffle=False``, ``empty_check=False``); each worker decodes only
   every n-th sample (the tar is read by all, which is cheap next to JPEG decoding), converts to RGB,
   resizes the shorter side and centre-crops to ``resolution``. A sample whose image is missing or does not
   decode is *skipped and counted*, never fatal.
2. *Encode* in batches through the frozen VAE (bf16 autocast on CUDA), taking the posterior **mean**
   × scaling factor: deterministic, so re-encoding the same shard with the same VAE gives the same cache
   (SD samples the posterior; for a VAE trained with KL weight 1e-6 its std is negligible).
3. *Tokenize* the captions (``max_length``, padded) and `sd_core.encoding.latent_cache.write_shard` the result (atomic).

Several GPUs: one encoder process per GPU (``spawn``), each with ``CUDA_VISIBLE_DEVICES`` set to its GPU
before CUDA initialises, each taking every G-th sample (with its own decode workers); the parent merges the
parts in tar order and writes the shard once. On CPU there is one encoder process.

Progress goes to a callback (the Dagster asset logs it) or a tqdm bar.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from sd_core.config import Profile

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
ProgressFn = Callable[[dict[str, Any]], None]


@dataclass
class EncodeReport:
    shard: str
    encoded: int
    skipped: int
    seconds: float
    images_per_s: float
    latent_mean: float
    latent_std: float
    latent_shape: list[int]
    processes: int
    device: str
    skipped_examples: list[str] = field(default_factory=list)  # "key: reason" for the first few skips
    manifest_entry: dict[str, Any] = field(default_factory=dict)

    def as_metadata(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("manifest_entry")
        return d


# -------------------------------------------------------------------------------------------- decoding
def load_image(data: bytes, resolution: int) -> np.ndarray:
    """Image bytes → (3, resolution, resolution) uint8: RGB, shorter side resized, centre-cropped."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if im.format == "JPEG":
            im.draft("RGB", (resolution, resolution))  # decode at a reduced scale when much larger
        im = im.convert("RGB")
        w, h = im.size
        s = resolution / min(w, h)
        if (w, h) != (resolution, resolution):
            nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
            if (nw, nh) != (w, h):
                im = im.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
            left, top = (nw - resolution) // 2, (nh - resolution) // 2
            im = im.crop((left, top, left + resolution, top + resolution))
        arr = np.asarray(im, dtype=np.uint8)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


class ShardSamples(torch.utils.data.IterableDataset):
    """Yields ``(index, key, caption, image uint8 (3, R, R) or None, error)`` for the samples of one tar
    that belong to encoder ``rank`` of ``world`` and to the current DataLoader worker."""

    def __init__(self, tar_path: str | os.PathLike[str], resolution: int, rank: int = 0, world: int = 1):
        super().__init__()
        self.tar_path = str(tar_path)
        self.resolution = resolution
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[tuple[int, str, str, np.ndarray | None, str]]:
        import webdataset as wds

        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        stride, slot = self.world * nw, self.rank * nw + wid
        ds = wds.WebDataset(self.tar_path, shardshuffle=False, empty_check=False, nodesplitter=None,
                            workersplitter=None, handler=wds.warn_and_continue)
        for i, sample in enumerate(ds):
            if i % stride != slot:
                continue
            key = str(sample.get("__key__", i))
            txt = sample.get("txt", b"")
            caption = txt.decode("utf-8", "replace").strip() if isinstance(txt, bytes) else str(txt or "")
            data = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
            if data is None:
                yield i, key, caption, None, "no image in sample"
                continue
            try:
                yield i, key, caption, load_image(data, self.resolution), ""
            except Exception as e:  # undecodable bytes: skip and count
                yield i, key, caption, None, f"{type(e).__name__}: {e}"[:200]


# -------------------------------------------------------------------------------------------- encoding
@dataclass
class _Part:
    indices: list[int] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    latents: list[np.ndarray] = field(default_factory=list)  # per batch, float32
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (index, "key: reason")


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _encode_part(tar_path: str, profile: Profile, rank: int, world: int, device: torch.device,
                 components=None, progress: ProgressFn | None = None, shard: str = "") -> _Part:
    from sd_core.encoding.components import load_components

    enc = profile.encode
    comps = components or load_components(profile, device=device, text_encoder=False)
    vae, scale = comps.vae, comps.scaling_factor
    dev = next(vae.parameters()).device
    use_bf16 = enc.autocast_bf16 and dev.type == "cuda"
    loader = torch.utils.data.DataLoader(
        ShardSamples(tar_path, enc.resolution, rank, world), batch_size=None,
        num_workers=max(0, enc.decode_workers), prefetch_factor=8 if enc.decode_workers > 0 else None,
        persistent_workers=False,
    )
    part = _Part()
    pending: list[tuple[int, str, str, np.ndarray]] = []
    t0 = time.perf_counter()
    last_report = [t0]

    def flush() -> None:
        if not pending:
            return
        x = torch.from_numpy(np.stack([p[3] for p in pending])).to(dev, non_blocking=True)
        x = x.float().div_(127.5).sub_(1.0)
        with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            z = vae.encode(x).latent_dist.mean
        part.latents.append((z.float() * scale).cpu().numpy())
        for i, k, c, _ in pending:
            part.indices.append(i)
            part.keys.append(k)
            part.captions.append(c)
        pending.clear()
        now = time.perf_counter()
        if progress is not None and (now - last_report[0] > 5.0):
            last_report[0] = now
            done = len(part.indices)
            progress({"shard": shard, "rank": rank, "encoded": done, "skipped": len(part.skipped),
                      "seconds": round(now - t0, 1), "images_per_s": round(done / max(now - t0, 1e-9), 1)})

    for i, key, caption, img, err in loader:
        if img is None:
            part.skipped.append((i, f"{key}: {err}"))
            continue
        pending.append((i, key, caption, img if isinstance(img, np.ndarray) else np.asarray(img)))
        if len(pending) >= enc.batch_size:
            flush()
    flush()
    return part


def _part_worker(tar_path: str, profile: Profile, rank: int, world: int, gpu: str | None, out_path: str) -> None:
    """Body of one encoder process (spawned): encode this rank's samples and save them to ``out_path``."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # already set by the parent at spawn; before any CUDA call
        device = torch.device("cuda:0")
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(world, 1)))
    part = _encode_part(tar_path, profile, rank, world, device)
    lat = np.concatenate(part.latents) if part.latents else np.zeros((0,), np.float32)
    np.savez(out_path, indices=np.asarray(part.indices, np.int64), keys=np.asarray(part.keys, dtype=object),
             captions=np.asarray(part.captions, dtype=object), latents=lat,
             skipped_idx=np.asarray([s[0] for s in part.skipped], np.int64),
             skipped_msg=np.asarray([s[1] for s in part.skipped], dtype=object))


def _run_parts(tar_path: str, profile: Profile, world: int, gpus: list[str] | None) -> list[_Part]:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="sd-encode-") as tmp:
        procs, outs = [], []
        for r in range(world):
            out = os.path.join(tmp, f"part{r}.npz")
            gpu = gpus[r] if gpus else None
            saved = os.environ.get("CUDA_VISIBLE_DEVICES")
            if gpu is not None:
                os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # inherited by the spawned child from the start
            try:
                p = ctx.Process(target=_part_worker, args=(tar_path, profile, r, world, gpu, out), daemon=False)
                p.start()
            finally:
                if gpu is not None:
                    if saved is None:
                        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                    else:
                        os.environ["CUDA_VISIBLE_DEVICES"] = saved
            procs.append(p)
            outs.append(out)
        try:
            for p in procs:
                p.join()
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
        bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
        if bad:
            raise RuntimeError(f"encoder process(es) failed (rank, exit code): {bad}")
        parts = []
        for out in outs:
            d = np.load(out, allow_pickle=True)  # our own temporary file, written just now
            part = _Part(d["indices"].tolist(), d["keys"].tolist(), d["captions"].tolist(),
                         [d["latents"]] if d["indices"].size else [],
                         list(zip(d["skipped_idx"].tolist(), d["skipped_msg"].tolist())))
            parts.append(part)
        return parts


def visible_gpus() -> list[str]:
    """The GPU ids an encoder may use (honours an existing CUDA_VISIBLE_DEVICES)."""
    if not torch.cuda.is_available():
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env:
        return [g.strip() for g in env.split(",") if g.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def encode_shard(
    tar_path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    shard: str,
    profile: Profile,
    *,
    components=None,
    device: str | torch.device | None = None,
    num_processes: int | None = None,
    code_version: str | None = None,
    extra: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
    show_progress: bool = False,
) -> EncodeReport:
    """Encode the tar at ``tar_path`` into ``cache_dir`` as shard ``shard`` (see the module docstring).

    ``components``: already-loaded `FrozenComponents` (single-process path only; else loaded from the
    profile). ``num_processes``: encoder processes; default one per visible GPU (``encode.num_gpus`` caps
    it), one on CPU. Setting it > 1 on CPU runs that many CPU encoder processes (used by tests to exercise
    the multi-process path). ``code_version`` and ``extra`` go into the manifest entry.
    """
    from sd_core.encoding.components import component_sources, load_tokenizer, tokenize
    from sd_core.encoding.latent_cache import write_shard

    tar_path = str(tar_path)
    if not Path(tar_path).exists():
        raise FileNotFoundError(f"shard tar not found: {tar_path}")
    enc = profile.encode
    dev = torch.device(device) if device is not None else _default_device()
    gpus = visible_gpus() if dev.type == "cuda" else []
    if enc.num_gpus is not None and gpus:
        gpus = gpus[: max(1, enc.num_gpus)]
    world = num_processes if num_processes is not None else max(1, len(gpus))
    t0 = time.perf_counter()

    bar = None
    if progress is None and show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc=f"encode {shard}", unit="img")

        def progress(p: dict[str, Any]) -> None:  # noqa: F811
            bar.n = p["encoded"]
            bar.refresh()

    if world == 1:
        parts = [_encode_part(tar_path, profile, 0, 1, dev, components, progress, shard)]
        devname = str(next(components.vae.parameters()).device) if components is not None else str(dev)
    else:
        if components is not None:
            raise ValueError("components= works only with one encoder process")
        parts = _run_parts(tar_path, profile, world, gpus[:world] if dev.type == "cuda" else None)
        devname = f"{world}x{dev.type}"
    if bar is not None:
        bar.close()

    # merge the parts in tar order
    idx = np.concatenate([np.asarray(p.indices, np.int64) for p in parts]) if parts else np.zeros(0, np.int64)
    keys = [k for p in parts for k in p.keys]
    caps = [c for p in parts for c in p.captions]
    lats = [l for p in parts for l in p.latents]
    src = component_sources(profile)
    vae_cfg = components.vae.config if components is not None else _vae_config(src.vae)
    if lats:
        latents = np.concatenate(lats)
    else:
        side = enc.resolution // 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        latents = np.zeros((0, int(vae_cfg["latent_channels"]), side, side), np.float32)
    order = np.argsort(idx, kind="stable")
    latents = latents[order]
    keys = [keys[i] for i in order]
    caps = [caps[i] for i in order]
    skipped = sorted(s for p in parts for s in p.skipped)

    tok_src = components.tokenizer if components is not None else load_tokenizer(
        component_sources(profile).tokenizer, profile.components.max_length)
    token_ids = tokenize(tok_src, caps, profile.components.max_length).numpy() if caps else \
        np.zeros((0, profile.components.max_length), np.int64)

    seconds = time.perf_counter() - t0
    lat32 = latents.astype(np.float32, copy=False)
    mean = float(lat32.mean()) if lat32.size else float("nan")
    std = float(lat32.std()) if lat32.size else float("nan")
    vae_scale = float(vae_cfg["scaling_factor"])
    entry = write_shard(
        cache_dir, shard, latents, keys, caps, token_ids,
        vae=src.vae if not profile.components.build_tiny else "tiny:" + str(src.vae),
        resolution=enc.resolution, scaling_factor=vae_scale, code_version=code_version,
        extra={"skipped": len(skipped), "source": tar_path, "latent_mean": mean, "latent_std": std,
               **(extra or {})},
    )
    return EncodeReport(
        shard=shard, encoded=len(keys), skipped=len(skipped), seconds=round(seconds, 2),
        images_per_s=round(len(keys) / max(seconds, 1e-9), 1), latent_mean=mean, latent_std=std,
        latent_shape=list(latents.shape[1:]), processes=world, device=devname,
        skipped_examples=[s[1] for s in skipped[:10]], manifest_entry=entry,
    )


def _vae_config(vae_source: str) -> dict[str, Any]:
    """A VAE's config (local dir or hub id) without loading its weights."""
    from diffusers import AutoencoderKL

    cfg = dict(AutoencoderKL.load_config(vae_source))
    cfg.setdefault("scaling_factor", 0.18215)
    return cfg


def latent_stats(cache_dir: str | os.PathLike[str], shard: str, chunk: int = 1024) -> dict[str, float]:
    """Mean, std and non-finite count of one cached shard, read in chunks from the memory map."""
    from sd_core.encoding.latent_cache import shard_paths

    arr = np.load(shard_paths(cache_dir, shard).latents, mmap_mode="r")
    n = s = ss = 0.0
    bad = 0
    for i in range(0, arr.shape[0], chunk):
        x = np.asarray(arr[i:i + chunk], dtype=np.float64)
        fin = np.isfinite(x)
        bad += int((~fin).sum())
        x = x[fin]
        n += x.size
        s += float(x.sum())
        ss += float((x * x).sum())
    mean = s / n if n else float("nan")
    std = math.sqrt(max(ss / n - mean * mean, 0.0)) if n else float("nan")
    return {"count": int(arr.shape[0]), "mean": mean, "std": std, "nonfinite": bad}


# ------------------------------------------------------------------------------------------ versions
ENCODE_FORMAT = "e1"  # bump when encoding itself changes (preprocessing, posterior mean, cache layout)


def latents_code_version(profile: Profile) -> str:
    """The version of a shard's latents under ``profile``: the encode format plus the components' version
    (VAE / text encoder / tokenizer sources, resolution, max_length), so a VAE change makes every shard stale."""
    from sd_core.encoding.components import components_version

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
