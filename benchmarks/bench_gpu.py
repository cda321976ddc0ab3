"""The GPU suite: every GPU figure DESIGN.md section 6 asks for, on one CUDA device, in one command, printed
as markdown for BENCHMARKS.md (with the device name). Budget: 8 minutes on an H100/H200-class GPU.

    make bench-gpu                  # python benchmarks/bench_gpu.py
    make bench-gpu DRY_RUN=1        # python benchmarks/bench_gpu.py --dry-run: CPU, toy shapes, < 1 minute

1. UNet training step, SD 1.5 config, 64x64 latents, 77x768 context, bf16 autocast (fp32 weights), fused
   AdamW, channels_last: ours vs diffusers ``UNet2DConditionModel`` with the same weights, eager and
   ``torch.compile``; samples/s, MFU at 2.407 TFLOP per sample per step against the device's dense bf16 peak,
   peak memory.
2. Sampling: 30-step DDIM + CFG at 512 px, our `generate` against diffusers' ``StableDiffusionPipeline``
   loaded with ``from_pretrained`` from our export (`sd_core.sampling.export`), prompt encoding to final latents.
3. Encoding: `encode_shard` at 512 px with the sd-vae-ft-mse config, JPEG decode included (images/s per GPU).
4. ``sd train`` (``python -m sd_core.train``) on the full 859,520,964-parameter UNet for a few dozen steps with
   ``--compile --grad-ckpt --channels-last --precision bf16``, then checkpoint save and load time and size.
5. ``pytest -m gpu``.

Weights are random, from the real configs (no hub access): the cost is the same. The dry run executes the same
code on CPU at toy shapes so the script is known to run before GPU time is spent on it; there,
``torch.compile`` uses the ``eager`` backend (Dynamo traces both models, no code generation), the trainer
runs without ``--compile`` (inductor's C++ build alone takes minutes on 2 cores; tests/test_recipe_flags.py
covers the compiled trainer) and MFU is not computed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bench_latents  # noqa: E402  (make_tar, SD_VAE_FT_MSE)
import bench_sampling  # noqa: E402  (the SD 1.5 / tiny sampling components)
import bench_unet  # noqa: E402  (inputs, PEAK_BF16_TFLOPS, TRAIN_FLOP_PER_SAMPLE_SD15_64)
from sd_core.accel import autocast  # noqa: E402
from sd_core.config import UNetConfig  # noqa: E402
from sd_core.model.convert import to_diffusers  # noqa: E402
from sd_core.model.unet import UNetModel  # noqa: E402

SECTIONS = ("UNet training step", "Sampling", "Encoding", "sd train", "pytest -m gpu")
TOY_UNET = UNetConfig(ch=16, ch_mults=(1, 2), res_blks=1, attn_lvls=(2,), heads=2, ctx_dim=64, norm_groups=8)
CLIP_L_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77)


@dataclasses.dataclass(frozen=True)
class Scale:
    """Every shape and count of the suite: the GPU one, or the dry run's toy one."""

    dry: bool
    device: torch.device
    unet: UNetConfig
    latent: int  # latent px (64 = 512 px images)
    tokens: int
    step_batch: int
    warmup: int
    steps: int
    compile_backend: str
    sample_build: Callable[..., Any]
    sample_dtype: torch.dtype
    repeats: int
    encode_px: int
    encode_images: int
    encode_batch: int
    decode_workers: int
    train_batch: int
    train_steps: int
    peak_tflops: float | None = None  # the device's dense bf16 peak; None: looked up by name (bench_unet)

    @classmethod
    def gpu(cls, batch: int, peak_tflops: float | None = None) -> "Scale":
        return cls(dry=False, device=torch.device("cuda"), unet=UNetConfig.sd15(), latent=64, tokens=77,
                   step_batch=batch, warmup=3, steps=10, compile_backend="inductor",
                   sample_build=bench_sampling.sd15_components, sample_dtype=torch.bfloat16, repeats=3,
                   encode_px=512, encode_images=512, encode_batch=32, decode_workers=8, train_batch=16,
                   train_steps=36, peak_tflops=peak_tflops)

    @classmethod
    def toy(cls) -> "Scale":
        return cls(dry=True, device=torch.device("cpu"), unet=TOY_UNET, latent=8, tokens=8, step_batch=2, warmup=1,
                   steps=2, compile_backend="eager", sample_build=bench_sampling.tiny_components,
                   sample_dtype=torch.float32, repeats=1, encode_px=64, encode_images=4, encode_batch=2,
                   decode_workers=1, train_batch=2, train_steps=4)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f}"


