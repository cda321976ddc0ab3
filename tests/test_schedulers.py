"""Schedulers against diffusers' DDPMScheduler / DDIMScheduler configured as SD 1.5 (diffusers is the oracle)."""

from __future__ import annotations

import pytest
import torch

from sd_core.model.schedulers import DDIMScheduler, DDPMScheduler

diffusers = pytest.importorskip("diffusers")

SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def ref_ddpm():
    return diffusers.DDPMScheduler(**SD15, clip_sample=False)


def ref_ddim():
    return diffusers.DDIMScheduler(**SD15, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                   timestep_spacing="leading")


def test_alphas_cumprod_identical():
    ours = DDPMScheduler()
    assert torch.equal(ours.betas, ref_ddpm().betas)
    assert torch.equal(ours.alphas_cumprod, ref_ddpm().alphas_cumprod)
    assert torch.equal(DDIMScheduler().alphas_cumprod, ref_ddim().alphas_cumprod)
    assert ours.alphas_cumprod.dtype == torch.float32
    assert ours.alphas_cumprod[0].item() == pytest.approx(0.99914998, abs=1e-8)
    assert ours.alphas_cumprod[499].item() == pytest.approx(0.27766943, abs=1e-7)
    assert ours.alphas_cumprod[999].item() == pytest.approx(0.0046600951, rel=1e-6)


def test_add_noise_identical_fp32():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 4, 16, 16, generator=g)
    noise = torch.randn(8, 4, 16, 16, generator=g)
    t = torch.tensor([0, 1, 100, 250, 499, 500, 998, 999])
    ours = DDPMScheduler().add_noise(x0, noise, t)
    assert torch.equal(ours, ref_ddpm().add_noise(x0, noise, t))
    assert torch.equal(ours, DDIMScheduler().add_noise(x0, noise, t))


def test_add_noise_is_fp32_for_low_precision_latents():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 4, 8, 8, generator=g).bfloat16()
    noise = torch.randn(4, 4, 8, 8, generator=g).bfloat16()
    t = torch.tensor([1, 10, 500, 999])
    ours = DDPMScheduler().add_noise(x0, noise, t)
    assert ours.dtype == torch.float32
    # exactly the fp32 computation on the (upcast) inputs
    assert torch.equal(ours, ref_ddpm().add_noise(x0.float(), noise.float(), t))


