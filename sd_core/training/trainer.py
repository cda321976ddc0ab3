"""The UNet trainer: a program of its own, the same command by hand, from Dagster, on one GPU or many.

Its command line is `sd_core.train` (``python -m sd_core.train``, ``torchrun ... -m sd_core.train``, ``sd train``),
its flags and settings `sd_core.training.args`. :func:`train` reads top to bottom: start up, build the data, the
text conditioning and the model, seed, restore (resume), open the log, wrap for DDP/compile, the loop (one
optimiser step; log, validate and save on their intervals), report.

Recipe (DESIGN.md section 5, the seeds): latents from the memory-mapped cache
(`sd_core.encoding.latent_cache.LatentDataset`) under a ``DistributedSampler``; the frozen text encoder runs on
the cached token ids (CFG dropout replaces a caption's ids with the ids of the empty prompt "", the sampler's
unconditional convention); uniform timesteps and Gaussian noise (``--noise-offset``: plus a per-channel
constant); ε-prediction MSE (or v-prediction, on a zero-terminal-SNR schedule if asked) with optional Min-SNR-γ
weights; AdamW (fused on CUDA and CPU), linear warmup then cosine to lr × ``min_lr_ratio`` (1e-2;
`sd_core.training.lr_schedule`); gradient clipping; gradient accumulation with DDP ``no_sync``; bf16 autocast
(``--precision``: by default on CUDA only); EMA after every optimiser step (`sd_core.model.ema`).

Defaults come from the profile (``--profile``, ``--overrides`` JSON), every recipe flag overrides its
``TrainConfig`` field. Checkpoints (`sd_core.training.checkpoint`) go to ``--output-dir`` every
``--checkpoint-every`` steps and at the end; ``--resume auto`` continues from ``{output-dir}/latest`` when it
exists, ``--resume PATH`` from a given checkpoint. Model, EMA, optimiser, LR schedule, step, every rank's RNG
states and the data position are restored: on CPU the continued run is bit-identical to an uninterrupted one
(same world size, batch size and accumulation). The data order is a pure function of (seed, epoch): each epoch
is a ``DistributedSampler`` permutation, and a resumed run skips the micro-batches already consumed
(`sd_core.training.data_order`). ``--stop-after STEP`` ends an invocation early without shortening the LR schedule.

Validation: samples whose (shard, row) hash falls below ``--val-share`` form a held-out split that is never
trained on (independent of the seed and of other shards, so it stays fixed as shards are added); up to
``val_max_samples`` of them are scored every ``--val-every`` steps with the plain (unweighted) MSE at fixed timesteps and
fixed noise (their own generator, so validation never disturbs the training RNG).

A non-finite loss or gradient norm stops training with :class:`NonFiniteLossError` naming the step, before the
optimiser step and before any checkpoint: the last good checkpoint stays the ``latest``.

Outputs in ``--output-dir``: ``step_*/`` checkpoints + ``latest``, ``metrics.jsonl`` (`sd_core.training.metrics_log`),
``result.json`` (final metrics, rank 0), ``errors/rank{R}.txt`` (the traceback of a rank that failed) and
``pids/rank{R}.json`` (so a launcher can clean up after a cancelled run). When launched by Dagster
(``DAGSTER_PIPES_CONTEXT`` set) global rank 0, and only it, opens Dagster Pipes: log lines go to the run log and
the final metrics are reported as the asset materialisation, with the latent manifest hash as data version.

Fault injection (tests only): the environment variable ``SD_TRAIN_FAULT`` holds comma-separated faults,
``nan@STEP`` (multiply the loss of optimiser step STEP, 1-based, by NaN: loss and gradients become NaN) and
``crash@STEP[:RANK]`` (raise ``RuntimeError("injected crash ...")`` on that rank, all ranks when omitted, at the
start of step STEP; STEP 0 = right after start-up).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from sd_core import accel
from sd_core.atomic import DiskFullError, write_json_atomic
from sd_core.config import TrainConfig
from sd_core.encoding import components as C
from sd_core.encoding.latent_cache import DamagedShardError, LatentDataset
from sd_core.encoding.versions import component_sources
from sd_core.model.ema import EMA
from sd_core.model.schedulers import DDPMScheduler
from sd_core.model.unet import UNetModel
from sd_core.training import checkpoint as ckpt
from sd_core.training import distributed as D
from sd_core.training.args import Settings, build_parser, resolve_settings
from sd_core.training.data_order import BatchReader, MicroBatches, split_indices
from sd_core.training.faults import Faults
from sd_core.training.lr_schedule import WarmupCosine
from sd_core.training.metrics_log import MetricsLogger
from sd_core.training.rng import rank_seed, rng_state, seed_rank, set_rng_state

RESULT_FILE = "result.json"
VAL_SEED = 20240601  # fixed: validation noise and timesteps do not depend on the training seed


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm of an optimiser step was NaN or infinite."""


