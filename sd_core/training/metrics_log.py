"""Where the trainer's numbers go: ``metrics.jsonl``, wandb (optional) and Dagster Pipes (when launched by
Dagster). Only global rank 0 creates a :class:`MetricsLogger` with sinks; other ranks get a silent one.

``metrics.jsonl`` holds one JSON object per line:

    {"kind": "train", "step", "epoch", "loss", "lr", "grad_norm", "samples_per_s", "time"}
    {"kind": "val",   "step", "val_loss", "val_samples", "time"}

``loss`` is the global mean training loss of that optimiser step (the Min-SNR-weighted objective when
weighting is on), ``val_loss`` the plain ε-MSE on the held-out split at fixed timesteps and noise. On resume
the lines past the resumed step are dropped, so the file always describes the run that produced the weights.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` (a file or the run directory holding one); ``[]`` if absent.
    A torn last line (a crash mid-write) is ignored."""
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_FILE
    if not p.exists():
        return []
    out = []
    with open(p) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def truncate_metrics(path: str | os.PathLike[str], max_step: int) -> None:
    """Keep only records with ``step <= max_step`` (atomic rewrite)."""
    p = Path(path)
    if not p.exists():
        return
    kept = [r for r in read_metrics(p) if int(r.get("step", 0)) <= max_step]
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        for r in kept:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


def _finite(x: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so a line stays parseable everywhere."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


class MetricsLogger:
    """Fans records out to the JSONL file, wandb and Dagster Pipes. ``enabled=False`` (non-zero ranks) makes
    every method a no-op."""

    def __init__(self, out_dir: str | os.PathLike[str], *, enabled: bool, resume_step: int | None = None,
                 wandb_run: Any = None, pipes: Any = None) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / METRICS_FILE
        self.wandb_run = wandb_run
        self.pipes = pipes
        self._file = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                truncate_metrics(self.path, resume_step)
            elif self.path.exists():
                self.path.unlink()  # a fresh run in an old directory: start a new log
            self._file = open(self.path, "a")

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {k: _finite(v) for k, v in record.items()}
        assert self._file is not None
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        if self.wandb_run is not None:
            step = int(record["step"])
            prefix = "val/" if record.get("kind") == "val" else "train/"
            data = {prefix + k: v for k, v in record.items()
                    if k not in ("kind", "step", "time") and isinstance(v, (int, float))}
            self.wandb_run.log(data, step=step)

    def info(self, message: str) -> None:
        """A human-readable line: stdout, and the Dagster run log when launched through Pipes."""
        if not self.enabled:
            return
        print(message, flush=True)
        if self.pipes is not None:
            self.pipes.log.info(message)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# ------------------------------------------------------------------------------------------------ plot
def loss_curve_png(records: Iterable[dict[str, Any]], title: str = "UNet training loss") -> bytes:
    """A PNG of the training loss (raw and smoothed) and the validation loss against the step."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    def num(v: Any) -> float:
        try:
            return float(v)
        except (TypeError, ValueError):
            return float("nan")

    records = list(records)
    train = [(int(r["step"]), num(r["loss"])) for r in records if r.get("kind") == "train" and "loss" in r]
    val = [(int(r["step"]), num(r["val_loss"])) for r in records if r.get("kind") == "val" and "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        xs, ys = zip(*train)
        ax.plot(xs, ys, color="tab:blue", alpha=0.35, lw=1, label="train (per step)")
        k = max(1, len(ys) // 20)
        if k > 1:
            sm = [sum(ys[max(0, i - k + 1): i + 1]) / len(ys[max(0, i - k + 1): i + 1]) for i in range(len(ys))]
            ax.plot(xs, sm, color="tab:blue", lw=1.8, label=f"train (mean of {k})")
    if val:
        xs, ys = zip(*val)
        ax.plot(xs, ys, "o-", color="tab:orange", lw=1.8, ms=4, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def loss_curve_markdown(records: Iterable[dict[str, Any]]) -> str:
    """The loss curve as markdown with a base64 data-URI image (renders in the Dagster UI)."""
    b64 = base64.b64encode(loss_curve_png(records)).decode()
    return f"![loss curve](data:image/png;base64,{b64})"
