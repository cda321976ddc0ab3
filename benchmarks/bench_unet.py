"""UNet training-step benchmark: our `sd_core.model.unet.UNetModel` vs diffusers `UNet2DConditionModel`.

Both models hold the same weights (ours converted with `sd_core.model.convert.to_diffusers`) and run the same
training step: forward on (noisy latents, timesteps, text context), MSE against the noise, backward, AdamW
step (lr 1e-4, weight decay 1e-2), gradients set to None. One process, one run, same inputs.

- CPU (default): the tiny config (`UNetConfig.tiny()`), batch 32, 8×8 latents, 16×64 context (the tiny
  profile's shapes), fp32. Steps run in interleaved rounds (ours then diffusers, the order alternating), so
  a load change on a shared machine hits both; the ratio is the median of the per-round ratios.
- `--gpu`: the SD 1.5 config (859,520,964 parameters) at 64×64 latents (512 px), 77×768 context, bf16
  autocast with fp32 weights, fused AdamW, with and without `torch.compile`; samples/s and MFU at 2.407 TFLOP
  per sample per training step (forward 803.3 GFLOP × 3, attention included; see notes/sd-reference.md)
  against the GPU's dense bf16 peak (`--peak-tflops`, known for H100/H200/A100).

Prints a markdown section for BENCHMARKS.md. On a shared CPU box use `--threads 1`: with several threads,
OpenMP workers spinning against other processes make wall times swing by several ×.

    python benchmarks/bench_unet.py [--threads 1] [--rounds 7] [--steps 3]
    python benchmarks/bench_unet.py --gpu [--batch 16] [--steps 20] [--no-compile]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sd_core.config import Profile, UNetConfig  # noqa: E402
from sd_core.encoding.components import vae_downsampling  # noqa: E402
from sd_core.machine import cpu_model  # noqa: E402
from sd_core.model.convert import to_diffusers  # noqa: E402
from sd_core.model.unet import UNetModel  # noqa: E402

TRAIN_FLOP_PER_SAMPLE_SD15_64 = 2.407e12  # SD 1.5 UNet, 64×64 latents, 77 tokens: forward + backward
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0}


def make_step(model, diffusers_model: bool, lr: float = 1e-4, fused: bool = False, autocast: bool = False):
    """One training step (forward, MSE, backward, AdamW) on fixed inputs; returns f(x, t, ctx, noise)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2, fused=fused or None)

    def step(x, t, ctx, noise):
        with torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            if diffusers_model:
                pred = model(x, t, encoder_hidden_states=ctx, return_dict=False)[0]
            else:
                pred = model(x, t, ctx)
            loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def inputs(config: UNetConfig, batch: int, size: int, tokens: int, device="cpu", seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch, config.in_ch, size, size, generator=g)
    noise = torch.randn(batch, config.out_ch, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    ctx = torch.randn(batch, tokens, config.ctx_dim, generator=g)
    return [v.to(device) for v in (x, t, ctx, noise)]


def machine() -> str:
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu_model()})"


