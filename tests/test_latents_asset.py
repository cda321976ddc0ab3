"""The `frozen_components` and `latents` assets through Dagster, the VAE-change staleness and the
`latents_refresh` schedule."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from dagster._core.definitions.data_version import StaleStatus
from dagster._utils.test.data_versions import get_stale_status_resolver

from sd_assets.assets.data import filtered_metadata, image_shards, laion_metadata
from sd_assets.assets.latents import build_latents_asset, frozen_components
from sd_core.encoding.versions import latents_code_version
from sd_assets.jobs import encode_job
from sd_assets.resources import SDConfig
from sd_assets.schedules import latents_refresh
from sd_core.config import Profile
from sd_core.encoding.latent_cache import MANIFEST, LatentDataset, read_manifest, read_shard_table, shard_paths
from latents_support import OVERRIDES, install_components, write_synthetic_tar
from dagster_support import step_error_text


def _materialize(assets, instance, overrides, root, **kw):
    res = dg.materialize(assets, instance=instance, raise_on_error=True,
                         resources={"sd": SDConfig(data_root=str(root), overrides=overrides)}, **kw)
    assert res.success
    return res


def _mat_metadata(res, key="latents"):
    mats = res.asset_materializations_for_node(key)
    return {k: v.value for k, v in mats[-1].metadata.items()}


def test_frozen_components_tiny_reuses_the_build(tiny_built, tiny_profile, tmp_path):
    p = tiny_profile(tmp_path / "data")
    install_components(tiny_built, p)
    with dg.instance_for_test() as instance:
        res = _materialize([frozen_components], instance, OVERRIDES, p.data_root)
        md = _mat_metadata(res, "frozen_components")
        build = json.loads((p.components_dir / "build.json").read_text())
        assert md["digest"] == build["digest"] and md["psnr_db"] == pytest.approx(build["reconstruction"]["psnr"], abs=0.01)
        assert {"colour_accuracy", "background_accuracy", "vae_params", "text_encoder_params", "scaling_factor",
                "fit_steps"} <= set(md)
        checks = res.get_asset_check_evaluations()
        assert [c.check_name for c in checks] == ["vae_reconstructs"]


# The shards the VAE-change tests encode with VAE A: shard -> (latents written, undecodable samples skipped).
ENCODED = {"00000": (6, 0), "00001": (6, 1)}
LATENTS = dg.AssetKey("latents")


@dataclass
class VaeChange:
    """One instance and data root in which `ENCODED` went through Dagster with VAE A; 00002 has images but
    no latents, 00003 no images yet. Production-style configuration: the VAE is a *configured source* (a
    local directory here); VAE B is A with another scaling factor, so changing it needs no new fit."""

    root: Path
    base: Profile
    instance: dg.DagsterInstance
    vae_a: Path
    vae_b: Path
    captions: dict[str, list[str]] = field(default_factory=dict)
    encoded: dict[str, Any] = field(default_factory=dict)  # shard -> the run that encoded it with VAE A

    def overrides(self, vae: Path) -> dict[str, Any]:
        return {"components": {"build_tiny": False, "vae": str(vae),
                               "text_encoder": str(self.base.components_dir / "text_encoder"),
                               "tokenizer": str(self.base.components_dir / "tokenizer")}}

    def profile(self, vae: Path) -> Profile:
        return self.base.with_overrides(self.overrides(vae))

    def latents(self, vae: Path) -> dg.AssetsDefinition:
        """The ``latents`` asset of a code location loaded with ``vae`` configured."""
        return build_latents_asset(self.profile(vae))

    def materialize(self, vae: Path, **kw: Any):
        return _materialize([frozen_components, self.latents(vae)], self.instance, self.overrides(vae), self.root,
                            **kw)

    def scheduled(self, vae: Path) -> dict[str, dg.RunRequest]:
        """The ``latents_refresh`` tick's run requests by shard, with ``vae`` configured."""
        sd = SDConfig(data_root=str(self.root), overrides=self.overrides(vae))
        repo = dg.Definitions(assets=[frozen_components, self.latents(self.vae_a)], schedules=[latents_refresh],
                              jobs=[encode_job], resources={"sd": sd}).get_repository_def()
        # Exited here, not left to the garbage collector: `context.instance` enters a second DagsterInstance
        # (from the ref), which points Dagster's defs-state ContextVar at its storage until the context exits.
        # Closed by a later GC, it resets that ContextVar to this test's storage in whatever test runs then,
        # whose next materialize fails with "Attempted to resolve undefined DagsterInstance weakref" (seen once).
        with dg.build_schedule_context(instance=self.instance, resources={"sd": sd}, repository_def=repo) as ctx:
            return {r.partition_key: r for r in (latents_refresh.evaluate_tick(ctx).run_requests or [])}

    def stale_status(self, vae: Path):
        return get_stale_status_resolver(self.instance, [frozen_components, self.latents(vae)])


