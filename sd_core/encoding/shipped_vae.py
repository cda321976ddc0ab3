"""The tiny VAE fit the repository ships: the tiny profile's "pretrained" VAE.

SD never trains its VAE with the UNet: it downloads ``stabilityai/sd-vae-ft-mse`` and keeps it frozen. The tiny
profile has no hub to download from, so it fits a small VAE on the synthetic renders (`sd_core.encoding.vae_fit`),
a step budget that is a pure function of its settings (`vae_fit_settings`): the renderer's version, the VAE's
shape, the seed and the fit's steps, batch and learning rate. That fit takes 3200 steps, about 8 minutes on
2 cores, nearly the demo's whole time budget, so the repository ships its result for the tiny profile's default
settings in ``sd_core/encoding/tiny_vae/`` (diffusers' ``save_pretrained`` layout plus ``fit.json``, the
`ShippedFit` record), written by ``sd components tiny-vae``. A build whose settings equal the record's uses
those weights; any other settings (``components.vae_fit_steps: 400``, a new renderer version) or
``components.vae_shipped_fit: false`` fit here, as before.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd_core.atomic import atomic_dir
from sd_core.config import Profile
from sd_core.data.synthetic import RENDER_VERSION

SHIPPED_DIR = Path(__file__).with_name("tiny_vae")
FIT_FILE = "fit.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"

if TYPE_CHECKING:  # torch only for the annotation: `sd_core.encoding.versions` imports this module without it
    import torch


def vae_fit_settings(profile: Profile) -> dict[str, Any]:
    """Everything the tiny VAE's weights depend on: two profiles with equal settings get the same VAE."""
    c = profile.components
    return {
        "render": RENDER_VERSION,  # the VAE is fitted on renders: a changed world is re-fitted
        "vae_channels": list(c.tiny_vae_channels),
        "vae_layers_per_block": c.tiny_vae_layers_per_block,
        "vae_norm_groups": c.tiny_vae_norm_groups,
        "image_size": profile.encode.resolution,
        "seed": c.seed,
        "fit_steps": c.vae_fit_steps,
        "fit_batch_size": c.vae_fit_batch_size,
        "fit_lr": c.vae_fit_lr,
    }


@dataclass(frozen=True)
class ShippedFit:
    """``fit.json``: the settings a shipped VAE was fitted with, what the fit measured and where it ran."""

    settings: dict[str, Any]
    fit: dict[str, Any]  # steps, seconds, final_loss, batch_size
    reconstruction: dict[str, Any]  # `vae_fit.ColourReport` on held-out renders
    latent_std_unscaled: float
    scaling_factor: float
    fitted_on: str  # CPU model of the machine that ran the fit
    command: str = "sd components tiny-vae"
    params: dict[str, int] = field(default_factory=dict)

    @classmethod
    def read(cls, folder: str | os.PathLike[str]) -> "ShippedFit":
        path = Path(folder) / FIT_FILE
        try:
            raw = json.loads(path.read_text())
            return cls(**raw)
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"{path}: not a shipped VAE fit record ({exc})") from exc


def shipped_fit_for(profile: Profile, folder: str | os.PathLike[str] = SHIPPED_DIR) -> ShippedFit | None:
    """The shipped fit of exactly this profile's VAE settings, or None (no shipped fit, other settings, or
    ``components.vae_shipped_fit`` off): then the VAE is fitted here."""
    folder = Path(folder)
    if not profile.components.vae_shipped_fit or not (folder / FIT_FILE).is_file():
        return None
    record = ShippedFit.read(folder)
    return record if record.settings == vae_fit_settings(profile) else None


def load_shipped_weights(vae: torch.nn.Module, record: ShippedFit, folder: str | os.PathLike[str] = SHIPPED_DIR) -> None:
    """Load a shipped fit's weights and scaling factor into a freshly built VAE of the same shape."""
    from safetensors.torch import load_file

    vae.load_state_dict(load_file(Path(folder) / WEIGHTS_FILE))
    vae.register_to_config(scaling_factor=record.scaling_factor)


def write_shipped_fit(vae: Any, record: ShippedFit, folder: str | os.PathLike[str] = SHIPPED_DIR) -> Path:
    """Write a fitted VAE and its record as a shipped fit (atomically: a killed write leaves the old one)."""
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        vae.save_pretrained(tmp)
        (tmp / FIT_FILE).write_text(json.dumps(asdict(record), indent=1, sort_keys=True) + "\n")
    return folder
