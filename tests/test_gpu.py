"""Checks that need a CUDA device (`pytest -m gpu`, the last section of `make bench-gpu`; `make test` skips
them): the UNet against diffusers on the GPU, bf16 autocast, and the trainer's recipe flags on CUDA
(fused AdamW, torch.compile with Triton, gradient checkpointing, channels_last)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sd_core.config import Profile, UNetConfig
from sd_core.model.convert import to_diffusers
from sd_core.model.unet import UNetModel
from sd_core.training import checkpoint as ck
from sd_core.training import trainer as train
from sd_core.training.metrics_log import read_metrics
from train_support import build_text_components, train_argv, write_synthetic_latents
from unet_support import inputs, randomize_

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

NARROW_UNET = {"unet": {"ch": 32, "ch_mults": [1, 2], "res_blks": 1, "attn_lvls": [2], "heads": 4,
                        "norm_groups": 8}}


def test_unet_matches_diffusers_on_cuda_in_fp32_and_bf16():
    config = UNetConfig.tiny()
    ours = randomize_(UNetModel(config)).eval().cuda()
    theirs = to_diffusers(ours)
    x, t, ctx = (v.cuda() for v in inputs(config, tokens=7))
    torch.backends.cuda.matmul.allow_tf32 = False  # an fp32 comparison, not TF32's 10-bit mantissa
    torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        ref = theirs(x, t, encoder_hidden_states=ctx).sample
        eps = ours(x, t, ctx)
        assert (eps - ref).abs().max() < 1e-4 * max(1.0, ref.abs().max().item())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = ours(x.to(memory_format=torch.channels_last), t, ctx)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> Profile:
    p = Profile.tiny(tmp_path_factory.mktemp("gpu") / "data").with_overrides(NARROW_UNET)
    write_synthetic_latents(p, build_text_components(p), shards=("00000",), per_shard=64)
    return p


def test_trainer_recipe_flags_on_cuda(profile, tmp_path):
    out = tmp_path / "run"
    argv = train_argv(profile, out, "--overrides", json.dumps(NARROW_UNET), "--device", "cuda", "--compile",
                      "--grad-ckpt", "--channels-last", batch_size=8, max_steps=6, checkpoint_every=3)
    assert train.main(argv + ["--stop-after", "3"]) == 0
    assert train.main(argv) == 0  # the compiled run resumed (--resume auto) from step 3
    rows = [r for r in read_metrics(out) if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert ck.read_config(ck.latest_checkpoint(out)).step == 6
    unet = ck.load_unet(out, device="cuda")
    assert all(p.is_cuda for p in unet.parameters())
