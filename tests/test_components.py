"""Frozen components: the tiny build (tokenizer, text encoder, fitted VAE) and the one loading path, which
also loads production-shaped (SD 1.5) components from local directories without a hub."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from sd_core.encoding.components import (
    BUILD_FILE,
    build_tiny_components,
    build_tiny_tokenizer,
    component_sources,
    components_digest,
    components_version,
    load_components,
    tokenize,
)
from sd_core.config import Profile
from sd_core.data import synthetic as S
from latents_support import CLIP_VIT_L14_TEXT, COLOUR_FLOOR, PSNR_FLOOR_DB, SD_VAE_FT_MSE, install_components


def test_tiny_build_reconstructs_and_records_itself(tiny_built, tiny_profile, tmp_path):
    info = json.loads((tiny_built / BUILD_FILE).read_text())
    rec = info["reconstruction"]
    assert rec["psnr"] >= PSNR_FLOOR_DB and rec["colour_accuracy"] >= COLOUR_FLOOR, rec
    assert 0.0 <= rec["colour_accuracy"] <= 1.0 and set(rec["per_colour_accuracy"]) <= set(S.COLORS)
    assert info["fit"]["steps"] > 0 and info["params"]["vae"] > 0 and info["vocab_size"] == len(S.vocabulary()) + 3
    assert sorted(p.name for p in tiny_built.iterdir()) == [BUILD_FILE, "text_encoder", "tokenizer", "vae"]
    assert not [p for p in tiny_built.parent.iterdir() if p.name.endswith(".tmp")]  # built in a temp dir, renamed

    # the scaling factor from the fit makes scaled latents of fresh renders have std ≈ 1
    p = tiny_profile(tmp_path / "data")
    install_components(tiny_built, p)
    c = load_components(p)
    assert c.scaling_factor == pytest.approx(info["scaling_factor"]) and c.scaling_factor != 1.0
    from sd_core.encoding.vae_fit import synthetic_batch

    batch = synthetic_batch(48, 64, random.Random(99))
    z = c.encode_images(batch.images)
    assert z.shape == (48, 4, 16, 16) and 0.75 < float(z.std()) < 1.33
    # same settings → the existing build is reused (no second fit), digest unchanged
    again = build_tiny_components(p, log=None)
    assert again["digest"] == info["digest"] == components_digest(p)
    # the config-only version ignores the wall-clock budget but follows the build settings
    assert components_version(p) == components_version(p.with_overrides({"components": {"vae_fit_seconds": 1}}))
    assert components_version(p) != components_version(p.with_overrides({"components": {"seed": 1}}))


def test_tiny_tokenizer_and_text_encoder(tiny_built, tiny_profile, tmp_path):
    p = tiny_profile(tmp_path / "data")
    install_components(tiny_built, p)
    c = load_components(p)
    assert all(not t.requires_grad for m in (c.vae, c.text_encoder) for t in m.parameters())
    assert not c.vae.training and not c.text_encoder.training
    ids = c.tokenize(["a red circle on a white background", "A GREEN  square", "",
                      "a purple hexagon " + "word " * 40])
    L = p.components.max_length
    assert ids.shape == (4, L) and ids.dtype == torch.int64
    bos, eos = c.tokenizer.bos_token_id, c.tokenizer.eos_token_id
    assert c.tokenizer.pad_token_id == eos  # SD 1.x convention: pad with EOS
    assert ids[0, 0] == bos and ids[0, 8] == eos and (ids[0, 9:] == eos).all()  # 7 words
    words = c.tokenizer.convert_ids_to_tokens(ids[0, 1:8].tolist())
    assert words == "a red circle on a white background".split()
    assert c.tokenizer.convert_ids_to_tokens(ids[1, 1:4].tolist()) == ["a", "green", "square"]  # lower-cased
    assert ids[2, 0] == bos and (ids[2, 1:] == eos).all()  # the empty prompt
    assert ids[3, -1] == eos and c.tokenizer.unk_token_id in ids[3].tolist()  # truncated, unknown words
    ctx = c.encode_text(ids)
    assert ctx.shape == (4, L, p.unet.ctx_dim) and torch.isfinite(ctx).all()
    # deterministic: a second load of the same directory gives the same context
    c2 = load_components(p)
    torch.testing.assert_close(c2.encode_text(ids), ctx)
    # distinct words give distinct embeddings (the UNet can tell colours apart)
    two = c.encode_text(c.tokenize(["a red circle", "a blue circle"]))
    assert (two[0, 2] - two[1, 2]).abs().max() > 1e-3


def test_tokenizer_builder_keeps_vocabulary_order():
    tok = build_tiny_tokenizer(["zebra", "apple"], 6)
    assert tok.convert_tokens_to_ids(["zebra", "apple"]) == [3, 4]
    assert tokenize(tok, ["apple zebra"], 6).tolist() == [[0, 4, 3, 1, 1, 1]]


def test_missing_tiny_build_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="frozen_components"):
        load_components(Profile.tiny(tmp_path))


def test_tiny_components_load_in_a_diffusers_pipeline(tiny_built, tiny_profile, tmp_path):
    """The tokenizer/text encoder/VAE directories load with diffusers' StableDiffusionPipeline.from_pretrained
    (what an exported model does), next to a small diffusers UNet."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    p = tiny_profile(tmp_path / "data")
    install_components(tiny_built, p)
    c = load_components(p)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=p.unet.ctx_dim,
                                attention_head_dim=4, norm_num_groups=32)
    pipe = StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe", safety_checker=None)
    assert loaded.vae.config.scaling_factor == pytest.approx(c.scaling_factor)
    out = loaded("a red circle on a white background", num_inference_steps=2, height=64, width=64,
                 output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()


@pytest.fixture(scope="module")
def sd15_dirs(tmp_path_factory):
    """Randomly initialised AutoencoderKL / CLIPTextModel with the real SD 1.5 component configs, saved with
    save_pretrained (fp16 on disk to halve the write), plus a word-level tokenizer with model_max_length 77."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("sd15-components")
    torch.manual_seed(0)
    AutoencoderKL(**SD_VAE_FT_MSE).half().save_pretrained(root / "vae")
    CLIPTextModel(CLIPTextConfig(**CLIP_VIT_L14_TEXT)).half().save_pretrained(root / "text_encoder")
    build_tiny_tokenizer(S.vocabulary(), 77).save_pretrained(root / "tokenizer")
    return root


def test_sd15_loading_path_from_local_directories(sd15_dirs, tmp_path):
    p = Profile.sd15(tmp_path).with_overrides({"components": {
        "vae": str(sd15_dirs / "vae"), "text_encoder": str(sd15_dirs / "text_encoder"),
        "tokenizer": str(sd15_dirs / "tokenizer")}})
    assert component_sources(p).vae == str(sd15_dirs / "vae")
    c = load_components(p, dtype=torch.float32)
    assert c.scaling_factor == pytest.approx(0.18215) and c.downsample == 8 and c.context_dim == 768
    assert c.param_counts()["vae"] == 83_653_863 and c.param_counts()["text_encoder"] == 123_060_480
    ids = c.tokenize(["a red circle on a white background"])
    assert ids.shape == (1, 77)
    assert c.encode_text(ids).shape == (1, 77, 768)
    # 512 px → 4×64×64 through the loaded VAE's architecture; shapes propagated on the meta device (the
    # numerics at 512 px cost ~1 TFLOP per image on CPU: tests/test_encode.py has that as a slow test)
    vae = c.vae.to("meta")
    z = vae.encode(torch.empty(2, 3, 512, 512, device="meta")).latent_dist.mean
    assert tuple(z.shape) == (2, 4, 64, 64)
    assert tuple(vae.decode(z).sample.shape) == (2, 3, 512, 512)
    assert components_digest(p) != ""  # local directories are fingerprinted
