"""The sd15 path end to end at reduced scale (configs/sd15-smoke.yaml), on CPU, through the `dagster` CLI.

The fast test pins what the smoke config keeps of the sd15 profile. The slow one (`make test-slow`) runs the
README's smoke commands into a temporary data root: `sd components sd15-random` (random weights in the real
configs, the real CLIP tokenizer), metadata and filter at the real thresholds, one 512 px shard downloaded by
img2dataset from the loopback server and encoded to 4x64x64 latents, the narrowed SD 1.5 UNet trained by 2
torchrun processes with the recipe's flags together, killed (SIGKILL to the whole `dagster` process group) after
its first checkpoint and resumed, the 512 px sample grid, and `sd export-diffusers` loaded by diffusers'
StableDiffusionPipeline, which generates an image. It prints each stage's wall time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from e2e_support import BIN, DEFS_MODULE, ROOT, dagster, env_for
from sd_assets.demo import ensure_dagster_home
from sd_assets.run_config import load_run_config
from sd_core.config import Profile, get_profile

CONFIG = ROOT / "configs" / "sd15-smoke.yaml"
RUN = "sd15-smoke"
SHARD = "00000"
ASTRONAUT_IDS = [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]  # tests/test_components.py


def _smoke_profile(data_root: Path, run_config: dict | None = None) -> Profile:
    cfg = (run_config or load_run_config([CONFIG]))["resources"]["sd"]["config"]
    return get_profile(cfg["profile"], data_root, cfg.get("overrides"))


def test_smoke_config_is_sd15_but_for_what_cannot_run_here(tmp_path):
    smoke, sd15 = _smoke_profile(tmp_path), Profile.sd15(tmp_path)
    assert smoke.name == "sd15" and smoke.filter == sd15.filter  # the real thresholds
    assert smoke.source.kind == "synthetic" and smoke.source.synthetic_image_size == smoke.filter.min_side == 512
    assert (smoke.download.image_size, smoke.download.resize_mode) == (512, sd15.download.resize_mode)
    assert smoke.encode.resolution == 512 and smoke.components.max_length == 77
    assert dataclasses.replace(smoke.unet, ch=sd15.unet.ch) == sd15.unet  # the SD 1.5 layout, only narrower
    t = smoke.train
    assert t.grad_ckpt and t.compile and t.channels_last and t.precision == "bf16" and t.nproc_per_node == 2
    assert (t.min_snr_gamma, t.cfg_dropout, t.ema_decay) == (5.0, 0.1, 0.9999)
    assert (t.min_snr_gamma, t.cfg_dropout, t.ema_decay) == (sd15.train.min_snr_gamma, sd15.train.cfg_dropout,
                                                             sd15.train.ema_decay)
    s = smoke.sample
    assert (s.height, s.width, s.steps, s.guidance) == (512, 512, 30, 7.5) and s.negative_prompt and s.prompts
    assert not t.wandb  # offline
    from sd_assets.definitions import defs

    run_config = yaml.safe_load(CONFIG.read_text())
    for job in [defs.resolve_job_def(j.name) for j in defs.jobs] + [defs.resolve_implicit_global_asset_job_def()]:
        assert dg.validate_run_config(job, run_config) is not None, job.name


# ------------------------------------------------------------------------------------------- the run
class Stages:
    """Wall time per stage, printed at the end (the figures for BENCHMARKS.md)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.t0 = time.monotonic()

    def timed(self, name: str, fn, *args, **kwargs):
        t = time.monotonic()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds[name] = round(time.monotonic() - t, 1)

    def report(self) -> str:
        rows = [f"| {k} | {v:.0f} s |" for k, v in self.seconds.items()]
        return "\n".join(["| stage | wall |", "|---|---|", *rows,
                          f"| total | {time.monotonic() - self.t0:.0f} s |"])


