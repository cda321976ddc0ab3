"""Every config value is checked for type and range where it enters, once, whichever way it enters: a run
config's overrides (materialised with Dagster), `Profile.with_overrides`, `dataclasses.replace`, ``SD_PROFILE``,
the flags of `sd train` and `sd generate`. Written as the attack: each bad value must end in one clear message
naming section, field, value and allowed range (or the flag), never a hang, a bare traceback or a silent
coercion."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml

from sd_assets.assets.data import filtered_metadata, laion_metadata
from sd_assets.assets.training import unet_checkpoint
from sd_assets.resources import SDConfig
from sd_core.cli import main as sd_main
from sd_core.config import (PROFILE_ENV, Checked, ConfigError, Profile, SampleConfig, TrainConfig, check_value,
                            get_profile)
from sd_core.training import args as train_args
from dagster_support import step_error_text

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = [f.name for f in dataclasses.fields(Profile) if f.name not in ("name", "data_root")]




def _materialize_with_run_config(assets: list, root: Path, overrides: dict[str, Any]):
    """Materialise ``assets`` with the ``sd`` resource configured by a run config, as ``dagster asset
    materialize -c run.yaml`` does (the YAML text goes through yaml.safe_load, like the CLI's)."""
    run_yaml = yaml.safe_dump({"resources": {"sd": {"config": {
        "profile": "tiny", "data_root": str(root), "overrides": overrides}}}})
    with dg.instance_for_test() as instance:
        return dg.materialize(assets, instance=instance, raise_on_error=False,
                              resources={"sd": SDConfig.configure_at_launch()}, run_config=yaml.safe_load(run_yaml))


# ------------------------------------------------------------------------------- run config through Dagster
@pytest.mark.timeout(120)  # it used to train forever
def test_a_negative_batch_size_in_a_run_config_fails_the_training_run_at_once(tmp_path):
    res = _materialize_with_run_config([unet_checkpoint], tmp_path / "data", {"train": {"batch_size": -4}})
    assert not res.success
    assert "train.batch_size = -4: must be an integer >= 1" in step_error_text(res)
    assert not (tmp_path / "data" / "checkpoints").exists()  # refused before any trainer started


@pytest.mark.timeout(120)
def test_a_string_for_max_steps_in_a_run_config_is_refused_by_name(tmp_path):
    res = _materialize_with_run_config([unet_checkpoint], tmp_path / "data", {"train": {"max_steps": "abc"}})
    assert not res.success
    assert "train.max_steps = 'abc': must be an integer >= 1, or None" in step_error_text(res)


@pytest.mark.timeout(120)
def test_a_word_for_a_filter_threshold_in_a_run_config_is_refused_by_name(tmp_path):
    res = _materialize_with_run_config([laion_metadata, filtered_metadata], tmp_path / "data",
                                       {"filter": {"min_aesthetic": "high"}})
    assert not res.success
    assert "filter.min_aesthetic = 'high': must be a finite number in [0, 10], or None" in step_error_text(res)
    assert not (tmp_path / "data" / "metadata").exists()  # the first step refused: nothing fetched


# ------------------------------------------------------------------------------------- the overrides path
@pytest.mark.parametrize("overrides, message", [
    ({"download": {"shard_size": True}}, "download.shard_size = True: must be an integer >= 1"),
    ({"train": {"batch_size": "32"}}, "train.batch_size = '32': must be an integer >= 1 (got a string"),
    ({"train": {"lr": "1e-4"}}, "train.lr = '1e-4': must be a finite number > 0 (got a string"),
    ({"train": {"grad_ckpt": 1}}, "train.grad_ckpt = 1: must be true or false"),
    ({"train": {"val_share": 1.0}}, "train.val_share = 1.0: must be a finite number in [0, 1)"),
    ({"train": {"wandb_mode": "online!"}}, "train.wandb_mode = 'online!': must be one of 'offline', 'online'"),
    ({"encode": {"num_gpus": 2.0}}, "encode.num_gpus = 2.0: must be an integer >= 1, or None"),
    ({"sample": {"guidance": float("nan")}}, "sample.guidance = nan: must be a finite number >= 0"),
    ({"sample": {"steps": 0}}, "sample.steps = 0: must be an integer in [1, 1000]"),
    ({"sample": {"seeds": []}}, "sample.seeds = []: must be a non-empty list whose items are each an integer >= 0"),
    ({"sample": {"prompts": "a red circle"}}, "sample.prompts = 'a red circle': must be a non-empty list"),
    ({"unet": {"ch_mults": [1, 0]}}, "unet.ch_mults = [1, 0]: must be a non-empty list"),
    ({"source": {"kind": "s3"}}, "source.kind = 's3': must be one of 'synthetic', 'parquet', 'hf'"),
    ({"filter": {"nsfw_allowed": ["unlikely"]}}, "filter.nsfw_allowed = ['unlikely']: must be a list"),
    ({"download": {"resize_mode": "crop"}}, "download.resize_mode = 'crop': must be one of 'no', 'border'"),
    ({"download": {"watchdog_s": 0}}, "download.watchdog_s = 0: must be a finite number > 0"),
    ({"components": {"max_length": None}}, "components.max_length = None: must be an integer >= 2"),
    ({"data_root": 5}, "profile.data_root = 5: must be a path"),
    ({"train": [1]}, "profile section 'train' must be a mapping"),
])
def test_bad_override_values_are_refused_naming_section_field_value_and_range(overrides, message, tmp_path):
    with pytest.raises(ConfigError) as e:
        get_profile("tiny", tmp_path, overrides)
    assert str(e.value).startswith(message)


def test_good_overrides_are_normalised_not_refused(tmp_path):
    p = get_profile("tiny", tmp_path, {"components": {"vae_fit_lr": 3}, "sample": {"seeds": [5, 6]},
                                       "train": {"max_steps": None, "epochs": 2, "min_snr_gamma": None},
                                       "data_root": str(tmp_path / "elsewhere")})
    assert p.components.vae_fit_lr == 3.0 and type(p.components.vae_fit_lr) is float  # ints widen
    assert p.sample.seeds == (5, 6) and p.data_root == tmp_path / "elsewhere"
    assert (p.train.max_steps, p.train.epochs, p.train.min_snr_gamma) == (None, 2, None)


def test_every_way_of_building_a_config_goes_through_the_same_check():
    message = "train.batch_size = -4: must be an integer >= 1"
    for build in (lambda: TrainConfig(batch_size=-4),
                  lambda: dataclasses.replace(TrainConfig(), batch_size=-4),
                  lambda: Profile.tiny().with_overrides({"train": {"batch_size": -4}}),
                  lambda: check_value(TrainConfig, "batch_size", -4)):
        with pytest.raises(ConfigError, match=message):
            build()


def test_the_presets_and_the_shipped_run_configs_pass_the_check(tmp_path):
    for make in (Profile.tiny, Profile.sd15):
        make(tmp_path)
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())["resources"]["sd"]["config"]
        get_profile(cfg["profile"], tmp_path, cfg.get("overrides"))


