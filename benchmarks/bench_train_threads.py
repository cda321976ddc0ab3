"""Tiny-profile training throughput on CPU by process/thread layout, idle and with one busy process.

Why: torch's OpenMP threads spin-wait for each other; when another CPU-bound process takes one of a 2-core
machine's cores, a 2-thread trainer waits on its descheduled thread at every parallel region (measured
earlier: 82 → 21 samples/s). This benchmark trains the real trainer (`sd_core.train`, the demo's recipe, the
global batch of 32 kept) for a fixed number of steps in each layout, first on the idle machine, then next to
``python -c "while True: pass"``, and prints samples/s (the trainer's steady throughput) and the slowdown.

Needs a data root with the tiny latent cache (``make demo`` makes one):

    python benchmarks/bench_train_threads.py [--data-root data] [--steps 60] [--layouts 0,1,2,3]

Expect the first layout's busy run to take long: that is the finding (~2.5 samples/s).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sd_core.machine import cpu_model  # noqa: E402

# (label, processes, OpenMP threads per process, extra environment)
LAYOUTS: list[tuple[str, int, int, dict[str, str]]] = [
    ("1 process × 2 threads", 1, 2, {}),
    ("1 process × 2 threads, OMP_WAIT_POLICY=PASSIVE", 1, 2, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ("1 process × 1 thread", 1, 1, {}),
    ("2 processes × 1 thread (DDP, gloo)", 2, 1, {}),
]


def train_once(data_root: Path, steps: int, nproc: int, threads: int, extra: dict[str, str]) -> float:
    """Samples/s of one run (the trainer's steady throughput, read from its result file)."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "sd_core.training.launch", f"--nproc_per_node={nproc}", "-m", "sd_core.train",
               "--profile", "tiny", "--data-root", str(data_root), "--output-dir", out, "--run-id", "bench",
               "--max-steps", str(steps), "--batch-size", str(32 // nproc), "--checkpoint-every", str(steps),
               "--val-every", str(steps), "--val-max-samples", "0", "--log-every", str(max(steps // 3, 1))]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", **extra}
        subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        result = json.loads((Path(out) / "result.json").read_text())
        return float(result["samples_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", type=Path, default=REPO / "data")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--layouts", default=",".join(str(i) for i in range(len(LAYOUTS))),
                    help="comma-separated indices into LAYOUTS to run (default: all)")
    args = ap.parse_args()
    if not (args.data_root / "latents" / "manifest.json").is_file():
        # `make bench` runs every benchmark: say what is missing instead of failing the others
        print(f"## Tiny training throughput by thread layout\n\nnot run: {args.data_root}/latents/manifest.json "
              f"not found (run `make demo` first, or pass --data-root)")
        return
    rows = []
    for label, nproc, threads, extra in (LAYOUTS[int(i)] for i in args.layouts.split(",")):
        idle = train_once(args.data_root, args.steps, nproc, threads, extra)
        busy_proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            busy = train_once(args.data_root, args.steps, nproc, threads, extra)
        finally:
            busy_proc.kill()
            busy_proc.wait()
        rows.append((label, idle, busy))
        print(f"{label}: {idle:.1f} samples/s idle, {busy:.1f} busy", file=sys.stderr, flush=True)
    print("## Tiny training throughput by thread layout (`benchmarks/bench_train_threads.py`)\n")
    print(f"{dt.date.today()}, {cpu_model()}, {os.cpu_count()} CPUs, torch trainer, global batch 32, "
          f"{args.steps} steps per run; busy = one `python -c \"while True: pass\"` alongside.\n")
    print("| layout | idle samples/s | busy samples/s | slowdown |")
    print("|---|---:|---:|---:|")
    for label, idle, busy in rows:
        print(f"| {label} | {idle:.1f} | {busy:.1f} | {idle / busy:.2f}× |")


if __name__ == "__main__":
    main()