def _materialize(env: dict[str, str], config: Path, select: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return dagster("asset", "materialize", "-m", DEFS_MODULE, "--select", select, "-c", str(config), *extra,
                   env=env, timeout=1800)


def _run_sd(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([str(BIN / "sd"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, f"sd {' '.join(args)} -> {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def _latest_metadata(home: Path, asset: str) -> dict:
    with dg.DagsterInstance.from_config(str(home)) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey(asset))
        assert event is not None, asset
        return {k: getattr(v, "value", v) for k, v in event.asset_materialization.metadata.items()}


def _train_killed_after_first_checkpoint(env: dict[str, str], config: Path, out: Path, log: Path) -> int:
    """Start the training stage, SIGKILL its whole process group once the first checkpoint is complete (the
    ``latest`` pointer is written last), then stop any rank that outlived it. Returns the step it had reached."""
    from sd_core.training.checkpoint import checkpoint_step, latest_checkpoint
    from sd_core.training.launch import stop_trainer_processes

    cmd = [str(BIN / "dagster"), "asset", "materialize", "-m", DEFS_MODULE, "--select", "unet_checkpoint",
           "-c", str(config)]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 1800
        while not (out / "latest").exists():
            assert proc.poll() is None, f"training ended ({proc.returncode}) before a checkpoint:\n" + \
                log.read_text(errors="replace")[-4000:]
            assert time.monotonic() < deadline, "no checkpoint within 30 min"
            time.sleep(1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        stop_trainer_processes(out)  # ranks in another process group, if torchrun put them there
    return checkpoint_step(latest_checkpoint(out))


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_sd15_smoke_run_through_dagster_ends_in_a_diffusers_pipeline(tmp_path, capsys):
    stages = Stages()
    data_root, components = tmp_path / "data", tmp_path / "sd15-random"
    home = ensure_dagster_home(data_root / "dagster_home")
    env = {**env_for(home, data_root), "SD_PROFILE": "sd15"}

    # the user's first step (README): components with random weights, the real tokenizer
    stages.timed("sd components sd15-random", _run_sd, "components", "sd15-random", "--out", str(components), env=env)
    run_config = load_run_config([CONFIG])
    sd_cfg = run_config["resources"]["sd"]["config"]
    sd_cfg["data_root"] = str(data_root)
    sd_cfg["overrides"]["components"].update({k: str(components / k) for k in ("vae", "text_encoder", "tokenizer")})
    config = tmp_path / "smoke.yaml"
    config.write_text(yaml.safe_dump(run_config, sort_keys=False))
    profile = _smoke_profile(data_root, run_config)

    stages.timed("metadata + filter", _materialize, env, config, "laion_metadata,filtered_metadata")
    funnel = _latest_metadata(home, "filtered_metadata")
    assert funnel["rows_out"] == 43 and funnel["num_shards"] == 9, funnel
    stages.timed("frozen_components", _materialize, env, config, "frozen_components")
    comp = _latest_metadata(home, "frozen_components")
    assert (comp["vae_params"], comp["text_encoder_params"], comp["vocab_size"]) == (83_653_863, 123_060_480, 49408)
    assert comp["latent_shape"] == [4, 64, 64] and comp["context_shape"] == [77, 768]

    stages.timed(f"image_shards + latents [{SHARD}]", _materialize, env, config, "image_shards,latents",
                 "--partition", SHARD)
    _check_shard_and_latents(profile)

    out = profile.checkpoints_dir / RUN
    train_config = tmp_path / "train.yaml"
    train_config.write_text(yaml.safe_dump({**run_config, "ops": {"unet_checkpoint": {"config": {"run_name": RUN}}}},
                                           sort_keys=False))
    killed_at = stages.timed("train until killed", _train_killed_after_first_checkpoint, env, train_config, out,
                             tmp_path / "train-killed.log")
    assert 1 <= killed_at < profile.train.max_steps
    resumed = stages.timed("train resumed", _materialize, env, train_config, "unet_checkpoint")
    _check_training(home, out, profile, killed_at, resumed.stdout + resumed.stderr)

    stages.timed("sample_grid", _materialize, env, config, "sample_grid")
    _check_grid(home, profile)

    # the run's own component folders (not the sd15 hub ids), passed as in the run config
    exported = tmp_path / "exported"
    components_override = json.dumps({"components": sd_cfg["overrides"]["components"]})
    stages.timed("sd export-diffusers", _run_sd, "export-diffusers", "--checkpoint", str(out), "--out",
                 str(exported), "--overrides", components_override, env=env)
    stages.timed("diffusers pipeline", _check_diffusers_pipeline, exported, profile)
    with capsys.disabled():
        print(f"\nsd15 smoke run ({os.cpu_count()} cores):\n{stages.report()}")


def _check_shard_and_latents(profile: Profile) -> None:
    """5 images downloaded at 512x512, encoded to (5, 4, 64, 64), captions tokenized to 77 real CLIP ids."""
    from PIL import Image

    with tarfile.open(profile.shards_dir / f"{SHARD}.tar") as tar:
        jpgs = [m for m in tar.getmembers() if m.name.endswith(".jpg")]
        assert len(jpgs) == 5
        assert Image.open(tar.extractfile(jpgs[0])).size == (512, 512)
    z = np.load(profile.latents_dir / f"{SHARD}.npy", mmap_mode="r")
    assert z.shape == (5, 4, 64, 64) and np.isfinite(z).all()
    rows = pq.read_table(profile.latents_dir / f"{SHARD}.parquet").to_pylist()
    ids = [list(r["token_ids"]) for r in rows]
    assert all(len(i) == 77 and i[0] == 49406 and i[-1] == 49407 for i in ids)
    # "a {colour} {shape} on a {background} background": "a" is 320, "background" 5994, then EOS padding
    assert all(i[1] == 320 and i[7] == 5994 and set(i[8:]) == {49407} for i in ids), ids[0]


def _check_training(home: Path, out: Path, profile: Profile, killed_at: int, output: str) -> None:
    """The resumed run continued from the kill point to max_steps, with finite losses and the recipe recorded."""
    from sd_core.training.checkpoint import read_config
    from sd_core.training.metrics_log import read_metrics

    meta = _latest_metadata(home, "unet_checkpoint")
    assert meta["step"] == profile.train.max_steps and meta["world_size"] == 2, meta
    assert "resumed from" in output and f"at step {killed_at}" in output, output[-4000:]
    train = [r for r in read_metrics(out) if r.get("kind") == "train"]
    assert [r["step"] for r in train] == list(range(1, profile.train.max_steps + 1)), train
    assert all(np.isfinite(float(r["loss"])) for r in train), train
    recorded = read_config(out / "latest").train
    assert {k: recorded[k] for k in ("grad_ckpt", "compile", "channels_last", "precision", "min_snr_gamma",
                                     "ema_decay")} == {"grad_ckpt": True, "compile": True, "channels_last": True,
                                                       "precision": "bf16", "min_snr_gamma": 5.0, "ema_decay": 0.9999}
    with dg.DagsterInstance.from_config(str(home)) as instance:
        check = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [dg.AssetCheckKey(dg.AssetKey("unet_checkpoint"), "checkpoint_loads_and_is_finite")])
        assert len(check) == 1 and all(e.status.value == "SUCCEEDED" for e in check.values()), check


def _check_grid(home: Path, profile: Profile) -> None:
    from PIL import Image

    meta = _latest_metadata(home, "sample_grid")
    grid = Image.open(meta["grid_path"])
    assert grid.width >= 512 and grid.height >= 512, grid.size  # 1 prompt x 1 seed at 512 px
    assert (meta["steps"], meta["guidance"], meta["resolution"]) == (30, 7.5, "512x512"), meta  # sd15's sampler
    assert meta["checkpoint_step"] == profile.train.max_steps
    arr = np.asarray(grid)
    assert np.isfinite(arr).all() and arr.std() > 0


def _check_diffusers_pipeline(exported: Path, profile: Profile) -> None:
    """The export loads in diffusers with the real tokenizer and generates a 512 px image (2 steps: the 512 px
    sampler itself ran in sample_grid)."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(exported, safety_checker=None)
    assert pipe.tokenizer("a photograph of an astronaut riding a horse").input_ids == ASTRONAUT_IDS
    out = pipe("a photograph of an astronaut riding a horse", negative_prompt=profile.sample.negative_prompt,
               num_inference_steps=2, guidance_scale=7.5, height=512, width=512, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 512, 512, 3) and np.isfinite(out.images).all()
    json.dumps(pipe.unet.config)  # the exported UNet's config is plain data
