"""`unet_checkpoint`: a 2-process torchrun (gloo) trainer launched through Dagster Pipes materialises the asset
with its metadata and check; a rank that crashes fails the run with its error visible and leaves no trainer
process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import dagster as dg
import pytest

from sd_assets.assets.training import CHECK_NAME, unet_checkpoint
from sd_core.training.launch import stop_trainer_processes, trainer_command, trainer_processes
from sd_assets.resources import SDConfig
from sd_core.training.checkpoint import load_train_state, load_unet, read_config
from sd_core.config import Profile
from sd_core.encoding.latent_cache import manifest_hash
from sd_core.training.metrics_log import read_metrics
from train_support import make_tiny_data

OVERRIDES = {
    "unet": {"ch": 16, "ch_mults": [1, 2], "res_blks": 1, "attn_lvls": [2], "heads": 2, "norm_groups": 8},
    "train": {"batch_size": 8, "max_steps": 4, "warmup_steps": 1, "log_every": 1, "checkpoint_every": 2,
              "val_every": 2, "val_max_samples": 16, "nproc_per_node": 2},
}


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> Profile:
    p = Profile.tiny(tmp_path_factory.mktemp("asset") / "data").with_overrides(OVERRIDES)
    make_tiny_data(p)
    return p


def _materialize(profile: Profile, run_name: str, env: dict[str, str] | None = None):
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [unet_checkpoint], instance=instance, raise_on_error=False,
            resources={"sd": SDConfig(profile="tiny", data_root=str(profile.data_root), overrides=OVERRIDES)},
            run_config={"ops": {"unet_checkpoint": {"config": {"run_name": run_name, "env": env or {}}}}},
        )
        return result


def test_two_process_training_through_pipes_materialises_the_checkpoint(profile):
    result = _materialize(profile, "ddp")
    assert result.success
    [mat] = [e.event_specific_data.materialization for e in result.get_asset_materialization_events()]
    md = {k: getattr(v, "value", v) for k, v in mat.metadata.items()}

    out = profile.checkpoints_dir / "ddp"
    assert md["steps"] == 4 and md["world_size"] == 2 and md["nproc_per_node"] == 2
    assert md["final_loss"] > 0 and md["best_loss"] <= md["final_loss"] and md["samples_per_s"] > 0
    assert md["wandb_run"] == "disabled"
    assert str(md["checkpoint_path"]) == str((out / "step_00000004").resolve())
    expected_hash = manifest_hash(profile.latents_dir)
    assert md["manifest_hash"] == expected_hash and mat.tags["dagster/data_version"] == expected_hash
    assert md["shards"] == ["00000", "00001"] and md["num_shards"] == 2
    assert md["filter_config"]["min_side"] == 64 and md["source"]["kind"] == "synthetic"
    assert md["loss_curve"].startswith("![loss curve](data:image/png;base64,")

    [check] = result.get_asset_check_evaluations()
    assert check.check_name == CHECK_NAME and check.passed

    # only rank 0 logged; the log has every step, and validation at 0, 2 and 4
    records = read_metrics(out)
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in records if r["kind"] == "val"] == [0, 2, 4]
    cfg = read_config(out)
    assert cfg.world_size == 2 and cfg.train["batch_size"] == 8
    assert len(load_train_state(out)["rng"]) == 2  # every rank's RNG streams, for an exact resume
    load_unet(out)
    assert trainer_processes(out.resolve()) == []


def test_a_crashing_rank_fails_the_run_with_its_error(profile):
    result = _materialize(profile, "crash", env={"SD_TRAIN_FAULT": "crash@2:1"})
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    message = json.dumps(failure.event_specific_data.error.to_string()) if failure.event_specific_data.error \
        else ""
    assert "injected crash at step 2 on rank 1" in message and "rank1" in message
    out = (profile.checkpoints_dir / "crash").resolve()
    assert trainer_processes(out) == []
    assert not result.get_asset_materialization_events()


def _launch(profile: Profile, out, run: str, nproc: int):
    """The trainer command the asset runs, started the way PipesSubprocessClient starts it."""
    overrides = {**OVERRIDES, "train": {**OVERRIDES["train"], "max_steps": 100_000}}
    cmd = trainer_command("tiny", profile.data_root, overrides, out, run, "auto", nproc, [])
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(trainer_processes(out)) < nproc + 1:  # the ranks and their torchrun agent
        assert proc.poll() is None and time.monotonic() < deadline, "the trainer did not start"
        time.sleep(0.2)
    return proc


def _gone(out, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while trainer_processes(out) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not trainer_processes(out)


def test_cancelled_trainer_leaves_no_processes(profile, tmp_path):
    # cancellation: Pipes forwards SIGINT to torchrun, which stops its ranks
    out = (tmp_path / "cancel").resolve()
    proc = _launch(profile, out, "cancel", nproc=2)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    assert _gone(out)

    # the asset's safety net: even with the torchrun agent killed outright, no rank survives the step
    out = (tmp_path / "killed").resolve()
    proc = _launch(profile, out, "killed", nproc=1)
    proc.kill()
    proc.wait(timeout=30)
    stop_trainer_processes(out, grace_s=10)
    assert _gone(out, timeout=5)
