"""The learning-rate schedule of the SD recipe: linear warmup, then cosine decay to ``final_ratio`` × lr.

The factor for the optimiser step that follows ``s`` completed steps is

    (s + 1) / warmup                                          for s < warmup
    r + (1 − r) · ½ · (1 + cos(π · min(1, (s − warmup) / (total − warmup))))   afterwards, r = final_ratio

so step 1 trains at lr / warmup, step ``warmup`` at the full lr, and the last step near lr × r.

The schedule is a pure function of the step: its checkpoint state is the step alone, so a resumed run may
change ``total`` (train longer) without the saved state overriding it.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def lr_factor(step: int, warmup: int, total: int, final_ratio: float = 0.01) -> float:
    """Multiplier of the base lr for the optimiser step after ``step`` completed steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / span))
    return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Sets ``lr`` of every param group of ``optimizer`` before each step; call :meth:`step` after
    ``optimizer.step()``. ``last_lr`` is the lr the most recent optimiser step used."""

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, warmup: int, total: int,
                 final_ratio: float = 0.01, step: int = 0) -> None:
        self.optimizer = optimizer
        self.base_lr = float(base_lr)
        self.warmup = int(warmup)
        self.total = int(total)
        self.final_ratio = float(final_ratio)
        self.steps_done = int(step)
        self.last_lr = self._apply()

    def lr_at(self, step: int) -> float:
        return self.base_lr * lr_factor(step, self.warmup, self.total, self.final_ratio)

    def _apply(self) -> float:
        lr = self.lr_at(self.steps_done)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    @property
    def current_lr(self) -> float:
        """The lr the next optimiser step will use."""
        return self.lr_at(self.steps_done)

    def step(self) -> None:
        self.last_lr = self.current_lr
        self.steps_done += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done, "base_lr": self.base_lr, "warmup": self.warmup,
                "total": self.total, "final_ratio": self.final_ratio}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the step; the shape (base lr, warmup, total) stays the current run's."""
        self.steps_done = int(state["steps_done"])
        self._apply()