# ------------------------------------------------------------------------------------------------ CPU
def bench_cpu(args) -> str:
    if args.threads:
        torch.set_num_threads(args.threads)
    config = UNetConfig.tiny()
    torch.manual_seed(0)
    ours = UNetModel(config)
    theirs = to_diffusers(ours)
    n_params = sum(p.numel() for p in ours.parameters())
    tiny = Profile.tiny()  # the tiny profile's latent side: its image size over the VAE's halvings (64 px -> 8)
    side = tiny.encode.resolution // vae_downsampling(tiny.components.tiny_vae_channels)
    x, t, ctx, noise = inputs(config, args.batch, side, 16)
    steps = {"ours": make_step(ours, False), "diffusers": make_step(theirs, True)}
    load0 = os.getloadavg()
    for f in steps.values():  # warm-up (allocator, oneDNN primitive caches)
        for _ in range(2):
            f(x, t, ctx, noise)
    per_step = {k: [] for k in steps}
    cpu_per_step = {k: [] for k in steps}
    ratios, cpu_ratios = [], []
    for r in range(args.rounds):
        order = list(steps) if r % 2 == 0 else list(steps)[::-1]
        took, cpu = {}, {}
        for k in order:
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                steps[k](x, t, ctx, noise)
            took[k] = (time.perf_counter() - t0) / args.steps
            cpu[k] = (time.process_time() - c0) / args.steps
            per_step[k].append(took[k])
            cpu_per_step[k].append(cpu[k])
        ratios.append(took["diffusers"] / took["ours"])
        cpu_ratios.append(cpu["diffusers"] / cpu["ours"])
    load1 = os.getloadavg()
    # both models took identical steps on identical weights: their weights must still agree
    drift = max((a - b).abs().max().item() for a, b in zip(ours.state_dict().values(),
                                                           to_diffusers_order(theirs, ours)))
    med = {k: statistics.median(v) for k, v in per_step.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu_per_step.items()}
    wins = sum(r > 1 for r in ratios)
    lines = [
        "## UNet training step: ours vs diffusers (`benchmarks/bench_unet.py`)",
        "",
        f"**CPU, tiny config** — `python benchmarks/bench_unet.py{' --threads ' + str(args.threads) if args.threads else ''}"
        f" --rounds {args.rounds} --steps {args.steps}`, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC,",
        f"{machine()}; torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s); load average"
        f" {load0[0]:.1f} at start, {load1[0]:.1f} at end.",
        "",
        f"Config `UNetConfig.tiny()` ({n_params / 1e6:.2f}M params), batch {args.batch},"
        f" {side}×{side}×{config.in_ch} latents,"
        f" 16×{config.ctx_dim} context, fp32; step = forward + MSE + backward + AdamW. {args.rounds} interleaved rounds"
        f" of {args.steps} steps after 2 warm-up steps each.",
        "",
        "| model | s/step (median, wall) | samples/s | speed vs diffusers (wall) | CPU s/step | speed vs diffusers (CPU time) |",
        "|---|---:|---:|---:|---:|---:|",
        f"| ours (`sd_core.model.unet.UNetModel`) | {med['ours']:.3f} | {args.batch / med['ours']:.1f} |"
        f" **{statistics.median(ratios):.2f}×** | {cpu_med['ours']:.3f} | {statistics.median(cpu_ratios):.2f}× |",
        f"| diffusers `UNet2DConditionModel` | {med['diffusers']:.3f} | {args.batch / med['diffusers']:.1f} | 1.00× |"
        f" {cpu_med['diffusers']:.3f} | 1.00× |",
        "",
        "Speed vs diffusers = median over rounds of (diffusers time / our time) in the same round; CPU time ="
        " process CPU seconds (less sensitive than wall time to other processes on a shared machine).",
        f"Ours faster in {wins} of {len(ratios)} rounds (wall); per-round ratios: wall "
        + ", ".join(f"{r:.2f}" for r in ratios)
        + "; CPU time "
        + ", ".join(f"{r:.2f}" for r in cpu_ratios)
        + f". Weights still agree after {2 + args.rounds * args.steps} identical steps: max abs difference {drift:.1e}.",
    ]
    return "\n".join(lines)


def to_diffusers_order(theirs, ours):
    """diffusers' tensors in our state dict's key order (so the two can be compared one to one)."""
    from sd_core.model.convert import unet_state_dict_from_diffusers

    return unet_state_dict_from_diffusers(theirs.state_dict(), ours.config).values()