# ====================================================================================== the run's pieces
@dataclass
class Data:
    """The latent cache as this rank sees it: training and held-out indices, the micro-batch order."""

    dataset: LatentDataset
    train_idx: np.ndarray
    val_idx: np.ndarray
    batches: MicroBatches
    total_steps: int  # the LR schedule's length, even when --stop-after ends this invocation sooner


@dataclass
class TextConditioner:
    """The frozen text encoder (it runs on the cached token ids) and the ids CFG dropout swaps in."""

    encoder: Any  # a transformers CLIPTextModel in eval mode
    empty_ids: torch.Tensor  # the empty prompt "", the sampler's unconditional embedding
    token_len: int
    hidden: int


@dataclass
class Model:
    """The UNet and what updates it. ``forward`` is what a training step calls (the UNet, DDP-wrapped and/or
    compiled, see :func:`wrap_for_training`); validation and checkpoints use ``unet`` itself."""

    unet: UNetModel
    ema: EMA
    optimizer: torch.optim.AdamW
    lr_sched: WarmupCosine
    noise_sched: DDPMScheduler
    ddp: DDP | None = None
    forward: Callable[..., torch.Tensor] | None = None


@dataclass
class Validation:
    """Fixed noise and timesteps of the held-out samples, drawn once from their own generator."""

    noise: torch.Tensor
    t: torch.Tensor


@dataclass
class Progress:
    """Where the run stands: restored on resume, advanced by the loop, saved in checkpoints, reported."""

    step: int = 0
    best_loss: float | None = None
    best_val: float | None = None
    last_loss: float | None = None
    last_val: float | None = None
    resumed_from: Path | None = None
    last_checkpoint: str | None = None

    def took_step(self, loss: float) -> None:
        self.step += 1
        self.last_loss = loss
        self.best_loss = loss if self.best_loss is None else min(self.best_loss, loss)

    def validated(self, val_loss: float) -> None:
        self.last_val = val_loss
        self.best_val = val_loss if self.best_val is None else min(self.best_val, val_loss)


@dataclass
class Run:
    """What the steps of one run share: built once by :func:`train`, passed to each step explicitly."""

    settings: Settings
    info: D.DistInfo
    faults: Faults
    data: Data
    text: TextConditioner
    model: Model
    gen: torch.Generator  # this rank's draws of noise, t and CFG dropout (see rng.seed_rank)
    log: MetricsLogger
    validation: Validation | None  # None: no held-out samples
    record: ckpt.CheckpointConfig  # every checkpoint's config.json, with its own step

    @property
    def tcfg(self) -> TrainConfig:
        return self.settings.train

    @property
    def device(self) -> torch.device:
        return self.info.device

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast when ``train.precision`` resolves to bf16 (auto: on CUDA), on CPU too (`sd_core.accel`)."""
        return accel.autocast(self.tcfg.precision, self.device)

    def predict(self, module: Callable[..., torch.Tensor], x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                tok: torch.Tensor) -> torch.Tensor:
        """``module``'s prediction (ε or v) for ``x0`` noised with ``noise`` to timesteps ``t``, given token ids
        ``tok``."""
        with torch.no_grad(), self.autocast():
            ctx = self.text.encoder(tok)[0]
        memory_format = torch.channels_last if self.tcfg.channels_last else torch.contiguous_format
        xt = self.model.noise_sched.add_noise(x0, noise, t).contiguous(memory_format=memory_format)
        with self.autocast():
            return module(xt, t, ctx)


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample MSE against the target (ε, or v; the mean over channels and pixels), times Min-SNR-γ
    ``weights`` if given."""
    per_sample = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
    return per_sample if weights is None else per_sample * weights


# ================================================================================================ train
@dataclass
class TrainResult:
    """What a run ended with (every rank returns it; rank 0 writes it to result.json and reports it)."""

    steps: int
    final_loss: float | None
    best_loss: float | None
    final_val_loss: float | None
    best_val_loss: float | None
    samples_per_s: float | None
    checkpoint: str | None
    manifest_hash: str
    shards: list[str]
    world_size: int
    wandb_run: str | None
    output_dir: str
    num_train_samples: int
    num_val_samples: int

    def as_metadata(self) -> dict[str, Any]:
        """The final metrics as Dagster Pipes metadata (paths typed as paths; unset values left out)."""
        md: dict[str, Any] = {
            "steps": self.steps,
            "final_loss": self.final_loss,
            "best_loss": self.best_loss,
            "final_val_loss": self.final_val_loss,
            "best_val_loss": self.best_val_loss,
            "samples_per_s": self.samples_per_s,
            "checkpoint_path": {"raw_value": self.checkpoint, "type": "path"} if self.checkpoint else None,
            "output_dir": {"raw_value": self.output_dir, "type": "path"},
            "manifest_hash": self.manifest_hash,
            "world_size": self.world_size,
            "wandb_run": self.wandb_run or "disabled",
            "num_train_samples": self.num_train_samples,
            "num_val_samples": self.num_val_samples,
        }
        return {k: v for k, v in md.items() if v is not None}


