"""Damaged artefacts, written as the attacks of issue 11: bytes overwritten in a real trained checkpoint, a
truncated latent shard, a pickle payload in the trainer state, a full disk during a save, and the single-node
torchrun rendezvous listening beyond loopback.

Each test checks what a user sees: the exit code, one line naming the file, which checkpoint a resumed run
continues from, the files left on disk.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sd_core.atomic import DiskFullError
from sd_core.cli import main as sd
from sd_core.config import Profile
from sd_core.encoding.latent_cache import DamagedShardError, LatentDataset, read_manifest, shard_paths, write_shard
from sd_core.training import checkpoint as ck
from sd_core.training.launch import trainer_command
from train_support import SMALL_UNET, make_tiny_data, train_argv


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> Profile:
    p = Profile.tiny(tmp_path_factory.mktemp("integrity") / "data").with_overrides(SMALL_UNET)
    make_tiny_data(p)
    return p


def _train(profile: Profile, out: Path, *extra: str, **flags) -> int:
    return sd(["train", *train_argv(profile, out, "--overrides", json.dumps(SMALL_UNET), *extra, **flags)])


@pytest.fixture(scope="module")
def trained(profile, tmp_path_factory) -> Path:
    """A real run: 6 steps, checkpoints at steps 3 and 6 (keep_last 2)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert _train(profile, out, max_steps=6, checkpoint_every=3, keep_last=2) == 0
    assert [p.name for p in ck.list_checkpoints(out)] == ["step_00000003", "step_00000006"]
    return out


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A private copy of the trained run, for one test to damage."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def overwrite_middle(path: Path, n: int = 4096) -> None:
    """The attack: overwrite ``n`` bytes in the middle of a file (same size, so only a content hash sees it)."""
    size = path.stat().st_size
    assert size > 2 * n, f"{path} is too small to damage in the middle"
    with open(path, "r+b") as f:
        f.seek(size // 2 - n // 2)
        f.write(np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes())
    assert path.stat().st_size == size


def _one_error_line(err: str, prefix: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith(prefix)]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------- damaged checkpoints
def test_the_record_holds_the_sha256_of_each_file(trained):
    ckpt = trained / "step_00000006"
    record = ck.read_config(ckpt)
    assert set(record.files) == {"unet.safetensors", "ema.safetensors", "state.pt"}
    for name, digest in record.files.items():
        assert digest == ck.file_sha256(ckpt / name)
    assert ck.verify_checkpoint(ckpt) == record


@pytest.mark.parametrize("victim, flags", [("ema.safetensors", []), ("unet.safetensors", ["--no-ema"])])
def test_generate_refuses_a_damaged_weights_file(run, tmp_path, capsys, victim, flags):
    ckpt = run / "step_00000006"
    overwrite_middle(ckpt / victim)
    out = tmp_path / "images"
    rc = sd(["generate", "--checkpoint", str(run), "--prompt", "a red circle", "--steps", "2", "--device", "cpu",
             "--out", str(out), *flags])
    line = _one_error_line(capsys.readouterr().err, "sd generate:")
    assert rc != 0 and str(ckpt / victim) in line and "sha256" in line
    assert not out.exists() or not any(out.iterdir())  # no (black) image written


def test_train_resume_path_refuses_a_damaged_state_file(profile, run, capsys):
    ckpt = run / "step_00000006"
    overwrite_middle(ckpt / "state.pt")
    before = sorted(p.name for p in run.iterdir())
    rc = _train(profile, run, "--resume", str(ckpt), max_steps=9, checkpoint_every=3, keep_last=1)
    line = _one_error_line(capsys.readouterr().err, "sd train: error:")
    assert rc != 0 and str(ckpt / "state.pt") in line
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("step_")) == \
        [n for n in before if n.startswith("step_")]  # nothing saved, nothing pruned


def test_resume_auto_falls_back_to_the_newest_intact_checkpoint(profile, run, capsys):
    damaged = run / "step_00000006" / "ema.safetensors"
    overwrite_middle(damaged)
    # one step further than the damaged checkpoint, saving each step, keeping one: the pruning that deleted the
    # good checkpoint in the issue
    rc = _train(profile, run, "--resume", "auto", "--stop-after", "4", max_steps=6, checkpoint_every=1,
                keep_last=1)
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert f"resumed from {run / 'step_00000003'} at step 3" in out
    said = [ln for ln in err.splitlines() if "newest intact checkpoint" in ln]
    assert len(said) == 1 and str(run / "step_00000003") in said[0] and str(damaged) in said[0]
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == 4 and ck.latest_checkpoint(run).name == "step_00000004"
    state = ck.load_train_state(run)
    assert state["step"] == 4 and state["data"]["consumed_micro_batches"] == 4  # continued from step 3
    # the newest intact checkpoint was never pruned: the new one (step 4), resumed from step 3
    ck.verify_checkpoint(run / "step_00000004")
    assert ck.newest_intact_checkpoint(run) == run / "step_00000004"


