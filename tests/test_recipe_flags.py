"""The sd15 recipe's flags together, as a user launches them: `torchrun --nproc_per_node=2 -m sd_core.train
--compile --grad-ckpt --channels-last --precision bf16` (gloo on CPU), stopped short with --stop-after and
resumed; plus the refusals when torch.compile cannot run and when a precision is unknown.

What is trained is shrunk so the test stays cheap: a one-level UNet (one ResBlock per side, the middle
block's SpatialTransformer, so proj_in/proj_out are in it) on 4x8x8 latents. `make test` runs the recipe
without `--compile` (~25 s); the compiled run is `slow` (`make test-slow`): its first run on a machine builds
~63 inductor C++ kernels in each of the two ranks, 141 s for the test alone on an idle 2-core Intel Xeon and
232 s inside `make test` (2026-12-02), a third of the suite's budget; with a warm compile cache
(``/tmp/torchinductor_$USER``) 38-56 s. Dynamo tracing our UNet is still checked by `make test`: the GPU suite's
dry run (tests/test_bench_gpu.py) compiles it with the ``eager`` backend.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from sd_core.accel import autocast, resolve_precision
from sd_core.config import Profile
from sd_core.model.convert import WRAPPER_PREFIXES
from sd_core.training import checkpoint as ck
from sd_core.training import trainer as train
from sd_core.training.metrics_log import read_metrics
from train_support import build_text_components, train_argv, write_synthetic_latents

NARROW_UNET = {"unet": {"ch": 8, "ch_mults": [1], "res_blks": 1, "attn_lvls": [], "heads": 2, "norm_groups": 4}}
RECIPE = ("--grad-ckpt", "--channels-last", "--precision", "bf16")  # and "--compile" (slow)
DDP_STRIDE_WARNING = "Grad strides do not match bucket view strides"


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> Profile:
    p = Profile.tiny(tmp_path_factory.mktemp("recipe") / "data").with_overrides(NARROW_UNET)
    write_synthetic_latents(p, build_text_components(p), shards=("00000",), per_shard=40, latent_shape=(4, 8, 8))
    return p


def _torchrun(profile: Profile, out: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = train_argv(profile, out, "--overrides", json.dumps(NARROW_UNET), *extra, batch_size=4,
                      max_steps=4, warmup_steps=1, checkpoint_every=2, val_every=2, val_max_samples=8)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "sd_core.train",
           *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _weight_keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def test_ddp_recipe_trains_saves_plain_keys_and_resumes(profile, tmp_path):
    _check_recipe_run(profile, tmp_path / "run", RECIPE)


@pytest.mark.slow  # a cold inductor build in both ranks: ~2-4 min on 2 cores (module docstring)
def test_compiled_ddp_recipe_trains_saves_plain_keys_and_resumes(profile, tmp_path):
    _check_recipe_run(profile, tmp_path / "run", ("--compile", *RECIPE))


def _check_recipe_run(profile: Profile, out: Path, recipe: tuple[str, ...]) -> None:
    """Two torchrun launches with ``recipe``: stopped after step 2, then resumed to the end (step 4)."""
    first = _torchrun(profile, out, *recipe, "--stop-after", "2")
    assert ck.latest_checkpoint(out).name == "step_00000002"
    second = _torchrun(profile, out, *recipe, "--resume", "auto")
    assert "resumed from" in second.stdout and "at step 2" in second.stdout
    assert "precision bf16" in first.stdout and "2 process(es)" in first.stdout

    # finite losses for every step, the resumed ones included; the run ends where the schedule does
    train_rows = [r for r in read_metrics(out) if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in train_rows)
    assert json.loads((out / "result.json").read_text())["steps"] == 4

    # weights as the plain UNet names them: no DDP `module.` or torch.compile `_orig_mod.` anywhere
    latest = ck.latest_checkpoint(out)
    for name in (ck.UNET_FILE, ck.EMA_FILE):
        keys = _weight_keys(latest / name)
        assert keys and not [k for k in keys if any(p in k for p in WRAPPER_PREFIXES)], name
    unet = ck.load_unet(out)
    assert sum(p.numel() for p in unet.parameters()) > 0

    # the DDP layout fix holds for the channels_last (and compiled) model too
    assert DDP_STRIDE_WARNING not in first.stderr + second.stderr


def test_compile_without_a_cxx_compiler_is_refused_up_front(profile, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    argv = train_argv(profile, tmp_path / "run", "--overrides", json.dumps(NARROW_UNET), "--compile", "--device", "cpu")
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert "--compile" in err and "C++ compiler" in err and "no-such-g++" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()  # refused before anything ran


def test_unknown_precision_is_refused_naming_the_flag(profile, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(train_argv(profile, tmp_path / "run", "--precision", "fp16"))
    assert e.value.code == 2
    assert "--precision" in capsys.readouterr().err


def test_precision_resolves_per_device_and_bf16_autocast_runs_on_cpu():
    assert resolve_precision(None, "cpu") == "fp32" and resolve_precision(None, "cuda") == "bf16"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", "cpu")
    x = torch.randn(8, 8)
    with autocast("bf16", "cpu"):
        assert (x @ x).dtype == torch.bfloat16
    for precision in (None, "fp32"):
        with autocast(precision, "cpu"):
            assert (x @ x).dtype == torch.float32


def test_encoding_follows_its_precision_setting_on_cpu():
    """`encode.precision: bf16` autocasts the VAE on CPU too: latents close to fp32's, but not bit-equal."""
    from diffusers import AutoencoderKL

    from sd_core.encoding.encode import _encode_batch

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4).eval()
    images = list(np.random.default_rng(0).integers(0, 256, (2, 3, 16, 16), dtype=np.uint8))
    fp32, bf16 = (_encode_batch(vae, 1.0, images, p) for p in ("fp32", "bf16"))
    assert fp32.dtype == bf16.dtype == np.float32 and fp32.shape == (2, 4, 8, 8)
    assert not np.array_equal(fp32, bf16)
    assert np.abs(fp32 - bf16).max() < 0.05 * np.abs(fp32).max()