def train(settings: Settings) -> TrainResult:
    """Run one training job (this process's part of it); returns the final metrics (on every rank).

    On failure the exception passes through the run's context managers (Dagster Pipes reports it to the run;
    :func:`main` writes the traceback to ``errors/rank{R}.txt``) and the process group is left to die with the
    process: a clean destroy could wait on a dead peer."""
    faults = Faults.from_env()
    info = D.init_distributed(settings.device)
    # every rank writes to rank 0's directory (a default run id is a timestamp: ranks could disagree)
    settings.output_dir = Path(D.broadcast_object(str(settings.output_dir), info))
    with contextlib.ExitStack() as stack:
        pipes = start_up(settings.output_dir, info, stack)
        faults.maybe_crash(0, info.rank)
        data = build_data(settings, info)
        text = load_text_conditioner(settings, data.dataset, info.device)
        model = build_model(settings, data.total_steps, info.device)
        # per-rank seeds for everything random in the loop; a dedicated generator draws noise, t and dropout
        gen = seed_rank(settings.train.seed, info.rank, info.device)
        progress = restore(settings, info, model, gen)
        agree_on_resume(progress, info)
        log, wandb_run = open_log(settings, info, progress, pipes, stack)
        log.info(describe_run(settings, info, data, model.unet, progress))
        wrap_for_training(model, info, settings.train.compile)
        run = Run(settings, info, faults, data, text, model, gen, log,
                  validation=fixed_validation(data, model.noise_sched),
                  record=checkpoint_record(settings, info, data.dataset, text))
        throughput = train_loop(run, progress)
        result = report(run, progress, throughput, wandb_run, pipes)
    D.cleanup(info)
    return result


def train_loop(run: Run, progress: Progress) -> Throughput:
    """Optimiser steps up to this invocation's end, logging, validating and checkpointing on their intervals."""
    tcfg = run.tcfg
    batches = micro_batches(run, progress.step)
    throughput = Throughput(tcfg.batch_size * tcfg.grad_accum * run.info.world_size)
    run.model.unet.train()
    if progress.resumed_from is None:  # the baseline: validation loss of the initial weights
        log_validation(run, 0, validate(run))
        throughput.restart_clock()
    end = min(run.data.total_steps, run.settings.stop_after) if run.settings.stop_after else run.data.total_steps
    while progress.step < end:
        run.faults.maybe_crash(progress.step + 1, run.info.rank)
        loss, grad_norm, lr = optimiser_step(run, batches, progress)
        progress.took_step(loss)
        throughput.steps += 1
        step = progress.step
        if step % tcfg.log_every == 0 or step == end:
            log_train(run, step, loss, grad_norm, lr, throughput.measure(run.device))
            throughput.new_window()
        if step % tcfg.val_every == 0 or step == end:
            val_loss = validate(run)
            if val_loss is not None:
                progress.validated(val_loss)
            log_validation(run, step, val_loss)
            throughput.restart_clock()
        if step % tcfg.checkpoint_every == 0 or step == end:
            progress.last_checkpoint = str(save(run, progress))  # "None" on ranks other than 0
            throughput.restart_clock()
    return throughput


