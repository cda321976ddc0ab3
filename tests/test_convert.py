"""sd_core.model.convert: numerical parity with diffusers' UNet2DConditionModel (the oracle), exact round trips,
CompVis checkpoint import, and loud errors on mismatched keys or unsupported configs."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel  # the oracle: a project dependency, never skipped

from sd_core.config import UNetConfig
from sd_core.model.convert import (
    StateDictMismatchError,
    diffusers_config,
    from_compvis,
    from_diffusers,
    load_compvis_state_dict,
    to_compvis_state_dict,
    to_diffusers,
    unet_config_from_diffusers,
    unet_state_dict_from_diffusers,
    unet_state_dict_to_diffusers,
)
from sd_core.model.unet import UNetModel
from unet_support import inputs, randomize_

pytestmark = pytest.mark.usefixtures("one_thread")

# A second architecture that differs from tiny in widths, depth, attention levels, norm groups, heads,
# transformer depth and context width; attention on the first and the deepest level.
OTHER = UNetConfig(
    in_ch=4, out_ch=3, ch=16, ch_mults=(1, 3, 2, 2), res_blks=2, attn_lvls=(1, 2, 4), heads=2, ctx_dim=24,
    transformer_depth=2, norm_groups=8,
)
# The tiny profile's UNet before 8×8 latents: no attention at the first level, as SD 1.x's last level has none.
PLAIN_FIRST_LEVEL = UNetConfig(ch=24, ch_mults=(1, 2, 4), res_blks=1, attn_lvls=(2, 3), heads=4, ctx_dim=64,
                               norm_groups=8)
CONFIGS = {"tiny": UNetConfig.tiny(), "other": OTHER, "plain_first_level": PLAIN_FIRST_LEVEL}


def assert_same_state_dict(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", CONFIGS)
def test_ours_to_diffusers_parity_and_exact_round_trip(name):
    config = CONFIGS[name]
    ours = randomize_(UNetModel(config)).eval()
    theirs = to_diffusers(ours)
    assert isinstance(theirs, UNet2DConditionModel) and not theirs.training
    x, t, ctx = inputs(config, tokens=7)
    with torch.no_grad():
        eps = ours(x, t, ctx)
        ref = theirs(x, t, encoder_hidden_states=ctx).sample
    assert eps.abs().max() > 0.1  # a meaningful comparison, not zeros against zeros
    assert (eps - ref).abs().max() < 1e-5
    back = from_diffusers(theirs)
    assert back.config == config
    assert_same_state_dict(back.state_dict(), ours.state_dict())


@pytest.mark.parametrize("name", CONFIGS)
def test_diffusers_to_ours_parity(name):
    config = CONFIGS[name]
    torch.manual_seed(0)
    theirs = randomize_(UNet2DConditionModel(**diffusers_config(config)), seed=1).eval()
    ours = from_diffusers(theirs)
    assert ours.config == config
    x, t, ctx = inputs(config, tokens=7, seed=2)
    with torch.no_grad():
        ref = theirs(x, t, encoder_hidden_states=ctx).sample
        eps = ours(x, t, ctx)
    assert ref.abs().max() > 0.1
    assert (eps - ref).abs().max() < 1e-5
    assert_same_state_dict(to_diffusers(ours).state_dict(), theirs.state_dict())


def test_sd15_config_and_key_map_match_diffusers_on_meta_device():
    config = UNetConfig.sd15()
    with torch.device("meta"):
        ours = UNetModel(config)
        theirs = UNet2DConditionModel(**diffusers_config(config))
    mapped = unet_state_dict_to_diffusers(ours.state_dict(), config)
    ref = theirs.state_dict()
    assert sorted(mapped) == sorted(ref)
    assert all(mapped[k].shape == ref[k].shape for k in ref)
    # the published SD 1.5 config (runwayml/stable-diffusion-v1-5 unet/config.json) maps to our preset
    sd15_json = dict(
        sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
        freq_shift=0, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, block_out_channels=[320, 640, 1280, 1280],
        layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32,
        norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
    )
    assert unet_config_from_diffusers(sd15_json) == config


@pytest.mark.parametrize("name", CONFIGS)
def test_compvis_names_agree_with_diffusers_own_ldm_converter(name):
    """diffusers' convert_ldm_unet_checkpoint, fed our weights under CompVis keys, yields the same diffusers
    state dict as our mapping: an independent check that our names are CompVis'."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = CONFIGS[name]
    ours = randomize_(UNetModel(config))
    converted = convert_ldm_unet_checkpoint(to_compvis_state_dict(ours), diffusers_config(config))
    mapped = unet_state_dict_to_diffusers(ours.state_dict(), config)
    assert sorted(converted) == sorted(mapped)
    assert all(torch.equal(converted[k], mapped[k]) for k in mapped)


