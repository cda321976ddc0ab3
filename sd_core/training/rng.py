"""Every random number generator a training process draws from: seeding per rank, and the state a checkpoint
carries so that a resumed run draws exactly what an uninterrupted one would.

The loop draws noise, timesteps and CFG dropout from one dedicated ``torch.Generator`` (on the training device);
torch's, numpy's and Python's global generators are seeded per rank too, for anything else that draws from them.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s streams: distinct per rank, a pure function of the run's seed."""
    return seed * 1000 + rank


def seed_rank(seed: int, rank: int, device: torch.device) -> torch.Generator:
    """Seed the global generators for this rank; returns the dedicated generator of noise, t and dropout."""
    s = rank_seed(seed, rank)
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)
    return torch.Generator(device=device).manual_seed(s)


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every RNG this process draws from, as tensors/lists (weights_only-loadable)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch_cpu": torch.get_rng_state(),
        # this rank's device only (get_rng_state_all would open a context on every visible GPU)
        "torch_cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
        "numpy": {"kind": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "generator": generator.get_state(),
        "generator_device": str(generator.device),
    }


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    """Restore what :func:`rng_state` captured (this rank's entry of a checkpoint)."""
    torch.set_rng_state(state["torch_cpu"].cpu())
    if state.get("torch_cuda") is not None and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state["torch_cuda"].cpu())
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    generator.set_state(state["generator"].cpu())