# ============================================================================================= start-up
def start_up(out: Path, info: D.DistInfo, stack: contextlib.ExitStack) -> Any:
    """The run directory with this rank's PID (so a launcher can clean up after a cancelled run), Dagster Pipes
    on rank 0 when launched by Dagster (closed by ``stack``), TF32 matmuls on CUDA. Returns Pipes or None."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "pids").mkdir(exist_ok=True)
    write_json_atomic(out / "pids" / f"rank{info.rank}.json", {"pid": os.getpid(), "ppid": os.getppid()})
    pipes = _open_pipes(stack) if info.is_main else None
    if info.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return pipes


def _open_pipes(stack: contextlib.ExitStack) -> Any:
    if "DAGSTER_PIPES_CONTEXT" not in os.environ:
        return None
    from dagster_pipes import open_dagster_pipes  # only when launched by Dagster

    return stack.enter_context(open_dagster_pipes())


def build_data(settings: Settings, info: D.DistInfo) -> Data:
    """The latent cache, its held-out split, this rank's micro-batch order and the run's length in steps."""
    tcfg = settings.train
    dataset = LatentDataset(settings.latents_dir, settings.shards)
    if len(dataset) == 0:
        raise RuntimeError(f"the latent cache {settings.latents_dir} is empty: encode some shards first")
    train_idx, val_idx = split_indices(dataset, tcfg.val_share)
    if len(val_idx) > tcfg.val_max_samples:  # an evenly spread, fixed subset (every shard contributes)
        val_idx = val_idx[np.linspace(0, len(val_idx) - 1, tcfg.val_max_samples).round().astype(np.int64)]
    batches = MicroBatches(train_idx, batch_size=tcfg.batch_size, grad_accum=tcfg.grad_accum,
                           world_size=info.world_size, rank=info.rank, seed=tcfg.seed)
    if batches.steps_per_epoch == 0:
        raise ValueError(
            f"{len(train_idx)} training samples are too few for one optimiser step of batch_size "
            f"{tcfg.batch_size} x grad_accum {tcfg.grad_accum} x {info.world_size} processes")
    total = tcfg.max_steps or 0
    if tcfg.epochs is not None:
        by_epochs = tcfg.epochs * batches.steps_per_epoch
        total = min(total, by_epochs) if tcfg.max_steps else by_epochs
    return Data(dataset, train_idx, val_idx, batches, total)


def load_text_encoder(settings: Settings, device: torch.device) -> tuple[Any, Any]:
    """(frozen text encoder in eval mode on ``device``, tokenizer) of the profile (`sd_core.encoding.components`), or
    from ``--components-dir`` (its ``text_encoder/`` and ``tokenizer/``)."""
    import transformers  # here, not at the top: every process that loads the code location imports this module

    transformers.utils.logging.disable_progress_bar()
    if settings.components_dir is not None:
        te_src, tok_src = str(settings.components_dir / "text_encoder"), str(settings.components_dir / "tokenizer")
    else:
        src = component_sources(settings.profile)
        te_src, tok_src = src.text_encoder, src.tokenizer
    for s in (te_src, tok_src):
        if (settings.components_dir is not None or settings.profile.components.build_tiny) and not Path(s).is_dir():
            raise FileNotFoundError(f"{s} not found: materialise the `frozen_components` asset first "
                                    f"(or pass --components-dir)")
    text_encoder = C.load_text_encoder(te_src, device=device, dtype=torch.float32)
    tokenizer = C.load_tokenizer(tok_src, settings.profile.components.max_length)
    return text_encoder, tokenizer


def empty_prompt_ids(tokenizer: Any, length: int) -> torch.Tensor:
    """Token ids of "" padded to ``length``, exactly as the sampler and the latent cache tokenize."""
    return C.tokenize(tokenizer, [""], length)[0]


def load_text_conditioner(settings: Settings, dataset: LatentDataset, device: torch.device) -> TextConditioner:
    """The text encoder, checked against the UNet's context width, and the empty prompt at the cache's length."""
    text_encoder, tokenizer = load_text_encoder(settings, device)
    hidden = int(text_encoder.config.hidden_size)
    if hidden != settings.profile.unet.ctx_dim:
        raise ValueError(f"text encoder hidden size {hidden} != UNet ctx_dim {settings.profile.unet.ctx_dim}")
    token_len = int(dataset.get_batch([0])[1].shape[1])
    return TextConditioner(text_encoder, empty_prompt_ids(tokenizer, token_len).to(device), token_len, hidden)


def build_model(settings: Settings, total_steps: int, device: torch.device) -> Model:
    """The UNet, its EMA, AdamW (fused on CUDA and CPU), the LR schedule over ``total_steps`` and the noise schedule."""
    tcfg = settings.train
    torch.manual_seed(tcfg.seed)  # identical init on every rank (DDP also broadcasts rank 0's)
    unet = UNetModel(settings.profile.unet).to(device)
    if tcfg.grad_ckpt:
        unet.enable_gradient_checkpointing()
    if tcfg.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    ema = EMA(unet, decay=tcfg.ema_decay)
    opt_kwargs: dict[str, Any] = {"lr": tcfg.lr, "weight_decay": tcfg.weight_decay}
    if device.type in ("cuda", "cpu"):  # CPU: one fused kernel instead of ~10 per parameter (tiny step -10 %)
        opt_kwargs["fused"] = True
    optimizer = torch.optim.AdamW(unet.parameters(), **opt_kwargs)
    lr_sched = WarmupCosine(optimizer, tcfg.lr, tcfg.warmup_steps, total_steps, final_ratio=tcfg.min_lr_ratio)
    sched = DDPMScheduler(zero_terminal_snr=tcfg.zero_terminal_snr, prediction_type=tcfg.prediction_type)
    return Model(unet, ema, optimizer, lr_sched, sched)


def wrap_for_training(model: Model, info: D.DistInfo, compile_unet: bool) -> None:
    """Set ``model.forward``: DDP first, then compile (DDPOptimizer splits the graph at bucket boundaries:
    communication overlaps the backward pass). Validation runs the plain module (no DDP hooks, no second
    compilation)."""
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    model.ddp = DDP(model.unet, device_ids=device_ids) if info.distributed else None
    forward = model.ddp if model.ddp is not None else model.unet
    model.forward = torch.compile(forward) if compile_unet else forward


def fixed_validation(data: Data, noise_sched: DDPMScheduler) -> Validation | None:
    """Timesteps, then noise, for every held-out sample from the fixed ``VAL_SEED`` (None without any)."""
    if not len(data.val_idx):
        return None
    vg = torch.Generator().manual_seed(VAL_SEED)
    t = torch.randint(0, noise_sched.num_train_timesteps, (len(data.val_idx),), generator=vg)
    noise = torch.randn((len(data.val_idx), *data.dataset.latent_shape), generator=vg)
    return Validation(noise=noise, t=t)


def checkpoint_record(settings: Settings, info: D.DistInfo, dataset: LatentDataset,
                      text: TextConditioner) -> ckpt.CheckpointConfig:
    """The config.json of this run's checkpoints (each save sets its step): the UNet and the run's lineage."""
    return ckpt.CheckpointConfig(
        step=0, unet=settings.profile.unet, profile=settings.profile.name, run_id=settings.run_id,
        world_size=info.world_size, manifest_hash=dataset.manifest_hash, shards=tuple(dataset.shards),
        latents_dir=str(settings.latents_dir), scaling_factor=dataset.scaling_factor,
        text=ckpt.TextConditioning(text.token_len, text.hidden,
                                   str(settings.components_dir or settings.profile.components_dir)),
        train=dataclasses.asdict(settings.train), filter=dataclasses.asdict(settings.profile.filter),
        source=dataclasses.asdict(settings.profile.source))


# =============================================================================================== resume
def resume_point(settings: Settings, announce: bool = True) -> Path | None:
    """The checkpoint to continue from: the run's newest intact one (``auto``, if any; a damaged newer one is
    skipped, saying so when ``announce``) or the one given (refused when damaged); ``none`` refuses a run
    directory that already holds checkpoints."""
    out = settings.output_dir
    if settings.resume == "auto":
        say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if announce else None
        return ckpt.newest_intact_checkpoint(out, say=say)
    if settings.resume != "none":
        path = ckpt.resolve_checkpoint(settings.resume)
        ckpt.verify_checkpoint(path)  # sha256 of every file + finite weights, before anything is loaded
        return path
    if ckpt.list_checkpoints(out):
        raise RuntimeError(f"{out} already holds checkpoints and --resume none was given: choose another "
                           f"--output-dir or resume")
    return None


def _match_optimizer_state_shapes(optimizer: torch.optim.Optimizer) -> None:
    """Give each per-parameter optimiser state tensor its parameter's shape. Checkpoints written before the
    SpatialTransformer's proj_in/proj_out became Linear layers hold their AdamW moments as (C, C, 1, 1); the
    values are the same, only the view differs, and without this the first step fails on a shape mismatch."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if (torch.is_tensor(value) and value.shape != param.shape and value.dim() > 0
                        and value.numel() == param.numel()):
                    optimizer.state[param][key] = value.reshape(param.shape)


