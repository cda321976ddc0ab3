"""Encoding one image shard (a WebDataset tar from img2dataset) into the latent cache.

Pipeline of `encode_shard`:

1. *Decode* in parallel worker processes: a ``torch.utils.data.DataLoader`` over an iterable that reads the
   tar with webdataset (0.2.x: ``shardshuffle=False``, ``empty_check=False``); each worker decodes only
   every n-th sample (the tar is read by all, which is cheap next to JPEG decoding), converts to RGB,
   resizes the shorter side and centre-crops to ``resolution``. A sample whose image is missing or does not
   decode is *skipped and counted*, never fatal.
2. *Encode* in batches through the frozen VAE (``encode.precision``: bf16 autocast on CUDA by default), taking
   the posterior **mean** × scaling factor: deterministic, so re-encoding the same shard with the same VAE gives
   the same cache (SD samples the posterior; for a VAE trained with KL weight 1e-6 its std is negligible).
3. *Tokenize* the captions (``max_length``, padded) and `sd_core.encoding.latent_cache.write_shard` the result (atomic).

Before anything is written, the samples read (encoded + skipped) are compared with the count img2dataset
recorded for the tar (``{shard}_stats.json`` next to it, else its ``{shard}.parquet``): a tar cut short or
damaged on disk ends early without a decode error, so only the count shows it. Fewer samples than recorded
is a `ShardCountError` and the shard's previous cache stays exactly as it was.

Several GPUs: one encoder process per GPU (``spawn``), each with ``CUDA_VISIBLE_DEVICES`` set to its GPU
before CUDA initialises, each taking every G-th sample (with its own decode workers); the parent merges the
parts and writes the shard once (`write_shard` stores it in key order). On CPU there is one encoder process.

Progress goes to a callback (the Dagster asset logs it) or a tqdm bar.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from sd_core.accel import autocast
from sd_core.config import EncodeConfig, Profile
from sd_core.encoding.components import load_components, load_tokenizer, tokenize, vae_downsampling
from sd_core.encoding.latent_cache import shard_paths, write_shard
from sd_core.encoding.versions import component_sources

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
        """The encode's counts, speed and cache entry as plain JSON values (what an orchestrator shows). The
        latents' mean and std are left to whoever checks the written cache (`latent_stats`): that is the
        float16 data training reads, not the float32 this report measured."""
        return {"encoded": self.encoded, "skipped": self.skipped, "images_per_s": self.images_per_s,
                "seconds": self.seconds, "latent_shape": list(self.latent_shape), "device": self.device,
                "processes": self.processes, "scaling_factor": float(self.manifest_entry["scaling_factor"]),
                "content_hash": self.manifest_entry["hash"], "skipped_examples": list(self.skipped_examples)}


class ShardCountError(RuntimeError):
    """A shard tar yields fewer samples than img2dataset recorded writing into it (truncated or damaged)."""

    def __init__(self, shard: str, tar: str, read: int, expected: int, record: str):
        self.shard, self.tar, self.read, self.expected, self.record = shard, tar, read, expected, record
        super().__init__(
            f"shard {shard}: {tar} holds {read} readable sample(s) but img2dataset wrote {expected} into it "
            f"(per {record}): the tar is truncated or damaged. Nothing was written; the shard's previous latent "
            f"cache is unchanged. Re-download the shard (materialise image_shards for {shard}).")


def recorded_samples(tar_path: str | os.PathLike[str]) -> tuple[int, str] | None:
    """(samples img2dataset wrote into the tar, the file saying so), from its ``{stem}_stats.json``
    (``successes``) or else its ``{stem}.parquet`` (rows with status ``success``); None for a tar without
    either (not img2dataset's: nothing to compare with)."""
    tar = Path(tar_path)
    stats = tar.with_name(f"{tar.stem}_stats.json")
    try:
        successes = json.loads(stats.read_text()).get("successes")
        if isinstance(successes, int) and not isinstance(successes, bool):
            return successes, str(stats)
    except (OSError, ValueError, AttributeError):  # absent or unreadable: the parquet says the same per row
        pass
    results = tar.with_name(f"{tar.stem}.parquet")
    try:
        import pyarrow.parquet as pq

        status = pq.read_table(results, columns=["status"]).column("status").to_pylist()
    except Exception:  # absent, or not img2dataset's results file
        return None
    return sum(1 for s in status if s == "success"), str(results)


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
    """What one encoder produced: its samples in the order it read them, and the ones it skipped."""

    indices: list[int] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    latents: list[np.ndarray] = field(default_factory=list)  # per batch, float32
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (index, "key: reason")


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _decode_loader(tar_path: str, enc: EncodeConfig, rank: int, world: int) -> torch.utils.data.DataLoader:
    """The decode workers of encoder ``rank`` of ``world``: each yields every n-th sample of that share."""
    return torch.utils.data.DataLoader(
        ShardSamples(tar_path, enc.resolution, rank, world), batch_size=None,
        num_workers=max(0, enc.decode_workers), prefetch_factor=8 if enc.decode_workers > 0 else None,
        persistent_workers=False,
    )


def _decoded_batches(samples: Iterable[tuple[int, str, str, Any, str]], batch_size: int,
                     skipped: list[tuple[int, str]]) -> Iterator[list[tuple[int, str, str, np.ndarray]]]:
    """Batches of up to ``batch_size`` decoded samples (index, key, caption, image), in the order read; a
    sample without an image goes to ``skipped`` as (index, "key: reason")."""
    pending: list[tuple[int, str, str, np.ndarray]] = []
    for i, key, caption, img, err in samples:
        if img is None:
            skipped.append((i, f"{key}: {err}"))
            continue
        pending.append((i, key, caption, img if isinstance(img, np.ndarray) else np.asarray(img)))
        if len(pending) >= batch_size:
            yield pending
            pending = []
    if pending:
        yield pending


def _encode_batch(vae: Any, scaling_factor: float, images: list[np.ndarray], precision: str | None) -> np.ndarray:
    """uint8 images (B, 3, R, R) → the VAE's posterior means × scaling factor, float32 (bf16 autocast when
    ``precision`` resolves to bf16: `sd_core.accel`)."""
    dev = next(vae.parameters()).device
    x = torch.from_numpy(np.stack(images)).to(dev, non_blocking=True)
    x = x.float().div_(127.5).sub_(1.0)
    with torch.inference_mode(), autocast(precision, dev):
        z = vae.encode(x).latent_dist.mean
    return (z.float() * scaling_factor).cpu().numpy()


class _ThrottledProgress:
    """Reports an encoder's counts to ``progress`` (if any) at most every ``every`` seconds."""

    def __init__(self, progress: ProgressFn | None, shard: str, rank: int, every: float = 5.0):
        self.progress, self.shard, self.rank, self.every = progress, shard, rank, every
        self.t0 = self.last = time.perf_counter()

    def __call__(self, part: _Part) -> None:
        now = time.perf_counter()
        if self.progress is None or now - self.last <= self.every:
            return
        self.last = now
        done = len(part.indices)
        self.progress({"shard": self.shard, "rank": self.rank, "encoded": done, "skipped": len(part.skipped),
                       "seconds": round(now - self.t0, 1), "images_per_s": round(done / max(now - self.t0, 1e-9), 1)})


def _encode_part(tar_path: str, profile: Profile, rank: int, world: int, device: torch.device,
                 components=None, progress: ProgressFn | None = None, shard: str = "") -> _Part:
    """Encode the share of encoder ``rank`` of ``world``: its decode workers feed batches of
    ``encode.batch_size`` through the VAE."""
    enc = profile.encode
    comps = components or load_components(profile, device=device, text_encoder=False)
    loader = _decode_loader(tar_path, enc, rank, world)
    part = _Part()
    report = _ThrottledProgress(progress, shard, rank)
    for batch in _decoded_batches(loader, enc.batch_size, part.skipped):
        part.latents.append(_encode_batch(comps.vae, comps.scaling_factor, [b[3] for b in batch], enc.precision))
        for i, key, caption, _ in batch:
            part.indices.append(i)
            part.keys.append(key)
            part.captions.append(caption)
        report(part)
    return part


def _save_part(part: _Part, path: str) -> None:
    lat = np.concatenate(part.latents) if part.latents else np.zeros((0,), np.float32)
    np.savez(path, indices=np.asarray(part.indices, np.int64), keys=np.asarray(part.keys, dtype=object),
             captions=np.asarray(part.captions, dtype=object), latents=lat,
             skipped_idx=np.asarray([s[0] for s in part.skipped], np.int64),
             skipped_msg=np.asarray([s[1] for s in part.skipped], dtype=object))


def _load_part(path: str) -> _Part:
    d = np.load(path, allow_pickle=True)  # our own temporary file, written just now
    return _Part(d["indices"].tolist(), d["keys"].tolist(), d["captions"].tolist(),
                 [d["latents"]] if d["indices"].size else [],
                 list(zip(d["skipped_idx"].tolist(), d["skipped_msg"].tolist())))


def _part_worker(tar_path: str, profile: Profile, rank: int, world: int, gpu: str | None, out_path: str) -> None:
    """Body of one encoder process (spawned): encode this rank's samples and save them to ``out_path``."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # already set by the parent at spawn; before any CUDA call
        device = torch.device("cuda:0")
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(world, 1)))
    _save_part(_encode_part(tar_path, profile, rank, world, device), out_path)


@contextmanager
def _visible_gpu(gpu: str | None) -> Iterator[None]:
    """Set CUDA_VISIBLE_DEVICES to ``gpu`` for the block, then restore the parent's value: a process spawned
    inside inherits it from its start, before anything in it can initialise CUDA."""
    if gpu is None:
        yield
        return
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


def _run_parts(tar_path: str, profile: Profile, world: int, gpus: list[str]) -> list[_Part]:
    """Encode in ``world`` spawned encoder processes (rank r on ``gpus[r]``; on CPU when ``gpus`` is empty),
    each saving its part to a temporary file; returns the parts in rank order."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="sd-encode-") as tmp:
        procs, outs = [], []
        for r in range(world):
            out = os.path.join(tmp, f"part{r}.npz")
            gpu = gpus[r] if gpus else None
            with _visible_gpu(gpu):
                p = ctx.Process(target=_part_worker, args=(tar_path, profile, r, world, gpu, out), daemon=False)
                p.start()
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
        return [_load_part(out) for out in outs]


def visible_gpus() -> list[str]:
    """The GPU ids an encoder may use (honours an existing CUDA_VISIBLE_DEVICES)."""
    if not torch.cuda.is_available():
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env:
        return [g.strip() for g in env.split(",") if g.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def _encoder_gpus(profile: Profile, dev: torch.device, num_processes: int | None) -> tuple[int, list[str]]:
    """(number of encoder processes, the GPU of each): by default one per visible GPU (``encode.num_gpus``
    caps them), one on CPU; the GPU list is empty on CPU."""
    gpus = visible_gpus() if dev.type == "cuda" else []
    if profile.encode.num_gpus is not None and gpus:
        gpus = gpus[: max(1, profile.encode.num_gpus)]
    world = num_processes if num_processes is not None else max(1, len(gpus))
    return world, gpus[:world]


def _encode_parts(tar_path: str, profile: Profile, dev: torch.device, world: int, gpus: list[str],
                  components: Any, progress: ProgressFn | None, shard: str) -> tuple[list[_Part], str]:
    """Run the encoder(s): in this process when ``world`` is 1, else in spawned processes. Returns the parts
    and the device the report names."""
    if world == 1:
        devname = str(next(components.vae.parameters()).device) if components is not None else str(dev)
        return [_encode_part(tar_path, profile, 0, 1, dev, components, progress, shard)], devname
    if components is not None:
        raise ValueError("components= works only with one encoder process")
    return _run_parts(tar_path, profile, world, gpus), f"{world}x{dev.type}"


@contextmanager
def _progress_or_bar(progress: ProgressFn | None, show_progress: bool, shard: str) -> Iterator[ProgressFn | None]:
    """``progress`` itself; or, when none is given and ``show_progress``, a callback moving a tqdm bar."""
    if progress is not None or not show_progress:
        yield progress
        return
    from tqdm.auto import tqdm

    bar = tqdm(desc=f"encode {shard}", unit="img")

    def move_bar(p: dict[str, Any]) -> None:
        bar.n = p["encoded"]
        bar.refresh()

    try:
        yield move_bar
    finally:
        bar.close()


def _merge_parts(parts: list[_Part], no_latents: np.ndarray
                 ) -> tuple[np.ndarray, list[str], list[str], list[tuple[int, str]]]:
    """The parts as one shard: latents (``no_latents`` when nothing encoded), keys, captions, and the skipped
    samples sorted by index. Rows stay in part order: `write_shard` stores them in key order."""
    keys = [k for p in parts for k in p.keys]
    caps = [c for p in parts for c in p.captions]
    lats = [lat for p in parts for lat in p.latents]
    skipped = sorted(s for p in parts for s in p.skipped)
    return (np.concatenate(lats) if lats else no_latents), keys, caps, skipped


def _no_latents(vae_cfg: Any, resolution: int) -> np.ndarray:
    """An empty (0, C, h, w) latents array of the shape the VAE gives at ``resolution``."""
    side = resolution // vae_downsampling(vae_cfg["block_out_channels"])
    return np.zeros((0, int(vae_cfg["latent_channels"]), side, side), np.float32)


def _caption_tokens(profile: Profile, components: Any, captions: list[str]) -> np.ndarray:
    """(N, max_length) token ids of the captions, by the loaded tokenizer or else the profile's."""
    max_length = profile.components.max_length
    tokenizer = components.tokenizer if components is not None else load_tokenizer(
        component_sources(profile).tokenizer, max_length)
    if not captions:
        return np.zeros((0, max_length), np.int64)
    return tokenize(tokenizer, captions, max_length).numpy()


def _mean_std(latents: np.ndarray) -> tuple[float, float]:
    """Mean and std of the latents in float32 (NaN for none)."""
    lat32 = latents.astype(np.float32, copy=False)
    if not lat32.size:
        return float("nan"), float("nan")
    return float(lat32.mean()), float(lat32.std())


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
    the multi-process path). ``code_version`` and ``extra`` go into the manifest entry. A tar that yields
    fewer samples than its img2dataset stats record is a `ShardCountError`, raised before anything is written.
    """
    shard_paths(cache_dir, shard)  # a shard name that would write outside cache_dir fails now, not after encoding
    tar_path = str(tar_path)
    if not Path(tar_path).exists():
        raise FileNotFoundError(f"shard tar not found: {tar_path}")
    dev = torch.device(device) if device is not None else _default_device()
    world, gpus = _encoder_gpus(profile, dev, num_processes)
    t0 = time.perf_counter()
    with _progress_or_bar(progress, show_progress, shard) as report_progress:
        parts, devname = _encode_parts(tar_path, profile, dev, world, gpus, components, report_progress, shard)
    src = component_sources(profile)
    vae_cfg = components.vae.config if components is not None else _vae_config(src.vae)
    latents, keys, caps, skipped = _merge_parts(parts, _no_latents(vae_cfg, profile.encode.resolution))
    _check_sample_count(shard, tar_path, len(keys) + len(skipped))
    token_ids = _caption_tokens(profile, components, caps)
    seconds = time.perf_counter() - t0
    mean, std = _mean_std(latents)
    entry = write_shard(
        cache_dir, shard, latents, keys, caps, token_ids,
        vae=src.vae if not profile.components.build_tiny else "tiny:" + str(src.vae),
        resolution=profile.encode.resolution, scaling_factor=float(vae_cfg["scaling_factor"]),
        code_version=code_version,
        extra={"skipped": len(skipped), "source": tar_path, "latent_mean": mean, "latent_std": std, **(extra or {})},
    )
    return EncodeReport(
        shard=shard, encoded=len(keys), skipped=len(skipped), seconds=round(seconds, 2),
        images_per_s=round(len(keys) / max(seconds, 1e-9), 1), latent_mean=mean, latent_std=std,
        latent_shape=list(latents.shape[1:]), processes=world, device=devname,
        skipped_examples=[s[1] for s in skipped[:10]], manifest_entry=entry,
    )


def _check_sample_count(shard: str, tar_path: str, read: int) -> None:
    """`ShardCountError` when the tar gave fewer samples than img2dataset recorded (before anything is written)."""
    recorded = recorded_samples(tar_path)
    if recorded is not None and read < recorded[0]:
        raise ShardCountError(shard, tar_path, read, recorded[0], recorded[1])


def _vae_config(vae_source: str) -> dict[str, Any]:
    """A VAE's config (local dir or hub id) without loading its weights."""
    from diffusers import AutoencoderKL

    cfg = dict(AutoencoderKL.load_config(vae_source))
    cfg.setdefault("scaling_factor", 0.18215)
    return cfg


def latent_stats(cache_dir: str | os.PathLike[str], shard: str, chunk: int = 1024) -> dict[str, float]:
    """Mean, std and non-finite count of one cached shard, read in chunks from the memory map."""
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
