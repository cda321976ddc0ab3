"""`make demo`: the example run configs, the stage plan, and the whole graph materialised through the
`dagster` CLI (shortened by configs/demo-fast.yaml) into a temporary data root, then reused."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
import yaml

from e2e_support import ROOT, dagster, env_for
from sd_assets.demo import Freshness, plan_stages
from sd_assets.run_config import deep_merge, load_run_config, sd_resource_config
from sd_core.config import Profile, get_profile

CONFIGS = ROOT / "configs"


def _profile_from(path, data_root):
    cfg = load_run_config([path])["resources"]["sd"]["config"]
    return get_profile(cfg["profile"], data_root, cfg.get("overrides"))


def test_example_configs_spell_out_their_profiles(tmp_path):
    # The values shown in tiny.yaml and sd15.yaml are the profiles' own: editing one changes one thing.
    assert _profile_from(CONFIGS / "tiny.yaml", tmp_path) == Profile.tiny(tmp_path)
    assert _profile_from(CONFIGS / "sd15.yaml", tmp_path) == Profile.sd15(tmp_path)
    fast = _profile_from(CONFIGS / "demo-fast.yaml", tmp_path)
    assert fast.name == "tiny" and fast.train.max_steps < 50 and fast.source.synthetic_rows <= 200


def test_example_configs_are_valid_run_config():
    from sd_assets.definitions import defs

    jobs = [defs.resolve_job_def(j.name) for j in defs.jobs] + [defs.resolve_implicit_global_asset_job_def()]
    for name in ("tiny", "sd15", "demo-fast"):
        run_config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
        for job in jobs:
            assert dg.validate_run_config(job, run_config) is not None, (name, job.name)


def test_stages_follow_the_graph():
    from sd_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    stages = plan_stages(graph)
    order = [k for s in stages for k in s.keys]
    assert sorted(order) == sorted(graph.materializable_asset_keys)
    seen: set = set()
    for stage in stages:
        for key in stage.keys:
            assert (graph.get(key).partitions_def is not None) == stage.partitioned
            assert all(p in seen or p in stage.keys for p in graph.get(key).parent_keys if p in order), key
        seen |= set(stage.keys)
    assert not stages[0].partitioned


@dataclass
class DemoRun:
    """One ``python -m sd_assets.demo`` into a fresh data root: how it was started and what it printed."""

    data_root: Path
    cmd: list[str]
    env: dict[str, str]
    first: subprocess.CompletedProcess[str]
    first_s: float

    def instance(self) -> dg.DagsterInstance:
        return dg.DagsterInstance.from_config(str(self.data_root / "dagster_home"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> DemoRun:
    """The whole graph materialised once (what costs), shared by the tests below."""
    data_root = tmp_path_factory.mktemp("demo") / "data"
    cmd = [sys.executable, "-m", "sd_assets.demo", "-c", str(CONFIGS / "demo-fast.yaml"), "--data-root", str(data_root)]
    env = env_for(data_root / "dagster_home", data_root)
    t0 = time.monotonic()
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    first_s = time.monotonic() - t0
    assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-3000:]
    return DemoRun(data_root, cmd, env, first, first_s)


def test_the_demo_materializes_every_asset(demo):
    assert "materializing" in demo.first.stdout and "done in" in demo.first.stdout
    from sd_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    with demo.instance() as instance:
        shards = instance.get_dynamic_partitions("shards")
        assert len(shards) >= 2  # configs/demo-fast.yaml: 43 rows in shards of 25
        for key in graph.materializable_asset_keys:
            if graph.get(key).partitions_def is None:
                assert instance.get_latest_materialization_event(key) is not None, key
            else:
                assert instance.get_materialized_partitions(key) == set(shards), key
        # the shards ran in one process (sd_assets.materialize_batch) but each is its own successful run
        shard_runs = [r for r in instance.get_runs() if "dagster/partition" in r.tags]
        assert sorted(r.tags["dagster/partition"] for r in shard_runs) == sorted(shards)
        assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in shard_runs)
    for j, shard in enumerate(shards, 1):  # each shard announced as it starts and as it ends
        assert re.search(rf"\[2/3\] shard {shard} \({j}/{len(shards)}\) materializing image_shards,latents",
                         demo.first.stdout), demo.first.stdout
        assert re.search(rf"\[2/3\] shard {shard} \({j}/{len(shards)}\) done in \d+ s", demo.first.stdout)


def test_a_batch_refuses_a_partition_that_is_not_a_shard(demo):
    # `python -m sd_assets.materialize_batch` (the demo's shard stage) on a key no shard has: a one-line refusal
    # naming the key and a non-zero exit, before any run starts
    with demo.instance() as instance:
        runs_before = len(instance.get_runs())
    config = demo.data_root / "dagster_home" / "demo_run_config.yaml"
    done = subprocess.run([sys.executable, "-m", "sd_assets.materialize_batch", "--select", "latents", "-c",
                           str(config), "--partition", "99999"], cwd=ROOT, env=demo.env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr[-3000:]
    assert "sd-batch: partition 99999 failed: DagsterInvalidSubsetError:" in done.stdout, done.stdout
    assert "Traceback" not in done.stdout + done.stderr
    with demo.instance() as instance:
        assert len(instance.get_runs()) == runs_before


def test_the_demo_ends_with_the_grid_and_its_score(demo):
    # the closing lines: where the grid is and its prompt-adherence score
    out = demo.first.stdout
    grid = next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("sample_grid: "))
    assert Path(grid).is_file() and Path(grid).is_relative_to(demo.data_root), grid
    assert "prompt adherence:" in out
    # and the final and best checkpoints' accuracies from checkpoint_eval
    assert "checkpoint_eval: " in out and "final step 4: colour " in out and "whole prompt" in out, out[-3000:]
    assert "best  step 4" in out and "ceiling, true renders: colour 100%" in out


def test_the_demo_says_what_it_trained_and_how_long_each_stage_took(demo):
    # steps and samples (what decides the model, the same on any machine), then the seconds and the CPU
    out = demo.first.stdout
    table = out[out.index("what ran ("):]
    assert f"{os.cpu_count()} CPUs" in table.splitlines()[0]
    assert "VAE fit 4 steps" in table  # configs/demo-fast.yaml: vae_fit_steps 4
    assert "UNet 4 steps x 16 = 64 samples" in table and "2 process(es)" in table  # 4 steps, 2 × batch 8
    assert re.search(r"\[shard\] image_shards,latents +\d+ s +\d[\d,]* images; \d[\d,]* latents", table), table


def test_the_demo_prints_final_and_best_checkpoint_accuracies():
    from sd_assets.demo import evaluation_lines, evaluation_summary

    def step(n, whole, best):
        md = {"checkpoint_step": n, "run_dir": dg.MetadataValue.path("/r"), "best_step": best,
              "best_metric": "accuracy/whole"}
        for prefix, v in (("accuracy/", whole), ("chance/", 0.25), ("ceiling/true_renders/", 1.0)):
            md.update({f"{prefix}{a}": v for a in ("colour", "shape", "background", "whole")})
        return md

    with dg.instance_for_test() as instance:
        assert evaluation_summary(instance) is None and evaluation_lines(None) == []
        for n, whole, best in ((2, 0.5, 2), (4, 0.75, 4), (6, 0.6, 4)):
            instance.report_runless_asset_event(dg.AssetMaterialization("checkpoint_eval", metadata=step(n, whole, best)))
        lines = evaluation_lines(evaluation_summary(instance))
    assert lines[0] == "checkpoint_eval: /r (best by accuracy/whole)"
    assert lines[1] == "  final step 6: colour 60%, shape 60%, background 60%, whole prompt 60%"
    assert lines[2] == "  best  step 4: colour 75%, shape 75%, background 75%, whole prompt 75%"
    assert lines[3] == "  chance: colour 25%, shape 25%, background 25%, whole 25%"
    assert "  ceiling, true renders: colour 100%, shape 100%, background 100%, whole 100%" in lines


def test_a_second_demo_reuses_what_is_materialized(demo):
    t0 = time.monotonic()
    second = subprocess.run(demo.cmd, cwd=ROOT, env=demo.env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-6000:] + second.stderr[-3000:]
    assert "materializing" not in second.stdout and "up to date" in second.stdout, second.stdout
    assert time.monotonic() - t0 < demo.first_s


def test_the_readme_command_re_encodes_one_shard(demo):
    # README.md (Operations), one shard re-encoded (the demo's run config has the data root and overrides):
    #   dagster asset materialize -m sd_assets.definitions --select latents --partition KEY -c CONFIG
    with demo.instance() as instance:
        shard = instance.get_dynamic_partitions("shards")[0]
    config = demo.data_root / "dagster_home" / "demo_run_config.yaml"
    dagster("asset", "materialize", "-m", "sd_assets.definitions", "--select", "latents", "--partition", shard,
            "-c", str(config), env=demo.env)
    with demo.instance() as instance:
        runs = instance.get_runs(limit=1)
        assert runs[0].tags.get("dagster/partition") == shard and runs[0].status == dg.DagsterRunStatus.SUCCESS


def test_a_rerun_upstream_re_runs_its_children_in_the_same_stage(demo):
    # The instance is asked before a stage starts, so it cannot know that the stage's own checkpoint is about to
    # change: a re-trained unet_checkpoint must take checkpoint_eval and sample_grid with it (else the old
    # grid and scores stand as the new checkpoint's), and a re-downloaded shard its latents.
    from sd_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    versions = {spec.key: spec.code_version for spec in defs.resolve_all_asset_specs()}
    first, shard_stage, last = plan_stages(graph)
    with demo.instance() as instance:
        shard = instance.get_dynamic_partitions("shards")[0]
        fresh = Freshness(instance, graph, versions)
        assert fresh.stage_todo(last.keys, None) == [] and fresh.stage_todo(shard_stage.keys, shard) == []
        fresh.ran.add((dg.AssetKey("latents"), shard))
        assert [(k.to_user_string(), why) for k, why in fresh.stage_todo(last.keys, None)] == [
            ("unet_checkpoint", "latents re-ran"), ("checkpoint_eval", "unet_checkpoint re-runs"),
            ("sample_grid", "unet_checkpoint re-runs")]
        # a new VAE default changes frozen_components' code version (tests/test_components.py: the version
        # follows the VAE's settings), which re-runs it, as a new encode version re-runs a shard's latents
        old = {**versions, dg.AssetKey("frozen_components"): "1-an0ldversion"}
        todo = Freshness(instance, graph, old).stage_todo(first.keys, None)
        assert todo[0][0] == dg.AssetKey("frozen_components") and todo[0][1].startswith("code version 1-"), todo


def _fresh_for(demo: DemoRun, instance: dg.DagsterInstance, *configs: Path, **overrides: dict) -> Freshness:
    """How `python -m sd_assets.demo -c CONFIGS` (plus ``overrides``) would judge the demo's data root."""
    from sd_assets.definitions import defs

    run_config = deep_merge(load_run_config(configs), {"resources": {"sd": {"config": {"overrides": overrides}}}})
    sd_resource_config(run_config)["data_root"] = str(demo.data_root)
    return Freshness.of(instance, defs, run_config)