def restore(settings: Settings, info: D.DistInfo, model: Model, gen: torch.Generator) -> Progress:
    """Load weights, EMA, optimiser, LR schedule, step, best losses and the RNG states from the resume point
    (a fresh :class:`Progress` without one)."""
    path = resume_point(settings, announce=info.is_main)
    if path is None:
        return Progress()
    saved_unet = ckpt.read_config(path).unet
    if saved_unet != settings.profile.unet:
        raise ckpt.CheckpointError(
            f"cannot resume from {path}: it holds a UNet of config {saved_unet}, the profile asks for "
            f"{dataclasses.asdict(settings.profile.unet)} (use another --output-dir or --resume none)")
    state = ckpt.load_train_state(path, verify=False)  # resume_point verified it
    unet_sd, _ = ckpt.load_weights(path / ckpt.UNET_FILE)
    model.unet.load_state_dict(unet_sd)
    ema_sd, _ = ckpt.load_weights(path / ckpt.EMA_FILE)
    model.ema.load_state_dict({"shadow": ema_sd, **state["ema"]})
    model.optimizer.load_state_dict(state["optimizer"])
    _match_optimizer_state_shapes(model.optimizer)
    model.lr_sched.load_state_dict(state["lr_schedule"])
    progress = Progress(step=int(state["step"]), best_loss=state.get("best_loss"),
                        best_val=state.get("best_val_loss"), resumed_from=path, last_checkpoint=str(path))
    restore_rng(settings, info, state, gen, path)
    return progress


def agree_on_resume(progress: Progress, info: D.DistInfo) -> None:
    """Refuse to train when the ranks restored different points. Each rank finds its resume point on its own
    disk view: a node whose ``--output-dir`` is not rank 0's storage (a local disk, another mount) finds no
    checkpoint or an older one, and would silently train a different model from its peers."""
    seen = D.all_gather_objects((str(progress.resumed_from) if progress.resumed_from else None, progress.step), info)
    if len(set(seen)) > 1:
        ranks = "; ".join(f"rank {r}: {path or 'no checkpoint'} (step {step})" for r, (path, step) in enumerate(seen))
        raise ckpt.CheckpointError(f"the ranks would resume from different points ({ranks}): every node must see "
                                   f"rank 0's --output-dir (shared storage)")


