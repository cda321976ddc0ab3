"""Training assets: `unet_checkpoint`, the UNet trained by `sd_core.train` under torchrun via Dagster Pipes.

The asset runs torchrun (the venv's own, ``sd_core.training.launch.trainer_command``: on one node
``python -m sd_core.training.launch --nproc_per_node=N -m sd_core.train ...``, its rendezvous on loopback)
through ``dg.PipesSubprocessClient``. Global rank 0 of the trainer opens Pipes and reports
the materialisation (steps, losses, samples/s, checkpoint path, wandb run) with the hash of the latent manifest
it trained on as data version; the other ranks only print (their output still reaches the run log). Here the
report is completed with our own lineage (the trained shard list, filter and source config, manifest hash:
Dagster stops tracking staleness past 100 upstream partitions), a loss-curve plot (train and validation, a
base64 PNG in markdown) and the asset check "the checkpoint loads and holds no NaN/inf".

N: ``TrainAssetConfig.nproc_per_node``, else ``TrainConfig.nproc_per_node``, else the visible GPU count, or 1 on
CPU. The run directory is ``{checkpoints_dir}/{run_name or the Dagster run id}``; with ``run_name`` set a later
materialisation continues the same run (``--resume auto``).

Failure and cancellation: a rank that raises writes its traceback to ``{run}/errors/rank{R}.txt``; torchrun
then stops the other ranks and exits non-zero, and the step fails with those tracebacks in its error. On
cancellation Pipes forwards SIGINT to torchrun, which terminates its workers; afterwards any trainer process
still alive (recorded in ``{run}/pids/``, matched on its command line) is terminated, so no trainer outlives
its run.

Several nodes (``nnodes > 1``, ``node_rank``, ``rdzv_endpoint`` = node rank 0's HOST:PORT, and a ``run_name``
so that every node names the same run directory on shared storage): each node runs this node's share,
``torchrun --nnodes=N --node-rank=R --nproc-per-node=G --rdzv-backend=static --rdzv-endpoint=HOST:PORT -m
sd_core.train ...`` (why static: `sd_core.training.launch`). Node rank 0 holds global rank 0, so its run
reports the materialisation. The other nodes run the same command, by hand, from Slurm or a Kubernetes job,
or as a Dagster run of this asset with their ``node_rank``: such a worker-node run trains its share without
Pipes (no rank of it reports), materialises nothing (the step succeeds, downstream steps are skipped) and
fails with the ranks' tracebacks when its share fails. Hence a ``multi_asset`` with ``can_subset``: an
``@asset`` with checks cannot leave its output out.
"""

import os
import signal
import subprocess
from pathlib import Path
from typing import Any, Iterator

import dagster as dg
from dagster._core.errors import DagsterPipesExecutionError  # not re-exported by `dagster` in 1.13

from sd_assets.assets.latents import frozen_components, latents
from sd_assets.resources import SDConfig, settings_read
from sd_core.config import Profile
from sd_core.training.launch import (check_nodes, node_global_ranks, rank_errors, stop_trainer_processes,
                                     trainer_command)
from sd_core.training.metrics_log import loss_curve_markdown, read_metrics

CHECK_NAME = "checkpoint_loads_and_is_finite"


class TrainAssetConfig(dg.Config):
    """Run config of `unet_checkpoint` (the recipe itself lives in the profile's ``train`` section; set it with
    the ``sd`` resource's ``overrides``, e.g. ``{"train": {"max_steps": 300}}``)."""

    run_name: str = ""  # run directory name under checkpoints/; "" = the Dagster run id (a fresh run)
    resume: str = "auto"  # auto | none | a checkpoint path
    nproc_per_node: int = 0  # 0: TrainConfig.nproc_per_node, else visible GPUs, else 1
    extra_args: list[str] = []  # appended to the trainer's command line (e.g. ["--compile"])
    env: dict[str, str] = {}  # extra environment for the trainer (NCCL settings, SD_TRAIN_FAULT in tests)
    nnodes: int = 1  # machines in the run; > 1: every node runs this node's share (module docs)
    node_rank: int = 0  # this node: 0 reports the checkpoint, others are worker nodes
    rdzv_endpoint: str = ""  # node rank 0's HOST:PORT, the same on every node; required when nnodes > 1


def _nproc(config: TrainAssetConfig, train_nproc: int | None) -> int:
    if config.nproc_per_node > 0:
        return config.nproc_per_node
    if train_nproc:
        return int(train_nproc)
    import torch  # here: the code location loads without torch (sd_assets.assets.latents)

    return max(1, torch.cuda.device_count())  # 0 without CUDA: one CPU process


