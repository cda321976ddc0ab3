"""`make bench-gpu DRY_RUN=1`: the GPU suite's script runs end to end on CPU at toy shapes, printing every
section with figures, so it is known to execute before anyone spends GPU time on it."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("UNet training step", "Sampling", "Encoding", "sd train", "pytest -m gpu")


def test_make_bench_gpu_dry_run_prints_every_section():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(["make", "--no-print-directory", "bench-gpu", "DRY_RUN=1"], cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = proc.stdout.split("---- markdown for BENCHMARKS.md ----", 1)[1]
    assert "DRY RUN" in report and "device: CPU" in report
    for title in SECTIONS:
        body = re.search(rf"^### {re.escape(title)} \(\d+ s\)\n(.*?)(?=^### |^Suite total)", report, re.S | re.M)
        assert body, f"section {title!r} missing:\n{report}"
        assert "FAILED" not in body.group(1), body.group(1)
    # each benchmark table has its figures: 4 step rows (ours/diffusers x eager/compiled), then one row each
    assert len(re.findall(r"^\| (ours|diffusers) \| (yes|no) \| \d", report, re.M)) == 4
    assert re.search(r"^\| \d+\.\d+ \| \d+\.\d+ \| \d+\.\d+x \|", report, re.M)  # sampling: ours, theirs, ratio
    assert re.search(r"^\| [\d,]+ \| \d+\.\d \| \d\.\d{4} \|", report, re.M)  # sd train: params, samples/s, loss
    assert "exit code 0" in report  # pytest -m gpu (skips without CUDA)
