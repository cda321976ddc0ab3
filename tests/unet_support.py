"""Helpers shared by tests/test_unet.py and tests/test_convert.py."""

from __future__ import annotations

import torch

from sd_core.config import UNetConfig


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-zero random weights everywhere (a fresh model's zero-initialised layers would hide bugs and make
    parity trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.ndim > 1 else 0.1))
    return model


def inputs(config: UNetConfig, batch: int = 2, size: int = 16, tokens: int = 5, seed: int = 1):
    """(x, t, ctx): latents, integer timesteps in [0, 1000), text context."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_ch, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    ctx = torch.randn(batch, tokens, config.ctx_dim, generator=g)
    return x, t, ctx
