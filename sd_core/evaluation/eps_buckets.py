"""Held-out ε-MSE of a checkpoint per timestep bucket, at fixed noise.

The trainer logs one validation number (ε-MSE at one random timestep per held-out sample); it hides *where*
a model is wrong: the high-noise end decides composition (does the shape follow the prompt?), the low-noise
end decides detail. So each held-out sample is scored once in every bucket of [0, 1000) (10 buckets of 100
timesteps by default), at a timestep and noise drawn once from a fixed generator per bucket: the same draws
for every checkpoint, so two steps of a run differ only by their weights. The whole-split mean is the mean
over every (sample, bucket) pair: a timestep-stratified estimate of the trainer's validation loss.

The held-out split and the loss are the trainer's own (`sd_core.training.trainer.build_data` on the run's
recorded train config and shard list, and `diffusion_loss`), so the samples scored here are exactly those the
run never trained on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sd_core.config import Profile, TrainConfig
from sd_core.encoding.components import encode_text
from sd_core.encoding.latent_cache import LatentDataset
from sd_core.model.schedulers import DDPMScheduler
from sd_core.training.args import Settings
from sd_core.training.checkpoint import CheckpointConfig
from sd_core.training.distributed import DistInfo
from sd_core.training.trainer import build_data, diffusion_loss

EVAL_NOISE_SEED = 20250101  # fixed: the draws of bucket b come from a generator seeded EVAL_NOISE_SEED + b


@dataclass
class HeldOut:
    """The latent cache as the run saw it and the indices it held out."""

    dataset: LatentDataset
    val_idx: np.ndarray
    latents_dir: Path


@dataclass
class BucketedLoss:
    """ε-MSE per timestep bucket ``[edges[b], edges[b+1])`` and over all buckets."""

    edges: list[int]
    per_bucket: list[float]
    mean: float
    n_samples: int

    def as_metadata(self) -> dict[str, float | int]:
        md: dict[str, float | int] = {"val_eps_mse": round(self.mean, 6), "val_samples": self.n_samples}
        for b, loss in enumerate(self.per_bucket):
            md[f"val_eps_mse/t{self.edges[b]:03d}-{self.edges[b + 1] - 1:03d}"] = round(loss, 6)
        return md


def _train_config(recorded: dict[str, Any], fallback: TrainConfig) -> TrainConfig:
    """The run's ``TrainConfig`` from its checkpoint record (fields this version no longer has are dropped)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items() if k in names}
    return dataclasses.replace(fallback, **values)


def held_out_split(record: CheckpointConfig, profile: Profile) -> HeldOut:
    """The held-out samples of the run that wrote ``record``: the trainer's `build_data` on the latents dir,
    shard list and train config the checkpoint recorded (the profile's latents dir if the recorded one is
    gone)."""
    recorded_dir = Path(record.latents_dir) if record.latents_dir else None
    latents_dir = recorded_dir if recorded_dir is not None and recorded_dir.is_dir() else profile.latents_dir
    tcfg = _train_config(record.train, profile.train)
    settings = Settings(profile=dataclasses.replace(profile, train=tcfg), latents_dir=latents_dir,
                        shards=list(record.shards) or None, components_dir=None, output_dir=Path("."),
                        run_id=record.run_id or "eval", resume="none", device="cpu", wandb_run_name=None)
    one_process = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
    data = build_data(settings, one_process)
    return HeldOut(data.dataset, data.val_idx, latents_dir)


def bucket_edges(n_buckets: int, num_timesteps: int = 1000) -> list[int]:
    """``n_buckets + 1`` integer edges splitting [0, num_timesteps) into near-equal buckets."""
    if not 1 <= n_buckets <= num_timesteps:
        raise ValueError(f"eps buckets must be between 1 and {num_timesteps}, got {n_buckets}")
    return [int(round(e)) for e in np.linspace(0, num_timesteps, n_buckets + 1)]


def _bucket_draws(n: int, latent_shape: tuple[int, ...], lo: int, hi: int, bucket: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps in [lo, hi), noise) for ``n`` samples: the same for every checkpoint of every run."""
    g = torch.Generator().manual_seed(EVAL_NOISE_SEED + bucket)
    t = torch.randint(lo, hi, (n,), generator=g)
    return t, torch.randn((n, *latent_shape), generator=g)


@torch.no_grad()
def bucketed_eps_mse(unet: Any, text_encoder: Any, held_out: HeldOut, n_buckets: int = 10,
                     batch_size: int = 32, sched: DDPMScheduler | None = None) -> BucketedLoss:
    """Held-out ε-MSE of ``unet`` (our UNetModel, eval mode) per timestep bucket, at fixed noise. ``sched``:
    the schedule it was trained on (default SD 1.x's); a v-prediction's output is compared as the ε it implies,
    so runs of either prediction type compare on one scale."""
    sched = sched or DDPMScheduler()
    edges = bucket_edges(n_buckets, sched.num_train_timesteps)
    idx, ds = held_out.val_idx, held_out.dataset
    if len(idx) == 0:
        raise ValueError(f"the run holds out no samples of {held_out.latents_dir} (train.val_share is 0): "
                         f"no validation ε-MSE")
    param = next(unet.parameters())
    sums = []
    for b in range(n_buckets):
        t_all, noise_all = _bucket_draws(len(idx), ds.latent_shape, edges[b], edges[b + 1], b)
        total = 0.0
        for i in range(0, len(idx), batch_size):
            lat, tok = ds.get_batch(idx[i:i + batch_size])
            x0 = torch.from_numpy(lat).float().to(param.device)
            noise, t = noise_all[i:i + batch_size].to(param.device), t_all[i:i + batch_size].to(param.device)
            ctx = encode_text(text_encoder, torch.from_numpy(tok)).to(param.device, param.dtype)
            xt = sched.add_noise(x0, noise, t)
            pred = sched.epsilon(unet(xt.to(param.dtype), t, ctx), xt, t)
            total += float(diffusion_loss(pred, noise).sum())
        sums.append(total / len(idx))
    return BucketedLoss(edges, sums, float(np.mean(sums)), int(len(idx)))
