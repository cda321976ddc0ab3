"""Fitting the tiny profile's VAE on the synthetic shapes, and measuring how well it keeps their colours.

DESIGN.md section 4: the measured baseline's VAE (diffusers AutoencoderKL (32, 64, 64), 3.5 min, 22.6 dB)
turned green brown and purple dull, and that capped the prompt adherence of the whole pipeline at 0.66
(colour adherence on the VAE's own reconstructions). So besides PSNR we report *colour fidelity*: on
held-out renders, the share of images whose reconstructed shape colour (mean RGB over the shape's interior)
is nearest to the right palette colour, the same for the background, and the mean RGB error on the shape.

Levers, measured on 2 shared CPU cores (1 thread, (16, 32, 32) channels, batch 16, lr 3e-3):

- **GroupNorm groups = 1** (`ComponentsConfig.tiny_vae_norm_groups`). With diffusers' default of one
  group per channel or few channels (32 groups; 16 for 16 channels), every channel is normalised to zero mean
  per image right before ``conv_out``, so the decoder cannot carry an image's absolute colour level through
  it: backgrounds came back grey (background accuracy 0.29-0.31, 8.5-8.8 dB after 40-150 steps). One
  group keeps the channels' relative levels: after 80 steps 15.5 dB, background accuracy 0.97, shape colour accuracy 1.0
  (4 groups: 14.5 dB, shape colour 0.61).
- A narrow initial posterior (`sd_core.encoding.components.build_tiny_vae` sets the log-variance bias to -8), so
  the sampled training latents are not mostly noise at the start (with 32 groups it made no measurable
  difference after 40 steps, 9.7 vs 9.4 dB: the normalisation was the real cause).
- The loss adds weight on shape pixels (the shape is a small part of each image, so plain MSE is
  dominated by the flat background) and a per-image mean-colour term; KL weight is tiny as in SD (1e-6).
- Adam with a short warmup and cosine decay over the wall-clock budget; the synthetic palette itself is
  few, saturated, far-apart colours (helper "data").
- **Steps for 8×8 latents** (the tiny profile's (16, 32, 32, 32), three halvings of 64 px): the prompt scorer
  read the shape of 0.89 of the reconstructions right after 800 steps, 0.93 after 1600 and 1.00 after 3200
  (29.8 dB); what the shorter fits lose is the triangles' tips (read as circles). Eight latent channels
  instead of four (0.91 at 800 steps) or wider blocks (32, 64, 64, 64) (0.75 at 800 steps, lr 3e-3) did not
  help (BENCHMARKS.md, session 16).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from sd_core.data import synthetic


@dataclass
class SyntheticBatch:
    images: torch.Tensor  # (B, 3, S, S) in [-1, 1]
    masks: torch.Tensor  # (B, 1, S, S) 1 on the shape's interior, 0 on the background (eroded edges: 0.5)
    colors: list[str]
    backgrounds: list[str]
    shapes: list[str]


def synthetic_batch(n: int, size: int, rng: random.Random) -> SyntheticBatch:
    """``n`` random renders of the synthetic source (every shape/colour/background equally likely)."""
    imgs, masks, cols, bgs, shps = [], [], [], [], []
    for _ in range(n):
        shape = rng.choice(synthetic.SHAPES)
        color = rng.choice(list(synthetic.COLORS))
        bg = rng.choice(list(synthetic.BACKGROUNDS))
        im = np.asarray(synthetic.render_shape(shape, color, bg, size=size, seed=rng.randrange(1 << 30)),
                        dtype=np.float32)
        bg_rgb = np.asarray(synthetic.BACKGROUNDS[bg], dtype=np.float32)
        fg_rgb = np.asarray(synthetic.COLORS[color], dtype=np.float32)
        # fraction of the way from the background to the shape colour (anti-aliased edges are partial)
        d = fg_rgb - bg_rgb
        frac = np.clip(((im - bg_rgb) * d).sum(-1) / max(float((d * d).sum()), 1e-6), 0.0, 1.0)
        imgs.append(im)
        masks.append(frac)
        cols.append(color)
        bgs.append(bg)
        shps.append(shape)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2) / 127.5 - 1.0
    m = torch.from_numpy(np.stack(masks))[:, None]
    return SyntheticBatch(x.contiguous(), m, cols, bgs, shps)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(a.float().clamp(-1, 1), b.float().clamp(-1, 1)).item()
    return float(10 * math.log10(4.0 / max(mse, 1e-12)))


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    p = np.asarray([palette[k] for k in names], dtype=np.float32)
    return names[int(np.argmin(((p - rgb) ** 2).sum(-1)))]


@dataclass
class ColourReport:
    psnr: float
    colour_accuracy: float  # share of images whose reconstructed shape colour is nearest the true one
    background_accuracy: float
    colour_error: float  # mean |ΔRGB| (0-255 scale, averaged over channels) on shape interiors
    per_colour_accuracy: dict[str, float] = field(default_factory=dict)
    n: int = 0

    def as_metadata(self) -> dict[str, Any]:
        """The fidelity numbers, rounded, as plain JSON values (what an orchestrator shows)."""
        return {"psnr_db": round(self.psnr, 2), "colour_accuracy": round(self.colour_accuracy, 3),
                "background_accuracy": round(self.background_accuracy, 3),
                "colour_error_rgb": round(self.colour_error, 1),
                "colour_accuracy_by_colour": dict(self.per_colour_accuracy)}


def colour_report(batch: SyntheticBatch, recon: torch.Tensor) -> ColourReport:
    """Compare reconstructions with the originals of a `SyntheticBatch` (see module docstring)."""
    rec = ((recon.float().clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).numpy()
    orig = ((batch.images + 1) * 127.5).permute(0, 2, 3, 1).numpy()
    masks = batch.masks[:, 0].numpy()
    ok_c, ok_b, errs = [], [], []
    per: dict[str, list[bool]] = {}
    for i in range(rec.shape[0]):
        inside = masks[i] > 0.99
        outside = masks[i] < 0.01
        if inside.sum() < 4 or outside.sum() < 4:
            continue
        shape_rgb = rec[i][inside].mean(0)
        bg_rgb = rec[i][outside].mean(0)
        c_ok = _nearest(shape_rgb, synthetic.COLORS) == batch.colors[i]
        ok_c.append(c_ok)
        per.setdefault(batch.colors[i], []).append(c_ok)
        ok_b.append(_nearest(bg_rgb, synthetic.BACKGROUNDS) == batch.backgrounds[i])
        errs.append(float(np.abs(rec[i][inside] - orig[i][inside]).mean()))
    return ColourReport(
        psnr=psnr(recon, batch.images),
        colour_accuracy=float(np.mean(ok_c)) if ok_c else 0.0,
        background_accuracy=float(np.mean(ok_b)) if ok_b else 0.0,
        colour_error=float(np.mean(errs)) if errs else float("nan"),
        per_colour_accuracy={k: float(np.mean(v)) for k, v in sorted(per.items())},
        n=len(ok_c),
    )


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Encode (distribution mean) and decode; images in [-1, 1]."""
    outs = []
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size]
        z = vae.encode(x).latent_dist.mean
        outs.append(vae.decode(z).sample)
    return torch.cat(outs)