class TestVaeChange:
    """Shards encoded through Dagster; a VAE change marks them stale and the schedule requests exactly the
    stale and missing shards (with versioned run keys); re-encoding one shard leaves the other's files alone.

    The tests share one instance (class-scoped fixtures, one encode of each shard) and run in file order: the
    ones before the first that asks for `reencoded` see the state right after encoding with VAE A."""

    @pytest.fixture(scope="class")
    def change(self, tiny_built, tiny_profile, tmp_path_factory) -> Iterator[VaeChange]:
        root = tmp_path_factory.mktemp("vae-change") / "data"
        base = tiny_profile(root)
        install_components(tiny_built, base)
        vae_a, vae_b = root / "vaes" / "a", root / "vaes" / "b"
        shutil.copytree(base.components_dir / "vae", vae_a)
        shutil.copytree(base.components_dir / "vae", vae_b)
        cfg = json.loads((vae_b / "config.json").read_text())
        cfg["scaling_factor"] = cfg["scaling_factor"] * 1.1
        (vae_b / "config.json").write_text(json.dumps(cfg))
        with dg.instance_for_test() as instance:
            change = VaeChange(root, base, instance, vae_a, vae_b)
            for i, key in enumerate(["00000", "00001", "00002"]):
                samples = write_synthetic_tar(base.shards_dir / f"{key}.tar", 6 + i, seed=10 + i,
                                              corrupt=(2,) if i == 1 else ())
                change.captions[key] = [s["caption"] for s in samples if s["image"] is not None]
            instance.add_dynamic_partitions("shards", ["00000", "00001", "00002", "00003"])
            change.materialize(vae_a, selection="frozen_components")
            for key in ENCODED:
                change.encoded[key] = change.materialize(vae_a, selection="latents", partition_key=key)
            yield change

    @pytest.fixture(scope="class")
    def reencoded(self, change) -> tuple[dict[Path, int], str]:
        """00000 re-encoded with VAE B; returns 00001's file mtimes and 00000's content hash from before."""
        p1 = shard_paths(change.base.latents_dir, "00001")
        before = {f: f.stat().st_mtime_ns for f in (p1.latents, p1.tokens, p1.table)}
        old_hash = read_manifest(change.base.latents_dir)["00000"]["hash"]
        change.materialize(change.vae_b, selection="latents", partition_key="00000")
        return before, old_hash

    def test_the_two_vaes_are_two_code_versions(self, change):
        assert latents_code_version(change.profile(change.vae_a)) != latents_code_version(change.profile(change.vae_b))

    def test_each_shard_reports_its_counts_and_passes_the_stats_check(self, change):
        for key, (n, skipped) in ENCODED.items():
            res = change.encoded[key]
            md = _mat_metadata(res)
            assert (md["encoded"], md["skipped"]) == (n, skipped) and md["latent_shape"] == [4, 8, 8]
            assert 0.5 <= md["latent_std"] <= 1.5 and md["images_per_s"] > 0
            (check,) = res.get_asset_check_evaluations()
            assert check.check_name == "latent_stats_sane" and check.passed

    def test_the_cache_holds_every_decodable_sample_with_its_caption(self, change):
        ds = LatentDataset(change.base.latents_dir)
        assert len(ds) == 12 and ds.latent_shape == (4, 8, 8)
        assert ds[0][1].shape == (change.base.components.max_length,)
        for key in ENCODED:
            assert read_shard_table(change.base.latents_dir, key).column("caption").to_pylist() == change.captions[key]

    def test_with_the_current_vae_the_schedule_requests_only_the_missing_shard(self, change):
        assert sorted(change.scheduled(change.vae_a)) == ["00002"]

    def test_a_vae_change_marks_the_encoded_shards_stale(self, change):
        # Dagster: under the old definitions both encoded partitions are fresh; with the new VAE they are stale
        fresh, stale = change.stale_status(change.vae_a), change.stale_status(change.vae_b)
        for key in ENCODED:
            assert fresh.get_status(LATENTS, key) == StaleStatus.FRESH
            assert stale.get_status(LATENTS, key) == StaleStatus.STALE
            causes = stale.get_stale_causes(LATENTS, key)
            assert any("code version" in c.reason for c in causes)

    def test_after_a_vae_change_the_schedule_requests_every_shard_with_images(self, change):
        reqs = change.scheduled(change.vae_b)
        assert sorted(reqs) == ["00000", "00001", "00002"]
        assert all(latents_code_version(change.profile(change.vae_b)) in r.run_key for r in reqs.values())
        assert reqs["00000"].tags["sd/encode_reason"].startswith("stale")
        assert reqs["00002"].tags["sd/encode_reason"] == "missing"

    def test_reencoding_one_shard_leaves_the_other_shards_files_alone(self, change, reencoded):
        before, old_hash = reencoded
        assert {f: f.stat().st_mtime_ns for f in before} == before
        m = read_manifest(change.base.latents_dir)
        assert m["00000"]["hash"] != old_hash and m["00000"]["code_version"] == latents_code_version(
            change.profile(change.vae_b))
        vae_b_scaling = json.loads((change.vae_b / "config.json").read_text())["scaling_factor"]
        assert m["00000"]["scaling_factor"] == pytest.approx(vae_b_scaling)

    def test_a_reencoded_shard_is_fresh_and_no_longer_requested(self, change, reencoded):
        assert sorted(change.scheduled(change.vae_b)) == ["00001", "00002"]
        assert change.stale_status(change.vae_b).get_status(LATENTS, "00000") == StaleStatus.FRESH

    def test_reencoding_again_rewrites_the_same_content(self, change, reencoded):
        first = read_manifest(change.base.latents_dir)["00000"]["hash"]
        change.materialize(change.vae_b, selection="latents", partition_key="00000")
        assert read_manifest(change.base.latents_dir)["00000"]["hash"] == first


