"""The `sample_grid` asset through Dagster on a tiny checkpoint, and the prompt-adherence score."""

from __future__ import annotations

import base64
import io

import dagster as dg
import numpy as np
import pytest
from PIL import Image

from sampling_support import save_components, save_tiny_checkpoint, tiny_unet
from sd_core.sampling.adherence import adherence, dominant_colour, prompt_colour


# ------------------------------------------------------------------------------------------ adherence
def _synthetic_set(noise: float = 0.0, seed: int = 0):
    from sd_core.data.synthetic import BACKGROUNDS, COLORS, SHAPES, caption, render_shape

    rng = np.random.default_rng(seed)
    images, prompts, colours = [], [], []
    for shape in SHAPES:
        for colour in COLORS:
            for bg in BACKGROUNDS:
                for s in range(2):
                    img = render_shape(shape, colour, bg, 64, seed=s)
                    if noise:
                        a = np.asarray(img).astype(float) * rng.uniform(0.6, 1.0)  # darker, duller
                        a = np.clip(a + rng.normal(0, noise, a.shape), 0, 255).astype(np.uint8)
                        img = Image.fromarray(a)
                    images.append(img)
                    prompts.append(caption(shape, colour, bg))
                    colours.append(colour)
    return images, prompts, colours


def test_adherence_is_one_on_rendered_synthetic_images():
    images, prompts, _ = _synthetic_set()
    r = adherence(images, prompts)
    assert r.n == len(images) and r.score == 1.0 and r.chance == 0.25
    noisy, prompts, _ = _synthetic_set(noise=15.0)
    assert adherence(noisy, prompts).score >= 0.95


def test_adherence_is_zero_for_wrong_colours():
    from sd_core.data.synthetic import COLORS

    names = list(COLORS)
    images, prompts, colours = _synthetic_set()
    wrong = [p.replace(c, names[(names.index(c) + 1) % len(names)], 1) for p, c in zip(prompts, colours)]
    r = adherence(images, wrong)
    assert r.score == 0.0 and not r.above_chance


def test_adherence_edge_cases():
    blank = Image.new("RGB", (64, 64), (128, 128, 128))
    assert dominant_colour(blank) is None  # nothing differs from the background: a miss
    grey_blob = blank.copy()
    grey_blob.paste((30, 30, 30), (20, 20, 40, 40))  # achromatic shape: no colour
    assert dominant_colour(grey_blob) is None
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert dominant_colour(noise) is None  # no plain background: an untrained model's output scores a miss
    two = blank.copy()
    two.paste((230, 25, 25), (8, 8, 30, 56))
    two.paste((30, 60, 235), (34, 8, 56, 56))  # half red, half blue: no dominant colour
    assert dominant_colour(two) is None
    assert prompt_colour("A Red circle on a white background") == "red"
    assert prompt_colour("a photograph of an astronaut") is None
    r = adherence([blank], ["an astronaut"])
    assert r.n == 0 and np.isnan(r.score)
    with pytest.raises(ValueError):
        adherence([blank], [])


# -------------------------------------------------------------------------------------------- asset
@pytest.fixture
def tiny_checkpoint(tmp_path):
    root = tmp_path / "data"
    save_components(root)
    lineage = {"manifest_hash": "f00dfeed", "shards": ["00000", "00001"], "filter": {"min_aesthetic": 6.5},
               "source": {"kind": "synthetic"}, "scaling_factor": 0.5}
    ckpt = save_tiny_checkpoint(root / "checkpoints" / "run-a", tiny_unet(seed=2), step=40, lineage=lineage)
    return root, ckpt


def _materialize(root, instance, **sample):
    from sd_assets.assets.sampling import sample_grid
    from sd_assets.resources import SDConfig

    overrides = {"sample": {"steps": 3, "height": 32, "width": 32, "seeds": [0, 1], **sample}}
    return dg.materialize([sample_grid], instance=instance,
                          resources={"sd": SDConfig(profile="tiny", data_root=str(root), overrides=overrides)})


@pytest.mark.usefixtures("one_thread")
def test_sample_grid_materializes_with_image_and_lineage(tiny_checkpoint):
    root, ckpt = tiny_checkpoint
    with dg.instance_for_test() as instance:
        result = _materialize(root, instance)
        assert result.success
        mats = result.asset_materializations_for_node("sample_grid")
        md = mats[0].metadata
        # the grid as an inline PNG in markdown
        text = md["grid"].value
        assert text.startswith("![sample grid](data:image/png;base64,")
        png = base64.b64decode(text.split("base64,", 1)[1].rstrip(")"))
        grid = Image.open(io.BytesIO(png))
        assert grid.format == "PNG"
        # 4 prompts × 2 seeds of 32 px, plus a label column
        assert grid.size[1] == 4 * 32 and grid.size[0] > 2 * 32
        path = root / "samples" / "run-a" / "grid.png"
        assert path.exists() and md["grid_path"].value == str(path)
        assert (root / "samples" / "run-a" / "grid_step_00000040.png").exists()
        assert md["checkpoint_path"].value == str(ckpt) and md["checkpoint_step"].value == 40
        assert md["ema_weights"].value is True
        # lineage from the checkpoint's config.json
        assert md["lineage/manifest_hash"].value == "f00dfeed"
        assert md["lineage/shards"].value == ["00000", "00001"]
        assert md["lineage/filter"].value == {"min_aesthetic": 6.5}
        # adherence (random weights: whatever the score, it is reported with its chance level)
        assert 0.0 <= md["adherence"].value <= 1.0 and md["adherence_chance"].value == 0.25
        checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
        assert checks["grid_exists"].passed
        adh = checks["adherence_above_chance"]
        assert adh.severity == dg.AssetCheckSeverity.WARN
        assert adh.passed == (md["adherence"].value > 0.25)


@pytest.mark.usefixtures("one_thread")
def test_sample_grid_prefers_upstream_materialization_and_fails_clearly(tiny_checkpoint, tmp_path):
    root, ckpt = tiny_checkpoint
    other = save_tiny_checkpoint(root / "checkpoints" / "run-b", tiny_unet(seed=3), step=7)
    with dg.instance_for_test() as instance:
        # the upstream asset's materialization names run-a's checkpoint, though run-b is newer on disk
        instance.report_runless_asset_event(dg.AssetMaterialization(
            "unet_checkpoint", metadata={"checkpoint_path": dg.MetadataValue.path(str(ckpt))}))
        result = _materialize(root, instance, seeds=[0])
        md = result.asset_materializations_for_node("sample_grid")[0].metadata
        assert md["checkpoint_path"].value == str(ckpt)
    with dg.instance_for_test() as instance:  # no upstream event: the newest run on disk
        md = _materialize(root, instance, seeds=[0]).asset_materializations_for_node("sample_grid")[0].metadata
        assert md["checkpoint_path"].value == str(other)
    empty = tmp_path / "empty"
    save_components(empty)
    with dg.instance_for_test() as instance:
        with pytest.raises(dg.Failure, match="no checkpoint found"):
            _materialize(empty, instance)