def checkpoint_check(ckpt: Path | None) -> dg.AssetCheckResult:
    """Both weight sets of the checkpoint load into a UNet and hold only finite numbers."""
    from sd_core.training.checkpoint import load_unet, nonfinite_tensors

    if ckpt is None:
        return dg.AssetCheckResult(check_name=CHECK_NAME, passed=False, metadata={"error": "no checkpoint"})
    try:
        n_params = {}
        for ema in (True, False):
            unet = load_unet(ckpt, ema=ema)
            n_params["ema" if ema else "unet"] = sum(p.numel() for p in unet.parameters())
        bad = nonfinite_tensors(ckpt)
    except Exception as e:  # noqa: BLE001 - a check reports, it does not crash the step
        return dg.AssetCheckResult(check_name=CHECK_NAME, passed=False,
                                   metadata={"error": f"{type(e).__name__}: {e}", "checkpoint": str(ckpt)})
    n_bad = sum(len(v) for v in bad.values())
    return dg.AssetCheckResult(
        check_name=CHECK_NAME, passed=n_bad == 0,
        metadata={"checkpoint": dg.MetadataValue.path(str(ckpt)), "parameters": n_params["unet"],
                  "nonfinite_tensors": dg.MetadataValue.json(bad)},
    )


@dg.multi_asset(
    specs=[dg.AssetSpec("unet_checkpoint", group_name="training", deps=[latents, frozen_components],
                        kinds={"pytorch"}, code_version="unet_checkpoint-1", skippable=True,
                        metadata=settings_read("unet", "train"),
                        description="The UNet trained on every encoded latent shard (torchrun + Dagster Pipes).")],
    check_specs=[dg.AssetCheckSpec(CHECK_NAME, asset="unet_checkpoint", blocking=True,
                                   description="the checkpoint's UNet and EMA weights load and hold no NaN/inf")],
    can_subset=True,  # a worker node's run materialises nothing (module docs)
    pool="gpu",
)
def unet_checkpoint(context: dg.AssetExecutionContext, config: TrainAssetConfig, sd: SDConfig
                    ) -> Iterator[dg.MaterializeResult]:
    """The UNet trained on every encoded latent shard (torchrun + Dagster Pipes; see the module docs)."""
    profile = sd.get()
    data_root = profile.data_root.resolve()
    _check_node_config(config)
    run_id = config.run_name or context.run_id
    out = (profile.checkpoints_dir / run_id).resolve()
    nproc = _nproc(config, profile.train.nproc_per_node)
    cmd = trainer_command(profile.name, data_root, dict(sd.overrides or {}), out, run_id, config.resume, nproc,
                          list(config.extra_args), config.nnodes, config.node_rank, config.rdzv_endpoint)
    ranks = node_global_ranks(config.node_rank, nproc)
    _clear_rank_files(out, ranks)
    env = _trainer_env(profile, data_root, nproc, config.env)
    where = f"node {config.node_rank} of {config.nnodes}, " if config.nnodes > 1 else ""
    context.log.info(f"launching the trainer ({where}{nproc} process(es)): {' '.join(cmd)}")
    if config.node_rank > 0:
        _run_worker_node(context, cmd, env, out, ranks)
        context.log.info(f"worker node {config.node_rank}: global ranks {ranks.start}..{ranks.stop - 1} finished; "
                         f"node rank 0's run reports unet_checkpoint (nothing is materialised here)")
        return
    invocation = _run_trainer(context, cmd, env, out, ranks)
    yield _materialisation(invocation.get_materialize_result(), out, run_id, nproc, config.nnodes)


def _check_node_config(config: TrainAssetConfig) -> None:
    """Refuse inconsistent multi-node settings before anything starts, naming the run-config field."""
    try:
        check_nodes(config.nnodes, config.node_rank, config.rdzv_endpoint)
    except ValueError as e:
        raise dg.Failure(description=f"unet_checkpoint run config: {e}") from None
    if config.nnodes > 1 and not config.run_name:
        raise dg.Failure(description="unet_checkpoint run config: run_name is required when nnodes > 1, so that "
                                     "every node names the same run directory (on storage all nodes share)")


def _materialisation(reported: dg.MaterializeResult, out: Path, run_id: str, nproc: int, nnodes: int
                     ) -> dg.MaterializeResult:
    """What global rank 0 reported, with our lineage, the loss curve and the checkpoint check."""
    metadata: dict[str, Any] = dict(reported.metadata or {})
    ckpt = _trained_checkpoint(metadata, out)
    if ckpt is not None:
        metadata.update(_lineage_metadata(ckpt))
    records = read_metrics(out)
    if records:
        metadata["loss_curve"] = dg.MetadataValue.md(loss_curve_markdown(records))
    metadata["run_id"] = run_id
    metadata["nproc_per_node"] = nproc
    metadata["nnodes"] = nnodes
    data_version = reported.data_version or (dg.DataVersion(str(metadata["manifest_hash"]))
                                             if "manifest_hash" in metadata else None)
    return dg.MaterializeResult(metadata=metadata, data_version=data_version,
                                check_results=[checkpoint_check(ckpt)])