def test_latents_needs_the_shard_tar(tiny_built, tiny_profile, tmp_path):
    p = tiny_profile(tmp_path / "data")
    install_components(tiny_built, p)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("shards", ["00009"])
        res = dg.materialize([build_latents_asset(p)], instance=instance, partition_key="00009", raise_on_error=False,
                             resources={"sd": SDConfig(data_root=str(p.data_root), overrides=OVERRIDES)})
        assert not res.success


# One real img2dataset shard: 60 synthetic rows → one filtered part, downloaded over HTTP from the loopback server.
ONE_SHARD = {"source": {"synthetic_rows": 60}, "download": {"shard_size": 50, "thread_count": 4, "timeout_s": 20}}




def test_a_truncated_shard_tar_fails_latents_and_leaves_the_previous_cache_untouched(tiny_built, tiny_profile,
                                                                                   tmp_path):
    p = tiny_profile(tmp_path / "data")
    install_components(tiny_built, p)
    overrides = {**OVERRIDES, **ONE_SHARD}
    with dg.instance_for_test() as instance:
        _materialize([laion_metadata, filtered_metadata], instance, overrides, p.data_root)
        (key,) = instance.get_dynamic_partitions("shards")
        _materialize([image_shards], instance, overrides, p.data_root, partition_key=key)
        tar = p.shards_dir / f"{key}.tar"
        written = json.loads((p.shards_dir / f"{key}_stats.json").read_text())["successes"]
        good = _materialize([build_latents_asset(p)], instance, overrides, p.data_root, partition_key=key)
        assert _mat_metadata(good)["encoded"] == written > 20
        files = shard_paths(p.latents_dir, key)
        cache = [files.latents, files.tokens, files.table, p.latents_dir / MANIFEST]
        before = {f: f.read_bytes() for f in cache}

        with open(tar, "r+b") as f:  # a copy cut short: half the bytes
            f.truncate(tar.stat().st_size // 2)
        res = dg.materialize([build_latents_asset(p)], instance=instance, partition_key=key, raise_on_error=False,
                             resources={"sd": SDConfig(data_root=str(p.data_root), overrides=overrides)})
        assert not res.success
        text = step_error_text(res)
        read = re.search(rf"shard {key}: {re.escape(str(tar))} holds (\d+) readable sample", text)
        assert read and int(read.group(1)) < written and f"but img2dataset wrote {written} into it" in text
        assert "truncated or damaged" in text and f"{key}_stats.json" in text
        assert {f: f.read_bytes() for f in cache} == before  # latents, tokens, table and manifest, byte for byte
        assert instance.get_latest_materialization_event(LATENTS).run_id == good.run_id  # none recorded since


def test_definitions_wire_latents():
    from sd_assets.definitions import defs

    spec = defs.get_assets_def("latents")
    key = dg.AssetKey("latents")
    assert spec.group_names_by_key[key] == "encoding"
    assert {d for d in spec.asset_deps[key]} == {dg.AssetKey("image_shards"), dg.AssetKey("frozen_components")}
    assert spec.code_versions_by_key[key] == latents_code_version(Profile.tiny())
    assert isinstance(spec.automation_conditions_by_key[key], dg.AutomationCondition)
    assert defs.get_assets_def("frozen_components").group_names_by_key[dg.AssetKey("frozen_components")] == "components"
