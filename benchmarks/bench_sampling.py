"""Sampling latency: 30-step DDIM + classifier-free guidance, our loop and UNet against diffusers'
``StableDiffusionPipeline`` on the same weights (our UNet converted with ``sd_core.model.convert.to_diffusers``),
in one process, runs interleaved, median of the repeats.

    python benchmarks/bench_sampling.py            # tiny profile on CPU (+ SD 1.5 at 512 px when CUDA is there)
    python benchmarks/bench_sampling.py --sd15     # only the SD 1.5 GPU case

What is timed: prompt encoding + the 30 denoising steps (one UNet call per step on the [uncond; cond] batch)
+ scheduler steps, ending at the final latents (``output="latent"`` / ``output_type="latent"``); the VAE
decode is the same diffusers module on both sides and is left out. Weights are random (no hub access here),
which does not change the cost. Prints a markdown section for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from sd_core.config import UNetConfig  # noqa: E402
from sd_core.sampling.generate import generate  # noqa: E402
from sd_core.model.unet import UNetModel  # noqa: E402


def _randomize_zero_init(unet: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            if p.ndim > 1 and not p.abs().sum():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def tiny_components(device: torch.device, dtype: torch.dtype):
    from sd_core.encoding.components import build_tiny_text_encoder, build_tiny_tokenizer, build_tiny_vae
    from sd_core.config import Profile
    from sd_core.data.synthetic import vocabulary

    prof = Profile.tiny()
    c = prof.components
    tok = build_tiny_tokenizer(vocabulary(), c.max_length)
    te = build_tiny_text_encoder(len(tok), prof.unet.ctx_dim, c.tiny_text_layers, c.tiny_text_heads, c.max_length, 0)
    vae = build_tiny_vae(c.tiny_vae_channels, c.tiny_vae_layers_per_block, prof.encode.resolution, 0)
    torch.manual_seed(0)
    unet = UNetModel(prof.unet)
    _randomize_zero_init(unet)
    prompts = list(prof.sample.prompts)
    return unet, te, tok, vae, prompts, prof.sample.height


def sd15_components(device: torch.device, dtype: torch.dtype):
    """SD 1.5-shaped components with random weights: the 859.5M UNet, a CLIP ViT-L/14-shaped text encoder and
    SD's VAE config (8× downsampling)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from sd_core.encoding.components import build_tiny_tokenizer
    from sd_core.data.synthetic import vocabulary

    tok = build_tiny_tokenizer(vocabulary(), 77)  # token ids only matter for their count (77)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, max_position_embeddings=77)).eval()
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                        sample_size=512, scaling_factor=0.18215).eval()
    torch.manual_seed(0)
    unet = UNetModel(UNetConfig.sd15())
    _randomize_zero_init(unet)
    prompts = ["a photograph of an astronaut riding a horse"]
    return unet, te, tok, vae, prompts, 512


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_case(name: str, build, device: torch.device, dtype: torch.dtype, steps: int, repeats: int) -> dict:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from sd_core.encoding.components import vae_downsampling
    from sd_core.model.convert import to_diffusers
    from sd_core.model.schedulers import DDIMScheduler as OurDDIM

    unet, te, tok, vae, prompts, size = build(device, dtype)
    unet, te, vae = (m.to(device=device, dtype=dtype).eval() for m in (unet, te, vae))
    d_unet = to_diffusers(unet, sample_size=size // vae_downsampling(vae.config.block_out_channels)).eval()
    cfg = {k: v for k, v in OurDDIM().config_dict().items() if not k.startswith("_")}
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=d_unet, scheduler=DDIMScheduler(**cfg),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    seeds = list(range(len(prompts)))

    def ours():
        return generate(unet, te, tok, vae, prompts, steps=steps, guidance=7.5, seed=seeds, height=size, width=size,
                        output="latent")

    def theirs():
        return pipe(prompts, num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
                    generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="latent").images

    times: dict[str, list[float]] = {"ours": [], "diffusers": []}
    with torch.inference_mode():
        a, b = ours(), theirs()  # warm-up (and a sanity check that both sample the same thing)
        max_diff = (a.float() - b.float().to(a.device)).abs().max().item()
        for _ in range(repeats):
            for key, fn in (("ours", ours), ("diffusers", theirs)):
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                times[key].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "name": name, "device": device, "dtype": dtype, "batch": len(prompts), "size": size, "steps": steps,
        "repeats": repeats, "ours": med["ours"], "diffusers": med["diffusers"], "ratio": med["diffusers"] / med["ours"],
        "max_latent_diff": max_diff, "params": sum(p.numel() for p in unet.parameters()),
        "all": times,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sd15", action="store_true", help="only the SD 1.5 GPU case")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's; 1 is far steadier on a shared, loaded machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    load0 = os.getloadavg()[0]
    results = []
    if not args.sd15:
        results.append(run_case("tiny profile, CPU fp32", tiny_components, torch.device("cpu"), torch.float32,
                                args.steps, args.repeats))
    gpu_note = None
    if torch.cuda.is_available():
        results.append(run_case("SD 1.5 config, 512 px, CUDA bf16", sd15_components, torch.device("cuda"),
                                torch.bfloat16, args.steps, args.repeats))
    else:
        gpu_note = "SD 1.5 config at 512 px on CUDA (bf16): not yet measured (no GPU lent)."

    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cpu = platform.processor() or platform.machine()
    print("## Sampling: 30-step DDIM + CFG (bench_sampling.py)\n")
    cmd = "python benchmarks/bench_sampling.py" + (f" --threads {args.threads}" if args.threads else "")
    print(f"`{cmd}`, {when}, torch {torch.__version__}, {os.cpu_count()} CPU cores "
          f"({cpu}), torch threads {torch.get_num_threads()}, load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end. "
          "Prompt encoding + the denoising loop to the final latents (VAE decode excluded, identical on both "
          f"sides); batch = prompts × 2 for CFG in one UNet call; median of {args.repeats} interleaved runs after "
          "a warm-up; same random weights on both sides.\n")
    print("| case | UNet params | prompts | px | ours (s) | diffusers pipeline (s) | diffusers / ours | max latent diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['batch']} | {r['size']} | {r['ours']:.3f} | "
              f"{r['diffusers']:.3f} | {r['ratio']:.2f}× | {r['max_latent_diff']:.1e} |")
    if gpu_note:
        print(f"\n{gpu_note}")
    for r in results:
        runs = ", ".join(f"{k}: " + " / ".join(f"{t:.3f}" for t in v) for k, v in r["all"].items())
        print(f"\nAll runs ({r['name']}): {runs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
