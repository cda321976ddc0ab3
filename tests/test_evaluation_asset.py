"""`checkpoint_eval` through Dagster: a short real training run (torchrun via Pipes, 3 checkpoints) gives 3
materialisations in step order with every metric; a second materialisation adds nothing; resuming the run with
more steps scores only the new steps; `sd generate --which best` uses the scores."""

from __future__ import annotations

import json
import math

import dagster as dg
import pytest

from sampling_support import tiny_vae
from sd_assets.assets.evaluation import checkpoint_eval
from sd_assets.assets.training import unet_checkpoint
from sd_assets.resources import SDConfig
from sd_core.config import Profile
from sd_core.sampling.generate import generate_main
from train_support import make_tiny_data

RUN = "eval-run"
TRAIN = {"batch_size": 8, "max_steps": 6, "warmup_steps": 1, "log_every": 2, "checkpoint_every": 2, "val_every": 6,
         "val_share": 0.2, "keep_last": 10, "nproc_per_node": 1}
OVERRIDES = {
    "unet": {"ch": 16, "ch_mults": [1, 2], "res_blks": 1, "attn_lvls": [2], "heads": 2, "norm_groups": 8},
    "train": TRAIN,
    "sample": {"steps": 2, "height": 32, "width": 32, "seeds": [0, 1]},
}
EVAL_CONFIG = {"seeds_per_prompt": 1, "eps_buckets": 10, "batch_size": 36}
EVERY_METRIC = (
    ["val_eps_mse", "val_samples", "val_manifest_hash"]
    + [f"val_eps_mse/t{lo:03d}-{lo + 99:03d}" for lo in range(0, 1000, 100)]
    + [f"{kind}/{a}" for kind in ("accuracy", "chance", "ceiling/true_renders", "ceiling/vae")
       for a in ("colour", "shape", "background", "whole")]
    + ["grid", "grid_path", "checkpoint_path", "checkpoint_step", "run_dir", "best_checkpoint", "best_step",
       "best_value", "best_metric", "lineage/manifest_hash", "lineage/shards", "lineage/filter", "lineage/source"]
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> Profile:
    """Text components and a small latent cache (tests/train_support.py) plus a tiny random VAE."""
    p = Profile.tiny(tmp_path_factory.mktemp("eval") / "data").with_overrides(OVERRIDES)
    make_tiny_data(p)
    tiny_vae().save_pretrained(p.components_dir / "vae")
    (p.components_dir / "build.json").write_text('{"profile": "tiny", "note": "test components"}')
    return p


def _materialize(instance, profile: Profile, assets, max_steps: int = 6):
    overrides = {**OVERRIDES, "train": {**TRAIN, "max_steps": max_steps}}
    ops = {"checkpoint_eval": {"config": EVAL_CONFIG}}
    if unet_checkpoint in assets:
        ops["unet_checkpoint"] = {"config": {"run_name": RUN}}
    result = dg.materialize(assets, instance=instance, run_config={"ops": ops}, resources={
        "sd": SDConfig(profile="tiny", data_root=str(profile.data_root), overrides=overrides)})
    assert result.success
    return [m.metadata for m in result.asset_materializations_for_node("checkpoint_eval")]


def _v(md, key):
    return getattr(md[key], "value", md[key])


def test_every_checkpoint_is_scored_once_in_step_order(profile, tmp_path, capsys):
    run_dir = (profile.checkpoints_dir / RUN).resolve()
    with dg.instance_for_test() as instance:
        first = _materialize(instance, profile, [unet_checkpoint, checkpoint_eval])
        assert [_v(md, "checkpoint_step") for md in first] == [2, 4, 6]
        for md in first:
            missing = [k for k in EVERY_METRIC if k not in md]
            assert not missing, missing
            assert math.isfinite(_v(md, "val_eps_mse")) and _v(md, "accuracy/whole") <= 1.0
            assert _v(md, "ceiling/true_renders/shape") >= 0.99 and _v(md, "chance/whole") == round(1 / 36, 4)
            assert _v(md, "lineage/shards") == ["00000", "00001"]
            assert _v(md, "checkpoint_path") == str(run_dir / f"step_{_v(md, 'checkpoint_step'):08d}")
            assert _v(md, "grid").startswith("![step ")
            assert (profile.samples_dir / RUN / f"grid_step_{_v(md, 'checkpoint_step'):08d}.png").is_file()
        events = instance.fetch_materializations(dg.AssetKey("checkpoint_eval"), limit=10).records
        assert [_v(e.asset_materialization.metadata, "checkpoint_step") for e in reversed(events)] == [2, 4, 6]
        assert isinstance(_v(first[-1], "val_eps_mse/t900-999"), float)  # numeric: the asset's Plots tab

        # deterministic and nothing new: a second materialisation emits nothing
        assert _materialize(instance, profile, [checkpoint_eval]) == []

        # the run resumed to 10 steps: only steps 8 and 10 are scored; the best covers all five steps
        more = _materialize(instance, profile, [unet_checkpoint, checkpoint_eval], max_steps=10)
        assert [_v(md, "checkpoint_step") for md in more] == [8, 10]
        scores = json.loads((run_dir / "eval_scores.json").read_text())
        assert [s["step"] for s in scores["steps"]] == [2, 4, 6, 8, 10]
        best = scores["best"]
        assert _v(more[-1], "best_step") == best["step"]
        assert _v(more[-1], "best_checkpoint") == str(run_dir / f"step_{best['step']:08d}")
        assert best["metrics"]["accuracy/whole"] == max(s["metrics"]["accuracy/whole"] for s in scores["steps"])

    # `sd generate --which best` samples from that checkpoint
    capsys.readouterr()
    rc = generate_main(["--checkpoint", str(run_dir), "--which", "best", "--prompt", "a red circle on a white "
                        "background", "--steps", "2", "--out", str(tmp_path / "out"), "--data-root",
                        str(profile.data_root), "--height", "32", "--width", "32"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert f"step_{best['step']:08d}" in out.err and len(list((tmp_path / "out").glob("*.png"))) == 1


def test_generate_which_best_without_scores_names_the_file(profile, tmp_path, capsys):
    run = tmp_path / "unscored"
    run.mkdir()
    rc = generate_main(["--checkpoint", str(run), "--which", "best", "--prompt", "a red circle", "--out",
                        str(tmp_path / "o")])
    assert rc == 2 and "eval_scores.json not found" in capsys.readouterr().err


def test_no_checkpoint_fails_clearly(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with dg.instance_for_test() as instance, pytest.raises(dg.Failure, match="no checkpoint to evaluate"):
        dg.materialize([checkpoint_eval], instance=instance,
                       resources={"sd": SDConfig(profile="tiny", data_root=str(empty))})


def test_the_sd15_metric_path_scores_a_checkpoint(profile, tmp_path):
    # a non-synthetic source takes the CLIP path: held-out captions generated, compared with the held-out
    # latents decoded by the VAE (a small random CLIP folder stands in for openai/clip-vit-large-patch14)
    from sampling_support import sd15_like_checkpoint
    from sd_core.evaluation.checkpoint_eval import EvalSettings, Evaluator

    sd15_like, clip_dir, ckpt = sd15_like_checkpoint(profile, tmp_path)
    evaluator = Evaluator(sd15_like, EvalSettings(clip_model=str(clip_dir), clip_prompts=4, eps_buckets=2), ckpt)
    metrics = evaluator.score(ckpt).metrics
    assert metrics["clip_n"] == 4 and math.isfinite(metrics["clip_score"]) and math.isfinite(metrics["clip_fd"])
    assert "accuracy/whole" not in metrics and math.isfinite(metrics["val_eps_mse/t500-999"])