def _trainer_env(profile: Profile, data_root: Path, nproc: int, extra: dict[str, str]) -> dict[str, str]:
    env = {"PYTHONUNBUFFERED": "1", "SD_PROFILE": profile.name, "SD_DATA_ROOT": str(data_root)}
    if not _cuda_visible():  # torchrun would pin every CPU rank to one thread
        threads = max(1, (os.cpu_count() or 1) // nproc)
        env["OMP_NUM_THREADS"] = str(threads)
        if threads > 1:  # spinning OpenMP threads collapse next to another busy process (bench_train_threads.py)
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.update(extra)
    return env


def _clear_rank_files(out: Path, ranks: range) -> None:
    """Remove the tracebacks and pid files of this node's ``ranks`` from an earlier attempt in the same run
    directory (a continued ``run_name``), so a failure reports this attempt's ranks and only this attempt's
    trainers are stopped. Other nodes' files are theirs (a shared run directory)."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("errors", "pids"):
        for rank in ranks:
            for f in (out / stale).glob(f"rank{rank}.*"):
                f.unlink()


def _run_trainer(context: dg.AssetExecutionContext, cmd: list[str], env: dict[str, str], out: Path, ranks: range
                 ) -> dg.PipesClientCompletedInvocation:
    """torchrun under Pipes: a failure carries the ranks' tracebacks, and no trainer process outlives it."""
    client = dg.PipesSubprocessClient(forward_termination=True, termination_timeout_seconds=30)
    try:
        return client.run(context=context, command=cmd, env=env)
    except DagsterPipesExecutionError as e:
        raise _trainer_failure(str(e), out, cmd) from e
    finally:
        _stop_leftovers(context, out, ranks)


def _trainer_failure(what: str, out: Path, cmd: list[str]) -> dg.Failure:
    errors = rank_errors(out)
    return dg.Failure(
        description=f"the trainer failed: {what}\n{errors or '(no rank wrote a traceback; see the stderr log)'}",
        metadata={"output_dir": dg.MetadataValue.path(str(out)), "command": " ".join(cmd)},
    )


def _stop_leftovers(context: dg.AssetExecutionContext, out: Path, ranks: range) -> None:
    """Terminate this node's trainer processes still alive (never another node's, in a shared directory)."""
    left = stop_trainer_processes(out, ranks=ranks)
    if left:
        context.log.warning(f"terminated leftover trainer processes {left}")


def _run_worker_node(context: dg.AssetExecutionContext, cmd: list[str], env: dict[str, str], out: Path,
                     ranks: range) -> None:
    """A worker node's share, as a plain subprocess: none of its ranks opens Pipes, and a Pipes session that
    receives nothing makes Dagster expect a materialisation. Its output reaches the run's logs like a Pipes
    child's; cancellation forwards SIGINT to torchrun, as Pipes does."""
    proc = subprocess.Popen(cmd, env={**os.environ, **env})
    try:
        code = proc.wait()
    except BaseException:  # the run was cancelled or interrupted
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    finally:
        _stop_leftovers(context, out, ranks)
    if code != 0:
        raise _trainer_failure(f"torchrun exited with code {code}", out, cmd)


def _trained_checkpoint(reported: dict[str, Any], out: Path) -> Path | None:
    """The checkpoint the trainer reported as ``checkpoint_path``, else the latest under ``out``; None if none."""
    from sd_core.training.checkpoint import CheckpointError, resolve_checkpoint

    raw = reported.get("checkpoint_path")
    path = getattr(raw, "value", raw) if raw is not None else None
    try:
        return resolve_checkpoint(path or out)
    except CheckpointError:
        return None


def _lineage_metadata(ckpt: Path) -> dict[str, Any]:
    """Our own lineage: what this checkpoint was trained on, as the trainer recorded it in config.json."""
    from sd_core.training.checkpoint import read_config

    cfg = read_config(ckpt)
    return {"checkpoint_path": dg.MetadataValue.path(str(ckpt)), "step": cfg.step, "shards": list(cfg.shards),
            "num_shards": len(cfg.shards), "filter_config": cfg.filter, "source": cfg.source,
            "manifest_hash": cfg.manifest_hash, "train_config": cfg.train}


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()