# ------------------------------------------------------------------------------------------------ GPU
def bench_gpu(args) -> str:
    if not torch.cuda.is_available():
        raise SystemExit("bench_unet.py --gpu: CUDA is not available on this machine")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    config = UNetConfig.sd15()
    torch.manual_seed(0)
    reference = UNetModel(config).state_dict()  # one set of weights on the CPU for every variant
    x, t, ctx, noise = inputs(config, args.batch, 64, 77, device="cuda")
    rows = []
    variants = [(c, m) for c in ([False] if args.no_compile else [False, True]) for m in ("ours", "diffusers")]
    for compiled, which in variants:
        model = UNetModel(config)
        model.load_state_dict(reference)
        model = model.cuda()
        if which == "diffusers":
            model = to_diffusers(model)  # same weights; our copy is dropped here
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
            x = x.to(memory_format=torch.channels_last)
        if args.grad_ckpt:
            model.enable_gradient_checkpointing()
        run = torch.compile(model) if compiled else model
        step = make_step(run, which == "diffusers", fused=True, autocast=True)
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            step(x, t, ctx, noise)
        torch.cuda.synchronize()
        warm_s = time.perf_counter() - t0
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.steps):
            loss = step(x, t, ctx, noise)
        end.record()
        torch.cuda.synchronize()
        s_per_step = start.elapsed_time(end) / 1000 / args.steps
        sps = args.batch / s_per_step
        mfu = sps * TRAIN_FLOP_PER_SAMPLE_SD15_64 / (peak * 1e12) if peak else float("nan")
        rows.append(dict(which=which, compiled=compiled, s=s_per_step, sps=sps, mfu=mfu, warm=warm_s,
                         mem=torch.cuda.max_memory_allocated() / 2**30, loss=float(loss)))
        del model, run, step
        gc.collect()
        torch.cuda.empty_cache()
    lines = [
        "",
        f"**GPU, SD 1.5 config** — `python benchmarks/bench_unet.py --gpu --batch {args.batch} --steps {args.steps}"
        f"{' --channels-last' if args.channels_last else ''}{' --grad-ckpt' if args.grad_ckpt else ''}`,"
        f" {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {name}, torch {torch.__version__}.",
        f"859,520,964 params, batch {args.batch}, 64×64×4 latents, 77×768 context, bf16 autocast (fp32 weights),"
        f" fused AdamW; MFU = samples/s × 2.407 TFLOP / {peak} TFLOP/s (dense bf16 peak).",
        "",
        "| model | torch.compile | s/step | samples/s | MFU | vs diffusers (same compile) | peak mem (GiB) | warm-up (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ref = next(o for o in rows if o["which"] == "diffusers" and o["compiled"] == r["compiled"])
        lines.append(
            f"| {r['which']} | {'yes' if r['compiled'] else 'no'} | {r['s']:.4f} | {r['sps']:.1f} | {r['mfu']:.1%} |"
            f" {r['sps'] / ref['sps']:.2f}× | {r['mem']:.1f} | {r['warm']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="SD 1.5 config on CUDA, bf16, eager and compiled")
    p.add_argument("--batch", type=int, default=None, help="batch size (CPU default 32, GPU default 16)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (CPU, default 3) or in all (GPU, 20)")
    p.add_argument("--rounds", type=int, default=7, help="CPU: interleaved rounds")
    p.add_argument("--threads", type=int, default=0, help="CPU: torch intra-op threads (0: torch's default)")
    p.add_argument("--warmup", type=int, default=5, help="GPU: untimed steps first (includes compilation)")
    p.add_argument("--no-compile", action="store_true", help="GPU: eager only")
    p.add_argument("--channels-last", action="store_true", help="GPU: both models and inputs channels_last")
    p.add_argument("--grad-ckpt", action="store_true", help="GPU: gradient checkpointing in both models")
    p.add_argument("--peak-tflops", type=float, default=None, help="GPU dense bf16 peak for MFU")
    args = p.parse_args(argv)
    for flag in ("batch", "steps", "rounds", "warmup"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag} must be >= 1, got {value}")
    if args.gpu:
        args.batch, args.steps = args.batch or 16, args.steps or 20
        print(bench_gpu(args))
    else:
        args.batch, args.steps = args.batch or 32, args.steps or 3
        print(bench_cpu(args))
        print("\n**GPU, SD 1.5 config** (`--gpu`): not yet measured (no GPU lent).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
