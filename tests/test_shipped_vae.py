"""The shipped tiny VAE fit (`sd_core.encoding.shipped_vae`): the demo's VAE without its 5-minute fit, used only
for exactly the settings it was fitted with, and `sd components tiny-vae`, the command that makes it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sd_core.config import Profile
from sd_core.encoding import components_cli
from sd_core.encoding.components import build_tiny_components, build_tiny_vae, load_components
from sd_core.encoding.shipped_vae import (SHIPPED_DIR, WEIGHTS_FILE, ShippedFit, load_shipped_weights, shipped_fit_for,
                                          vae_fit_settings)
from sd_core.evaluation import prompt_scorer

QUICK_FIT = {"components": {"vae_fit_steps": 3, "vae_fit_batch_size": 2}}


def test_the_shipped_fit_is_the_tiny_profiles_default(tmp_path):
    tiny = Profile.tiny(tmp_path)
    record = ShippedFit.read(SHIPPED_DIR)
    assert record.settings == vae_fit_settings(tiny), (
        "the tiny profile's VAE settings changed: run `sd components tiny-vae` and commit sd_core/encoding/tiny_vae")
    assert record.fit["steps"] == tiny.components.vae_fit_steps and record.fitted_on
    assert shipped_fit_for(tiny) == record
    # any other setting, or the switch off, fits here
    assert shipped_fit_for(tiny.with_overrides({"components": {"vae_shipped_fit": False}})) is None
    assert shipped_fit_for(tiny.with_overrides({"components": {"vae_fit_steps": 400}})) is None
    assert shipped_fit_for(tiny.with_overrides({"encode": {"resolution": 32}})) is None


def test_a_default_build_loads_the_shipped_weights_and_its_reconstructions_read_right(tmp_path):
    p = Profile.tiny(tmp_path / "data")
    info = build_tiny_components(p, log=None)
    assert info["fit"]["source"] == "shipped" and info["fit"]["steps"] == 3200 and info["fit"]["seconds"] == 0.0
    record = ShippedFit.read(SHIPPED_DIR)
    assert info["scaling_factor"] == pytest.approx(record.scaling_factor)
    built, shipped = load_file(p.components_dir / "vae" / WEIGHTS_FILE), load_file(SHIPPED_DIR / WEIGHTS_FILE)
    assert built.keys() == shipped.keys() and all(torch.equal(built[k], shipped[k]) for k in shipped)
    # the VAE target: the prompt scorer reads >= 0.97 of each attribute off its reconstructions
    recon = prompt_scorer.calibrate(64, 1, load_components(p).vae).vae_reconstructions
    assert recon is not None and min(recon.accuracy[a] for a in prompt_scorer.ATTRIBUTES) >= 0.97, recon.accuracy


def test_tiny_vae_command_fits_here_and_writes_a_fit_the_build_then_uses(tmp_path, capsys):
    out = tmp_path / "fit"
    assert components_cli.main(["tiny-vae", "--out", str(out), "--overrides", json.dumps(QUICK_FIT)]) == 0
    assert str(out) in capsys.readouterr().out
    record = ShippedFit.read(out)
    assert record.fit["steps"] == 3 and record.fit["seconds"] > 0 and record.command == "sd components tiny-vae"
    p = Profile.tiny(tmp_path / "data").with_overrides(QUICK_FIT)
    assert shipped_fit_for(p, out) == record and shipped_fit_for(Profile.tiny(tmp_path), out) is None
    c = p.components
    vae = build_tiny_vae(c.tiny_vae_channels, c.tiny_vae_layers_per_block, 64, c.seed, c.tiny_vae_norm_groups)
    load_shipped_weights(vae, record, out)
    assert vae.config.scaling_factor == record.scaling_factor != 1.0


def test_tiny_vae_command_refuses_a_bad_override_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "fit"
    bad = json.dumps({"components": {"vae_fit_steps": -1}})
    assert components_cli.main(["tiny-vae", "--out", str(out), "--overrides", bad]) == 1
    assert "components.vae_fit_steps = -1: must be an integer >= 0" in capsys.readouterr().err
    assert not out.exists()


def test_a_broken_fit_record_is_refused_by_name(tmp_path):
    (tmp_path / "fit.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"{tmp_path / 'fit.json'}: not a shipped VAE fit record"):
        shipped_fit_for(Profile.tiny(tmp_path), tmp_path)
