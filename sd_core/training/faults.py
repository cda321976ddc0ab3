"""Test-only fault injection: the faults ``SD_TRAIN_FAULT`` asks the trainer for (syntax: `sd_core.training.trainer`).

The training loop only asks "crash here?" (:meth:`Faults.maybe_crash`) and "poison this loss?"
(:meth:`Faults.poison`); parsing the variable stays out of its way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

FAULT_ENV = "SD_TRAIN_FAULT"


@dataclass(frozen=True)
class Faults:
    nan_steps: frozenset[int] = frozenset()
    crashes: tuple[tuple[int, int | None], ...] = ()  # (step, rank or None for every rank)

    @classmethod
    def from_env(cls) -> Faults:
        spec = os.environ.get(FAULT_ENV, "").strip()
        if not spec:
            return cls()
        nan, crash = set(), []
        for item in spec.split(","):
            kind, _, rest = item.strip().partition("@")
            if kind == "nan":
                nan.add(int(rest))
            elif kind == "crash":
                step, _, rank = rest.partition(":")
                crash.append((int(step), int(rank) if rank else None))
            else:
                raise ValueError(f"{FAULT_ENV}: unknown fault {item!r} (expected nan@STEP or crash@STEP[:RANK])")
        return cls(frozenset(nan), tuple(crash))

    def maybe_crash(self, step: int, rank: int) -> None:
        for s, r in self.crashes:
            if s == step and (r is None or r == rank):
                raise RuntimeError(f"injected crash at step {step} on rank {rank} ({FAULT_ENV})")

    def poison(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """``loss`` times NaN in optimiser step ``step`` (1-based) when asked, so loss and gradients turn NaN."""
        return loss * float("nan") if step in self.nan_steps else loss
