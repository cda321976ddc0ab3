"""Exponential moving average of model weights (Polyak averaging) with warmup correction.

After the n-th update (n = number of earlier updates) the shadow weights are

    shadow ← shadow − (1 − d_n) · (shadow − θ),   d_n = 0 if n == 0 else min(decay, (1 + n) / (10 + n))

which is exactly diffusers' ``EMAModel`` with ``use_ema_warmup=False, update_after_step=0`` (its first
``step()`` copies the weights; the test compares against it). Early on the average follows the weights closely;
after ~10⁵ updates it reaches ``decay`` (0.9999 in the SD recipe). Without the correction a 0.9999 average would
be dominated by the random initialisation for the first tens of thousands of steps.

The shadow is a plain ``{name: float32 tensor}`` dict keyed like the model's ``state_dict()`` (wrappers such as
DDP's ``module.`` and ``torch.compile``'s ``_orig_mod.`` stripped), so it can be written with safetensors as is
and loaded into a fresh model with ``model.load_state_dict(shadow)``.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DDP / FSDP-style ``.module`` and ``torch.compile``'s ``._orig_mod`` wrappers."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel") and hasattr(model, "module"):
            model = model.module
        else:
            return model


class EMA:
    """EMA of a model's floating-point parameters and buffers, kept in float32.

    ``update(model)`` after every optimiser step (it runs under ``torch.no_grad`` itself); ``copy_to(model)`` to
    load the averaged weights into a model (e.g. for sampling); ``state_dict()`` / ``load_state_dict()`` for
    checkpoints. Non-float entries of the state dict (integer buffers) are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, device: torch.device | str | None = None) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.num_updates = 0
        self.device = torch.device(device) if device is not None else None
        self.shadow: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, tensor in self._named_tensors(model).items():
                target = self.device or tensor.device
                if tensor.is_floating_point():
                    self.shadow[name] = tensor.detach().to(device=target, dtype=torch.float32).clone()
                else:
                    self.shadow[name] = tensor.detach().to(device=target).clone()

    # ------------------------------------------------------------------------------------------ helpers
    @staticmethod
    def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
        return dict(unwrap_model(model).state_dict(keep_vars=True))

    def decay_at(self, n: int) -> float:
        """The decay used by the update that follows ``n`` earlier updates."""
        if n <= 0:
            return 0.0
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @property
    def current_decay(self) -> float:
        """The decay the next ``update`` will use."""
        return self.decay_at(self.num_updates)

    # ------------------------------------------------------------------------------------------- update
    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """Fold the model's current weights into the average; returns the decay that was used."""
        decay = self.decay_at(self.num_updates)
        one_minus = 1.0 - decay
        tensors = self._named_tensors(model)
        if tensors.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - tensors.keys())
            extra = sorted(tensors.keys() - self.shadow.keys())
            raise KeyError(f"EMA/model key mismatch: missing from model {missing[:10]}, new in model {extra[:10]}")
        s_avg, p_avg = [], []
        for name, shadow in self.shadow.items():
            value = tensors[name].detach()
            if shadow.is_floating_point():
                s_avg.append(shadow)
                p_avg.append(value.to(device=shadow.device, dtype=torch.float32))
            else:
                shadow.copy_(value)
        if s_avg:
            if one_minus == 1.0:
                torch._foreach_copy_(s_avg, p_avg)
            else:
                torch._foreach_sub_(s_avg, torch._foreach_sub(s_avg, p_avg), alpha=one_minus)
        self.num_updates += 1
        return decay

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (cast to each parameter's dtype and device)."""
        tensors = self._named_tensors(model)
        unknown = sorted(tensors.keys() - self.shadow.keys())
        if unknown:
            raise KeyError(f"model has entries the EMA does not: {unknown[:10]}")
        for name, target in tensors.items():
            target.data.copy_(self.shadow[name].to(device=target.device, dtype=target.dtype))

    def to(self, device: torch.device | str) -> "EMA":
        self.device = torch.device(device)
        self.shadow = {k: v.to(self.device) for k, v in self.shadow.items()}
        return self

    # ----------------------------------------------------------------------------------- serialisation
    def state_dict(self) -> dict[str, Any]:
        """``{"shadow": {name: tensor}, "num_updates": int, "decay": float}``.

        ``shadow`` is flat and safetensors-ready; the two scalars belong in the trainer state.
        """
        return {"shadow": dict(self.shadow), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Restore from :meth:`state_dict` output, or from a bare shadow dict (``num_updates`` then kept).

        Shapes are checked; with ``strict`` the key sets must match exactly.
        """
        if "shadow" in state and isinstance(state["shadow"], Mapping):
            shadow = state["shadow"]
            self.num_updates = int(state.get("num_updates", self.num_updates))
            self.decay = float(state.get("decay", self.decay))
        else:
            shadow = state
        missing = sorted(self.shadow.keys() - shadow.keys())
        unexpected = sorted(shadow.keys() - self.shadow.keys())
        if strict and (missing or unexpected):
            raise KeyError(f"EMA state mismatch: missing {missing[:10]}, unexpected {unexpected[:10]}")
        for name, value in shadow.items():
            if name not in self.shadow:
                continue
            current = self.shadow[name]
            if tuple(value.shape) != tuple(current.shape):
                raise ValueError(f"EMA entry {name!r}: shape {tuple(value.shape)}, expected {tuple(current.shape)}")
            self.shadow[name] = value.detach().to(device=current.device, dtype=current.dtype).clone()