def test_every_field_of_every_section_has_a_type_the_check_understands():
    # a field whose annotation the check cannot read would only ever be described as "a value": none is
    from sd_core.config import _describe, _field_specs

    for section in SECTIONS:
        cls = type(getattr(Profile.tiny(), section))
        for name, (hint, limit) in _field_specs(cls).items():
            assert "a value" not in _describe(hint, limit), f"{section}.{name}: {hint}"


def test_a_new_field_is_checked_without_being_registered_anywhere():
    @dataclasses.dataclass(frozen=True)
    class WithNewFields(Checked):  # what another stage adding fields does: annotate, optionally bound
        count: int = 1
        share: float = dataclasses.field(default=0.5, metadata={"min": 0, "lt": 1})
        names: tuple[str, ...] = ("a",)

    assert WithNewFields(names=["b"]).names == ("b",)
    for bad, message in [({"count": "3"}, "WithNewFields.count = '3': must be an integer"),
                         ({"share": 1}, "WithNewFields.share = 1: must be a finite number in [0, 1)"),
                         ({"names": ("a", 2)}, "WithNewFields.names = ('a', 2): must be a list")]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            WithNewFields(**bad)


# --------------------------------------------------------------------------------------- SD_PROFILE
def test_a_bad_sd_profile_is_refused_naming_the_variable(monkeypatch, tmp_path):
    monkeypatch.setenv(PROFILE_ENV, "sd21")
    with pytest.raises(ConfigError, match=r"unknown profile 'sd21' \(from SD_PROFILE\): must be one of sd15, tiny"):
        get_profile(data_root=tmp_path)
    with pytest.raises(ConfigError, match=r"unknown profile 'sd22' \(from profile\)"):
        get_profile("sd22", tmp_path)