@torch.no_grad()
def latent_std(vae, images: torch.Tensor, batch_size: int = 64) -> float:
    """Std of the (unscaled) latent means over ``images``: SD's scaling factor is 1 / this."""
    zs = [vae.encode(images[i:i + batch_size]).latent_dist.mean for i in range(0, images.shape[0], batch_size)]
    return float(torch.cat(zs).float().std())


@dataclass
class FitResult:
    steps: int
    seconds: float
    final_loss: float
    history: list[tuple[int, float, float]]  # (step, seconds, loss)


def fit_tiny_vae(
    vae,
    steps: int,
    *,
    size: int = 64,
    batch_size: int = 32,
    lr: float = 3e-3,
    kl_weight: float = 1e-6,
    shape_weight: float = 4.0,
    colour_weight: float = 1.0,
    pool: int = 1024,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> FitResult:
    """Fit ``vae`` in place on synthetic renders for ``steps`` optimiser steps.

    A budget in steps, not seconds: the same config gives the same VAE on any machine (a 180 s budget made
    358 steps on the AMD dev box and 929 on the Intel one, 20.6 vs 23.9 dB). Loss per image: MSE weighted
    ``1 + shape_weight × mask`` (shape pixels count more than the flat background) + ``colour_weight`` × MSE
    of the mask-weighted mean colour (a global colour-shift penalty), + ``kl_weight`` × KL. The learning rate
    warms up over 20 steps then follows a cosine to 5 % at the last step. Images come from a pre-rendered
    pool (rendering is the slow part on CPU), rotated by multiples of 90° for variety.
    """
    rng = random.Random(seed)
    torch.manual_seed(seed)
    data = synthetic_batch(min(pool, max(128, steps * batch_size // 2)), size, rng)  # short fits: fewer renders
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    vae.train()
    t0 = time.perf_counter()
    hist, loss_v = [], float("nan")
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        cur = _learning_rate(lr, step, steps)
        for group in opt.param_groups:
            group["lr"] = cur
        x, m = _rotated_draw(data, batch_size, g)
        loss = _fit_loss(vae, x, m, kl_weight=kl_weight, shape_weight=shape_weight, colour_weight=colour_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_v = float(loss.detach())
        if (step + 1) % 50 == 0 or step + 1 == steps:
            hist.append((step + 1, time.perf_counter() - t0, loss_v))
            if log:
                log(f"tiny VAE fit: step {step + 1}/{steps}, {time.perf_counter() - t0:.0f}s, loss {loss_v:.4f}, "
                    f"lr {cur:.2e}")
    vae.eval()
    return FitResult(steps, time.perf_counter() - t0, loss_v, hist)


def _learning_rate(base: float, step: int, steps: int) -> float:
    """A 20-step linear warmup, then a cosine from ``base`` to 5 % of it at the last of ``steps``."""
    warm = min(1.0, (step + 1) / 20)
    frac = step / max(steps - 1, 1)
    return base * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


def _rotated_draw(data: SyntheticBatch, batch_size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random images of the pre-rendered pool and their masks, all rotated by the same random
    multiple of 90°."""
    idx = torch.randint(0, data.images.shape[0], (batch_size,), generator=g)
    x, m = data.images[idx], data.masks[idx]
    k = int(torch.randint(0, 4, (1,), generator=g))
    if k:
        x, m = torch.rot90(x, k, (2, 3)), torch.rot90(m, k, (2, 3))
    return x, m


def _fit_loss(vae, x: torch.Tensor, m: torch.Tensor, *, kl_weight: float, shape_weight: float,
              colour_weight: float) -> torch.Tensor:
    """The fit's loss on images ``x`` with shape masks ``m`` (see `fit_tiny_vae`): shape-weighted MSE of a
    sampled-latent reconstruction, plus the mean-colour and KL terms."""
    dist = vae.encode(x).latent_dist
    rec = vae.decode(dist.sample()).sample
    loss = ((1.0 + shape_weight * m) * (rec - x) ** 2).mean()
    if colour_weight:
        msum = m.sum((2, 3)).clamp_min(1.0)
        mean_rec = (rec * m).sum((2, 3)) / msum
        mean_x = (x * m).sum((2, 3)) / msum
        loss = loss + colour_weight * F.mse_loss(mean_rec, mean_x)
    if kl_weight:
        loss = loss + kl_weight * dist.kl().mean()
    return loss