def test_resume_auto_refuses_when_no_checkpoint_is_intact(profile, run, capsys):
    for step in ("step_00000003", "step_00000006"):
        overwrite_middle(run / step / "unet.safetensors")
    rc = _train(profile, run, "--resume", "auto", max_steps=9, checkpoint_every=3, keep_last=1)
    line = _one_error_line(capsys.readouterr().err, "sd train: error:")
    assert rc != 0 and "no intact checkpoint" in line
    assert [p.name for p in ck.list_checkpoints(run)] == ["step_00000003", "step_00000006"]  # none replaced


def test_nan_weights_with_a_matching_hash_are_refused(run):
    """A checkpoint saved with NaN weights (its hash is right): sampling would write black images."""
    sd_, meta = ck.load_weights(run / "step_00000006" / "ema.safetensors")
    first = next(iter(sd_))
    sd_[first] = torch.full_like(sd_[first], float("nan"))
    bad = ck.save_checkpoint(run, ck.read_config(run / "step_00000006"), unet_state=sd_, ema_state=sd_,
                             train_state=ck.load_train_state(run / "step_00000006"))
    with pytest.raises(ck.DamagedCheckpointError, match=re.escape(first)):
        ck.load_unet(bad)


class _Payload:
    """What a hostile state.pt carries: unpickling it would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_payload_in_state_is_refused_by_name(profile, run, tmp_path, capsys):
    ckpt = run / "step_00000006"
    marker = tmp_path / "pwned"
    state = ck.load_train_state(ckpt)
    state["extra"] = _Payload(marker)
    with open(ckpt / "state.pt", "wb") as f:
        torch.save(state, f)
    # the attacker also rewrote config.json's hash, so the file passes the integrity check
    record = json.loads((ckpt / "config.json").read_text())
    record["files"]["state.pt"] = ck.file_sha256(ckpt / "state.pt")
    (ckpt / "config.json").write_text(json.dumps(record))

    rc = _train(profile, run, "--resume", str(ckpt), max_steps=9, checkpoint_every=3)
    line = _one_error_line(capsys.readouterr().err, "sd train: error:")
    assert rc != 0 and f"{ckpt / 'state.pt'} is not a plain tensor checkpoint" in line
    assert "weights_only" not in line and "trust" not in line
    assert not marker.exists()


def test_old_checkpoints_without_hashes_load_as_unverified(run, caplog):
    ckpt = run / "step_00000006"
    record = json.loads((ckpt / "config.json").read_text())
    del record["files"]
    record["format"] = 1
    (ckpt / "config.json").write_text(json.dumps(record))
    with caplog.at_level("WARNING", logger="sd_core.training.checkpoint"):
        ck.load_unet(ckpt)
    assert any("unverified" in r.getMessage() and "ema.safetensors" in r.getMessage() for r in caplog.records)


# -------------------------------------------------------------------------------------- latent cache
def _shard(cache: Path, name: str, n: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    write_shard(cache, name, rng.standard_normal((n, 4, 8, 8)).astype(np.float32), [f"{name}{i}" for i in range(n)],
                [f"caption {i}" for i in range(n)], rng.integers(0, 50, (n, 6)), vae="v", resolution=64)


def test_a_truncated_latent_shard_is_named_with_both_sizes(tmp_path):
    cache = tmp_path / "latents"
    _shard(cache, "00000")
    _shard(cache, "00001", seed=1)
    npy = shard_paths(cache, "00001").latents
    full = npy.stat().st_size
    os.truncate(npy, full // 2)
    with pytest.raises(DamagedShardError) as e:
        LatentDataset(cache)
    assert str(e.value).startswith(f"latents/00001.npy is {full // 2:,} bytes, the manifest says {full:,}: "
                                   f"re-encode shard 00001")
    assert "mmap" not in str(e.value)
    assert len(LatentDataset(cache, shards=["00000"])) == 64  # the other shard still reads


def test_a_truncated_shard_of_an_old_manifest_is_named_too(tmp_path):
    cache = tmp_path / "latents"
    _shard(cache, "00001")
    manifest = json.loads((cache / "manifest.json").read_text())
    del manifest["shards"]["00001"]["files"]  # written before the manifest described files
    (cache / "manifest.json").write_text(json.dumps(manifest))
    npy = shard_paths(cache, "00001").latents
    os.truncate(npy, npy.stat().st_size - 1000)
    with pytest.raises(DamagedShardError, match=r"latents/00001\.npy is [\d,]+ bytes, its header describes "
                                                r"\(64, 4, 8, 8\) float16 = [\d,]+ bytes: re-encode shard 00001"):
        LatentDataset(cache)


def test_in_place_damage_is_found_by_the_sample_or_the_full_hash(tmp_path):
    cache = tmp_path / "latents"
    _shard(cache, "00001", n=512)
    npy = shard_paths(cache, "00001").latents
    with open(npy, "r+b") as f:  # the header (always sampled)
        f.seek(10)
        f.write(b"X")
    with pytest.raises(DamagedShardError, match="sampled sha256"):
        LatentDataset(cache)
    _shard(cache, "00001", n=512)
    overwrite_middle(npy, n=512)
    with pytest.raises(DamagedShardError, match=r"latents/00001\.npy differs .*sha256 mismatch"):
        LatentDataset(cache, verify="full")


def test_the_trainer_names_a_truncated_shard(profile, tmp_path, capsys):
    p = Profile.tiny(tmp_path / "data").with_overrides(SMALL_UNET)
    shutil.copytree(profile.data_root, p.data_root)
    npy = shard_paths(p.latents_dir, "00001").latents
    os.truncate(npy, npy.stat().st_size // 3)
    rc = _train(p, tmp_path / "out", max_steps=2)
    line = _one_error_line(capsys.readouterr().err, "sd train: error:")
    assert rc != 0 and "latents/00001.npy is" in line and "re-encode shard 00001" in line


# ----------------------------------------------------------------------------------------- disk full
@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (we run as root in CI); skipped, saying why, where mounting is not allowed."""
    d = tmp_path / "small"
    d.mkdir()
    if not shutil.which("mount"):
        pytest.skip("no mount command: cannot make a small filesystem to fill")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a 2 MiB tmpfs here ({r.stderr.strip() or r.returncode}): needs root")
    yield d
    subprocess.run(["umount", str(d)], check=False)


