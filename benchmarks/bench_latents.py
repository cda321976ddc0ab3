"""Latent cache and encoding benchmarks (helper "latents"); prints a markdown section for BENCHMARKS.md.

1. Random-access batch reads, SD 1.5 latent shape (4×64×64 float16, 32 KiB per sample): our cache
   (`LatentDataset`, per-shard memory-mapped .npy, batch gathered with `get_batch`, and one sample at a
   time with ``ds[i]`` as a DataLoader would) vs a per-image ``.npy`` layout like the seeds' (one file per
   latent, ``np.load`` each). Same samples, same random batches, same run, page cache warm for both
   (a warm-up pass reads everything first; the data set fits in RAM, as a training node's page cache would
   hold a hot working set).
2. Encode throughput on CPU: `encode_shard` on a tar of 512 px JPEGs with a randomly initialised
   ``AutoencoderKL`` of the sd-vae-ft-mse config, including JPEG decode/resize in the worker process,
   tokenization and the cache write. Decode-only throughput of the same tar alongside.
3. The same on CUDA (bf16 autocast, one process per GPU) when a GPU is present; otherwise recorded as not
   measured.

    python benchmarks/bench_latents.py [--samples 8192] [--encode-images 4]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SD_VAE_FT_MSE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "sample_size": 512, "scaling_factor": 0.18215,
}


def bench_reads(root: Path, n: int, shard_size: int, batch: int, batches: int, seed: int = 0) -> dict:
    from sd_core.encoding.latent_cache import LatentDataset, write_shard

    rng = np.random.default_rng(seed)
    cache, per_file = root / "cache", root / "per_file"
    per_file.mkdir(parents=True)
    for s in range(0, n, shard_size):
        m = min(shard_size, n - s)
        lat = rng.standard_normal((m, 4, 64, 64), dtype=np.float32).astype(np.float16)
        tok = rng.integers(0, 49408, (m, 77))
        write_shard(cache, f"{s // shard_size:05d}", lat, [str(s + i) for i in range(m)], ["c"] * m, tok)
        for i in range(m):  # the seeds' layout: one .npy per image (latent), plus its token ids
            np.save(per_file / f"{s + i:08d}.npy", lat[i])
            np.save(per_file / f"{s + i:08d}.tok.npy", tok[i])
    ds = LatentDataset(cache)
    order = [rng.integers(0, n, batch) for _ in range(batches)]

    def run_cache_batch():
        for idx in order:
            ds.get_batch(idx)

    def run_cache_items():
        for idx in order:
            for i in idx:
                ds[int(i)]

    def run_files():
        for idx in order:
            np.stack([np.load(per_file / f"{int(i):08d}.npy") for i in idx])
            np.stack([np.load(per_file / f"{int(i):08d}.tok.npy") for i in idx])

    out = {}
    for name, fn in [("cache_get_batch", run_cache_batch), ("cache_getitem", run_cache_items),
                     ("per_file_npy", run_files)]:
        fn()  # warm-up: page cache and memory maps
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        out[name] = batch * batches / best
    return out


def make_tar(path: Path, n: int, size: int) -> None:
    import webdataset as wds

    from sd_core.data import synthetic as S

    with wds.TarWriter(str(path)) as w:
        for i in range(n):
            shape, color, bg = S.SHAPES[i % 3], list(S.COLORS)[i % 4], list(S.BACKGROUNDS)[i % 3]
            buf = io.BytesIO()
            S.render_shape(shape, color, bg, size=size, seed=i).save(buf, "JPEG", quality=90)
            w.write({"__key__": f"{i:09d}", "jpg": buf.getvalue(), "txt": S.caption(shape, color, bg)})


def bench_encode(root: Path, n: int, device: str, batch_size: int, workers: int) -> dict:
    import torch
    from diffusers import AutoencoderKL

    from sd_core.encoding.components import build_tiny_tokenizer
    from sd_core.config import Profile
    from sd_core.data import synthetic as S
    from sd_core.encoding.encode import ShardSamples, encode_shard

    comp = root / "components"
    if not (comp / "vae").exists():
        torch.manual_seed(0)
        AutoencoderKL(**SD_VAE_FT_MSE).save_pretrained(comp / "vae")
        build_tiny_tokenizer(S.vocabulary(), 77).save_pretrained(comp / "tokenizer")
    p = Profile.sd15(root / f"data-{device}").with_overrides({
        "components": {"vae": str(comp / "vae"), "text_encoder": str(comp / "text_encoder"), "tokenizer": str(comp / "tokenizer")},
        "encode": {"batch_size": batch_size, "decode_workers": workers}})
    tar = root / "bench.tar"
    if not tar.exists():
        make_tar(tar, n, 512)
    t = time.perf_counter()
    k = sum(1 for _ in ShardSamples(tar, 512))
    decode = k / (time.perf_counter() - t)
    if device == "cuda":  # warm-up: CUDA context, cuDNN autotune
        encode_shard(tar, p.latents_dir, "warmup", p, device="cuda")
    r = encode_shard(tar, p.latents_dir, "00000", p, device=device)
    return {"images": r.encoded, "images_per_s": r.encoded / r.seconds, "seconds": r.seconds,
            "decode_only_images_per_s": decode, "device": r.device, "processes": r.processes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=8192)
    ap.add_argument("--shard-size", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--encode-images", type=int, default=4)
    ap.add_argument("--encode-batch", type=int, default=2)
    ap.add_argument("--gpu-images", type=int, default=256)
    ap.add_argument("--skip-encode", action="store_true")
    ap.add_argument("--json", type=str, default=None, help="also write the raw figures here")
    args = ap.parse_args()

    import torch

    root = Path(tempfile.mkdtemp(prefix="bench-latents-"))
    try:
        reads = bench_reads(root / "reads", args.samples, args.shard_size, args.batch, args.batches)
        enc_cpu = None if args.skip_encode else bench_encode(root / "enc", args.encode_images, "cpu",
                                                             args.encode_batch, 1)
        enc_gpu = None
        if torch.cuda.is_available() and not args.skip_encode:
            enc_gpu = bench_encode(root / "enc", args.gpu_images, "cuda", 32, 8)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    lines = [
        "## Latent cache reads and encoding (`benchmarks/bench_latents.py`)",
        "",
        f"Machine: {cpu}. Command: `python {' '.join(['benchmarks/bench_latents.py'] + sys.argv[1:])}`. "
        f"Date: {now}. Load average at the end (1/5/15 min): {' / '.join(f'{x:.1f}' for x in os.getloadavg())}.",
        "",
        f"Random-access batches of {args.batch} from {args.samples} latents of 4×64×64 fp16 (+77 token ids), "
        f"{args.batches} batches, warm page cache, best of 3:",
        "",
        "| layout | samples/s | vs per-image .npy |",
        "|---|---:|---:|",
    ]
    ref = reads["per_file_npy"]
    for name, label in [("cache_get_batch", f"latent cache, `LatentDataset.get_batch` ({args.shard_size}/shard, mmap)"),
                        ("cache_getitem", "latent cache, `ds[i]` one at a time (DataLoader style)"),
                        ("per_file_npy", "per-image `.npy` files (the seeds' layout), `np.load` each")]:
        lines.append(f"| {label} | {reads[name]:,.0f} | {reads[name] / ref:.1f}x |")
    lines += ["", "Encoding, 512 px, sd-vae-ft-mse config with random weights, including JPEG decode/resize, "
                  "tokenization and the cache write:", "",
              "| device | images/s | images | decode-only images/s (1 process) |", "|---|---:|---:|---:|"]
    if enc_cpu:
        lines.append(f"| CPU ({enc_cpu['device']}, batch {args.encode_batch}, 1 decode worker) | "
                     f"{enc_cpu['images_per_s']:.3f} | {enc_cpu['images']} | {enc_cpu['decode_only_images_per_s']:.0f} |")
    if enc_gpu:
        lines.append(f"| GPU ({torch.cuda.get_device_name(0)}, {enc_gpu['processes']} process(es), bf16, batch 32, "
                     f"8 decode workers) | {enc_gpu['images_per_s']:.1f} | {enc_gpu['images']} | "
                     f"{enc_gpu['decode_only_images_per_s']:.0f} |")
    else:
        lines.append("| GPU (bf16 autocast, one process per GPU) | not yet measured (no GPU lent) | | |")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"reads": reads, "encode_cpu": enc_cpu, "encode_gpu": enc_gpu}, indent=1))


if __name__ == "__main__":
    main()
