"""What `make demo` did, stage by stage: the work each asset did (steps, samples, images) and its wall time.

Why: the demo's quality depends on the work done, not on the seconds spent, so the demo says both: a model
is reproducible from "VAE fit 800 steps, UNet 900 steps × 32 samples" on any machine, while the seconds say
what this machine took (and on which CPU). Read back from each asset's own materialisation metadata, so the
numbers are the ones the Dagster UI shows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from sd_core.machine import cpu_model

Metadata = dict[str, Any]


@dataclass
class StageRun:
    """One stage of the demo as it ran: its assets, the seconds it took (all its partitions together) and
    each asset's metadata per partition it materialised (empty when the stage was up to date)."""

    label: str
    seconds: float = 0.0
    partitions: int = 0
    work: dict[str, list[Metadata]] = field(default_factory=dict)

    def add(self, asset: str, metadata: Metadata) -> None:
        self.work.setdefault(asset, []).append(metadata)


def _total(mds: Sequence[Metadata], key: str) -> int:
    return int(sum(float(md.get(key) or 0) for md in mds))


def _vae(mds: Sequence[Metadata]) -> str | None:
    md = mds[-1]
    if "fit_steps" not in md:  # pretrained components: nothing was trained
        return None
    where = " (the shipped fit)" if md.get("fit_source") == "shipped" else ""
    return f"VAE fit {md['fit_steps']} steps{where}, {md.get('psnr_db', float('nan')):.1f} dB"


def _filter(mds: Sequence[Metadata]) -> str:
    md = mds[-1]
    return f"{_total([md], 'rows_in'):,} rows -> {_total([md], 'rows_out'):,}"


def _training(mds: Sequence[Metadata]) -> str:
    md = mds[-1]
    tc = md.get("train_config") or {}
    per_step = int(tc.get("batch_size", 0)) * int(tc.get("grad_accum", 1)) * int(md.get("world_size") or 1)
    step = int(md.get("step") or 0)
    rate = md.get("samples_per_s")
    return (f"UNet {step} steps x {per_step} = {step * per_step:,} samples"
            + (f", {float(rate):.0f} samples/s" if rate else "")
            + f", {md.get('world_size') or 1} process(es)")


SUMMARIES: dict[str, Callable[[Sequence[Metadata]], str | None]] = {
    "frozen_components": _vae,
    "filtered_metadata": _filter,
    "image_shards": lambda mds: f"{_total(mds, 'successes'):,} images",
    "latents": lambda mds: f"{_total(mds, 'encoded'):,} latents",
    "unet_checkpoint": _training,
    "checkpoint_eval": lambda mds: f"{_total(mds[-1:], 'accuracy_n')} images scored per checkpoint",
    "sample_grid": lambda mds: f"grid of {_total(mds[-1:], 'adherence_n')} images",
}


def stage_lines(stages: Sequence[StageRun]) -> list[str]:
    """The demo's closing table: per stage, its wall time and the work its assets did."""
    lines = [f"what ran ({cpu_model()}, {os.cpu_count()} CPUs):"]
    width = max((len(s.label) for s in stages), default=10)
    for s in stages:
        work = [w for asset, mds in s.work.items() if asset in SUMMARIES and (w := SUMMARIES[asset](mds))]
        when = f"{s.seconds:5.0f} s" if s.work else "up to date"
        lines.append(f"  {s.label.ljust(width)}  {when:>10}  {'; '.join(work)}")
    return lines
