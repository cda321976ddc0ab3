"""The `frozen_components` and `latents` assets through Dagster, the VAE-change staleness and the
`latents_refresh` schedule."""

from __future__ import annotations

import json
import shutil

import dagster as dg
import pytest
from dagster._core.definitions.data_version import StaleStatus
from dagster._utils.test.data_versions import get_stale_status_resolver

from sd_assets.assets.latents import build_latents_asset, frozen_components
from sd_core.encoding.encode import latents_code_version
from sd_assets.jobs import encode_job
from sd_assets.resources import SDConfig
from sd_assets.schedules import latents_refresh
from sd_core.config import Profile
from sd_core.encoding.latent_cache import LatentDataset, read_manifest, read_shard_table, shard_paths
from tests.latents_support import OVERRIDES, build_session_components, install_components, tiny_profile, \
    write_synthetic_tar


@pytest.fixture(scope="session")
def tiny_built(tmp_path_factory):
    return build_session_components(tmp_path_factory.getbasetemp() / "latents-tiny")


def _materialize(assets, instance, overrides, root, **kw):
    res = dg.materialize(assets, instance=instance, raise_on_error=True,
                         resources={"sd": SDConfig(data_root=str(root), overrides=overrides)}, **kw)
    assert res.success
    return res


def _mat_metadata(res, key="latents"):
    mats = res.asset_materializations_for_node(key)
    return {k: v.value for k, v in mats[-1].metadata.items()}


def test_frozen_components_tiny_reuses_the_build(tiny_built, tmp_path):
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