def device_name(s: Scale) -> str:
    if s.device.type == "cuda":
        return torch.cuda.get_device_name(s.device)
    return f"CPU ({os.cpu_count()} cores; dry run)"


# ----------------------------------------------------------------------------------- 1. UNet training step
def _step_model(s: Scale, reference: dict, which: str) -> torch.nn.Module:
    """Ours or diffusers' UNet holding ``reference``'s weights, on the device, channels_last."""
    model = UNetModel(s.unet)
    model.load_state_dict(reference)
    model = model.to(s.device)
    if which == "diffusers":
        model = to_diffusers(model, sample_size=s.latent)
    return model.to(memory_format=torch.channels_last).train()


def _time_steps(s: Scale, model: torch.nn.Module, which: str, compiled: bool, batch: list) -> dict:
    """Warm-up (compilation included), then ``s.steps`` timed training steps; samples/s and peak memory."""
    x, t, ctx, noise = batch
    run = torch.compile(model, backend=s.compile_backend) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-2, fused=s.device.type == "cuda" or None)

    def step() -> torch.Tensor:
        with autocast("bf16", s.device):
            if which == "diffusers":
                pred = run(x, t, encoder_hidden_states=ctx, return_dict=False)[0]
            else:
                pred = run(x, t, ctx)
            loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for _ in range(s.warmup):
        step()
    _sync(s.device)
    warm = time.perf_counter() - t0
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
    t0 = time.perf_counter()
    for _ in range(s.steps):
        loss = step()
    _sync(s.device)
    sec = (time.perf_counter() - t0) / s.steps
    mem = torch.cuda.max_memory_allocated(s.device) if s.device.type == "cuda" else None
    return dict(which=which, compiled=compiled, s=sec, sps=s.step_batch / sec, warm=warm, mem=mem, loss=float(loss))


