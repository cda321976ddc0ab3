"""Checkpoints: safetensors weights + weights_only state, atomic writes, the `latest` pointer, keep-last-K,
wrapper prefixes, and the loader `load_unet`."""

from __future__ import annotations

import json

import pytest
import torch

from sd_core.training import checkpoint as ck
from sd_core.config import UNetConfig
from sd_core.model.unet import UNetModel

CFG = UNetConfig(ch=16, ch_mults=(1, 2), res_blks=1, attn_lvls=(2,), heads=2, ctx_dim=8, norm_groups=8)


def _model(seed: int = 0) -> UNetModel:
    torch.manual_seed(seed)
    m = UNetModel(CFG)
    with torch.no_grad():  # zero-initialised output layers would make weight comparisons trivial
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return m


def _save(run, step, model, ema=None, keep_last=None, **state):
    return ck.save_checkpoint(
        run, ck.CheckpointConfig(step=step, unet=CFG, manifest_hash="abc"),
        unet_state=model.state_dict(), ema_state=(ema or model).state_dict(),
        train_state={"step": step, "rng": torch.arange(7, dtype=torch.uint8), "nested": {"a": [1, 2.5, "x", None]},
                     **state},
        keep_last=keep_last)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_roundtrip_latest_and_weights_only_state(tmp_path):
    run = tmp_path / "run"
    live, ema = _model(0), _model(1)
    path = _save(run, 10, live, ema)
    assert path == run / "step_00000010" and (run / "latest").read_text().strip() == "step_00000010"
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "ema.safetensors", "state.pt", "unet.safetensors"]

    # the loader accepts the run directory, the checkpoint directory and a weights file
    assert _same(ck.load_unet(run), ema) and _same(ck.load_unet(path, ema=False), live)
    assert _same(ck.load_unet(path / "unet.safetensors"), live)
    m = ck.load_unet(run)
    assert not m.training and not any(p.requires_grad for p in m.parameters())

    state = ck.load_train_state(run)  # torch.load(weights_only=True) inside
    assert state["step"] == 10 and state["nested"] == {"a": [1, 2.5, "x", None]}
    assert torch.equal(state["rng"], torch.arange(7, dtype=torch.uint8))
    cfg = ck.read_config(run)
    assert cfg.step == 10 and cfg.manifest_hash == "abc" and cfg.unet == CFG
    assert ck.nonfinite_tensors(run) == {"unet.safetensors": [], "ema.safetensors": []}


class Evil:
    """Stands for any pickled object a hostile state.pt could carry."""


def test_state_with_arbitrary_objects_is_refused(tmp_path):
    ck.save_checkpoint(tmp_path, ck.CheckpointConfig(step=1, unet=CFG), unet_state=_model().state_dict(),
                       ema_state=None, train_state={"obj": Evil()})
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_train_state(tmp_path)
    message = str(e.value)
    # names the file and what it holds, and does not pass on torch's advice to unpickle it anyway
    assert "step_00000001/state.pt is not a plain tensor checkpoint" in message and "Evil" in message
    assert "weights_only" not in message and "trust" not in message


def test_wrapper_prefixes_are_stripped_on_save_and_load(tmp_path):
    m = _model()
    wrapped = {f"module._orig_mod.{k}": v for k, v in m.state_dict().items()}
    ck.save_weights(tmp_path / "w.safetensors", wrapped)
    sd, _ = ck.load_weights(tmp_path / "w.safetensors")
    assert set(sd) == set(m.state_dict())

    # a foreign file that kept its prefixes (saved without our helper) still loads
    from safetensors.torch import save_file

    save_file({f"_orig_mod.module.{k}": v.contiguous() for k, v in m.state_dict().items()},
              str(tmp_path / "foreign.safetensors"))
    assert _same(ck.load_unet(tmp_path / "foreign.safetensors", config=CFG), m)
    with pytest.raises(ck.CheckpointError, match="carries no UNet config"):
        ck.load_unet(tmp_path / "foreign.safetensors")
    with pytest.raises(ck.CheckpointError, match="does not match"):
        ck.load_unet(tmp_path / "foreign.safetensors", config=UNetConfig.tiny())