def test_latents_through_dagster_stale_on_vae_change_and_schedule(tiny_built, tmp_path):
    """Two shards encoded through Dagster; a VAE change marks them stale and the schedule requests exactly the
    stale and missing shards (with versioned run keys); re-encoding one shard leaves the other's files alone."""
    root = tmp_path / "data"
    base = tiny_profile(root)
    install_components(tiny_built, base)
    # Production-style configuration: the VAE is a *configured source* (a local directory here). Two
    # directories = two VAEs (B is A with another scaling factor), so changing it needs no new fit.
    vae_a, vae_b = root / "vaes" / "a", root / "vaes" / "b"
    shutil.copytree(base.components_dir / "vae", vae_a)
    shutil.copytree(base.components_dir / "vae", vae_b)
    cfg = json.loads((vae_b / "config.json").read_text())
    cfg["scaling_factor"] = cfg["scaling_factor"] * 1.1
    (vae_b / "config.json").write_text(json.dumps(cfg))

    def overrides(vae):
        return {"components": {"build_tiny": False, "vae": str(vae),
                               "text_encoder": str(base.components_dir / "text_encoder"),
                               "tokenizer": str(base.components_dir / "tokenizer")}}

    prof_a, prof_b = base.with_overrides(overrides(vae_a)), base.with_overrides(overrides(vae_b))
    assert latents_code_version(prof_a) != latents_code_version(prof_b)
    latents_a, latents_b = build_latents_asset(prof_a), build_latents_asset(prof_b)

    caps = {}
    for i, key in enumerate(["00000", "00001", "00002"]):
        samples = write_synthetic_tar(base.shards_dir / f"{key}.tar", 6 + i, seed=10 + i, corrupt=(2,) if i == 1 else ())
        caps[key] = [s["caption"] for s in samples if s["image"] is not None]

    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("shards", ["00000", "00001", "00002", "00003"])  # 00003: no images yet
        _materialize([frozen_components, latents_a], instance, overrides(vae_a), root, selection="frozen_components")
        for key, (n, skipped) in {"00000": (6, 0), "00001": (6, 1)}.items():
            res = _materialize([frozen_components, latents_a], instance, overrides(vae_a), root,
                               selection="latents", partition_key=key)
            md = _mat_metadata(res)
            assert (md["encoded"], md["skipped"]) == (n, skipped) and md["latent_shape"] == [4, 16, 16]
            assert 0.5 <= md["latent_std"] <= 1.5 and md["images_per_s"] > 0
            (check,) = res.get_asset_check_evaluations()
            assert check.check_name == "latent_stats_sane" and check.passed

        ds = LatentDataset(base.latents_dir)
        assert len(ds) == 12 and ds.latent_shape == (4, 16, 16) and ds[0][1].shape == (base.components.max_length,)
        for key in ("00000", "00001"):
            assert read_shard_table(base.latents_dir, key).column("caption").to_pylist() == caps[key]

        def scheduled(profile_overrides):
            sd = SDConfig(data_root=str(root), overrides=profile_overrides)
            repo = dg.Definitions(assets=[frozen_components, latents_a], schedules=[latents_refresh],
                                  jobs=[encode_job], resources={"sd": sd}).get_repository_def()
            ctx = dg.build_schedule_context(instance=instance, resources={"sd": sd}, repository_def=repo)
            data = latents_refresh.evaluate_tick(ctx)
            return {r.partition_key: r for r in (data.run_requests or [])}

        # current VAE: only the shard with images but no latents
        assert sorted(scheduled(overrides(vae_a))) == ["00002"]

        # Dagster: under the old definitions both encoded partitions are fresh; with the new VAE they are stale
        fresh = get_stale_status_resolver(instance, [frozen_components, latents_a])
        stale = get_stale_status_resolver(instance, [frozen_components, latents_b])
        for key in ("00000", "00001"):
            assert fresh.get_status(dg.AssetKey("latents"), key) == StaleStatus.FRESH
            assert stale.get_status(dg.AssetKey("latents"), key) == StaleStatus.STALE
            causes = stale.get_stale_causes(dg.AssetKey("latents"), key)
            assert any("code version" in c.reason for c in causes)

        reqs = scheduled(overrides(vae_b))
        assert sorted(reqs) == ["00000", "00001", "00002"]
        assert all(latents_code_version(prof_b) in r.run_key for r in reqs.values())
        assert reqs["00000"].tags["sd/encode_reason"].startswith("stale")
        assert reqs["00002"].tags["sd/encode_reason"] == "missing"

        # re-encode 00000 with VAE B: 00001's files are untouched, and the schedule now wants exactly 00001, 00002
        p1 = shard_paths(base.latents_dir, "00001")
        before = {f: f.stat().st_mtime_ns for f in (p1.latents, p1.tokens, p1.table)}
        old_hash = read_manifest(base.latents_dir)["00000"]["hash"]
        _materialize([frozen_components, latents_b], instance, overrides(vae_b), root, selection="latents",
                     partition_key="00000")
        assert {f: f.stat().st_mtime_ns for f in before} == before
        m = read_manifest(base.latents_dir)
        assert m["00000"]["hash"] != old_hash and m["00000"]["code_version"] == latents_code_version(prof_b)
        assert m["00000"]["scaling_factor"] == pytest.approx(cfg["scaling_factor"])
        assert sorted(scheduled(overrides(vae_b))) == ["00001", "00002"]
        stale = get_stale_status_resolver(instance, [frozen_components, latents_b])
        assert stale.get_status(dg.AssetKey("latents"), "00000") == StaleStatus.FRESH

        # idempotent: running the partition again rewrites the same content
        _materialize([frozen_components, latents_b], instance, overrides(vae_b), root, selection="latents",
                     partition_key="00000")
        assert read_manifest(base.latents_dir)["00000"]["hash"] == m["00000"]["hash"]


def test_latents_needs_the_shard_tar(tiny_built, tmp_path):
    p = tiny_profile(tmp_path / "data")
    install_components(tiny_built, p)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("shards", ["00009"])
        res = dg.materialize([build_latents_asset(p)], instance=instance, partition_key="00009", raise_on_error=False,
                             resources={"sd": SDConfig(data_root=str(p.data_root), overrides=OVERRIDES)})
        assert not res.success


def test_definitions_wire_latents():
    from sd_assets.definitions import defs

    spec = defs.get_assets_def("latents")
    key = dg.AssetKey("latents")
    assert spec.group_names_by_key[key] == "encoding"
    assert {d for d in spec.asset_deps[key]} == {dg.AssetKey("image_shards"), dg.AssetKey("frozen_components")}
    assert spec.code_versions_by_key[key] == latents_code_version(Profile.tiny())
    assert isinstance(spec.automation_conditions_by_key[key], dg.AutomationCondition)
    assert defs.get_assets_def("frozen_components").group_names_by_key[dg.AssetKey("frozen_components")] == "components"