def bench_unet_step(s: Scale) -> list[str]:
    torch.manual_seed(0)
    reference = UNetModel(s.unet).state_dict()  # zero-initialised output layers: the same cost as trained ones
    batch = bench_unet.inputs(s.unet, s.step_batch, s.latent, s.tokens, device=s.device)
    batch[0] = batch[0].contiguous(memory_format=torch.channels_last)
    name = device_name(s)
    peak = None if s.dry else s.peak_tflops or next((v for k, v in bench_unet.PEAK_BF16_TFLOPS.items() if k in name),
                                                      None)
    rows = []
    for compiled in (False, True):
        for which in ("ours", "diffusers"):
            try:
                rows.append(_time_steps(s, _step_model(s, reference, which), which, compiled, batch))
            except torch.cuda.OutOfMemoryError:
                rows.append(dict(which=which, compiled=compiled, oom=True))
            gc.collect()
            if s.device.type == "cuda":
                torch.cuda.empty_cache()
    lines = [f"{s.unet.ch}-wide UNet ({sum(v.numel() for v in reference.values()):,} params), batch {s.step_batch},"
             f" {s.latent}x{s.latent}x4 latents, {s.tokens}x{s.unet.ctx_dim} context, bf16 autocast (fp32 weights),"
             f" {'fused ' if s.device.type == 'cuda' else ''}AdamW, channels_last, compile backend"
             f" {s.compile_backend}; MFU = samples/s x 2.407 TFLOP / {peak or 'n/a'} TFLOP/s (dense bf16 peak).", "",
             "| model | torch.compile | s/step | samples/s | MFU | vs diffusers (same compile) | peak mem (GiB) |"
             " warm-up (s) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        label = f"| {r['which']} | {'yes' if r['compiled'] else 'no'} |"
        if r.get("oom"):
            lines.append(f"{label} out of memory at batch {s.step_batch} | | | | | |")
            continue
        ref = next((o for o in rows if o["which"] == "diffusers" and o["compiled"] == r["compiled"]
                    and not o.get("oom")), None)
        mfu = f"{r['sps'] * bench_unet.TRAIN_FLOP_PER_SAMPLE_SD15_64 / (peak * 1e12):.1%}" if peak else "n/a"
        lines.append(f"{label} {r['s']:.4f} | {r['sps']:.1f} | {mfu} | "
                     f"{(r['sps'] / ref['sps']) if ref else float('nan'):.2f}x | "
                     f"{_gib(r['mem']) if r['mem'] is not None else 'n/a'} | {r['warm']:.0f} |")
    return lines


# ------------------------------------------------------------------------------------------- 2. sampling
def bench_sampling_vs_pipeline(s: Scale, work: Path) -> list[str]:
    """Our 30-step DDIM + CFG against diffusers' pipeline loaded from our export of the same weights."""
    from diffusers import StableDiffusionPipeline

    from sd_core.sampling.export import export_pipeline
    from sd_core.sampling.generate import generate

    unet, te, tok, vae, prompts, size = s.sample_build(s.device, s.sample_dtype)
    prompts = prompts[:1] if s.dry else prompts
    bench_sampling._randomize_zero_init(unet)  # a non-trivial eps, so the comparison means something
    export = export_pipeline(unet, te, tok, vae, work / "export")
    pipe = StableDiffusionPipeline.from_pretrained(export, torch_dtype=s.sample_dtype).to(s.device)
    pipe.set_progress_bar_config(disable=True)
    unet, te, vae = (m.to(device=s.device, dtype=s.sample_dtype).eval() for m in (unet, te, vae))
    seeds = list(range(len(prompts)))

    def ours():
        return generate(unet, te, tok, vae, prompts, steps=30, guidance=7.5, seed=seeds, height=size, width=size,
                        output="latent")

    def theirs():
        return pipe(prompts, num_inference_steps=30, guidance_scale=7.5, height=size, width=size, output_type="latent",
                    generator=[torch.Generator().manual_seed(i) for i in seeds]).images

    times: dict[str, list[float]] = {"ours": [], "diffusers": []}
    with torch.inference_mode():
        diff = (ours().float() - theirs().float().to(s.device)).abs().max().item()  # warm-up + agreement
        for _ in range(s.repeats):
            for key, fn in (("ours", ours), ("diffusers", theirs)):
                _sync(s.device)
                t0 = time.perf_counter()
                fn()
                _sync(s.device)
                times[key].append(time.perf_counter() - t0)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return [f"{len(prompts)} prompt(s) (UNet batch {2 * len(prompts)}), {size} px, {s.sample_dtype}, median of "
            f"{s.repeats} interleaved runs after a warm-up; prompt encoding to final latents (VAE decode excluded).",
            "",
            "| ours (s) | diffusers pipeline from our export (s) | diffusers / ours | max final-latent diff |",
            "|---:|---:|---:|---:|",
            f"| {med['ours']:.3f} | {med['diffusers']:.3f} | {med['diffusers'] / med['ours']:.2f}x | {diff:.1e} |"]


# ------------------------------------------------------------------------------------------- 3. encoding
def bench_encoding(s: Scale, work: Path) -> list[str]:
    from diffusers import AutoencoderKL

    from sd_core.config import Profile
    from sd_core.data.synthetic import vocabulary
    from sd_core.encoding.components import build_tiny_tokenizer
    from sd_core.encoding.encode import encode_shard

    comp = work / "components"
    config = dict(bench_latents.SD_VAE_FT_MSE)
    if s.dry:  # the same architecture family, narrowed
        config.update(block_out_channels=[8, 16], down_block_types=config["down_block_types"][:2],
                      up_block_types=config["up_block_types"][:2], norm_num_groups=4, sample_size=s.encode_px)
    torch.manual_seed(0)
    AutoencoderKL(**config).save_pretrained(comp / "vae")
    build_tiny_tokenizer(vocabulary(), 77).save_pretrained(comp / "tokenizer")
    profile = Profile.sd15(work / "data").with_overrides({
        "components": {"vae": str(comp / "vae"), "text_encoder": str(comp / "text_encoder"),
                       "tokenizer": str(comp / "tokenizer")},
        "encode": {"resolution": s.encode_px, "batch_size": s.encode_batch, "decode_workers": s.decode_workers,
                   "precision": "bf16"}})
    tar = work / "images.tar"
    bench_latents.make_tar(tar, s.encode_images, s.encode_px)
    warm = work / "warm.tar"
    bench_latents.make_tar(warm, 2 * s.encode_batch, s.encode_px)
    encode_shard(warm, profile.latents_dir, "warmup", profile, device=s.device, num_processes=1)
    report = encode_shard(tar, profile.latents_dir, "00000", profile, device=s.device, num_processes=1)
    return [f"{s.encode_images} JPEGs of {s.encode_px} px through `encode_shard` (decode + resize in "
            f"{s.decode_workers} worker(s), bf16 autocast, batch {s.encode_batch}, tokenization, cache write), "
            f"sd-vae-ft-mse config{' narrowed' if s.dry else ''}, random weights, one encoder process.", "",
            "| images/s per GPU | images | seconds |", "|---:|---:|---:|",
            f"| {report.encoded / report.seconds:.1f} | {report.encoded} | {report.seconds:.1f} |"]


# ------------------------------------------------------------------------------------------ 4. sd train
def _train_data(s: Scale, work: Path) -> tuple[Path, Path]:
    """A components folder (text encoder of the UNet's context width, a tokenizer) and a latent cache of
    ``16 x batch`` random latents; returns (data root, components dir)."""
    import numpy as np
    from transformers import CLIPTextConfig, CLIPTextModel

    from sd_core.data.synthetic import vocabulary
    from sd_core.encoding.components import build_tiny_text_encoder, build_tiny_tokenizer, tokenize
    from sd_core.encoding.latent_cache import write_shard

    root, comp = work / "train", work / "train" / "components"
    tok = build_tiny_tokenizer(vocabulary(), s.tokens)  # only the ids' count matters for the cost
    torch.manual_seed(0)
    te = (build_tiny_text_encoder(len(tok), s.unet.ctx_dim, 2, 2, s.tokens, 0) if s.dry
          else CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)))
    tok.save_pretrained(comp / "tokenizer")
    te.save_pretrained(comp / "text_encoder")
    n = 16 * s.train_batch
    lat = np.random.default_rng(0).standard_normal((n, 4, s.latent, s.latent), dtype=np.float32).astype(np.float16)
    caps = [f"a red circle on a white background {i}" for i in range(n)]
    write_shard(root / "latents", "00000", lat, [f"{i:09d}" for i in range(n)], caps,
                tokenize(tok, caps, s.tokens).numpy(), vae="random", resolution=8 * s.latent, scaling_factor=0.18215)
    return root, comp


