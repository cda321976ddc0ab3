"""Training across nodes, on loopback: two torchrun "nodes" (one process each, gloo, c10d rendezvous) train
exactly like one node with two processes, only global rank 0 writes, a node killed with SIGKILL (its torchrun
agent and its rank) takes the other down instead of leaving it hanging, and restarting both nodes resumes
bit-identically; from Dagster, `unet_checkpoint` runs node 0's share (static rendezvous, see
`sd_core.training.launch`) and materialises the checkpoint while the other node runs the same command.

Every run here uses the same settings (tiny profile, `train_support.SMALL_UNET`, 6 steps, checkpoints every 2),
so each is compared bit for bit with one reference: one node, two processes (``--nnodes=1``, the project's
loopback launcher). Output directories: each node is given its own ``--output-dir``; the trainer uses global
rank 0's on every rank (on a cluster: one path on shared storage), so the other node's stays absent.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import dagster as dg
import pytest
import torch

from sd_assets.assets.training import CHECK_NAME, unet_checkpoint
from sd_assets.resources import SDConfig
from sd_core.config import Profile
from sd_core.training import checkpoint as ck
from sd_core.training.launch import check_nodes, trainer_command, trainer_processes
from sd_core.training.metrics_log import read_metrics
from train_support import SMALL_UNET, make_tiny_data, train_argv

# the run's settings, as trainer flags (train_support.train_argv) and as the asset's profile overrides
FLAGS = {"max_steps": 6, "checkpoint_every": 2, "val_every": 3}
TRAIN = {"batch_size": 8, "max_steps": 6, "warmup_steps": 2, "log_every": 1, "checkpoint_every": 2, "val_every": 3,
         "val_share": 0.1, "val_max_samples": 16, "lr": 1e-3, "seed": 0}
OVERRIDES = {**SMALL_UNET, "train": TRAIN}
RUN_TIMEOUT_S = 240  # one launch takes ~30 s on a busy 2-core machine; a hang is what this guards against


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> Profile:
    p = Profile.tiny(tmp_path_factory.mktemp("multinode") / "data").with_overrides(SMALL_UNET)
    make_tiny_data(p)
    return p


def _env() -> dict[str, str]:
    """One thread per rank (two "nodes" share 2 cores), gloo on the loopback interface only."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1"}


def _trainer_args(profile: Profile, out: Path, *extra: str) -> list[str]:
    return ["-m", "sd_core.train", *train_argv(profile, out, "--overrides", json.dumps(SMALL_UNET), *extra, **FLAGS)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    """A node: its torchrun in a session of its own (so the whole node can be killed), output to ``log``."""
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, env=_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_node(proc: subprocess.Popen, ranks: list[int]) -> None:
    """A node dies: its torchrun agent's session and its ranks, SIGKILL. torchrun starts every rank in a
    session of its own, so killing the agent's process group alone would leave the ranks training."""
    for pid in ranks:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _rank_pid(out: Path, rank: int) -> int:
    return int(json.loads((out / "pids" / f"rank{rank}.json").read_text())["pid"])


def _wait(proc: subprocess.Popen, log: Path, out: Path | None = None, timeout: float = RUN_TIMEOUT_S) -> int:
    """torchrun's exit code; a hang fails the test (after killing the node and the ranks it recorded)."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_node(proc, trainer_processes(out) if out is not None else [])
        pytest.fail(f"torchrun did not exit within {timeout} s (a hang); its log:\n{log.read_text()[-3000:]}")


def _c10d_node(profile: Profile, node_rank: int, port: int, out: Path, *extra: str) -> list[str]:
    """The issue's command for one of two nodes: c10d rendezvous at node 0's 127.0.0.1:PORT, 1 process."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node_rank}",
            "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
            *_trainer_args(profile, out, *extra)]


def _start_two_c10d_nodes(profile: Profile, port: int, outs: tuple[Path, Path], logs: Path, *extra: str
                          ) -> tuple[subprocess.Popen, subprocess.Popen]:
    """Node 0, then (once its agent hosts the rendezvous store) node 1. c10d ignores --node_rank and numbers
    the nodes by host name, then agent PID: on one machine the node started first holds global rank 0."""
    node0 = _start(_c10d_node(profile, 0, port, outs[0], *extra), logs / "node0.log")
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not _listening(port):
        assert node0.poll() is None, (logs / "node0.log").read_text()
        assert time.monotonic() < deadline, "node 0's rendezvous store never listened"
        time.sleep(0.1)
    return node0, _start(_c10d_node(profile, 1, port, outs[1], *extra), logs / "node1.log")


