"""EMA: warmup-corrected decay, parity with diffusers' EMAModel, copy_to and save/load round trips."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sd_core.model.ema import EMA


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.GroupNorm(4, 16), nn.Linear(16, 4))


def perturb(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_warmup_corrected_decay_values():
    ema = EMA(small_model(), decay=0.9999)
    assert ema.decay_at(0) == 0.0  # first update copies the weights
    assert ema.decay_at(1) == pytest.approx(2 / 11)
    assert ema.decay_at(10) == pytest.approx(11 / 20)
    assert ema.decay_at(1000) == pytest.approx(1001 / 1010)
    assert ema.decay_at(10**6) == 0.9999  # capped at decay
    small = EMA(small_model(), decay=0.999)
    assert small.decay_at(8991) == 0.999 and small.decay_at(8989) < 0.999
    used = [ema.update(small_model()) for _ in range(3)]
    assert used == [0.0, pytest.approx(2 / 11), pytest.approx(3 / 12)]
    assert ema.num_updates == 3


def test_matches_diffusers_emamodel():
    diffusers = pytest.importorskip("diffusers")
    from diffusers.training_utils import EMAModel

    model = small_model()
    ours = EMA(model, decay=0.9)
    ref = EMAModel(model.parameters(), decay=0.9, use_ema_warmup=False, update_after_step=0, foreach=False)
    for i in range(40):
        perturb(model, i)
        ours.update(model)
        ref.step(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    for name, ref_p in zip(names, ref.shadow_params):
        torch.testing.assert_close(ours.shadow[name], ref_p, rtol=0, atol=1e-6)
    assert ref.cur_decay_value == pytest.approx(ours.decay_at(39))
    del diffusers


def test_float32_shadow_for_bf16_model():
    model = small_model().to(torch.bfloat16)
    ema = EMA(model, decay=0.5)
    assert all(v.dtype == torch.float32 for v in ema.shadow.values())
    assert set(ema.shadow) == set(model.state_dict())
    ema.update(model)  # n=0: copy
    perturb(model, 1)
    assert ema.update(model) == pytest.approx(2 / 11)  # min(0.5, 2/11)
    assert all(v.dtype == torch.float32 for v in ema.shadow.values())
    ema.copy_to(model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_update_formula_exact():
    model = small_model()
    ema = EMA(model, decay=0.9999)
    ema.update(model)
    prev = {k: v.clone() for k, v in ema.shadow.items()}
    perturb(model, 2)
    d = ema.update(model)
    assert d == pytest.approx(2 / 11)
    for name, p in model.state_dict().items():
        expected = prev[name] - (1 - d) * (prev[name] - p)
        torch.testing.assert_close(ema.shadow[name], expected, rtol=0, atol=1e-7)


def test_works_under_no_grad_and_with_grad_params():
    model = small_model()
    ema = EMA(model)
    loss = model(torch.randn(2, 8)).sum()
    loss.backward()
    with torch.no_grad():
        ema.update(model)
    ema.update(model)  # also fine outside no_grad
    assert not any(v.requires_grad for v in ema.shadow.values())


def test_copy_to_and_safetensors_roundtrip(tmp_path):
    model = small_model()
    ema = EMA(model, decay=0.9)
    for i in range(5):
        perturb(model, i)
        ema.update(model)
    # the shadow is a flat {name: tensor} dict keyed like the model's state dict: safetensors as is
    path = tmp_path / "ema.safetensors"
    save_file(ema.state_dict()["shadow"], str(path))
    fresh = small_model(seed=123)
    fresh.load_state_dict(load_file(str(path)))
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, ema.shadow[name])

    # load_state_dict into a new EMA restores shadow and update count
    ema2 = EMA(small_model(seed=5), decay=0.9)
    ema2.load_state_dict(ema.state_dict())
    assert ema2.num_updates == 5
    assert all(torch.equal(ema2.shadow[k], ema.shadow[k]) for k in ema.shadow)
    # a bare shadow dict also loads (count kept)
    ema3 = EMA(small_model(seed=6), decay=0.9)
    ema3.load_state_dict(load_file(str(path)))
    assert ema3.num_updates == 0 and all(torch.equal(ema3.shadow[k], ema.shadow[k]) for k in ema.shadow)

    # copy_to loads the averaged weights into a model
    target = small_model(seed=9)
    ema.copy_to(target)
    for name, value in target.state_dict().items():
        assert torch.equal(value, ema.shadow[name])


def test_load_errors_are_clear():
    ema = EMA(small_model())
    bad = {k: v for k, v in ema.shadow.items()}
    key = next(iter(bad))
    bad[key] = torch.zeros(3)
    with pytest.raises(ValueError, match="shape"):
        ema.load_state_dict(bad)
    with pytest.raises(KeyError, match="missing"):
        ema.load_state_dict({})


def test_strips_ddp_and_compile_prefixes():
    model = small_model()

    class Wrapper(nn.Module):  # stands in for torch.compile's OptimizedModule
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

    ema = EMA(Wrapper(model))
    assert set(ema.shadow) == set(model.state_dict())
    ema.update(Wrapper(model))