def restore_rng(settings: Settings, info: D.DistInfo, state: dict[str, Any], gen: torch.Generator,
                path: Path) -> None:
    """This rank's saved RNG states when the layout (world size, batch size, accumulation, seed) is unchanged:
    the run continues bit-identically. Otherwise the streams are re-seeded, with a warning."""
    tcfg = settings.train
    data, rngs = state["data"], state["rng"]
    same_layout = (data["world_size"], data["batch_size"], data["grad_accum"], data["seed"]) == (
        info.world_size, tcfg.batch_size, tcfg.grad_accum, tcfg.seed)
    if same_layout and len(rngs) == info.world_size:
        set_rng_state(rngs[info.rank], gen)
        return
    if info.is_main:
        print(f"warning: resuming with a different world size / batch layout / seed than "
              f"{path} was saved with ({data}): the data order continues approximately and "
              f"RNG streams are re-seeded", file=sys.stderr, flush=True)
    gen.manual_seed(rank_seed(tcfg.seed, info.rank) + 7919 * int(state["step"]))


# ================================================================================================== log
def open_log(settings: Settings, info: D.DistInfo, progress: Progress, pipes: Any,
             stack: contextlib.ExitStack) -> tuple[MetricsLogger, Any]:
    """The metrics log (rank 0 writes; to wandb too when asked) and the wandb run, both closed by ``stack``,
    which logs a failure first."""
    wandb_run = None
    if info.is_main:
        wandb_run = _init_wandb(settings, {"train": dataclasses.asdict(settings.train),
                                           "unet": dataclasses.asdict(settings.profile.unet),
                                           "profile": settings.profile.name, "world_size": info.world_size})
        if wandb_run is not None:
            stack.callback(wandb_run.finish)
    log = MetricsLogger(settings.output_dir, enabled=info.is_main,
                        resume_step=progress.step if progress.resumed_from else None, wandb_run=wandb_run,
                        pipes=pipes)
    stack.callback(log.close)
    stack.enter_context(_logging_failure(log))
    return log, wandb_run


@contextlib.contextmanager
def _logging_failure(log: MetricsLogger) -> Iterator[None]:
    try:
        yield
    except BaseException as e:
        log.info(f"[train] failed: {type(e).__name__}: {e}")
        raise


def _init_wandb(settings: Settings, config: dict[str, Any]) -> Any:
    tcfg = settings.train
    if not tcfg.wandb:
        return None
    mode = os.environ.get("WANDB_MODE") or tcfg.wandb_mode
    if mode == "disabled":
        return None
    import wandb  # optional, and slow to import

    id_file = settings.output_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id + "\n")
    return wandb.init(project=tcfg.wandb_project, name=settings.wandb_run_name or settings.run_id, id=run_id,
                      resume="allow", mode=mode, dir=str(settings.output_dir), config=config)


def describe_run(settings: Settings, info: D.DistInfo, data: Data, unet: UNetModel, progress: Progress) -> str:
    """The start-up line: profile, model size, processes, data, steps, output (and where a resume starts)."""
    tcfg = settings.train
    n_params = sum(p.numel() for p in unet.parameters())
    return (f"[train] {settings.profile.name} profile, {n_params:,} UNet params, {info.world_size} process(es) "
            f"on {info.device} ({info.backend or 'no process group'}); {len(data.dataset)} latents in "
            f"{len(data.dataset.shards)} shard(s): {len(data.train_idx)} train / {len(data.val_idx)} validation; "
            f"{data.total_steps} steps of {tcfg.batch_size}x{tcfg.grad_accum}x{info.world_size} samples "
            f"({data.batches.steps_per_epoch} steps/epoch); precision "
            f"{accel.resolve_precision(tcfg.precision, info.device)}; output {settings.output_dir}"
            + (f"; resumed from {progress.resumed_from} at step {progress.step}" if progress.resumed_from else ""))


def log_train(run: Run, step: int, loss: float, grad_norm: float, lr: float, samples_per_s: float) -> None:
    epoch, _ = run.data.batches.position(step - 1)
    run.log.log({"kind": "train", "step": step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                 "samples_per_s": samples_per_s, "time": time.time()})
    run.log.info(f"[train] step {step}/{run.data.total_steps} loss {loss:.4f} lr {lr:.3g} grad norm {grad_norm:.3f} "
                 f"{samples_per_s:.1f} samples/s")


def log_validation(run: Run, step: int, val_loss: float | None) -> None:
    if val_loss is None:
        return
    run.log.log({"kind": "val", "step": step, "val_loss": val_loss, "val_samples": len(run.data.val_idx),
                 "time": time.time()})
    run.log.info(f"[train] step {step} validation loss {val_loss:.4f}")


class Throughput:
    """Samples per second over the windows between train log lines; the clock restarts after validating and
    saving, so their time is left out."""

    def __init__(self, samples_per_step: int) -> None:
        self.samples_per_step = samples_per_step
        self.windows: list[float] = []
        self.steps = 0
        self.t0 = time.perf_counter()

    def restart_clock(self) -> None:
        self.t0 = time.perf_counter()

    def new_window(self) -> None:
        self.t0, self.steps = time.perf_counter(), 0

    def measure(self, device: torch.device) -> float:
        """This window's samples/s so far (recorded), once the GPU has finished its queued work."""
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples_per_s = self.steps * self.samples_per_step / max(time.perf_counter() - self.t0, 1e-9)
        self.windows.append(samples_per_s)
        return samples_per_s

    def steady(self) -> float | None:
        """The mean, leaving out the first window (start-up, compilation) when there are others."""
        steady = self.windows[1:] if len(self.windows) > 1 else self.windows
        return (sum(steady) / len(steady)) if steady else None