def test_snr_and_min_snr_weights():
    s = DDPMScheduler()
    t = torch.arange(1000)
    snr = s.snr(t)
    ac = s.alphas_cumprod
    assert torch.equal(snr, ac / (1 - ac))
    assert snr[0].item() == pytest.approx(1175.4, rel=1e-3)
    assert snr[999].item() == pytest.approx(0.00468, rel=1e-2)
    w = s.min_snr_weights(t, gamma=5.0)
    assert torch.allclose(w, torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert w[0].item() == pytest.approx(0.0043, abs=1e-4)
    assert w[100].item() == pytest.approx(0.59, abs=0.01)
    assert (w[200:] == 1.0).all()
    assert w.mean().item() == pytest.approx(0.917, abs=0.002)


def test_sample_timesteps_range_and_determinism():
    s = DDPMScheduler()
    a = s.sample_timesteps(4096, generator=torch.Generator().manual_seed(3))
    b = s.sample_timesteps(4096, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.dtype == torch.int64
    assert a.min() >= 0 and a.max() <= 999


@pytest.mark.parametrize("n", [1, 10, 30, 50, 1000])
def test_ddim_timesteps_identical(n):
    ours, ref = DDIMScheduler(), ref_ddim()
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    assert torch.equal(ours.timesteps, ref.timesteps)


def test_ddim_30_steps_sd15_list():
    s = DDIMScheduler()
    s.set_timesteps(30)
    ts = s.timesteps.tolist()
    assert ts[:3] == [958, 925, 892] and ts[-3:] == [67, 34, 1] and len(ts) == 30


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_30_consecutive_steps_identical(eta):
    ours, ref = DDIMScheduler(), ref_ddim()
    ours.set_timesteps(30)
    ref.set_timesteps(30)
    g = torch.Generator().manual_seed(42)
    x = torch.randn(2, 4, 8, 8, generator=g)
    x_ours, x_ref = x.clone(), x.clone()
    g_ours, g_ref = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for t in ours.timesteps:
        # a deterministic stand-in for the UNet so the two trajectories see identical inputs
        eps = torch.tanh(x_ours * 0.5 + t.item() / 1000.0)
        eps_ref = torch.tanh(x_ref * 0.5 + t.item() / 1000.0)
        x_ours = ours.step(eps, t, x_ours, eta=eta, generator=g_ours)
        x_ref = ref.step(eps_ref, t, x_ref, eta=eta, generator=g_ref).prev_sample
        assert torch.equal(x_ours, x_ref), f"step t={t.item()} differs"
    assert torch.isfinite(x_ours).all()


def test_ddim_step_with_generator_list_matches_diffusers():
    ours, ref = DDIMScheduler(), ref_ddim()
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    gens = lambda: [torch.Generator().manual_seed(s) for s in (10, 11, 12)]  # noqa: E731
    t = ours.timesteps[0]
    a = ours.step(eps, t, x, eta=1.0, generator=gens())
    b = ref.step(eps, t, x, eta=1.0, generator=gens()).prev_sample
    assert torch.equal(a, b)


def test_ddim_int_timestep_and_config_roundtrip():
    ours = DDIMScheduler()
    ours.set_timesteps(30)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    eps = torch.zeros_like(x)
    assert torch.equal(ours.step(eps, 958, x), ours.step(eps, torch.tensor(958), x))
    cfg = {k: v for k, v in ours.config_dict().items() if not k.startswith("_")}
    ref = diffusers.DDIMScheduler(**cfg)
    ref.set_timesteps(30)
    assert torch.equal(ref.timesteps, ours.timesteps)
    assert torch.equal(ref.alphas_cumprod, ours.alphas_cumprod)
    with pytest.raises(ValueError):
        DDIMScheduler().step(eps, 958, x)  # set_timesteps not called


def test_no_diffusers_import_in_schedulers():
    import inspect

    import sd_core.model.schedulers as mod

    src = inspect.getsource(mod)
    assert "import diffusers" not in src and "from diffusers" not in src


# ------------------------------------------------------------ zero terminal SNR + v-prediction (Lin et al. 2024)
def ref_zero_snr_ddim():
    return diffusers.DDIMScheduler(**SD15, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                   timestep_spacing="trailing", rescale_betas_zero_snr=True,
                                   prediction_type="v_prediction")


def test_zero_terminal_snr_schedule_is_diffusers_and_ends_at_zero():
    ours = DDPMScheduler(zero_terminal_snr=True, prediction_type="v_prediction")
    ref = diffusers.DDPMScheduler(**SD15, clip_sample=False, rescale_betas_zero_snr=True,
                                  prediction_type="v_prediction")
    assert torch.equal(ours.betas, ref.betas) and torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    assert ours.alphas_cumprod[999].item() == 0.0 and ours.snr(torch.tensor([999])).item() == 0.0
    # the noisiest SD 1.x input still carries 6.8 % of the clean latent; this one none
    assert DDPMScheduler().alphas_cumprod[999].item() ** 0.5 == pytest.approx(0.0683, abs=1e-4)


def test_velocity_target_and_implied_epsilon():
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 400, 900, 998, 999])
    ours = DDPMScheduler(zero_terminal_snr=True, prediction_type="v_prediction")
    ref = diffusers.DDPMScheduler(**SD15, rescale_betas_zero_snr=True, prediction_type="v_prediction")
    v = ours.target(x0, noise, t)
    assert torch.allclose(v, ref.get_velocity(x0, noise, t), atol=1e-6)
    # a perfect v-prediction implies the true ε (what the ε-MSE metrics compare), even at ᾱ = 0
    xt = ours.add_noise(x0, noise, t)
    assert torch.allclose(ours.epsilon(v, xt, t), noise, atol=1e-5)
    assert torch.equal(DDPMScheduler().target(x0, noise, t), noise)  # ε-prediction: the noise itself


def test_v_prediction_ddim_trailing_matches_diffusers_step_for_step():
    ours, ref = DDIMScheduler(timestep_spacing="trailing", zero_terminal_snr=True, prediction_type="v_prediction"), \
        ref_zero_snr_ddim()
    ours.set_timesteps(30)
    ref.set_timesteps(30)
    assert ours.timesteps.tolist() == ref.timesteps.tolist() and ours.timesteps[0].item() == 999
    g = torch.Generator().manual_seed(4)
    a = b = torch.randn(2, 4, 16, 16, generator=g)
    for t in ours.timesteps:
        out = torch.randn(2, 4, 16, 16, generator=g)
        a, b = ours.step(out, t, a), ref.step(out, t, b).prev_sample
    assert torch.equal(a, b)
    cfg = ours.config_dict()
    assert (cfg["prediction_type"], cfg["rescale_betas_zero_snr"], cfg["timestep_spacing"]) == \
        ("v_prediction", True, "trailing")


def test_zero_terminal_snr_without_v_prediction_is_refused():
    with pytest.raises(ValueError, match="zero_terminal_snr needs prediction_type='v_prediction'"):
        DDPMScheduler(zero_terminal_snr=True)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        DDIMScheduler(prediction_type="sample")