def test_keep_last_prunes_but_never_latest(tmp_path):
    m = _model()
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, m, keep_last=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    assert ck.latest_checkpoint(tmp_path).name == "step_00000004"


def test_a_crash_during_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    m = _model()
    _save(tmp_path, 5, m)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, 6, _model(3))
    monkeypatch.undo()
    assert ck.latest_checkpoint(tmp_path).name == "step_00000005"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []
    assert _same(ck.load_unet(tmp_path, ema=False), m)

    # a temporary directory left by a killed process is not a checkpoint and is swept by the next save
    (tmp_path / ".tmp-step_00000007-999").mkdir()
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_00000005"]
    _save(tmp_path, 8, m)
    assert not (tmp_path / ".tmp-step_00000007-999").exists()

    # re-saving an existing step replaces it atomically
    m2 = _model(7)
    _save(tmp_path, 8, m2)
    assert _same(ck.load_unet(tmp_path, ema=False), m2)


def test_nonfinite_and_bad_pointers_are_reported(tmp_path):
    m = _model()
    with torch.no_grad():
        next(m.parameters()).view(-1)[0] = float("nan")
    _save(tmp_path, 1, m)
    bad = ck.nonfinite_tensors(tmp_path)
    assert len(bad["unet.safetensors"]) == 1
    (tmp_path / "latest").write_text("step_00000099\n")
    with pytest.raises(ck.CheckpointError, match="not a complete checkpoint"):
        ck.load_unet(tmp_path)
    with pytest.raises(ck.CheckpointError, match="not found"):
        ck.load_unet(tmp_path / "nope")
    json.loads((tmp_path / "step_00000001" / "config.json").read_text())  # config stays valid JSON


def _damage(path, n=256):
    """Overwrite ``n`` bytes in the middle of a file, keeping its size."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(bytes(range(256)) * (n // 256))


def test_each_file_is_hashed_and_checked_on_load(tmp_path):
    m = _model()
    path = _save(tmp_path, 1, m)
    assert set(ck.read_config(path).files) == {"unet.safetensors", "ema.safetensors", "state.pt"}
    for name, expect in (("ema.safetensors", "ema.safetensors"), ("unet.safetensors", "unet.safetensors")):
        _save(tmp_path, 1, m)
        _damage(path / name)
        with pytest.raises(ck.DamagedCheckpointError, match=f"{path / expect}: its sha256 is"):
            ck.load_unet(path, ema=name == "ema.safetensors")
        with pytest.raises(ck.DamagedCheckpointError, match=name):
            ck.verify_checkpoint(path)
    _save(tmp_path, 1, m)
    _damage(path / "state.pt")
    with pytest.raises(ck.DamagedCheckpointError, match="state.pt"):
        ck.load_train_state(path)


def test_pruning_never_deletes_the_newest_intact_checkpoint(tmp_path):
    m = _model()
    for step in (1, 2, 3):
        _save(tmp_path, step, m)
    _damage(tmp_path / "step_00000003" / "unet.safetensors")  # the newest, which `latest` names
    removed = ck.prune_checkpoints(tmp_path, keep_last=1)
    assert [p.name for p in removed] == ["step_00000001"]
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    assert ck.newest_intact_checkpoint(tmp_path) == tmp_path / "step_00000002"


def test_resume_auto_skips_damaged_checkpoints_and_says_which(tmp_path):
    m = _model()
    for step in (1, 2, 3):
        _save(tmp_path, step, m)
    _damage(tmp_path / "step_00000003" / "state.pt")
    (tmp_path / "step_00000002" / "ema.safetensors").unlink()
    said = []
    assert ck.newest_intact_checkpoint(tmp_path, say=said.append) == tmp_path / "step_00000001"
    assert len(said) == 1 and "step_00000003/state.pt" in said[0] and "step_00000002/ema.safetensors" in said[0]
    assert "is missing" in said[0]
    assert ck.newest_intact_checkpoint(tmp_path / "empty") is None