# ================================================================================================= step
def micro_batches(run: Run, start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's (latents, token ids) micro-batches from optimiser step ``start_step`` on, in DataLoader
    workers (``num_workers``; default 4 on CUDA, none on CPU)."""
    cuda = run.device.type == "cuda"
    workers = run.tcfg.num_workers if run.tcfg.num_workers is not None else (4 if cuda else 0)
    loader = torch.utils.data.DataLoader(
        BatchReader(run.data.dataset), batch_size=None, sampler=run.data.batches.iter_from(start_step),
        num_workers=workers, pin_memory=cuda, generator=torch.Generator(),
        persistent_workers=False, prefetch_factor=4 if workers else None,
    )
    return iter(loader)


def optimiser_step(run: Run, batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
                   progress: Progress) -> tuple[float, float, float]:
    """Accumulate gradients over ``grad_accum`` micro-batches, clip, step (optimiser, LR schedule, EMA); returns
    (loss, gradient norm, lr used), averaged over ranks. A non-finite loss or norm stops before the step."""
    tcfg, model = run.tcfg, run.model
    loss = accumulate_gradients(run, batches, progress.step + 1)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.unet.parameters(), tcfg.grad_clip)
    stats = torch.stack([loss.float(), grad_norm.float().to(run.device)])
    D.all_reduce_sum(stats, run.info)
    loss_v, gn_v = (stats / run.info.world_size).tolist()
    if not (math.isfinite(loss_v) and math.isfinite(gn_v)):
        what = "loss" if not math.isfinite(loss_v) else "gradient norm"
        raise NonFiniteLossError(
            f"non-finite {what} at step {progress.step + 1} (loss {loss_v}, grad norm {gn_v}): training stopped "
            f"before the optimiser step; the last good checkpoint is "
            f"{progress.last_checkpoint or 'none (none saved yet)'}")
    model.optimizer.step()
    lr_used = model.lr_sched.current_lr
    model.lr_sched.step()
    model.optimizer.zero_grad(set_to_none=True)
    model.ema.update(model.unet)
    return loss_v, gn_v, lr_used


def accumulate_gradients(run: Run, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], step: int) -> torch.Tensor:
    """Forward and backward of one optimiser step's micro-batches (gradients all-reduced in the last one only);
    returns this rank's loss. ``step`` is 1-based."""
    tcfg, model, device, gen = run.tcfg, run.model, run.device, run.gen
    loss_sum = torch.zeros((), device=device)
    for micro in range(tcfg.grad_accum):
        lat, tok = next(batches)
        x0 = lat.to(device, non_blocking=True).float()
        tok = tok.to(device, non_blocking=True)
        b = x0.shape[0]
        # the generator's draws, in this order (a resumed run replays them): noise, t, CFG dropout
        noise = torch.randn(x0.shape, generator=gen, device=device)
        t = torch.randint(0, model.noise_sched.num_train_timesteps, (b,), generator=gen, device=device)
        drop = torch.rand(b, generator=gen, device=device) < tcfg.cfg_dropout
        if tcfg.noise_offset:  # drawn last: runs without an offset keep their draws (and their resume replays)
            noise = noise + tcfg.noise_offset * torch.randn((b, x0.shape[1], 1, 1), generator=gen, device=device)
        tok = torch.where(drop[:, None], run.text.empty_ids[None, :], tok)
        weights = model.noise_sched.min_snr_weights(t, tcfg.min_snr_gamma) if tcfg.min_snr_gamma else None
        sync = model.ddp.no_sync() if (model.ddp is not None and micro < tcfg.grad_accum - 1) \
            else contextlib.nullcontext()
        with sync:
            pred = run.predict(model.forward, x0, noise, t, tok)
            target = model.noise_sched.target(x0, noise, t)
            loss = run.faults.poison(diffusion_loss(pred, target, weights).mean() / tcfg.grad_accum, step)
            loss.backward()
        loss_sum += loss.detach()
    return loss_sum


# ============================================================================================= validate
def validate(run: Run) -> float | None:
    """Mean MSE against the target (ε or v) over the held-out samples at their fixed noise and timesteps, on the plain UNet (each rank
    scores every world_size-th sample); None without held-out samples."""
    if run.validation is None:
        return None
    val_idx, device, unet = run.data.val_idx, run.device, run.model.unet
    mine = np.arange(run.info.rank, len(val_idx), run.info.world_size)
    acc = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, samples)
    unet.eval()
    with torch.no_grad():
        for i in range(0, len(mine), run.tcfg.batch_size):
            sel = mine[i:i + run.tcfg.batch_size]
            lat, tok = run.data.dataset.get_batch(val_idx[sel])
            x0 = torch.from_numpy(lat).to(device).float()
            noise, t = run.validation.noise[sel].to(device), run.validation.t[sel].to(device)
            pred = run.predict(unet, x0, noise, t, torch.from_numpy(tok).to(device))
            acc[0] += diffusion_loss(pred, run.model.noise_sched.target(x0, noise, t)).sum().double()
            acc[1] += len(sel)
    unet.train()
    D.all_reduce_sum(acc, run.info)
    return float(acc[0] / acc[1])