def _todo(fresh: Freshness, stage, partition: str | None) -> list[tuple[str, str]]:
    return [(k.to_user_string(), why) for k, why in fresh.stage_todo(stage.keys, partition)]


def test_other_settings_re_run_what_they_change_and_what_follows(demo):
    # `make demo CONFIG=configs/demo-fast.yaml`, then `make demo` into the same data root: the 4-step model
    # (and the 4-step VAE fit, and its shards) must not pass for the real demo's because the code is the same
    from sd_assets.definitions import defs

    first, shard_stage, last = plan_stages(defs.resolve_asset_graph())
    with demo.instance() as instance:
        shard = instance.get_dynamic_partitions("shards")[0]
        same = _fresh_for(demo, instance, CONFIGS / "demo-fast.yaml")
        assert [_todo(same, s, p) for s, p in ((first, None), (shard_stage, shard), (last, None))] == [[], [], []]
        # one sampler setting: only the grid; one training setting: the checkpoint and what scores it
        steps = _fresh_for(demo, instance, CONFIGS / "demo-fast.yaml", sample={"steps": 6})
        assert _todo(steps, last, None) == [("sample_grid", "settings changed: sample.steps 4 -> 6")]
        lr = _fresh_for(demo, instance, CONFIGS / "demo-fast.yaml", train={"lr": 0.002}, encode={"batch_size": 4})
        assert _todo(lr, shard_stage, shard) == []  # the encoder's batch size decides how fast, not what
        assert _todo(lr, last, None) == [("unet_checkpoint", "settings changed: train.lr 0.001 -> 0.002"),
                                         ("checkpoint_eval", "unet_checkpoint re-runs"),
                                         ("sample_grid", "unet_checkpoint re-runs")]
        real = _fresh_for(demo, instance, CONFIGS / "tiny.yaml")
        assert dict(_todo(real, first, None)) == {
            "frozen_components": "settings changed: components.vae_fit_steps 4 -> 3200",
            "laion_metadata": "settings changed: source.synthetic_rows 60 -> 2000",
            "filtered_metadata": "settings changed: download.shard_size 25 -> 500"}
        # the shard's rows stay (its part is cut once; filtered_metadata adds parts for new rows), its images
        # too; its latents come from the new VAE
        assert _todo(real, shard_stage, shard) == [
            ("latents", "settings changed: components.vae_fit_steps 4 -> 3200")]
        assert [k for k, _ in _todo(real, last, None)] == ["unet_checkpoint", "checkpoint_eval", "sample_grid"]