def test_compvis_checkpoint_import_round_trip():
    config = UNetConfig.tiny()
    ours = randomize_(UNetModel(config))
    unet_sd = to_compvis_state_dict(ours)
    assert all(k.startswith("model.diffusion_model.") for k in unet_sd)
    ema = {"model_ema.diffusion_model" + k[len("model.diffusion_model.") :].replace(".", ""): v * 2
           for k, v in unet_sd.items()}
    other = {"first_stage_model.encoder.conv_in.weight": torch.zeros(1), "cond_stage_model.x": torch.zeros(1),
             "betas": torch.zeros(1000), "model_ema.decay": torch.tensor(0.9999)}
    ckpt = {"state_dict": {**unet_sd, **ema, **other}, "global_step": 10}  # an ldm Lightning checkpoint
    assert_same_state_dict(from_compvis(ckpt, config).state_dict(), ours.state_dict())
    assert_same_state_dict(load_compvis_state_dict(ckpt["state_dict"], config), ours.state_dict())
    ema_sd = load_compvis_state_dict(ckpt, config, use_ema=True)
    assert all(torch.equal(ema_sd[k], v * 2) for k, v in ours.state_dict().items())
    # plain UNet keys, and wrapper prefixes from DDP and torch.compile
    plain = ours.state_dict()
    for prefix in ("", "module.", "_orig_mod.", "module._orig_mod."):
        sd = {prefix + k: v for k, v in plain.items()}
        assert_same_state_dict(load_compvis_state_dict(sd, config), plain)
    half = from_compvis(unet_sd, config, dtype=torch.float16)
    assert next(half.parameters()).dtype == torch.float16


def test_unknown_and_missing_keys_are_listed():
    config = UNetConfig.tiny()
    sd = dict(UNetModel(config).state_dict())
    del sd["out.2.bias"]
    sd["input_blocks.1.0.bogus.weight"] = torch.zeros(1)
    with pytest.raises(StateDictMismatchError) as err:
        load_compvis_state_dict(sd, config)
    msg = str(err.value)
    assert "1 missing, 1 unexpected" in msg and "out.2.bias" in msg and "input_blocks.1.0.bogus.weight" in msg
    assert err.value.missing == ["out.2.bias"] and err.value.unexpected == ["input_blocks.1.0.bogus.weight"]

    dsd = unet_state_dict_to_diffusers(UNetModel(config).state_dict(), config)
    del dsd["conv_in.weight"]
    dsd["mid_block.extra"] = torch.zeros(1)
    with pytest.raises(StateDictMismatchError, match="conv_in.weight") as err:
        unet_state_dict_from_diffusers(dsd, config)
    assert "mid_block.extra" in str(err.value)

    # a checkpoint of another architecture: the SD 1.5 keys it lacks are listed
    with pytest.raises(StateDictMismatchError, match="missing"):
        load_compvis_state_dict(to_compvis_state_dict(UNetModel(config)))


def test_unsupported_diffusers_configs_are_refused_with_the_reason():
    base = diffusers_config(UNetConfig.tiny())
    cases = {
        "use_linear_projection": dict(use_linear_projection=True),  # SD 2.x
        "attention_head_dim": dict(attention_head_dim=[2, 4, 8]),  # per-level heads
        "up_block_types": dict(up_block_types=("UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D")),
        "class_embed_type": dict(class_embed_type="timestep"),
        "down_block_types": dict(down_block_types=("DownBlock2D", "SimpleCrossAttnDownBlock2D", "DownBlock2D")),
    }
    for field, change in cases.items():
        with pytest.raises(ValueError, match=field):
            unet_config_from_diffusers({**base, **change})
