"""The trainer (`sd_core.train`) in one process on CPU: CLI validation, LR schedule, the held-out split,
exact resume, NaN injection, and a loss that falls on structured synthetic latents."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from sd_core.training import checkpoint as ck
from sd_core.training import trainer as train
from sd_core.config import Profile
from sd_core.training.lr_schedule import lr_factor
from sd_core.training.data_order import split_indices
from sd_core.training.faults import FAULT_ENV
from sd_core.training.metrics_log import read_metrics
from train_support import SMALL_UNET, make_tiny_data, train_argv


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> Profile:
    p = Profile.tiny(tmp_path_factory.mktemp("train") / "data").with_overrides(SMALL_UNET)
    make_tiny_data(p)
    return p


def _argv(profile, out, *extra, **flags):
    return train_argv(profile, out, "--overrides", json.dumps(SMALL_UNET), *extra, **flags)


def _train_losses(out):
    return [(r["step"], r["loss"]) for r in read_metrics(out) if r["kind"] == "train"]


# ----------------------------------------------------------------------------------------------- CLI
def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--resume", "--min-snr-gamma", "--cfg-dropout", "--ema-decay", "--grad-ckpt", "--compile",
                 "--channels-last", "--checkpoint-every", "--log-every", "--wandb", "--val-share", "--val-every",
                 "--grad-accum", "--epochs", "--max-steps", "--warmup-steps", "--seed", "--batch-size"):
        assert flag in text


@pytest.mark.parametrize("argv, flag", [
    (["--lr", "-1"], "--lr"), (["--batch-size", "0"], "--batch-size"), (["--cfg-dropout", "1.5"], "--cfg-dropout"),
    (["--ema-decay", "2"], "--ema-decay"), (["--grad-accum", "x"], "--grad-accum"),
    (["--resume", "/nonexistent/ckpt"], "--resume"), (["--overrides", "[1]"], "--overrides"),
    (["--min-snr-gamma", "-5"], "--min-snr-gamma"), (["--val-share", "1"], "--val-share"),
])
def test_bad_values_are_rejected_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_flags_override_the_profile(tmp_path):
    args = train.build_parser().parse_args(["--data-root", str(tmp_path), "--lr", "3e-4", "--min-snr-gamma", "none",
                                            "--epochs", "2", "--no-wandb", "--output-dir", str(tmp_path / "o")])
    s = train.resolve_settings(args)
    t = s.train
    assert (t.lr, t.min_snr_gamma, t.epochs, t.max_steps, t.wandb) == (3e-4, None, 2, None, False)
    assert t.batch_size == Profile.tiny().train.batch_size  # untouched fields keep the profile's values


# ------------------------------------------------------------------------------------ recipe pieces
def test_lr_schedule_warmup_then_cosine_to_one_percent():
    assert lr_factor(0, 10, 110) == pytest.approx(0.1)
    assert lr_factor(9, 10, 110) == pytest.approx(1.0)
    assert lr_factor(10, 10, 110) == pytest.approx(1.0)
    assert lr_factor(60, 10, 110) == pytest.approx(0.505)
    assert lr_factor(110, 10, 110) == pytest.approx(0.01)
    assert all(lr_factor(s, 10, 110) >= lr_factor(s + 1, 10, 110) for s in range(10, 120))


def test_validation_split_is_disjoint_deterministic_and_stable(profile):
    from sd_core.encoding.latent_cache import LatentDataset

    both = LatentDataset(profile.latents_dir)
    tr, va = split_indices(both, 0.25)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(both)
    assert 0.1 < len(va) / len(both) < 0.4
    assert np.array_equal(va, split_indices(both, 0.25)[1])
    # a shard's held-out rows do not depend on which other shards exist
    second = LatentDataset(profile.latents_dir, [both.shards[1]])
    _, va2 = split_indices(second, 0.25)
    assert np.array_equal(va2 + both.offsets[1], va[va >= both.offsets[1]])


# -------------------------------------------------------------------------------------- training runs
def test_exact_resume_matches_an_uninterrupted_run(profile, tmp_path):
    flags = dict(max_steps=6, checkpoint_every=3, grad_accum=2, cfg_dropout=0.3, noise_offset=0.3)  # all RNG draws
    assert train.main(_argv(profile, tmp_path / "straight", **flags)) == 0
    assert train.main(_argv(profile, tmp_path / "resumed", "--stop-after", "3", **flags)) == 0
    assert ck.latest_checkpoint(tmp_path / "resumed").name == "step_00000003"
    assert train.main(_argv(profile, tmp_path / "resumed", "--resume", "auto", **flags)) == 0

    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    key = lambda r: (r["kind"], r["step"], r.get("loss"), r.get("grad_norm"), r.get("lr"), r.get("val_loss"))  # noqa
    assert [key(r) for r in a] == [key(r) for r in b]
    assert [s for s, _ in _train_losses(tmp_path / "straight")] == [1, 2, 3, 4, 5, 6]
    for ema in (False, True):
        x = ck.load_unet(tmp_path / "straight", ema=ema).state_dict()
        y = ck.load_unet(tmp_path / "resumed", ema=ema).state_dict()
        assert all(torch.equal(x[k], y[k]) for k in x)
    state = ck.load_train_state(tmp_path / "resumed")
    assert state["step"] == 6 and state["data"]["consumed_micro_batches"] == 12
    result = json.loads((tmp_path / "resumed" / "result.json").read_text())
    assert result["steps"] == 6 and result["manifest_hash"] == ck.read_config(tmp_path / "resumed").manifest_hash


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(profile, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    monkeypatch.setenv(FAULT_ENV, "nan@5")
    with pytest.raises(train.NonFiniteLossError, match=r"non-finite loss at step 5\b"):
        train.main(_argv(profile, out, max_steps=8, checkpoint_every=2))
    assert [p.name for p in ck.list_checkpoints(out)] == ["step_00000002", "step_00000004"]
    assert ck.latest_checkpoint(out).name == "step_00000004"
    m = ck.load_unet(out)
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert ck.nonfinite_tensors(out) == {"unet.safetensors": [], "ema.safetensors": []}
    assert max(s for s, _ in _train_losses(out)) == 4  # nothing logged for the poisoned step
    assert "NonFiniteLossError" in (out / "errors" / "rank0.txt").read_text()


def test_epochs_bound_the_run(profile, tmp_path):
    out = tmp_path / "epochs"
    # --epochs alone replaces the profile's max_steps (1250 for tiny)
    assert train.main(_argv(profile, out, max_steps=None, epochs=1, checkpoint_every=100, val_max_samples=4)) == 0
    result = json.loads((out / "result.json").read_text())
    n_train = result["num_train_samples"]
    assert result["steps"] == n_train // 8 and result["num_val_samples"] == 4
    assert ck.latest_checkpoint(out).name == f"step_{n_train // 8:08d}"


def test_loss_falls_on_structured_latents(profile, tmp_path):
    out = tmp_path / "fall"
    assert train.main(_argv(profile, out, max_steps=40, batch_size=16, lr=3e-3, warmup_steps=4, val_every=40,
                            checkpoint_every=40, min_snr_gamma=5)) == 0
    losses = [l for _, l in _train_losses(out)]
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert math.isfinite(last) and last < 0.8 * first, (first, last)
    val = [(r["step"], r["val_loss"]) for r in read_metrics(out) if r["kind"] == "val"]
    assert [s for s, _ in val] == [0, 40] and val[-1][1] < val[0][1]


def test_v_prediction_on_a_zero_terminal_snr_schedule_trains_and_selects_its_sampler(profile, tmp_path):
    from sd_core.sampling.generate import schedule_of
    from sd_core.model.schedulers import sampler_for

    out = tmp_path / "vz"
    assert train.main(_argv(profile, out, "--prediction-type", "v_prediction", "--zero-terminal-snr",
                            max_steps=4, checkpoint_every=4, val_every=4)) == 0
    losses = [l for _, l in _train_losses(out)]
    assert len(losses) == 4 and all(math.isfinite(l) for l in losses)
    record = ck.read_config(out)
    assert (record.train["prediction_type"], record.train["zero_terminal_snr"]) == ("v_prediction", True)
    sampler = sampler_for(*schedule_of(record))  # what sd generate, sample_grid and checkpoint_eval use
    sampler.set_timesteps(30)
    assert sampler.timesteps[0].item() == 999 and sampler.alphas_cumprod[999].item() == 0.0
    cfg = sampler.config_dict()  # what sd export-diffusers writes as the pipeline's scheduler
    assert (cfg["prediction_type"], cfg["rescale_betas_zero_snr"], cfg["timestep_spacing"]) == \
        ("v_prediction", True, "trailing")
    # a checkpoint from before the settings existed samples as SD 1.x
    assert schedule_of(dataclasses.replace(record, train={})) == ("epsilon", False)


def test_a_zero_terminal_snr_without_v_prediction_is_refused_naming_both_fields(profile, tmp_path, capsys):
    assert train.main(_argv(profile, tmp_path / "bad", "--zero-terminal-snr")) == 2
    assert "train.zero_terminal_snr = True needs train.prediction_type = 'v_prediction'" in capsys.readouterr().err


def test_adamw_moments_saved_with_conv_shapes_resume_into_linear_projections():
    """Checkpoints from before proj_in/proj_out became Linear hold their AdamW moments as (C, C, 1, 1)."""
    from sd_core.training.trainer import _match_optimizer_state_shapes

    proj = torch.nn.Linear(4, 4, bias=False)
    opt = torch.optim.AdamW(proj.parameters())
    old = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.full((4, 4, 1, 1), 0.5),
                         "exp_avg_sq": torch.full((4, 4, 1, 1), 0.25)}},
           "param_groups": opt.state_dict()["param_groups"]}
    opt.load_state_dict(old)
    _match_optimizer_state_shapes(opt)
    proj(torch.ones(1, 4)).sum().backward()
    opt.step()  # without the reshape: "The size of tensor a (4) must match the size of tensor b (1)"
    assert opt.state[proj.weight]["exp_avg"].shape == (4, 4)
