"""Which sampler settings read a trained tiny checkpoint best: whole-prompt accuracy per (guidance, guidance
interval, eta), on the evaluation set the `checkpoint_eval` asset scores (36 prompts × seeds), one run.

    python benchmarks/bench_sampler.py CKPT_DIR DATA_ROOT 7.5:0:0 5:500:1 [--seeds 4] [--seed-offset 100]

A spec is ``guidance:guidance_min_timestep:eta`` (`SampleConfig`): "7.5:0:0" is SD's usual DDIM with CFG 7.5 at
every step, "5:500:1" the tiny profile's sampler. ``--seed-offset 100`` scores seeds 100.. instead of 0..: a
set no setting was chosen on. Quality figures (step budgets, not seconds): BENCHMARKS.md "Session 6".
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from sd_core.config import get_profile  # noqa: E402
from sd_core.evaluation import prompt_scorer  # noqa: E402
from sd_core.machine import cpu_model  # noqa: E402
from sd_core.sampling.generate import generate, load_for_sampling, sample_settings  # noqa: E402


def _spec(text: str) -> tuple[float, int, float]:
    try:
        guidance, min_t, eta = text.split(":")
        return float(guidance), int(min_t), float(eta)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected guidance:min_timestep:eta, e.g. 5:500:1, got {text!r}") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("data_root")
    ap.add_argument("specs", nargs="+", type=_spec, help="guidance:guidance_min_timestep:eta")
    ap.add_argument("--seeds", type=int, default=4, help="seeds per prompt (default 4: 144 images)")
    ap.add_argument("--seed-offset", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the tiny profile's)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    profile = get_profile("tiny", args.data_root)
    args.steps = args.steps or profile.sample.steps
    bundle = load_for_sampling(args.checkpoint, profile=profile, device=torch.device("cpu"))
    pairs = prompt_scorer.evaluation_set(args.seeds)
    prompts, seeds = [p for p, _ in pairs], [s + args.seed_offset for _, s in pairs]
    print(f"{args.checkpoint}, {len(prompts)} images (seeds {args.seed_offset}..), DDIM {args.steps}, EMA weights, "
          f"{cpu_model()}\n\n| guidance | at t >= | eta | colour | shape | background | whole | squares right | s |\n"
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for guidance, min_t, eta in args.specs:
        settings = {**sample_settings(profile.sample), "steps": args.steps, "guidance": guidance,
                    "guidance_min_timestep": min_t, "eta": eta}
        t0 = time.perf_counter()
        images = generate(bundle.unet, bundle.text_encoder, bundle.tokenizer, bundle.vae, prompts, seed=seeds,
                          scaling_factor=bundle.scaling_factor, batch_size=72, max_length=bundle.max_length,
                          scheduler=bundle.sampler(), **settings)
        acc = prompt_scorer.prompt_accuracy(images, prompts)
        squares = collections.Counter(t.shape == r.shape == "square" for t, r in zip(acc.targets, acc.readings))
        a = acc.accuracy
        print(f"| {guidance:g} | {min_t} | {eta:g} | {a['colour']:.3f} | {a['shape']:.3f} | {a['background']:.3f} | "
              f"{a['whole']:.3f} | {squares[True]}/{sum(t.shape == 'square' for t in acc.targets)} | "
              f"{time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
