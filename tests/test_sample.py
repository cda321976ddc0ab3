"""Sampling: parity with diffusers' StableDiffusionPipeline on our export, determinism, CLI and export.

Tiny real components (tests/sampling_support.py); every test runs a handful of DDIM steps on 8×8 latents.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sampling_support import components, save_components, save_tiny_checkpoint, tiny_unet
from sd_core.config import Profile
from sd_core.sampling.generate import (CompatibilityError, generate, load_for_sampling, make_generators,
                                       sample_settings)

PROMPTS = ["a red circle on a white background", "a blue square on a black background"]
KW = dict(height=32, width=32)

# Pixel parity tolerance against diffusers, in uint8 levels: our UNet and its diffusers conversion agree to
# < 1e-5 (tests/test_unet.py), the rest of the loop is the same arithmetic, so images may differ by at most
# one rounding level; measured: 0.
PIXEL_TOL = 1

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def comps():
    return components(seed=0)


def _arr(img) -> np.ndarray:
    return np.asarray(img).astype(np.int16)


@pytest.fixture(scope="module")
def exported(comps, tmp_path_factory):
    from sd_core.sampling.export import export_pipeline

    out = export_pipeline(**comps, out_dir=tmp_path_factory.mktemp("export") / "pipe")
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out)  # no extra arguments needed
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("eta,negative", [(0.0, None), (1.0, "a green triangle")])
def test_generate_matches_diffusers_pipeline_on_export(comps, exported, eta, negative):
    seeds = [3, 4]
    ours = generate(**comps, prompts=PROMPTS, negative_prompts=negative, steps=6, guidance=7.5, eta=eta,
                    seed=seeds, **KW)
    ref = exported(PROMPTS, negative_prompt=[negative] * 2 if negative else None, num_inference_steps=6,
                   guidance_scale=7.5, eta=eta, generator=[torch.Generator().manual_seed(s) for s in seeds],
                   **KW).images
    for a, b in zip(ours, ref):
        assert a.size == b.size == (32, 32)
        diff = np.abs(_arr(a) - _arr(b)).max()
        assert diff <= PIXEL_TOL, f"max abs pixel difference {diff}"
        assert _arr(a).std() > 1.0  # not a blank image


def test_export_folder_is_a_complete_pipeline(exported, comps):
    from diffusers import DDIMScheduler

    assert isinstance(exported.scheduler, DDIMScheduler)
    cfg = exported.scheduler.config
    assert (cfg.beta_schedule, cfg.steps_offset, cfg.set_alpha_to_one, cfg.timestep_spacing, cfg.clip_sample) == (
        "scaled_linear", 1, False, "leading", False)
    assert exported.safety_checker is None
    exported.scheduler.set_timesteps(30)
    assert exported.scheduler.timesteps[0].item() == 958 and exported.scheduler.timesteps[-1].item() == 1
    assert exported.vae.config.scaling_factor == comps["vae"].config.scaling_factor


def test_seeds_determinism_and_negative_prompt(comps):
    kw = dict(steps=4, **KW)
    a = generate(**comps, prompts=PROMPTS[:1], seed=7, **kw)[0]
    b = generate(**comps, prompts=PROMPTS[:1], seed=7, **kw)[0]
    c = generate(**comps, prompts=PROMPTS[:1], seed=8, **kw)[0]
    n = generate(**comps, prompts=PROMPTS[:1], negative_prompts="a blue square", seed=7, **kw)[0]
    assert np.array_equal(_arr(a), _arr(b))
    assert np.abs(_arr(a) - _arr(c)).mean() > 1.0
    assert np.abs(_arr(a) - _arr(n)).mean() > 0.5
    # an image depends only on its own seed: batched with another prompt, or in batches of one, it is the same
    both = generate(**comps, prompts=[PROMPTS[1], PROMPTS[0]], seed=[1, 7], **kw)
    assert np.array_equal(_arr(both[1]), _arr(a))
    singles = generate(**comps, prompts=[PROMPTS[1], PROMPTS[0]], seed=[1, 7], batch_size=1, **kw)
    assert all(np.array_equal(_arr(x), _arr(y)) for x, y in zip(both, singles))
    # int seed s means seeds s, s+1, ...
    assert [g.initial_seed() for g in make_generators(5, 3)] == [5, 6, 7]


def test_guidance_one_equals_conditional_only(comps):
    # g = 1: eps_u + 1·(eps_c − eps_u) = eps_c, and the unconditional pass is skipped
    a = generate(**comps, prompts=PROMPTS[:1], steps=3, guidance=1.0, seed=0, **KW)[0]
    b = generate(**comps, prompts=PROMPTS[:1], steps=3, guidance=1.0, negative_prompts="a green triangle", seed=0,
                 **KW)[0]
    assert np.array_equal(_arr(a), _arr(b))


def test_guidance_only_from_a_timestep_on(comps):
    # 4 DDIM steps: t = 751, 501, 251, 1. Guidance from 999 guides no step (the image is guidance 1's), from 0
    # every step (the usual CFG image), from 500 the first two: latents unlike both.
    kw = dict(prompts=PROMPTS[:1], steps=4, seed=0, **KW)
    unguided = _arr(generate(**comps, guidance=1.0, **kw)[0])
    full = _arr(generate(**comps, guidance=7.5, **kw)[0])
    assert np.array_equal(_arr(generate(**comps, guidance=7.5, guidance_min_timestep=999, **kw)[0]), unguided)
    assert np.array_equal(_arr(generate(**comps, guidance=7.5, guidance_min_timestep=0, **kw)[0]), full)
    lat = {m: generate(**comps, guidance=7.5, guidance_min_timestep=m, output="latent", **kw) for m in (0, 500, 999)}
    assert (lat[500] - lat[0]).abs().max() > 1e-3 and (lat[500] - lat[999]).abs().max() > 1e-3


def test_incompatible_components_are_clear_errors(comps):
    wrong = dict(comps, unet=tiny_unet(ctx_dim=32))
    with pytest.raises(CompatibilityError, match=r"hidden size is 64 .*\(ctx_dim\) of 32"):
        generate(**wrong, prompts=PROMPTS[:1], steps=1, **KW)
    with pytest.raises(ValueError, match="multiples of 4"):
        generate(**comps, prompts=PROMPTS[:1], steps=1, height=30, width=32)


# ------------------------------------------------------------------------------ checkpoint, CLI, export
@pytest.fixture
def ckpt_root(tmp_path, monkeypatch):
    root = tmp_path / "data"
    comps = save_components(root)
    unet = tiny_unet(seed=1)
    ckpt = save_tiny_checkpoint(root / "checkpoints" / "run1", unet, step=20,
                                lineage={"manifest_hash": "abc123", "scaling_factor": 0.5})
    monkeypatch.setenv("SD_DATA_ROOT", str(root))
    monkeypatch.setenv("SD_PROFILE", "tiny")
    return root, ckpt, comps, unet


def test_load_for_sampling_uses_ema_by_default(ckpt_root):
    from sd_core.training.checkpoint import CheckpointConfig, save_checkpoint

    root, ckpt, comps, unet = ckpt_root
    ema_sd = {k: v + 1.0 for k, v in unet.state_dict().items()}
    ckpt2 = save_checkpoint(root / "checkpoints" / "run2", CheckpointConfig(step=30, unet=unet.config),
                            unet_state=unet.state_dict(), ema_state=ema_sd, train_state={"step": 30})
    b = load_for_sampling(ckpt2, data_root=root, device="cpu")
    assert b.ema and b.step == 30
    name, value = next(iter(ema_sd.items()))
    assert torch.equal(b.unet.state_dict()[name], value)
    live = load_for_sampling(ckpt2, data_root=root, device="cpu", use_ema=False)
    assert torch.equal(live.unet.state_dict()[name], unet.state_dict()[name])
    # run directory → its latest checkpoint; the lineage in config.json comes along
    b1 = load_for_sampling(root / "checkpoints" / "run1", data_root=root, device="cpu")
    assert b1.checkpoint == ckpt and b1.config.manifest_hash == "abc123" and b1.scaling_factor == 0.5


def test_generate_cli_writes_pngs(ckpt_root, tmp_path, capsys):
    from PIL import Image

    from sd_core.cli import main

    root, ckpt, comps, unet = ckpt_root
    batch = tmp_path / "prompts.txt"
    batch.write_text("# my prompts\na red circle on a white background\n\na green square on a black background\n")
    out = tmp_path / "out"
    rc = main(["generate", "--checkpoint", str(ckpt), "--batch", str(batch), "--steps", "3", "--seed", "11",
               "--height", "32", "--width", "32", "--out", str(out), "--device", "cpu"])
    assert rc == 0
    files = sorted(out.glob("*.png"))
    assert [f.name[:12] for f in files] == ["0000_seed11_", "0001_seed12_"]
    # the CLI image equals generate() with the same seed, the checkpoint's EMA weights and the profile's sampler
    # (tiny: CFG 5 from t = 500 on, eta 1) where no flag overrides it
    settings = {**sample_settings(Profile.tiny(root).sample), "steps": 3, **KW}
    assert (settings["eta"], settings["guidance_min_timestep"]) == (1.0, 500)
    direct = generate(unet, comps["text_encoder"], comps["tokenizer"], comps["vae"], PROMPTS[:1], seed=11,
                      scaling_factor=0.5, **settings)[0]
    assert np.array_equal(_arr(Image.open(files[0])), _arr(direct))


def test_generate_cli_errors(ckpt_root, tmp_path, capsys):
    from sd_core.cli import main
    from sd_core.training.checkpoint import CheckpointConfig, save_checkpoint

    root, ckpt, comps, unet = ckpt_root
    rc = main(["generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "a red circle", "--device", "cpu"])
    assert rc == 2 and "checkpoint not found" in capsys.readouterr().err

    # weights whose shapes do not match the config they claim: the error names the expected shapes
    sd = dict(unet.state_dict())
    key = "input_blocks.0.0.weight"
    sd[key] = torch.zeros(8, 4, 3, 3)
    bad = save_checkpoint(root / "checkpoints" / "bad", CheckpointConfig(step=1, unet=unet.config),
                          unet_state=sd, ema_state=sd, train_state={})
    rc = main(["generate", "--checkpoint", str(bad), "--prompt", "a red circle", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and key in err and "(8, 4, 3, 3)" in err and "expected (16, 4, 3, 3)" in err

    # a checkpoint trained for another text encoder width than the profile's components
    other = tiny_unet(ctx_dim=32)
    mism = save_tiny_checkpoint(root / "checkpoints" / "other", other, step=1)
    rc = main(["generate", "--checkpoint", str(mism), "--prompt", "a red circle", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "does not fit profile 'tiny'" in err and "ctx_dim" in err and "64" in err


def test_export_cli_loads_in_diffusers(ckpt_root, tmp_path):
    from diffusers import StableDiffusionPipeline

    from sd_core.cli import main

    root, ckpt, comps, unet = ckpt_root
    out = tmp_path / "exported"
    assert main(["export-diffusers", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae.config.scaling_factor == 0.5 and pipe.tokenizer.model_max_length == 16
    ref = pipe(PROMPTS[:1], num_inference_steps=3, generator=[torch.Generator().manual_seed(0)], **KW).images[0]
    ours = generate(unet, comps["text_encoder"], comps["tokenizer"], comps["vae"], PROMPTS[:1], steps=3, seed=0,
                    scaling_factor=0.5, max_length=16, **KW)[0]
    assert np.abs(_arr(ref) - _arr(ours)).max() <= PIXEL_TOL