def test_a_bad_sd_profile_fails_the_trainer_and_the_code_location_with_the_message(tmp_path):
    env = {**os.environ, PROFILE_ENV: "sd21", "SD_DATA_ROOT": str(tmp_path)}
    res = subprocess.run([sys.executable, "-m", "sd_core.train", "--max-steps", "1"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "sd train: error: unknown profile 'sd21' (from SD_PROFILE)" in res.stderr
    assert "Traceback" not in res.stderr
    res = subprocess.run([sys.executable, "-c", "import sd_assets.definitions"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "ConfigError: unknown profile 'sd21' (from SD_PROFILE)" in res.stderr


# ------------------------------------------------------------------------------------------ `sd train`
@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "-4"], "argument --batch-size: train.batch_size = -4: must be an integer >= 1"),
    (["--max-steps", "abc"], "argument --max-steps: train.max_steps = 'abc': must be an integer >= 1"),
    (["--lr", "nan"], "argument --lr: train.lr = nan: must be a finite number > 0"),
    (["--warmup-steps", "1.5"], "argument --warmup-steps: train.warmup_steps = '1.5': must be an integer >= 0"),
    (["--ema-decay", "1.01"], "argument --ema-decay: train.ema_decay = 1.01: must be a finite number in [0, 1]"),
    (["--min-snr-gamma", "-5"], "argument --min-snr-gamma: train.min_snr_gamma = -5.0: must be a finite number > 0"),
    (["--wandb-mode", "cloud"], "argument --wandb-mode: invalid choice: 'cloud'"),
    (["--stop-after", "0"], "argument --stop-after: must be an integer >= 1, got 0"),
    (["--overrides", '{"train": {"batch_size": -4}}'], "sd train: error: train.batch_size = -4: must be an integer"),
    (["--overrides", '{"train": {"grad_accum": true}}'], "sd train: error: train.grad_accum = True: must be an"),
])
def test_bad_sd_train_flags_fail_in_argparse_with_the_config_message(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        code = sd_main(["train", "--data-root", str(tmp_path), *argv])
        raise SystemExit(code)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_each_train_flag_reports_exactly_what_the_override_path_reports(tmp_path):
    # one check: a numeric flag's error is the config's error for the same value, for every recipe flag
    tiny = Profile.tiny().train
    parser = train_args.build_parser()
    flags = {a.dest: a.type for a in parser._actions
             if a.dest in train_args._TRAIN_FLAGS and callable(a.type) and a.dest != "wandb_project"}
    assert {"batch_size", "lr", "max_steps", "val_share", "ema_decay", "cfg_dropout", "keep_last"} <= set(flags)
    for dest, parse in flags.items():
        with pytest.raises(Exception) as from_flag:
            parse("-7")
        value = -7.0 if isinstance(getattr(tiny, dest), float) else -7  # what the flag parsed "-7" to
        with pytest.raises(ConfigError) as from_override:
            get_profile("tiny", tmp_path, {"train": {dest: value}})
        assert str(from_flag.value) == str(from_override.value), dest


# --------------------------------------------------------------------------------------- `sd generate`
@pytest.fixture
def checkpoint(tmp_path, monkeypatch):
    from sampling_support import save_components, save_tiny_checkpoint, tiny_unet

    root = tmp_path / "data"
    save_components(root)  # VAE: 2 halvings, UNet: 2 levels (1 halving), so images are multiples of 8 px
    ckpt = save_tiny_checkpoint(root / "checkpoints" / "run1", tiny_unet(seed=1), step=5)
    monkeypatch.setenv("SD_DATA_ROOT", str(root))
    monkeypatch.setenv(PROFILE_ENV, "tiny")
    return ckpt


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "argument --steps: sample.steps = 0: must be an integer in [1, 1000]"),
    (["--guidance", "nan"], "argument --guidance: sample.guidance = nan: must be a finite number >= 0"),
    (["--guidance", "inf"], "argument --guidance: sample.guidance = inf: must be a finite number >= 0"),
    (["--guidance", "-1"], "argument --guidance: sample.guidance = -1.0: must be a finite number >= 0"),
    (["--guidance-min-timestep", "1000"],
     "argument --guidance-min-timestep: sample.guidance_min_timestep = 1000: must be an integer in [0, 999]"),
    (["--num-images", "0"], "argument --num-images: must be an integer >= 1, got 0"),
    (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got 0"),
    (["--height", "0"], "argument --height: sample.height = 0: must be an integer >= 1"),
    (["--height", "63"], "argument --height: must be a positive multiple of 8 (the VAE's downsampling 4 x the "
                         "UNet's 2), got 63"),
    (["--width", "36"], "argument --width: must be a positive multiple of 8 (the VAE's downsampling 4 x the "
                        "UNet's 2), got 36"),
])
def test_bad_sd_generate_flags_exit_2_naming_the_flag_and_write_nothing(flags, message, checkpoint, tmp_path,
                                                                        capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        sd_main(["generate", "--checkpoint", str(checkpoint), "--prompt", "a red circle", "--device", "cpu",
                 "--steps", "2", "--out", str(out), *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"sd generate: error: {message}" in err and "Traceback" not in err
    assert not out.exists()


def test_sd_generate_with_a_bad_sd_profile_exits_2_with_the_message(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(PROFILE_ENV, "sd21")
    rc = sd_main(["generate", "--checkpoint", str(checkpoint), "--prompt", "a red circle", "--device", "cpu",
                  "--out", str(tmp_path / "out")])
    assert rc == 2 and "unknown profile 'sd21' (from SD_PROFILE)" in capsys.readouterr().err


def test_sd_generate_accepts_sizes_that_fit_the_vae(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert sd_main(["generate", "--checkpoint", str(checkpoint), "--prompt", "a red circle", "--device", "cpu",
                    "--steps", "1", "--guidance", "0", "--height", "40", "--width", "32", "--out", str(out)]) == 0
    from PIL import Image

    (png,) = out.glob("*.png")
    assert Image.open(png).size == (32, 40)


def test_the_generate_flags_share_the_sample_config_check():
    from sd_core.sampling.generate import _generate_parser

    parser = _generate_parser()
    steps = next(a for a in parser._actions if a.dest == "steps")
    with pytest.raises(Exception) as from_flag:
        steps.type("0")
    with pytest.raises(ConfigError) as from_config:
        SampleConfig(steps=0)
    assert str(from_flag.value) == str(from_config.value)


def test_setting_changes_name_each_changed_field_with_both_values(tmp_path):
    # what `make demo` prints as the reason an asset re-runs (sd_assets.demo.Freshness)
    from sd_core.config import setting_changes

    before = Profile.tiny(tmp_path)
    after = before.with_overrides({"train": {"max_steps": 8, "lr": 1e-3}, "encode": {"batch_size": 4}})
    assert setting_changes(before, after, ("train",)) == ["train.max_steps 1250 -> 8"]  # lr: the same value
    assert setting_changes(before, after, ("unet", "encode.precision")) == []  # batch_size not asked for
    assert setting_changes(before, after, ("encode.batch_size",)) == ["encode.batch_size 64 -> 4"]
    assert setting_changes(before, Profile.tiny(tmp_path / "elsewhere"), SECTIONS) == []  # not the data root
    for bad, message in (("trian", "unknown setting 'trian': a profile section (components, "),
                         ("train.maxsteps", "section 'train' has no field 'maxsteps'")):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            setting_changes(before, after, (bad,))
