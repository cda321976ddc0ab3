"""The device-dependent switches the trainer, the encoder and the benchmarks share: mixed precision and
torch.compile's toolchain.

Precision is a setting (``TrainConfig.precision``, ``EncodeConfig.precision``: ``fp32`` / ``bf16``, ``None`` =
auto) rather than "bf16 when on CUDA", so bf16 autocast also runs on CPU, where the tests can reach it; auto
keeps the old behaviour (bf16 autocast on CUDA, fp32 elsewhere). Weights stay fp32 either way: autocast
runs the matmuls and convolutions in bf16 and keeps reductions and the loss in fp32.

torch.compile's inductor backend builds C++ kernels on CPU (and Triton's launcher needs a C compiler on
CUDA); without a compiler it fails deep inside the first forward pass with a traceback that does not say
why. :func:`compile_toolchain_problem` says it up front, naming the flag.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

import torch

PRECISIONS = ("fp32", "bf16")


def resolve_precision(precision: str | None, device: torch.device | str) -> str:
    """``precision`` as given, or for ``None`` (auto) bf16 on CUDA and fp32 elsewhere; anything else is a
    ``ValueError`` naming the accepted values."""
    if precision is None or precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} (or None for auto), got {precision!r}")
    return precision


def autocast(precision: str | None, device: torch.device | str) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when ``precision`` resolves to bf16, else a no-op context."""
    device = torch.device(device)
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _runs(compiler: str) -> bool:
    try:
        subprocess.run([compiler, "--version"], capture_output=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def compile_toolchain_problem(device: torch.device | str, flag: str = "--compile") -> str | None:
    """Why torch.compile cannot run on ``device`` here (a sentence naming ``flag``), or None when it can.

    CPU: inductor's C++ compiler (``$CXX``, else g++), the one torch itself would pick. CUDA: a C compiler for
    Triton's kernel launcher (``$CC``, else cc/gcc/clang)."""
    if torch.device(device).type == "cuda":
        candidates = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
        what = "a C compiler (for Triton's kernel launcher)"
    else:
        candidates = [os.environ.get("CXX") or "g++"]
        what = "a C++ compiler (inductor builds its CPU kernels with it)"
    if any(shutil.which(c) and _runs(c) for c in candidates):
        return None
    env = "CC" if torch.device(device).type == "cuda" else "CXX"
    return (f"{flag}: torch.compile needs {what} and none was found on this machine (tried "
            f"{', '.join(candidates)}); install one (e.g. `apt-get install g++`) or point ${env} at one, "
            f"or run without {flag}")
