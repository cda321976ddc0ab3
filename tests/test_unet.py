"""sd_core.model.unet: shape and size of the model, gradient checkpointing, channels_last, and that it learns."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from sd_core.config import UNetConfig
from sd_core.model.unet import UNetModel
from unet_support import inputs, randomize_

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = UNetConfig(ch=32, ch_mults=(1, 2), res_blks=1, attn_lvls=(2,), heads=2, ctx_dim=32)


def test_sd15_parameter_count_on_meta_device():
    with torch.device("meta"):
        model = UNetModel(UNetConfig.sd15())
    assert sum(p.numel() for p in model.parameters()) == 859_520_964
    assert len(model.state_dict()) == 686  # as many tensors as diffusers' SD 1.5 UNet


def test_tiny_preset_is_a_small_two_level_unet_with_attention_at_both_levels():
    config = UNetConfig.tiny()
    n = sum(p.numel() for p in UNetModel(config).parameters())
    assert n == 617_140 and config.ch_mults == (1, 2) and config.attn_lvls == (1, 2)


def test_fresh_model_predicts_zero_and_keeps_shape():
    config = UNetConfig.tiny()
    model = UNetModel(config)
    x, t, ctx = inputs(config, tokens=16)
    eps = model(x, t, ctx)
    assert eps.shape == x.shape
    assert torch.count_nonzero(eps) == 0  # zero-initialised output projection
    # the zero-initialised residual branches make every block an identity at init
    assert all(torch.count_nonzero(m.weight) == 0 for m in (model.out[2], model.middle_block[1].proj_out))


def test_timestep_forms_and_context_length():
    config = SMALL
    model = randomize_(UNetModel(config)).eval()
    x, _, ctx = inputs(config, size=8)
    with torch.no_grad():
        a = model(x, 500, ctx)
        b = model(x, torch.tensor([500, 500]), ctx)
        c = model(x, torch.tensor(500.0), ctx)
        d = model(x, torch.tensor([500, 500]), torch.randn(2, 11, config.ctx_dim))  # any number of tokens
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    assert d.shape == x.shape


def test_rejects_latents_not_divisible_by_the_downsampling_factor():
    model = UNetModel(UNetConfig.tiny())
    x, t, ctx = inputs(UNetConfig.tiny(), size=8)
    with pytest.raises(ValueError, match="multiples of 2"):
        model(x[..., :7, :7], t, ctx)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(attn_lvls=(0, 1)), "attn_lvls"),
        (dict(attn_lvls=(5,)), "attn_lvls"),
        (dict(ch=40), "norm_groups"),
        (dict(ch=64, heads=3), "heads"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNetConfig(**{**dict(ch=32, ch_mults=(1, 2), attn_lvls=(2,), heads=2), **kwargs})


def _output_and_grads(model, x, t, ctx, weight):
    model.zero_grad(set_to_none=True)
    out = model(x, t, ctx)
    (out * weight).sum().backward()
    return out.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


def test_gradient_checkpointing_changes_neither_outputs_nor_gradients():
    """Tolerance: 1e-6 absolute (the recomputation runs the same CPU kernels; it is bit-identical here)."""
    config = SMALL
    model = randomize_(UNetModel(config))
    x, t, ctx = inputs(config, size=8, tokens=7)
    w = torch.randn_like(x)
    out0, grads0 = _output_and_grads(model, x, t, ctx, w)
    ckpt = copy.deepcopy(model).enable_gradient_checkpointing()
    out1, grads1 = _output_and_grads(ckpt, x, t, ctx, w)
    torch.testing.assert_close(out1, out0, rtol=0, atol=1e-6)
    for k in grads0:
        torch.testing.assert_close(grads1[k], grads0[k], rtol=0, atol=1e-6, msg=k)
    # it really is checkpointing: the ResBlock forward runs again during backward
    calls = []  # a pre-hook: non-reentrant recomputation stops early, before forward hooks would fire
    ckpt.input_blocks[1][0].register_forward_pre_hook(lambda *a: calls.append(1))
    ckpt(x, t, ctx).sum().backward()
    assert len(calls) == 2
    ckpt.disable_gradient_checkpointing()
    calls.clear()
    ckpt(x, t, ctx).sum().backward()
    assert len(calls) == 1


def test_channels_last_changes_neither_outputs_nor_gradients():
    """Checked in float64, where both memory formats agree to 1e-10 relative (to the largest output/gradient):
    channels_last only changes the kernels' summation order. In fp32 that rounding shows at ~1e-5 relative on
    outputs and ~1e-4 on GroupNorm weight gradients (random weights, std 0.2); the fp32 check uses 1e-4."""
    config = UNetConfig.tiny()
    for dtype, tol_out, tol_grad in ((torch.float64, 1e-10, 1e-10), (torch.float32, 1e-4, None)):
        model = randomize_(UNetModel(config)).to(dtype)
        x, t, ctx = (v.to(dtype) if v.is_floating_point() else v for v in inputs(config, tokens=7))
        w = torch.randn_like(x)
        out0, grads0 = _output_and_grads(model, x, t, ctx, w)
        cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        out1, grads1 = _output_and_grads(cl, x.to(memory_format=torch.channels_last), t, ctx, w)
        assert out1.is_contiguous(memory_format=torch.channels_last)  # the format survives the whole network
        assert (out1 - out0).abs().max() <= tol_out * out0.abs().max()
        if tol_grad is not None:
            scale = max(g.abs().max() for g in grads0.values())  # some gradients are exactly 0 in theory
            for k in grads0:
                assert (grads1[k] - grads0[k]).abs().max() <= tol_grad * scale, k


def test_channels_last_gradients_have_their_parameters_strides():
    """DDP's bucket views take each parameter's strides; a gradient with other strides is the "Grad strides do
    not match bucket view strides" warning and a copy per bucket per step. Under channels_last + gradient
    checkpointing every gradient must come back in its parameter's exact layout (proj_in/proj_out included)."""
    config = UNetConfig.tiny()
    model = randomize_(UNetModel(config)).enable_gradient_checkpointing().to(memory_format=torch.channels_last)
    x, t, ctx = inputs(config, tokens=7)
    model(x.to(memory_format=torch.channels_last), t, ctx).sum().backward()
    mismatched = [(k, tuple(p.shape), p.stride(), p.grad.stride()) for k, p in model.named_parameters()
                  if p.grad.stride() != p.stride()]
    assert mismatched == []