def _trainer_command(s: Scale, root: Path, comp: Path, out: Path) -> list[str]:
    recipe = ["--grad-ckpt", "--channels-last", "--precision", "bf16"] + ([] if s.dry else ["--compile"])
    profile = ["--profile", "tiny", "--overrides", json.dumps({"unet": dataclasses.asdict(s.unet)})] if s.dry \
        else ["--profile", "sd15"]
    return [sys.executable, "-m", "sd_core.train", *profile, "--data-root", str(root), "--components-dir", str(comp),
            "--output-dir", str(out), "--device", s.device.type, "--batch-size", str(s.train_batch),
            "--max-steps", str(s.train_steps), "--warmup-steps", "5", "--log-every", str(max(1, s.train_steps // 6)),
            "--checkpoint-every", str(s.train_steps), "--val-share", "0", "--no-wandb",
            "--num-workers", "0" if s.dry else "2", *recipe]


def bench_train(s: Scale, work: Path) -> list[str]:
    from sd_core.training import checkpoint as ck
    from sd_core.training.metrics_log import read_metrics

    root, comp = _train_data(s, work)
    out = work / "run"
    cmd = _trainer_command(s, root, comp, out)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"sd train failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    rows = [r for r in read_metrics(out) if r["kind"] == "train"]
    result = json.loads((out / "result.json").read_text())
    latest = ck.latest_checkpoint(out)
    size = sum(f.stat().st_size for f in latest.iterdir() if f.is_file())
    # the trainer's own save: its last train row is logged right before it, result.json written right after
    save_s = (out / "result.json").stat().st_mtime - rows[-1]["time"]
    t0 = time.perf_counter()
    unet = ck.load_unet(latest, ema=False, device=s.device)  # hash-verified, as a resume or `sd generate` loads it
    ck.load_weights(latest / ck.EMA_FILE)
    ck.load_train_state(latest)
    _sync(s.device)
    load_s = time.perf_counter() - t0
    flags = " ".join(a for a in cmd[cmd.index("--num-workers") + 2:])
    return [f"`python -m sd_core.train --profile {'tiny (toy UNet)' if s.dry else 'sd15'} --batch-size "
            f"{s.train_batch} --max-steps {s.train_steps} {flags}` on {result['steps']} steps of random "
            f"{s.latent}x{s.latent} latents, 1 process; samples/s = the trainer's steady windows (first left out); "
            f"save = the trainer's final checkpoint (UNet, EMA, optimiser state; hashed); load = UNet to the device "
            f"+ EMA + state.",
            "", "| UNet params | samples/s | final loss | wall incl. start-up + compile (s) | checkpoint size (GiB) |"
            " save (s) | load (s) |", "|---:|---:|---:|---:|---:|---:|---:|",
            f"| {sum(p.numel() for p in unet.parameters()):,} | {result['samples_per_s'] or float('nan'):.1f} | "
            f"{rows[-1]['loss']:.4f} | {wall:.0f} | {size / 2**30:.2f} | {save_s:.1f} | {load_s:.1f} |"]


# --------------------------------------------------------------------------------------- 5. pytest -m gpu
def run_gpu_tests(s: Scale) -> list[str]:
    """``pytest -m gpu``. The dry run runs only tests/test_gpu.py (collecting the whole suite costs ~15 s on 2
    cores), where every test skips without CUDA."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    cmd += ["tests/test_gpu.py"] if s.dry else []
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    tail = [line for line in proc.stdout.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
    ok = proc.returncode == 0
    return [f"`{' '.join(['pytest'] + cmd[3:])}`: exit code {proc.returncode}{'' if ok else ' (FAILED)'}; "
            f"{tail[0]}"] + ([] if ok else ["", "```", proc.stdout[-3000:], "```"])


# ------------------------------------------------------------------------------------------------- main
def run_suite(s: Scale, command: str) -> tuple[list[str], bool]:
    """Every section in order; a failing section is reported (its error) and the others still run."""
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## GPU suite (`benchmarks/bench_gpu.py`){' — DRY RUN (CPU, toy shapes)' if s.dry else ''}", "",
             f"- device: {device_name(s)}; torch {torch.__version__}; {when}", f"- command: `{command}`", ""]
    ok = True
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sd-bench-gpu-") as tmp:
        work = Path(tmp)
        jobs = [lambda: bench_unet_step(s), lambda: bench_sampling_vs_pipeline(s, work / "sample"),
                lambda: bench_encoding(s, work / "encode"), lambda: bench_train(s, work / "train"),
                lambda: run_gpu_tests(s)]
        for title, job in zip(SECTIONS, jobs):
            t0 = time.perf_counter()
            try:
                body = job()
            except Exception as e:  # noqa: BLE001 - one broken section must not hide the others' figures
                ok, body = False, [f"FAILED: {type(e).__name__}: {str(e)[-2000:]}"]
            lines += [f"### {title} ({time.perf_counter() - t0:.0f} s)", "", *body, ""]
            print("\n".join(lines[-len(body) - 3:]), flush=True)
            gc.collect()
            if s.device.type == "cuda":
                torch.cuda.empty_cache()
    lines.append(f"Suite total: {time.perf_counter() - t_all:.0f} s.")
    return lines, ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, toy shapes, < 1 minute: check the script runs")
    p.add_argument("--batch", type=int, default=32, help="GPU: UNet step benchmark batch size (default 32)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="GPU: dense bf16 peak for MFU (default: known for H100/H200/A100/L40S/A10G by name)")
    p.add_argument("--require-cuda", action="store_true",
                   help="exit 2 without a CUDA device (`make bench-gpu`); otherwise print 'not yet measured' "
                        "and exit 0, as `make bench` expects of every benchmark")
    args = p.parse_args(argv)
    if args.batch < 1:
        p.error(f"--batch must be >= 1, got {args.batch}")
    if not args.dry_run and not torch.cuda.is_available():
        print("## GPU suite (`benchmarks/bench_gpu.py`)\n\nnot yet measured (no CUDA device here; "
              "`make bench-gpu DRY_RUN=1` checks the script on CPU at toy shapes)")
        return 2 if args.require_cuda else 0
    if args.dry_run:
        torch.set_num_threads(1)  # tiny models on a shared 2-core machine: one thread is fastest and steadiest
    else:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    scale = Scale.toy() if args.dry_run else Scale.gpu(args.batch, args.peak_tflops)
    command = "python benchmarks/bench_gpu.py" + (" --dry-run" if args.dry_run else f" --batch {args.batch}")
    lines, ok = run_suite(scale, command)
    print("\n---- markdown for BENCHMARKS.md ----\n" + "\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