def _small_state(n: int = 1000) -> dict:
    return {"step": 1, "w": torch.zeros(n)}


@pytest.mark.parametrize("too_big", ["state", "ema"])
def test_a_full_disk_during_a_checkpoint_save_keeps_the_previous_one(small_disk, too_big):
    run = small_disk / "run"
    sd_ = {"w": torch.randn(20_000)}  # 80 kB per weights file
    rec = ck.CheckpointConfig(step=1, unet=ck.unet_config_from_dict({}))
    ck.save_checkpoint(run, rec, unet_state=sd_, ema_state=sd_, train_state=_small_state())
    big = torch.zeros(1_000_000)  # 4 MB: more than the disk holds
    with pytest.raises(DiskFullError) as e:
        ck.save_checkpoint(run, ck.CheckpointConfig(step=2, unet=rec.unet), unet_state=sd_,
                           ema_state={"w": big} if too_big == "ema" else sd_,
                           train_state={"w": big} if too_big == "state" else _small_state())
    assert str(e.value) == (f"no space left on {run} while writing step_00000002, previous checkpoint "
                            f"{run / 'step_00000001'} intact")
    assert sorted(p.name for p in run.iterdir()) == ["latest", "step_00000001"]  # no temporary left
    assert ck.newest_intact_checkpoint(run) == run / "step_00000001"


def test_a_full_disk_during_a_cache_write_keeps_the_previous_shard(small_disk):
    cache = small_disk / "latents"
    _shard(cache, "00001", n=16)
    before = read_manifest(cache)["00001"]
    rng = np.random.default_rng(0)
    n = 8000  # 8000 x 4x8x8 float16 = 4 MB
    with pytest.raises(DiskFullError, match=r"^no space left on .*latents while writing 00001\.(tokens\.)?npy, "
                                            r"the previous files of shard 00001 are intact$"):
        write_shard(cache, "00001", rng.standard_normal((n, 4, 8, 8)), [str(i) for i in range(n)], ["c"] * n,
                    np.zeros((n, 6)))
    assert read_manifest(cache)["00001"] == before
    assert not [p.name for p in cache.iterdir() if p.name.endswith(".tmp")]
    assert len(LatentDataset(cache, verify="full")) == 16


# ------------------------------------------------------------------------------- loopback rendezvous
WORKER = """
import os, sys, time
from pathlib import Path
import torch.distributed as dist
dist.init_process_group("gloo")
dist.barrier()
d = Path(sys.argv[1])
(d / f"ready{dist.get_rank()}").write_text(os.environ["MASTER_ADDR"])
while not (d / "go").exists():
    time.sleep(0.1)
dist.barrier()
"""


def _listening(pids: set[int]) -> list[str]:
    """Local addresses of the TCP sockets ``pids`` listen on (``ss -ltnp``)."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        if {int(p) for p in re.findall(r"pid=(\d+)", line)} & pids:
            found.append(line.split()[3])
    return found


def _tree(root: int) -> set[int]:
    """``root`` and all its descendants."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    tree, grew = {root}, True
    while grew:
        new = {pid for pid, ppid in parents.items() if ppid in tree} - tree
        tree |= new
        grew = bool(new)
    return tree


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to list listening sockets")
def test_single_node_rendezvous_listens_on_loopback_only(profile, tmp_path):
    cmd = trainer_command("tiny", profile.data_root, {}, tmp_path / "out", "r", "auto", 2, [])
    assert cmd[1:3] == ["-m", "sd_core.training.launch"] and "--standalone" not in cmd
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("GLOO_SOCKET_IFNAME", None)
    proc = subprocess.Popen([sys.executable, "-m", "sd_core.training.launch", "--nproc_per_node=2", str(script),
                             str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready{r}").exists() for r in (0, 1)):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the ranks did not rendezvous"
            time.sleep(0.2)
        addresses = _listening(_tree(proc.pid))
    finally:
        (tmp_path / "go").touch()
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert addresses and all(a.startswith("127.0.0.1:") for a in addresses), addresses
    assert (tmp_path / "ready1").read_text() == "127.0.0.1"