def _weights(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {kind: ck.load_unet(path, ema=kind == "ema").state_dict() for kind in ("unet", "ema")}


def _same_weights(a: Path, b: Path) -> bool:
    x, y = _weights(a), _weights(b)
    return all(x[k].keys() == y[k].keys() and all(torch.equal(x[k][n], y[k][n]) for n in x[k]) for k in x)


def _metrics(out: Path) -> list[tuple]:
    """What a user compares in metrics.jsonl: every train and validation record, timings left out."""
    return [(r["kind"], r["step"], r.get("loss"), r.get("grad_norm"), r.get("lr"), r.get("val_loss"))
            for r in read_metrics(out)]


@pytest.fixture(scope="module")
def reference(profile, tmp_path_factory) -> Path:
    """One node, two processes: ``--nnodes=1 --nproc_per_node=2`` with the rendezvous on loopback."""
    out = tmp_path_factory.mktemp("one-node") / "run"
    log = out.parent / "torchrun.log"
    t0 = time.monotonic()
    proc = _start([sys.executable, "-m", "sd_core.training.launch", "--nproc_per_node=2",
                   *_trainer_args(profile, out)], log)
    assert _wait(proc, log, out) == 0, log.read_text()[-3000:]
    print(f"one node x 2 processes: {time.monotonic() - t0:.1f} s")
    assert [p.name for p in ck.list_checkpoints(out)][-1] == "step_00000006"
    return out


# ------------------------------------------------------------------------------ two torchrun nodes (c10d)
@pytest.fixture(scope="module")
def killed(profile, tmp_path_factory) -> dict:
    """Two c10d nodes; once a checkpoint exists, node 1 dies: its torchrun agent and its rank, SIGKILL.
    Global rank 0 is paused (SIGSTOP) for the kill, so the run cannot finish first; then it carries on and
    meets its dead peer. Returns the directories, exit codes and the checkpoints left behind."""
    base = tmp_path_factory.mktemp("two-nodes")
    outs, port = (base / "node0-out", base / "node1-out"), _free_port()
    t0 = time.monotonic()
    node0, node1 = _start_two_c10d_nodes(profile, port, outs, base)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not ck.list_checkpoints(outs[0]):
        assert node0.poll() is None and node1.poll() is None, (base / "node0.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    rank0 = _rank_pid(outs[0], 0)
    os.kill(rank0, signal.SIGSTOP)
    try:
        _kill_node(node1, [_rank_pid(outs[0], 1)])  # rank 1 recorded its PID in global rank 0's directory
    finally:
        os.kill(rank0, signal.SIGCONT)
    t_kill = time.monotonic()
    codes = (_wait(node0, base / "node0.log", outs[0]), node1.returncode)
    torn_down_s = time.monotonic() - t_kill
    left = [p.name for p in ck.list_checkpoints(outs[0])]
    print(f"two nodes until the kill: {t_kill - t0:.1f} s; node 0 exited {torn_down_s:.1f} s after it")
    return {"base": base, "outs": outs, "port": port, "codes": codes, "torn_down_s": torn_down_s,
            "checkpoints": left, "latest": ck.latest_checkpoint(outs[0]).name,
            "logs": [(base / f"node{r}.log").read_text() for r in (0, 1)]}


@pytest.fixture(scope="module")
def restarted(profile, killed) -> dict:
    """Both nodes started again with the same commands and ``--resume auto``."""
    base, outs = killed["base"], killed["outs"]
    t0 = time.monotonic()
    node0, node1 = _start_two_c10d_nodes(profile, _free_port(), outs, base, "--resume", "auto")
    codes = (_wait(node0, base / "node0.log", outs[0]), _wait(node1, base / "node1.log", outs[0]))
    print(f"two nodes resumed: {time.monotonic() - t0:.1f} s")
    return {"codes": codes, "logs": [(base / f"node{r}.log").read_text() for r in (0, 1)]}


def test_killing_one_node_tears_down_both(killed):
    node0_code, node1_code = killed["codes"]
    assert node1_code == -signal.SIGKILL
    assert node0_code != 0, "node 0 reported success although its peer was killed"
    assert killed["torn_down_s"] < RUN_TIMEOUT_S
    assert killed["latest"] != "step_00000006", "the run finished before node 1 was killed"
    assert not trainer_processes(killed["outs"][0]), "a trainer process outlived its node"


def test_only_global_rank_0_writes_and_the_other_nodes_directory_stays_empty(killed, restarted):
    out0, out1 = killed["outs"]
    assert not out1.exists()  # node 1's --output-dir: its ranks wrote into global rank 0's
    assert sorted(p.name for p in (out0 / "pids").iterdir()) == ["rank0.json", "rank1.json"]
    assert (out0 / "metrics.jsonl").exists() and (out0 / "result.json").exists()
    assert ck.read_config(out0).world_size == 2
    # only rank 0 logs: the start-up line is on node 0's console, not node 1's
    assert "[train] tiny profile" in killed["logs"][0] and "[train] tiny profile" not in killed["logs"][1]


def test_two_nodes_train_like_one_node_with_two_processes(killed, reference):
    """Up to the kill the two nodes trained uninterrupted: the checkpoints they wrote are bit-identical to the
    one-node run's at the same steps (the whole run is compared after the resume, below)."""
    out0 = killed["outs"][0]
    assert killed["checkpoints"]
    for name in killed["checkpoints"]:
        assert _same_weights(out0 / name, reference / name), name


def test_restarted_nodes_resume_from_the_last_checkpoint_bit_identically(killed, restarted, reference):
    out0 = killed["outs"][0]
    assert restarted["codes"] == (0, 0), restarted["logs"][0][-3000:]
    step = int(killed["latest"].removeprefix("step_"))
    assert f"resumed from {out0 / killed['latest']} at step {step}" in restarted["logs"][0]
    assert ck.latest_checkpoint(out0).name == "step_00000006"
    assert _metrics(out0) == _metrics(reference)
    assert [s for k, s, *_ in _metrics(out0) if k == "train"] == [1, 2, 3, 4, 5, 6]
    assert _same_weights(out0, reference)
    assert ck.load_train_state(out0)["step"] == 6


# ------------------------------------------------------------------------------------------- from Dagster
def _materialize(profile: Profile, **config) -> dg.ExecuteInProcessResult:
    return _materialize_with_logs(profile, **config)[0]


def _materialize_with_logs(profile: Profile, **config) -> tuple[dg.ExecuteInProcessResult, str]:
    """`unet_checkpoint` on a fresh instance; the result and the run's log messages."""
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [unet_checkpoint], instance=instance, raise_on_error=False,
            resources={"sd": SDConfig(profile="tiny", data_root=str(profile.data_root), overrides=OVERRIDES)},
            run_config={"ops": {"unet_checkpoint": {"config": config}}},
        )
        return result, "\n".join(e.user_message for e in instance.all_logs(result.run_id))


def _failure_message(result: dg.ExecuteInProcessResult) -> str:
    failure = next(e for e in result.all_events if e.is_step_failure)
    return failure.event_specific_data.error.to_string()


@pytest.mark.parametrize("nnodes, node_rank, endpoint, message", [
    (2, 0, "", "rdzv_endpoint is required when nnodes > 1"),
    (1, 0, "127.0.0.1:29400", "rdzv_endpoint ('127.0.0.1:29400') is only used with nnodes > 1"),
    (2, 0, "127.0.0.1", "rdzv_endpoint '127.0.0.1' is not HOST:PORT"),
    (2, 0, "127.0.0.1:70000", "rdzv_endpoint '127.0.0.1:70000' is not HOST:PORT"),
    (2, 0, "-h:29400", "rdzv_endpoint '-h:29400' is not HOST:PORT"),
    (2, 2, "h:1", "node_rank must be in 0..1 (nnodes=2), got 2"),
    (0, 0, "", "nnodes must be a whole number >= 1, got 0"),
])
def test_inconsistent_node_settings_are_refused_naming_the_field(nnodes, node_rank, endpoint, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_nodes(nnodes, node_rank, endpoint)


# Two real gloo ranks (the trainer's own init_distributed, from torchrun's variables) that restored different
# points: rank 1's node saw no checkpoint in its --output-dir (not rank 0's storage).
_DISAGREEING_RANK = """
import sys
from pathlib import Path
from sd_core.training import checkpoint as ck, distributed as D, trainer as T
info = D.init_distributed("cpu")
point = (Path(sys.argv[1]), 4) if info.rank == 0 else (None, 0)
try:
    T.agree_on_resume(T.Progress(step=point[1], resumed_from=point[0]), info)
    print("agreed")
except ck.CheckpointError as e:
    print(f"refused: {e}")
"""


def test_ranks_that_would_resume_from_different_points_are_refused(tmp_path):
    latest = tmp_path / "run" / "step_00000004"
    env = {**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    ranks = [subprocess.Popen([sys.executable, "-c", _DISAGREEING_RANK, str(latest)], env={**env, "RANK": str(r),
                              "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    outs = [proc.communicate(timeout=RUN_TIMEOUT_S)[0] for proc in ranks]
    for out in outs:  # on both ranks, before a step: which rank saw what, and what to fix
        assert (f"refused: the ranks would resume from different points (rank 0: {latest} (step 4); "
                "rank 1: no checkpoint (step 0)): every node must see rank 0's --output-dir (shared storage)") in out, out


def test_cluster_endpoints_are_accepted():
    for endpoint in ("node-0.cluster.local:29400", "10.0.0.1:29400", "[fd00::1]:29400"):
        check_nodes(2, 1, endpoint)
    check_nodes(1, 0, "")


def test_a_node_runs_torchrun_with_a_static_rendezvous_at_node_0():
    cmd = trainer_command("tiny", Path("/d"), {}, Path("/o"), "run1", "auto", 8, [], nnodes=2, node_rank=1,
                          rdzv_endpoint="10.0.0.1:29400")
    assert cmd[1:cmd.index("sd_core.train")] == [
        "-m", "torch.distributed.run", "--nnodes=2", "--node-rank=1", "--nproc-per-node=8", "--rdzv-backend=static",
        "--rdzv-endpoint=10.0.0.1:29400", "-m"]
    one = trainer_command("tiny", Path("/d"), {}, Path("/o"), "run1", "auto", 2, [])
    assert one[1:4] == ["-m", "sd_core.training.launch", "--nproc_per_node=2"]  # one node: loopback, as before


@pytest.mark.parametrize("config, message", [
    ({"run_name": "r", "nnodes": 2}, "rdzv_endpoint is required when nnodes > 1"),
    ({"nnodes": 2, "rdzv_endpoint": "127.0.0.1:29400"}, "run_name is required when nnodes > 1"),
])
def test_the_asset_refuses_them_before_starting_anything(profile, config, message):
    result = _materialize(profile, **config)
    assert not result.success and not result.get_asset_materialization_events()
    error = _failure_message(result)
    assert "unet_checkpoint run config:" in error and message in error, error
    assert not (profile.checkpoints_dir / "r").exists()


@contextlib.contextmanager
def _other_node(profile: Profile, node_rank: int, port: int, run: str, log: Path) -> Iterator[subprocess.Popen]:
    """The other node's share: the very command `unet_checkpoint` runs on a node (`trainer_command`)."""
    out = (profile.checkpoints_dir / run).resolve()
    cmd = trainer_command("tiny", profile.data_root.resolve(), OVERRIDES, out, run, "auto", 1, [], nnodes=2,
                          node_rank=node_rank, rdzv_endpoint=f"127.0.0.1:{port}")
    proc = _start(cmd, log)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            _kill_node(proc, trainer_processes(out))


def _node_config(run: str, node_rank: int, port: int) -> dict:
    return {"run_name": run, "nnodes": 2, "node_rank": node_rank, "rdzv_endpoint": f"127.0.0.1:{port}",
            "nproc_per_node": 1, "env": {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}}


@pytest.mark.slow  # ~30 s of two more torchrun nodes plus a Dagster run: keeps `make test` under 10 minutes
def test_dagster_runs_node_0_and_materialises_the_two_node_checkpoint(profile, reference, tmp_path):
    run, port = "two-nodes", _free_port()
    t0 = time.monotonic()
    with _other_node(profile, 1, port, run, tmp_path / "node1.log") as node1:
        result = _materialize(profile, **_node_config(run, 0, port))
        assert _wait(node1, tmp_path / "node1.log", profile.checkpoints_dir / run) == 0
    print(f"Dagster node 0 + torchrun node 1: {time.monotonic() - t0:.1f} s")
    assert result.success, _failure_message(result)
    [mat] = [e.event_specific_data.materialization for e in result.get_asset_materialization_events()]
    md = {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
    out = (profile.checkpoints_dir / run).resolve()
    assert md["world_size"] == 2 and md["nnodes"] == 2 and md["nproc_per_node"] == 1 and md["steps"] == 6
    assert str(md["checkpoint_path"]) == str(out / "step_00000006")
    [check] = result.get_asset_check_evaluations()
    assert check.check_name == CHECK_NAME and check.passed
    # the uninterrupted two-node run, end to end: the one-node run's losses and weights
    assert _metrics(out) == _metrics(reference)
    assert _same_weights(out, reference)


@pytest.mark.slow
def test_a_worker_node_run_trains_its_share_and_materialises_nothing(profile, tmp_path):
    run, port = "worker-node", _free_port()
    with _other_node(profile, 0, port, run, tmp_path / "node0.log") as node0:
        result, logs = _materialize_with_logs(profile, **_node_config(run, 1, port))
        assert _wait(node0, tmp_path / "node0.log", profile.checkpoints_dir / run) == 0
    assert result.success, _failure_message(result)
    assert not result.get_asset_materialization_events() and not result.get_asset_check_evaluations()
    assert "worker node 1: global ranks 1..1 finished" in logs
    assert ck.latest_checkpoint(profile.checkpoints_dir / run).name == "step_00000006"  # node 0 wrote it