def test_every_declared_setting_names_a_profile_setting(tmp_path):
    # a typo in an asset's settings_read would only surface when `make demo` compares: refused here instead
    from sd_assets.definitions import defs
    from sd_assets.resources import declared_settings
    from sd_core.config import setting_changes

    declared = {s.key.to_user_string(): declared_settings(s.metadata) for s in defs.resolve_all_asset_specs()}
    assert declared["unet_checkpoint"] == ("unet", "train") and declared["checkpoint_eval"] == ()
    for names in declared.values():  # an unknown section or field raises ConfigError, naming it
        setting_changes(Profile.tiny(tmp_path), Profile.sd15(tmp_path), names)


BAD_CONFIGS = {  # file text -> what the refusal says after the file's name
    "resources:\n  sd:\n    config:\n      overrides:\n        train:\n          max_steps: -3\n":
        "train.max_steps = -3: must be an integer >= 1",
    "resources: [1, 2\n": "not valid YAML at line 2, column 1",
    "- 1\n- 2\n": "a run config is a YAML mapping (resources: sd: config: ...), got list",
    "resources:\n  sd: 5\n": "resources.sd must be a mapping, got int",
}


@pytest.mark.parametrize("text", BAD_CONFIGS, ids=range(len(BAD_CONFIGS)))
def test_a_demo_config_that_does_not_load_is_refused_before_anything_starts(text, tmp_path, capsys):
    from sd_assets.demo import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    assert main(["-c", str(CONFIGS / "demo-fast.yaml"), "-c", str(bad), "--data-root", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sd-pipeline demo: ") and str(bad) in err and BAD_CONFIGS[text] in err, err
    assert not (tmp_path / "data").exists()  # nothing created, nothing started


@pytest.mark.parametrize("text", BAD_CONFIGS, ids=range(len(BAD_CONFIGS)))
def test_a_shard_batch_refuses_the_same_configs_before_any_run(text, tmp_path, capsys, monkeypatch):
    from sd_assets import materialize_batch

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))  # an instance would be made here: none must be
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    assert materialize_batch.main(["--select", "latents", "-c", str(bad), "--partition", "00000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sd-batch: {bad}: ") and BAD_CONFIGS[text] in err, err
    assert not (tmp_path / "home").exists()


def test_a_demo_refuses_a_config_file_it_cannot_read_or_a_data_root_it_cannot_create(tmp_path, capsys):
    from sd_assets.demo import main

    assert main(["-c", str(tmp_path / "absent.yaml")]) == 2
    assert f"{tmp_path / 'absent.yaml'}: cannot read it (No such file or directory)" in capsys.readouterr().err
    listed = tmp_path / "listed.yaml"  # the config's data root (no --data-root flag to take its place)
    listed.write_text("resources:\n  sd:\n    config:\n      data_root: [1]\n")
    assert main(["-c", str(listed)]) == 2
    assert "resources.sd.config.data_root must be a path, got list" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["-c", str(CONFIGS / "demo-fast.yaml"), "--data-root", str(blocker / "data")]) == 1
    assert f"cannot create {blocker / 'data' / 'dagster_home'}: Not a directory" in capsys.readouterr().err


def test_a_second_demo_on_the_same_data_root_is_refused_while_the_first_runs(tmp_path):
    # while one demo runs (here: this test holds its lock), another on the same data root is refused at once,
    # naming the holder, and starts nothing
    from sd_assets.demo import demo_lock, ensure_dagster_home

    home = ensure_dagster_home(tmp_path / "data" / "dagster_home")
    cmd = [sys.executable, "-m", "sd_assets.demo", "-c", str(CONFIGS / "demo-fast.yaml"), "--data-root",
           str(tmp_path / "data")]
    with demo_lock(home):
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stdout + done.stderr
    assert f"another demo (pid {os.getpid()}) is running on {tmp_path / 'data'}" in done.stderr
    assert sorted(p.name for p in home.iterdir()) == ["dagster.yaml", "demo.lock"]  # no run, no run config
    with demo_lock(home):  # released by the holder: the next one takes it
        pass


def test_the_components_code_version_follows_the_vae_settings():
    from sd_assets.definitions import defs
    from sd_core.encoding.versions import components_version

    spec = next(s for s in defs.resolve_all_asset_specs() if s.key == dg.AssetKey("frozen_components"))
    assert spec.code_version == f"1-{components_version(get_profile())}"
