"""Noise schedules: the DDPM training schedule and the DDIM sampler, with Stable Diffusion 1.x's settings.

Both match diffusers' ``DDPMScheduler`` / ``DDIMScheduler`` configured as SD 1.5 bit for bit in fp32 (the tests
use diffusers as the oracle; this module never imports it):

- betas = linspace(√0.00085, √0.012, 1000, float32)², ᾱ = cumprod(1 − β) in float32;
  ᾱ[0] = 0.99914998, ᾱ[999] = 0.0046600951.
- DDIM ``leading`` spacing with ``steps_offset=1``: 30 steps are [958, 925, …, 34, 1]; the step goes from t to
  t − 1000 // N and uses ᾱ[0] past the end (``set_alpha_to_one=False``); ``clip_sample=False``.

Two options SD 1.x does not use, both as diffusers defines them (``rescale_betas_zero_snr``,
``prediction_type="v_prediction"``): ``zero_terminal_snr`` rescales the betas so that ᾱ[999] = 0 (Lin et al.
2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed"): with SD's ᾱ[999] = 0.0047 a noised latent
still shows the clean latent's mean at every training step, so a model learns to read an image's overall colour
off its input rather than from the caption, and cannot choose it from pure noise at sampling. A zero terminal
SNR needs v-prediction (ε-prediction is undefined at ᾱ = 0) and DDIM's ``trailing`` spacing (sampling starts
at t = 999).

One deliberate difference: :meth:`DDPMScheduler.add_noise` computes in float32 whatever the latents' dtype
(diffusers casts ᾱ to the latents' dtype, which loses the schedule's precision in bf16/fp16) and returns a
float32 tensor.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

Generator = torch.Generator | Sequence[torch.Generator] | None


PREDICTION_TYPES = ("epsilon", "v_prediction")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose ᾱ ends at exactly 0, the rest of √ᾱ shifted and scaled linearly (Lin et al. 2024,
    Algorithm 1; diffusers' ``rescale_zero_terminal_snr``, operation for operation)."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= last
    alphas_bar_sqrt *= first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = alphas_bar[1:] / alphas_bar[:-1]
    return 1 - torch.cat([alphas_bar[0:1], alphas])


class _ScaledLinearSchedule:
    """The shared β / ᾱ tables (kept on CPU in float32; per-device copies are cached)."""

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        zero_terminal_snr: bool = False,
        prediction_type: str = "epsilon",
    ) -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if zero_terminal_snr and prediction_type == "epsilon":
            raise ValueError("zero_terminal_snr needs prediction_type='v_prediction' (ε is undefined at ᾱ = 0)")
        self.num_train_timesteps = int(num_train_timesteps)
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)
        self.zero_terminal_snr = bool(zero_terminal_snr)
        self.prediction_type = prediction_type
        self.betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
        if zero_terminal_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self._cache: dict[torch.device, torch.Tensor] = {}

    def _ac(self, device: torch.device | str) -> torch.Tensor:
        """ᾱ as float32 on ``device`` (cached, so a training loop does not copy it every step)."""
        device = torch.device(device)
        table = self._cache.get(device)
        if table is None:
            table = self._cache[device] = self.alphas_cumprod.to(device)
        return table

    @staticmethod
    def _expand(coef: torch.Tensor, ndim: int) -> torch.Tensor:
        return coef.reshape(coef.shape[0], *([1] * (ndim - 1))) if coef.ndim == 1 else coef

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t · x₀ + √(1 − ᾱ_t) · ε, in float32 (inputs of any float dtype); returns float32.

        ``timesteps``: an int tensor of shape (B,) (or a scalar), one timestep per sample.
        """
        x0 = original_samples.float()
        eps = noise.float()
        t = torch.as_tensor(timesteps, device=x0.device).long()
        ac = self._ac(x0.device)[t]
        sqrt_alpha = self._expand(ac**0.5, x0.ndim) if ac.ndim else ac**0.5
        sqrt_one_minus = self._expand((1 - ac) ** 0.5, x0.ndim) if ac.ndim else (1 - ac) ** 0.5
        return sqrt_alpha * x0 + sqrt_one_minus * eps

    def velocity(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """v = √ᾱ_t · ε − √(1 − ᾱ_t) · x₀ (Salimans & Ho 2022), in float32: the v-prediction target."""
        t = torch.as_tensor(timesteps, device=noise.device).long()
        ac = self._expand(self._ac(noise.device)[t], noise.ndim)
        return ac**0.5 * noise.float() - (1 - ac) ** 0.5 * original_samples.float()

    def target(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the model learns to predict: ε, or v for ``v_prediction``."""
        if self.prediction_type == "v_prediction":
            return self.velocity(original_samples, noise, timesteps)
        return noise.float()

    def epsilon(self, model_output: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The ε a model output stands for at ``timesteps`` (ε = √ᾱ·v + √(1−ᾱ)·x_t for v-prediction), so ε-MSE
        metrics compare models of either prediction type."""
        if self.prediction_type == "epsilon":
            return model_output.float()
        t = torch.as_tensor(timesteps, device=sample.device).long()
        ac = self._expand(self._ac(sample.device)[t], sample.ndim)
        return ac**0.5 * model_output.float() + (1 - ac) ** 0.5 * sample.float()

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t), float32, on the timesteps' device."""
        t = torch.as_tensor(timesteps).long()
        ac = self._ac(t.device)[t]
        return ac / (1.0 - ac)

    def __len__(self) -> int:
        return self.num_train_timesteps


class DDPMScheduler(_ScaledLinearSchedule):
    """The training schedule: 1000 steps, scaled-linear betas 0.00085 → 0.012, ε-prediction (SD 1.x), or with
    a zero terminal SNR and v-prediction (see the module docstring)."""

    def sample_timesteps(
        self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Uniform random timesteps in [0, num_train_timesteps), int64, shape (batch_size,)."""
        gen_device = generator.device if generator is not None else device
        t = torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator, device=gen_device)
        return t.to(device)

    def min_snr_weights(self, timesteps: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
        """Min-SNR-γ loss weights for ε-prediction (Hang et al. 2023): min(SNR_t, γ) / SNR_t.

        Only low-noise timesteps are down-weighted (t < ~147 for γ = 5: 0.0043 at t = 0, 0.59 at t = 100).
        """
        snr = self.snr(timesteps)
        if self.prediction_type == "v_prediction":  # the same weight on the x₀ error: v-MSE = (SNR + 1) · x₀-MSE
            return torch.clamp(snr, max=float(gamma)) / (snr + 1)
        return torch.clamp(snr, max=float(gamma)) / snr


class DDIMScheduler(_ScaledLinearSchedule):
    """DDIM sampling (Song et al. 2021) with SD 1.x's diffusers settings.

    ``leading`` spacing, ``steps_offset=1``, ``set_alpha_to_one=False`` (the last step lands on ᾱ[0], not 1),
    no sample clipping, ε-prediction. ``eta`` = 0 is deterministic DDIM, ``eta`` = 1 is DDPM-like ancestral
    sampling; the noise for eta > 0 is drawn exactly as diffusers draws it (one ``torch.randn`` of the model
    output's shape from ``generator``, or one per batch item when a list of generators is given), so the same
    generator state gives the same trajectory in both.
    """

    init_noise_sigma = 1.0

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        steps_offset: int = 1,
        set_alpha_to_one: bool = False,
        timestep_spacing: str = "leading",
        zero_terminal_snr: bool = False,
        prediction_type: str = "epsilon",
    ) -> None:
        super().__init__(num_train_timesteps, beta_start, beta_end, zero_terminal_snr, prediction_type)
        if timestep_spacing not in ("leading", "trailing", "linspace"):
            raise ValueError(f"timestep_spacing must be 'leading', 'trailing' or 'linspace', got {timestep_spacing!r}")
        self.steps_offset = int(steps_offset)
        self.set_alpha_to_one = bool(set_alpha_to_one)
        self.timestep_spacing = timestep_spacing
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)

    # ------------------------------------------------------------------------------------------ setup
    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """Choose the N sampling timesteps (descending). SD 1.5, N = 30: [958, 925, …, 34, 1]."""
        n = int(num_inference_steps)
        T = self.num_train_timesteps
        if not 1 <= n <= T:
            raise ValueError(f"num_inference_steps must be in [1, {T}], got {n}")
        self.num_inference_steps = n
        if self.timestep_spacing == "leading":
            ratio = T // n
            ts = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64) + self.steps_offset
        elif self.timestep_spacing == "trailing":
            ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
        else:  # linspace
            ts = np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
        self.timesteps = torch.from_numpy(ts).to(device)

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """DDIM needs no input scaling (kept for interface parity with diffusers' schedulers)."""
        return sample

    def config_dict(self) -> dict[str, Any]:
        """The equivalent diffusers ``DDIMScheduler`` config (for ``scheduler_config.json`` on export)."""
        return {
            "_class_name": "DDIMScheduler",
            "num_train_timesteps": self.num_train_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "beta_schedule": "scaled_linear",
            "trained_betas": None,
            "clip_sample": False,
            "set_alpha_to_one": self.set_alpha_to_one,
            "steps_offset": self.steps_offset,
            "prediction_type": self.prediction_type,
            "thresholding": False,
            "timestep_spacing": self.timestep_spacing,
            "rescale_betas_zero_snr": self.zero_terminal_snr,
        }

    # ------------------------------------------------------------------------------------------- step
    def _alpha_prev(self, prev_timestep: Any) -> torch.Tensor:
        return self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        generator: Generator = None,
        variance_noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One DDIM step x_t → x_{t−Δ} (Δ = T // N) for ε- or v-prediction; returns the previous sample.

        The arithmetic follows diffusers' ``DDIMScheduler.step`` operation for operation, so results are
        bitwise identical on the same device and dtype.
        """
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(n) before step()")
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.to("cpu")
        prev_timestep = timestep - self.num_train_timesteps // self.num_inference_steps

        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self._alpha_prev(prev_timestep)
        beta_prod_t = 1 - alpha_prod_t

        if self.prediction_type == "v_prediction":
            pred_original_sample = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
            pred_epsilon = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample
        else:
            pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
            pred_epsilon = model_output

        beta_prod_t_prev = 1 - alpha_prod_t_prev
        variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
        std_dev_t = eta * variance ** (0.5)

        pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * pred_epsilon
        prev_sample = alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction

        if eta > 0:
            if variance_noise is None:
                variance_noise = _randn_like(model_output, generator)
            prev_sample = prev_sample + std_dev_t * variance_noise
        return prev_sample


def sampler_for(prediction_type: str = "epsilon", zero_terminal_snr: bool = False) -> DDIMScheduler:
    """The DDIM sampler for a model trained on this schedule: SD 1.x's, or, with a zero terminal SNR, the
    ``trailing`` spacing that starts at t = 999, where such a model has learned to start from pure noise."""
    return DDIMScheduler(timestep_spacing="trailing" if zero_terminal_snr else "leading",
                         zero_terminal_snr=zero_terminal_snr, prediction_type=prediction_type)


def _randn_like(ref: torch.Tensor, generator: Generator) -> torch.Tensor:
    """Standard normal noise shaped like ``ref``, drawn the way diffusers' ``randn_tensor`` draws it: on the
    generator's device (CPU generators give the same numbers on any target device), one draw per batch item when
    given a list of generators."""
    if isinstance(generator, (list, tuple)):
        if len(generator) == 1:
            generator = generator[0]
        else:
            if len(generator) != ref.shape[0]:
                raise ValueError(f"got {len(generator)} generators for a batch of {ref.shape[0]}")
            shape = (1, *ref.shape[1:])
            parts = [torch.randn(shape, generator=g, device=g.device, dtype=ref.dtype) for g in generator]
            return torch.cat(parts, dim=0).to(ref.device)
    gen_device = generator.device if generator is not None else ref.device
    return torch.randn(ref.shape, generator=generator, device=gen_device, dtype=ref.dtype).to(ref.device)