# ================================================================================================= save
def save(run: Run, progress: Progress) -> Path | None:
    """Checkpoint at ``progress.step``; a collective (every rank calls it, rank 0 writes). Returns the
    checkpoint's path on rank 0, None elsewhere."""
    rngs = D.all_gather_objects(rng_state(run.gen), run.info)
    path = None
    if run.info.is_main:
        state = train_state(run, progress, rngs)
        path = ckpt.save_checkpoint(run.settings.output_dir, dataclasses.replace(run.record, step=progress.step),
                                    unet_state=run.model.unet.state_dict(), ema_state=run.model.ema.shadow,
                                    train_state=state, keep_last=run.tcfg.keep_last)
        run.log.info(f"[train] step {progress.step}: checkpoint {path}")
    D.barrier(run.info)
    return path


def train_state(run: Run, progress: Progress, rngs: list[dict[str, Any]]) -> dict[str, Any]:
    """state.pt: what a resumed run needs besides the weights (every rank's RNG states in ``rngs``)."""
    tcfg, model, step = run.tcfg, run.model, progress.step
    epoch, micro = run.data.batches.position(step)
    return {
        "format": ckpt.FORMAT, "step": step, "optimizer": model.optimizer.state_dict(),
        "lr_schedule": model.lr_sched.state_dict(),
        "ema": {"num_updates": model.ema.num_updates, "decay": model.ema.decay},
        "rng": rngs,
        "data": {"epoch": epoch, "micro_batch": micro, "consumed_micro_batches": step * tcfg.grad_accum,
                 "world_size": run.info.world_size, "batch_size": tcfg.batch_size,
                 "grad_accum": tcfg.grad_accum, "seed": tcfg.seed},
        "best_loss": progress.best_loss, "best_val_loss": progress.best_val,
    }


# =============================================================================================== report
def report(run: Run, progress: Progress, throughput: Throughput, wandb_run: Any, pipes: Any) -> TrainResult:
    """The final metrics; rank 0 writes result.json, logs them and reports them through Pipes (the latent
    manifest hash as data version)."""
    data, out = run.data, run.settings.output_dir
    result = TrainResult(
        steps=progress.step, final_loss=progress.last_loss, best_loss=progress.best_loss,
        final_val_loss=progress.last_val, best_val_loss=progress.best_val, samples_per_s=throughput.steady(),
        checkpoint=progress.last_checkpoint, manifest_hash=run.record.manifest_hash, shards=list(data.dataset.shards),
        world_size=run.info.world_size, wandb_run=_wandb_path(wandb_run), output_dir=str(out),
        num_train_samples=int(len(data.train_idx)), num_val_samples=int(len(data.val_idx)),
    )
    if run.info.is_main:
        write_json_atomic(out / RESULT_FILE, dataclasses.asdict(result))
        run.log.info(f"[train] done: {progress.step} steps, final loss {progress.last_loss}, best "
                     f"{progress.best_loss}, validation {progress.last_val}, checkpoint {progress.last_checkpoint}")
        if pipes is not None:
            pipes.report_asset_materialization(metadata=result.as_metadata(), data_version=result.manifest_hash)
    return result


def _wandb_path(run: Any) -> str | None:
    if run is None:
        return None
    try:
        path = "/".join(str(x) for x in run.path if x) if not isinstance(run.path, str) else run.path
    except Exception:  # noqa: BLE001 - offline runs may lack an entity
        path = f"{run.project}/{run.id}"
    offline = getattr(run.settings, "_offline", False) or getattr(run.settings, "mode", "") == "offline"
    return f"{path} (offline: {run.dir})" if offline else path


# ================================================================================================= main
def _record_error(out: Path | None) -> None:
    """Write this rank's traceback where the launcher (the Dagster asset) can show it."""
    if out is None:
        return
    try:
        rank = int(os.environ.get("RANK", "0"))
        d = out / "errors"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"rank{rank}.txt").write_text(traceback.format_exc())
    except OSError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        settings = resolve_settings(args)
    except ValueError as e:
        print(f"sd train: error: {e}", file=sys.stderr)
        return 2
    # up front: without a compiler inductor fails in the first forward pass, with a traceback that hides why
    problem = accel.compile_toolchain_problem(D.device_type(settings.device)) if settings.train.compile else None
    if problem:
        print(f"sd train: error: {problem}", file=sys.stderr)
        return 2
    try:
        train(settings)
    except (ckpt.CheckpointError, DamagedShardError, DiskFullError) as e:  # damaged input, full disk: one line
        _record_error(settings.output_dir)
        print(f"sd train: error: {e}", file=sys.stderr)
        return 1
    except BaseException:
        _record_error(settings.output_dir)
        raise
    return 0