def test_proj_weights_keep_sd1_conv_shape_in_state_dicts_and_load_from_either_shape():
    """proj_in/proj_out are 2-d parameters but state dicts hold SD 1.x's (C, C, 1, 1) 1x1-conv weights, so
    checkpoints written before and after the change (and CompVis ones) load unchanged."""
    model = randomize_(UNetModel(SMALL))
    sd = model.state_dict()
    proj = [k for k in sd if ".proj_in.weight" in k or ".proj_out.weight" in k]
    assert proj and all(sd[k].ndim == 4 and sd[k].shape[2:] == (1, 1) for k in proj)
    assert all(dict(model.named_parameters())[k].ndim == 2 for k in proj)
    for form in ("4-d", "2-d"):
        other = UNetModel(SMALL)
        given = {k: (v.flatten(1) if form == "2-d" and k in proj else v) for k, v in sd.items()}
        assert other.load_state_dict(given) is not None
        assert all(torch.equal(other.state_dict()[k], sd[k]) for k in sd), form
    with pytest.raises(RuntimeError, match="proj_in.weight"):  # a wrong width is still refused, naming the key
        UNetModel(SMALL).load_state_dict({**sd, proj[0]: torch.zeros(3, 3, 1, 1)})


def test_tiny_model_overfits_a_fixed_batch():
    torch.manual_seed(0)
    model = UNetModel(SMALL)
    x, t, ctx = inputs(SMALL, batch=4, size=8)
    noise = torch.randn_like(x)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(150):
        loss = F.mse_loss(model(x, t, ctx), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.5  # a fresh model predicts zero: loss = E[noise^2] ~ 1
    final = sum(losses[-10:]) / 10
    assert final < losses[0] / 100, (losses[0], final)


def test_unet_module_does_not_use_diffusers():
    """diffusers is only the test oracle (sd_core.model.convert); the model itself stands alone."""
    import ast
    import inspect

    import sd_core.model.unet

    tree = ast.parse(inspect.getsource(sd_core.model.unet))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(name.split(".")[0] == "diffusers" for name in imported), imported
