"""The UNet trainer: a program of its own, the same command by hand, from Dagster, on one GPU or many.

    python -m sd_core.train --profile tiny --data-root data --max-steps 200          # one process
    torchrun --nproc_per_node=2 -m sd_core.train --profile tiny --data-root data     # DDP (gloo on CPU)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-endpoint=HOST:29500 -m sd_core.train --profile sd15 ...
    sd train --help

Recipe (DESIGN.md section 5, the seeds): latents from the memory-mapped cache (`sd_core.encoding.latent_cache.LatentDataset`)
under a ``DistributedSampler``; the frozen text encoder runs on the cached token ids (CFG dropout replaces a
caption's ids with the ids of the empty prompt "", the sampler's unconditional convention); uniform timesteps
and Gaussian noise; ε-prediction MSE with optional Min-SNR-γ weights; AdamW (fused on CUDA), linear warmup then
cosine to lr × ``min_lr_ratio`` (1e-2; `sd_core.training.lr_schedule`); gradient clipping; gradient accumulation with DDP ``no_sync``;
bf16 autocast on CUDA; EMA after every optimiser step (`sd_core.model.ema`).

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
``val_max_samples`` of them are scored every ``--val-every`` steps with plain ε-MSE at fixed timesteps and
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

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sd_core.atomic import write_json_atomic

FAULT_ENV = "SD_TRAIN_FAULT"
RESULT_FILE = "result.json"
VAL_SEED = 20240601  # fixed: validation noise and timesteps do not depend on the training seed


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm of an optimiser step was NaN or infinite."""


# ============================================================================================ arguments
def _number(cast: type, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
            hi_open: bool = False):
    """An argparse ``type=`` parsing ``cast`` (int or float) within [lo, hi] (open ends where asked); its
    errors read "argument --flag: must be ...", so the message names the flag."""
    bounds = (("(" if lo_open else "[") + ("-inf" if lo is None else f"{lo:g}") + ", "
              + ("inf" if hi is None else f"{hi:g}") + (")" if hi_open else "]"))

    def parse(s: str):
        try:
            v = cast(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if cast is int else 'a number'}, "
                                             f"got {s!r}") from None
        if cast is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be finite, got {s!r}")
        if (lo is not None and (v < lo or (lo_open and v == lo))) or \
                (hi is not None and (v > hi or (hi_open and v == hi))):
            raise argparse.ArgumentTypeError(f"must be in {bounds}, got {v}")
        return v

    parse.__name__ = f"{cast.__name__} in {bounds}"
    return parse


_positive_int = _number(int, 0, lo_open=True)
_nonneg_int = _number(int, 0)
_positive_float = _number(float, 0.0, lo_open=True)
_nonneg_float = _number(float, 0.0)
_probability = _number(float, 0.0, 1.0, hi_open=True)
_unit_interval = _number(float, 0.0, 1.0)


def _gamma(s: str) -> float:
    """Min-SNR γ: a positive number; 0 or 'none' turns the weighting off (stored as 0)."""
    if s.strip().lower() in ("none", "off", "0", "0.0"):
        return 0.0
    return _positive_float(s)


def _resume(s: str) -> str:
    if s in ("auto", "none"):
        return s
    if not Path(s).exists():
        raise argparse.ArgumentTypeError(f"'auto', 'none' or an existing checkpoint path, got {s!r} (not found)")
    return s


def _json_object(s: str) -> dict[str, Any]:
    try:
        v = json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"invalid JSON ({e.msg} at {e.pos}): {s!r}") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {type(v).__name__}")
    return v


def _shard_list(s: str) -> list[str]:
    names = [x.strip() for x in s.split(",") if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated shard names")
    return names


# flag dest -> TrainConfig field (the flags that override the profile's training config)
_TRAIN_FLAGS = {
    "batch_size": "batch_size", "grad_accum": "grad_accum", "lr": "lr", "weight_decay": "weight_decay",
    "warmup_steps": "warmup_steps", "max_steps": "max_steps", "epochs": "epochs", "seed": "seed",
    "min_snr_gamma": "min_snr_gamma", "cfg_dropout": "cfg_dropout", "ema_decay": "ema_decay",
    "grad_clip": "grad_clip", "grad_ckpt": "grad_ckpt", "compile": "compile", "channels_last": "channels_last",
    "checkpoint_every": "checkpoint_every", "keep_last": "keep_last", "log_every": "log_every",
    "val_share": "val_share", "val_every": "val_every", "val_max_samples": "val_max_samples",
    "wandb": "wandb", "wandb_mode": "wandb_mode", "wandb_project": "wandb_project",
    "num_workers": "num_workers", "min_lr_ratio": "min_lr_ratio",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sd train",
        description="Train the UNet on the latent cache (run it under torchrun for several processes). "
                    "Recipe flags default to the profile's TrainConfig; any flag given overrides it.",
        epilog="Example: torchrun --standalone --nproc_per_node=2 -m sd_core.train --profile tiny "
               "--data-root data --max-steps 300. Test-only fault injection: SD_TRAIN_FAULT=nan@STEP or "
               "crash@STEP[:RANK] (see the module documentation).",
    )
    g = p.add_argument_group("data and output")
    g.add_argument("--profile", default=None, help="profile name (default: $SD_PROFILE or tiny)")
    g.add_argument("--data-root", default=None, help="data root (default: $SD_DATA_ROOT or ./data)")
    g.add_argument("--overrides", type=_json_object, default=None,
                   help='profile overrides as JSON, e.g. \'{"train": {"lr": 5e-4}}\'')
    g.add_argument("--latents-dir", default=None, help="latent cache directory (default: {data-root}/latents)")
    g.add_argument("--shards", type=_shard_list, default=None,
                   help="comma-separated shards to train on (default: every shard in the latent manifest)")
    g.add_argument("--components-dir", default=None,
                   help="directory with text_encoder/ and tokenizer/ (default: the profile's components)")
    g.add_argument("--output-dir", default=None,
                   help="run directory for checkpoints and logs (default: {data-root}/checkpoints/{run-id})")
    g.add_argument("--run-id", default=None,
                   help="run name (default: $DAGSTER_RUN_ID, else a UTC timestamp)")
    g.add_argument("--resume", type=_resume, default="auto",
                   help="'auto': continue from {output-dir}/latest if present; a checkpoint or run directory; "
                        "'none': start fresh (an existing run directory is then refused)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="compute device")
    g.add_argument("--stop-after", type=_positive_int, default=None, metavar="STEP",
                   help="end this invocation at step STEP (checkpointed) while the LR schedule keeps its full "
                        "length; continue later with --resume (for time-limited jobs)")

    r = p.add_argument_group("recipe (defaults: the profile's TrainConfig)")
    r.add_argument("--batch-size", type=_positive_int, default=None, help="micro-batch size per process")
    r.add_argument("--grad-accum", type=_positive_int, default=None, help="micro-batches per optimiser step")
    r.add_argument("--lr", type=_positive_float, default=None, help="peak learning rate")
    r.add_argument("--min-lr-ratio", type=_unit_interval, default=None,
                   help="final lr of the cosine decay as a fraction of --lr")
    r.add_argument("--weight-decay", type=_nonneg_float, default=None, help="AdamW weight decay")
    r.add_argument("--warmup-steps", type=_nonneg_int, default=None, help="linear warmup steps")
    r.add_argument("--max-steps", type=_positive_int, default=None,
                   help="optimiser steps to train (with --epochs: whichever ends first)")
    r.add_argument("--epochs", type=_positive_int, default=None,
                   help="epochs to train (given alone, it replaces the profile's max steps)")
    r.add_argument("--seed", type=_nonneg_int, default=None, help="seed of init, data order, noise")
    r.add_argument("--min-snr-gamma", type=_gamma, default=None, help="Min-SNR γ (0 or 'none': unweighted)")
    r.add_argument("--cfg-dropout", type=_probability, default=None,
                   help="probability of replacing a caption by the empty prompt")
    r.add_argument("--ema-decay", type=_unit_interval, default=None, help="EMA decay (warmup-corrected)")
    r.add_argument("--grad-clip", type=_positive_float, default=None, help="gradient-norm clip")
    r.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=None,
                   help="gradient checkpointing")
    r.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the UNet")
    r.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format")
    r.add_argument("--num-workers", type=_nonneg_int, default=None, help="DataLoader worker processes")

    c = p.add_argument_group("checkpoints, validation, logging")
    c.add_argument("--checkpoint-every", type=_positive_int, default=None, help="checkpoint interval (steps)")
    c.add_argument("--keep-last", type=_positive_int, default=None, help="checkpoints to keep")
    c.add_argument("--log-every", type=_positive_int, default=None, help="metrics interval (steps)")
    c.add_argument("--val-share", type=_probability, default=None, help="held-out share of samples")
    c.add_argument("--val-every", type=_positive_int, default=None, help="validation interval (steps)")
    c.add_argument("--val-max-samples", type=_nonneg_int, default=None, help="validation samples scored")
    c.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=None, help="log to wandb")
    c.add_argument("--wandb-mode", choices=("offline", "online", "disabled"), default=None,
                   help="wandb mode ($WANDB_MODE wins when set)")
    c.add_argument("--wandb-project", default=None, help="wandb project")
    c.add_argument("--wandb-run-name", default=None, help="wandb run name (default: the run id)")
    _annotate_profile_defaults(p)
    return p


def _annotate_profile_defaults(parser: argparse.ArgumentParser) -> None:
    """Append each recipe flag's profile defaults to its help, e.g. "[tiny: 32, sd15: 128]"."""
    from sd_core.config import PROFILES

    trains = {name: make().train for name, make in PROFILES.items()}
    for action in parser._actions:
        field = _TRAIN_FLAGS.get(action.dest)
        if field is None:
            continue
        values = ", ".join(f"{name}: {getattr(t, field)}" for name, t in trains.items())
        action.help = f"{action.help} [{values}]"


# ============================================================================================== settings
@dataclass
class Settings:
    """Everything one training run needs, resolved from flags + profile."""

    profile: Any  # sd_core.config.Profile with the final TrainConfig
    latents_dir: Path
    shards: list[str] | None
    components_dir: Path | None
    output_dir: Path
    run_id: str
    resume: str
    device: str
    wandb_run_name: str | None
    stop_after: int | None = None

    @property
    def train(self):
        return self.profile.train


def _default_run_id() -> str:
    rid = os.environ.get("DAGSTER_RUN_ID")
    if rid:
        return rid
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def resolve_settings(args: argparse.Namespace) -> Settings:
    from sd_core.config import get_profile

    profile = get_profile(args.profile, args.data_root, args.overrides)
    changes = {field: getattr(args, dest) for dest, field in _TRAIN_FLAGS.items() if getattr(args, dest) is not None}
    if args.epochs is not None and args.max_steps is None:
        changes["max_steps"] = None
    if changes.get("min_snr_gamma") == 0.0:
        changes["min_snr_gamma"] = None
    tcfg = dataclasses.replace(profile.train, **changes)
    if tcfg.max_steps is None and tcfg.epochs is None:
        raise ValueError("neither max_steps nor epochs is set: give --max-steps or --epochs")
    profile = dataclasses.replace(profile, train=tcfg)
    run_id = args.run_id or _default_run_id()
    out = Path(args.output_dir) if args.output_dir else profile.checkpoints_dir / run_id
    return Settings(
        profile=profile,
        latents_dir=Path(args.latents_dir) if args.latents_dir else profile.latents_dir,
        shards=args.shards,
        components_dir=Path(args.components_dir) if args.components_dir else None,
        output_dir=out,
        run_id=run_id,
        resume=args.resume,
        device=args.device,
        wandb_run_name=args.wandb_run_name,
        stop_after=args.stop_after,
    )


# ============================================================================================== faults
@dataclass(frozen=True)
class _Faults:
    nan_steps: frozenset[int] = frozenset()
    crashes: tuple[tuple[int, int | None], ...] = ()

    @classmethod
    def from_env(cls) -> "_Faults":
        spec = os.environ.get(FAULT_ENV, "").strip()
        if not spec:
            return cls()
        nan, crash = set(), []
        for item in spec.split(","):
            kind, _, rest = item.strip().partition("@")
            if kind == "nan":
                nan.add(int(rest))
            elif kind == "crash":
                step, _, rank = rest.partition(":")
                crash.append((int(step), int(rank) if rank else None))
            else:
                raise ValueError(f"{FAULT_ENV}: unknown fault {item!r} (expected nan@STEP or crash@STEP[:RANK])")
        return cls(frozenset(nan), tuple(crash))

    def maybe_crash(self, step: int, rank: int) -> None:
        for s, r in self.crashes:
            if s == step and (r is None or r == rank):
                raise RuntimeError(f"injected crash at step {step} on rank {rank} ({FAULT_ENV})")


# ============================================================================================ RNG state
def _rng_state(generator: Any) -> dict[str, Any]:
    """Every RNG this process draws from, as tensors/lists (weights_only-loadable)."""
    import torch

    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch_cpu": torch.get_rng_state(),
        # this rank's device only (get_rng_state_all would open a context on every visible GPU)
        "torch_cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
        "numpy": {"kind": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "generator": generator.get_state(),
        "generator_device": str(generator.device),
    }


def _set_rng_state(state: dict[str, Any], generator: Any) -> None:
    import torch

    torch.set_rng_state(state["torch_cpu"].cpu())
    if state.get("torch_cuda") is not None and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state["torch_cuda"].cpu())
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    generator.set_state(state["generator"].cpu())


# ========================================================================================= text encoder
def load_text_encoder(settings: Settings, device: Any):
    """(frozen text encoder in eval mode on ``device``, tokenizer) of the profile (`sd_core.encoding.components`), or
    from ``--components-dir`` (its ``text_encoder/`` and ``tokenizer/``)."""
    import torch

    import transformers

    from sd_core.encoding import components as C

    transformers.utils.logging.disable_progress_bar()
    if settings.components_dir is not None:
        te_src, tok_src = str(settings.components_dir / "text_encoder"), str(settings.components_dir / "tokenizer")
    else:
        src = C.component_sources(settings.profile)
        te_src, tok_src = src.text_encoder, src.tokenizer
    for s in (te_src, tok_src):
        if (settings.components_dir is not None or settings.profile.components.build_tiny) and not Path(s).is_dir():
            raise FileNotFoundError(f"{s} not found: materialise the `frozen_components` asset first "
                                    f"(or pass --components-dir)")
    text_encoder = C.load_text_encoder(te_src, device=device, dtype=torch.float32)
    tokenizer = C.load_tokenizer(tok_src, settings.profile.components.max_length)
    return text_encoder, tokenizer


def empty_prompt_ids(tokenizer: Any, length: int) -> "Any":
    """Token ids of "" padded to ``length``, exactly as the sampler and the latent cache tokenize."""
    from sd_core.encoding.components import tokenize

    return tokenize(tokenizer, [""], length)[0]


# =============================================================================================== train
@dataclass
class TrainResult:
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


def _open_pipes(stack: contextlib.ExitStack) -> Any:
    if "DAGSTER_PIPES_CONTEXT" not in os.environ:
        return None
    from dagster_pipes import open_dagster_pipes

    return stack.enter_context(open_dagster_pipes())


def _init_wandb(settings: Settings, config: dict[str, Any]) -> Any:
    tcfg = settings.train
    if not tcfg.wandb:
        return None
    mode = os.environ.get("WANDB_MODE") or tcfg.wandb_mode
    if mode == "disabled":
        return None
    import wandb

    id_file = settings.output_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id + "\n")
    return wandb.init(project=tcfg.wandb_project, name=settings.wandb_run_name or settings.run_id, id=run_id,
                      resume="allow", mode=mode, dir=str(settings.output_dir), config=config)


def _wandb_path(run: Any) -> str | None:
    if run is None:
        return None
    try:
        path = "/".join(str(x) for x in run.path if x) if not isinstance(run.path, str) else run.path
    except Exception:  # noqa: BLE001 - offline runs may lack an entity
        path = f"{run.project}/{run.id}"
    offline = getattr(run.settings, "_offline", False) or getattr(run.settings, "mode", "") == "offline"
    return f"{path} (offline: {run.dir})" if offline else path


def train(settings: Settings) -> TrainResult:
    """Run one training job (this process's part of it); returns the final metrics (on every rank)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sd_core.training import checkpoint as ckpt
    from sd_core.training import distributed as D
    from sd_core.model.ema import EMA
    from sd_core.encoding.latent_cache import LatentDataset
    from sd_core.training.lr_schedule import WarmupCosine
    from sd_core.training.metrics_log import MetricsLogger
    from sd_core.model.schedulers import DDPMScheduler
    from sd_core.training.data_order import BatchReader, MicroBatches, split_indices
    from sd_core.model.unet import UNetModel

    faults = _Faults.from_env()
    tcfg = settings.train
    info = D.init_distributed(settings.device)
    # every rank writes to rank 0's directory (a default run id is a timestamp: ranks could disagree)
    out = Path(D.broadcast_object(str(settings.output_dir), info))
    settings.output_dir = out
    stack = contextlib.ExitStack()
    log = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "pids").mkdir(exist_ok=True)
        write_json_atomic(out / "pids" / f"rank{info.rank}.json", {"pid": os.getpid(), "ppid": os.getppid()})
        pipes = _open_pipes(stack) if info.is_main else None
        faults.maybe_crash(0, info.rank)
        device = info.device
        cuda = device.type == "cuda"
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        # ---------------------------------------------------------------------------------------- data
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

        # ------------------------------------------------------------------------------------- models
        text_encoder, tokenizer = load_text_encoder(settings, device)
        hidden = int(text_encoder.config.hidden_size)
        if hidden != settings.profile.unet.ctx_dim:
            raise ValueError(f"text encoder hidden size {hidden} != UNet ctx_dim {settings.profile.unet.ctx_dim}")
        token_len = int(dataset.get_batch([0])[1].shape[1])
        empty_ids = empty_prompt_ids(tokenizer, token_len).to(device)

        torch.manual_seed(tcfg.seed)  # identical init on every rank (DDP also broadcasts rank 0's)
        unet = UNetModel(settings.profile.unet).to(device)
        if tcfg.grad_ckpt:
            unet.enable_gradient_checkpointing()
        if tcfg.channels_last:
            unet = unet.to(memory_format=torch.channels_last)
        ema = EMA(unet, decay=tcfg.ema_decay)
        opt_kwargs: dict[str, Any] = {"lr": tcfg.lr, "weight_decay": tcfg.weight_decay}
        if cuda:
            opt_kwargs["fused"] = True
        optimizer = torch.optim.AdamW(unet.parameters(), **opt_kwargs)
        lr_sched = WarmupCosine(optimizer, tcfg.lr, tcfg.warmup_steps, total, final_ratio=tcfg.min_lr_ratio)
        noise_sched = DDPMScheduler()

        # per-rank seeds for everything random in the loop; a dedicated generator draws noise/t/dropout
        rank_seed = tcfg.seed * 1000 + info.rank
        torch.manual_seed(rank_seed)
        np.random.seed(rank_seed % 2**32)
        random.seed(rank_seed)
        gen = torch.Generator(device=device).manual_seed(rank_seed)

        # --------------------------------------------------------------------------------------- resume
        start_step, best_loss, best_val = 0, None, None
        resume_from = None
        if settings.resume == "auto":
            resume_from = ckpt.latest_checkpoint(out)
        elif settings.resume != "none":
            resume_from = ckpt.resolve_checkpoint(settings.resume)
        elif ckpt.list_checkpoints(out):
            raise RuntimeError(f"{out} already holds checkpoints and --resume none was given: choose another "
                               f"--output-dir or resume")
        if resume_from is not None:
            saved_unet = ckpt.read_config(resume_from).unet
            if saved_unet != settings.profile.unet:
                raise ckpt.CheckpointError(
                    f"cannot resume from {resume_from}: it holds a UNet of config {saved_unet}, the profile asks for "
                    f"{dataclasses.asdict(settings.profile.unet)} (use another --output-dir or --resume none)")
            state = ckpt.load_train_state(resume_from)
            usd, _ = ckpt.load_weights(resume_from / ckpt.UNET_FILE)
            unet.load_state_dict(usd)
            esd, _ = ckpt.load_weights(resume_from / ckpt.EMA_FILE)
            ema.load_state_dict({"shadow": esd, **state["ema"]})
            optimizer.load_state_dict(state["optimizer"])
            lr_sched.load_state_dict(state["lr_schedule"])
            start_step = int(state["step"])
            best_loss, best_val = state.get("best_loss"), state.get("best_val_loss")
            data = state["data"]
            same_layout = (data["world_size"], data["batch_size"], data["grad_accum"], data["seed"]) == (
                info.world_size, tcfg.batch_size, tcfg.grad_accum, tcfg.seed)
            rngs = state["rng"]
            if same_layout and len(rngs) == info.world_size:
                _set_rng_state(rngs[info.rank], gen)
            else:
                if info.is_main:
                    print(f"warning: resuming with a different world size / batch layout / seed than "
                          f"{resume_from} was saved with ({data}): the data order continues approximately and "
                          f"RNG streams are re-seeded", file=sys.stderr, flush=True)
                gen.manual_seed(rank_seed + 7919 * start_step)

        wandb_run = None
        if info.is_main:
            wandb_run = _init_wandb(settings, {"train": dataclasses.asdict(tcfg),
                                               "unet": dataclasses.asdict(settings.profile.unet),
                                               "profile": settings.profile.name, "world_size": info.world_size})
            if wandb_run is not None:
                stack.callback(wandb_run.finish)
        log = MetricsLogger(out, enabled=info.is_main, resume_step=start_step if resume_from else None,
                            wandb_run=wandb_run, pipes=pipes)
        stack.callback(log.close)
        n_params = sum(p.numel() for p in unet.parameters())
        log.info(f"[train] {settings.profile.name} profile, {n_params:,} UNet params, {info.world_size} process(es) "
                 f"on {device} ({info.backend or 'no process group'}); {len(dataset)} latents in "
                 f"{len(dataset.shards)} shard(s): {len(train_idx)} train / {len(val_idx)} validation; "
                 f"{total} steps of {tcfg.batch_size}x{tcfg.grad_accum}x{info.world_size} samples "
                 f"({batches.steps_per_epoch} steps/epoch); output {out}"
                 + (f"; resumed from {resume_from} at step {start_step}" if resume_from else ""))

        # ------------------------------------------------------------------------------------- wrapping
        # DDP first, then compile (DDPOptimizer splits the graph at bucket boundaries: communication overlaps
        # the backward pass). Validation runs the plain module (no DDP hooks, no second compilation).
        ddp = DDP(unet, device_ids=[device.index] if cuda else None) if info.distributed else None
        model: Any = ddp if ddp is not None else unet
        if tcfg.compile:
            model = torch.compile(model)
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
        mem_fmt = torch.channels_last if tcfg.channels_last else torch.contiguous_format

        def encode(tok: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), autocast():
                return text_encoder(tok)[0]

        # ---------------------------------------------------------------------------------- validation
        val_noise = val_t = None
        if len(val_idx):
            vg = torch.Generator().manual_seed(VAL_SEED)
            val_t = torch.randint(0, noise_sched.num_train_timesteps, (len(val_idx),), generator=vg)
            val_noise = torch.randn((len(val_idx), *dataset.latent_shape), generator=vg)

        def validate() -> float | None:
            if val_noise is None:
                return None
            mine = np.arange(info.rank, len(val_idx), info.world_size)
            acc = torch.zeros(2, dtype=torch.float64, device=device)
            unet.eval()
            with torch.no_grad():
                for i in range(0, len(mine), tcfg.batch_size):
                    sel = mine[i:i + tcfg.batch_size]
                    lat, tok = dataset.get_batch(val_idx[sel])
                    x0 = torch.from_numpy(lat).to(device).float()
                    noise = val_noise[sel].to(device)
                    t = val_t[sel].to(device)
                    xt = noise_sched.add_noise(x0, noise, t).contiguous(memory_format=mem_fmt)
                    ctx = encode(torch.from_numpy(tok).to(device))
                    with autocast():
                        pred = unet(xt, t, ctx)
                    per = F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))
                    acc[0] += per.sum().double()
                    acc[1] += len(sel)
            unet.train()
            D.all_reduce_sum(acc, info)
            return float(acc[0] / acc[1])

        # -------------------------------------------------------------------------------------- saving
        manifest_hash = dataset.manifest_hash
        record = ckpt.CheckpointConfig(
            step=0, unet=settings.profile.unet, profile=settings.profile.name, run_id=settings.run_id,
            world_size=info.world_size, manifest_hash=manifest_hash, shards=tuple(dataset.shards),
            latents_dir=str(settings.latents_dir), scaling_factor=dataset.scaling_factor,
            text=ckpt.TextConditioning(token_len, hidden,
                                       str(settings.components_dir or settings.profile.components_dir)),
            train=dataclasses.asdict(tcfg), filter=dataclasses.asdict(settings.profile.filter),
            source=dataclasses.asdict(settings.profile.source))

        def save(step: int) -> Path | None:
            rngs = D.all_gather_objects(_rng_state(gen), info)  # collective: every rank calls save()
            path = None
            if info.is_main:
                epoch, micro = batches.position(step)
                state = {
                    "format": ckpt.FORMAT, "step": step, "optimizer": optimizer.state_dict(),
                    "lr_schedule": lr_sched.state_dict(),
                    "ema": {"num_updates": ema.num_updates, "decay": ema.decay},
                    "rng": rngs,
                    "data": {"epoch": epoch, "micro_batch": micro, "consumed_micro_batches": step * tcfg.grad_accum,
                             "world_size": info.world_size, "batch_size": tcfg.batch_size,
                             "grad_accum": tcfg.grad_accum, "seed": tcfg.seed},
                    "best_loss": best_loss, "best_val_loss": best_val,
                }
                path = ckpt.save_checkpoint(out, dataclasses.replace(record, step=step),
                                            unet_state=unet.state_dict(), ema_state=ema.shadow,
                                            train_state=state, keep_last=tcfg.keep_last)
                log.info(f"[train] step {step}: checkpoint {path}")
            D.barrier(info)
            return path

        # ---------------------------------------------------------------------------------------- loop
        workers = tcfg.num_workers if tcfg.num_workers is not None else (4 if cuda else 0)
        loader = torch.utils.data.DataLoader(
            BatchReader(dataset), batch_size=None, sampler=batches.iter_from(start_step),
            num_workers=workers, pin_memory=cuda, generator=torch.Generator(),
            persistent_workers=False, prefetch_factor=4 if workers else None,
        )
        it = iter(loader)
        gamma = tcfg.min_snr_gamma
        step = start_step
        last_loss = None
        last_val = None
        last_ckpt = str(resume_from) if resume_from else None
        window_t0, window_steps, throughputs = time.perf_counter(), 0, []
        samples_per_step = tcfg.batch_size * tcfg.grad_accum * info.world_size
        unet.train()
        if resume_from is None:  # the baseline: validation loss of the initial weights
            v0 = validate()
            if v0 is not None:
                log.log({"kind": "val", "step": 0, "val_loss": v0, "val_samples": len(val_idx), "time": time.time()})
                log.info(f"[train] step 0 validation loss {v0:.4f}")
            window_t0 = time.perf_counter()
        end = min(total, settings.stop_after) if settings.stop_after else total
        while step < end:
            faults.maybe_crash(step + 1, info.rank)
            loss_acc = torch.zeros((), device=device)
            for micro in range(tcfg.grad_accum):
                lat, tok = next(it)
                x0 = lat.to(device, non_blocking=True).float()
                tok = tok.to(device, non_blocking=True)
                b = x0.shape[0]
                noise = torch.randn(x0.shape, generator=gen, device=device)
                t = torch.randint(0, noise_sched.num_train_timesteps, (b,), generator=gen, device=device)
                drop = torch.rand(b, generator=gen, device=device) < tcfg.cfg_dropout
                tok = torch.where(drop[:, None], empty_ids[None, :], tok)
                ctx = encode(tok)
                xt = noise_sched.add_noise(x0, noise, t).contiguous(memory_format=mem_fmt)
                sync = ddp.no_sync() if (ddp is not None and micro < tcfg.grad_accum - 1) \
                    else contextlib.nullcontext()
                with sync:
                    with autocast():
                        pred = model(xt, t, ctx)
                    per = F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))
                    if gamma:
                        per = per * noise_sched.min_snr_weights(t, gamma)
                    loss = per.mean() / tcfg.grad_accum
                    if step + 1 in faults.nan_steps:
                        loss = loss * float("nan")
                    loss.backward()
                loss_acc += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), tcfg.grad_clip)
            stats = torch.stack([loss_acc.float(), grad_norm.float().to(device)])
            D.all_reduce_sum(stats, info)
            loss_v, gn_v = (stats / info.world_size).tolist()
            if not (math.isfinite(loss_v) and math.isfinite(gn_v)):
                what = "loss" if not math.isfinite(loss_v) else "gradient norm"
                raise NonFiniteLossError(
                    f"non-finite {what} at step {step + 1} (loss {loss_v}, grad norm {gn_v}): training stopped "
                    f"before the optimiser step; the last good checkpoint is {last_ckpt or 'none (none saved yet)'}")
            optimizer.step()
            lr_used = lr_sched.current_lr
            lr_sched.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update(unet)
            step += 1
            window_steps += 1
            last_loss = loss_v
            best_loss = loss_v if best_loss is None else min(best_loss, loss_v)

            if step % tcfg.log_every == 0 or step == end:
                if cuda:
                    torch.cuda.synchronize()
                now = time.perf_counter()
                sps = window_steps * samples_per_step / max(now - window_t0, 1e-9)
                throughputs.append(sps)
                epoch, _ = batches.position(step - 1)
                log.log({"kind": "train", "step": step, "epoch": epoch, "loss": loss_v, "lr": lr_used,
                         "grad_norm": gn_v, "samples_per_s": sps, "time": time.time()})
                log.info(f"[train] step {step}/{total} loss {loss_v:.4f} lr {lr_used:.3g} grad norm {gn_v:.3f} "
                         f"{sps:.1f} samples/s")
                window_t0, window_steps = time.perf_counter(), 0
            if step % tcfg.val_every == 0 or step == end:
                v = validate()
                if v is not None:
                    last_val = v
                    best_val = v if best_val is None else min(best_val, v)
                    log.log({"kind": "val", "step": step, "val_loss": v, "val_samples": len(val_idx),
                             "time": time.time()})
                    log.info(f"[train] step {step} validation loss {v:.4f}")
                window_t0 = time.perf_counter()
            if step % tcfg.checkpoint_every == 0 or step == end:
                last_ckpt = str(save(step))
                window_t0 = time.perf_counter()

        if step == start_step and resume_from is not None:  # nothing left to do: report the resumed state
            last_ckpt = str(resume_from)
        # steady-state throughput: leave out the first window (start-up, compilation) when there are others
        steady = throughputs[1:] if len(throughputs) > 1 else throughputs
        result = TrainResult(
            steps=step, final_loss=last_loss, best_loss=best_loss, final_val_loss=last_val, best_val_loss=best_val,
            samples_per_s=(sum(steady) / len(steady)) if steady else None,
            checkpoint=last_ckpt, manifest_hash=manifest_hash, shards=list(dataset.shards),
            world_size=info.world_size, wandb_run=_wandb_path(wandb_run), output_dir=str(out),
            num_train_samples=int(len(train_idx)), num_val_samples=int(len(val_idx)),
        )
        if info.is_main:
            write_json_atomic(out / RESULT_FILE, dataclasses.asdict(result))
            log.info(f"[train] done: {step} steps, final loss {last_loss}, best {best_loss}, validation {last_val}, "
                     f"checkpoint {last_ckpt}")
            if pipes is not None:
                pipes.report_asset_materialization(metadata=_pipes_metadata(result), data_version=manifest_hash)
        stack.close()
        D.cleanup(info)
        return result
    except BaseException as e:
        if log is not None:
            log.info(f"[train] failed: {type(e).__name__}: {e}")
        # hand the exception to the context managers (Dagster Pipes reports it to the run), then re-raise;
        # the process group is left to die with the process (a clean destroy could wait on a dead peer)
        stack.__exit__(type(e), e, e.__traceback__)
        raise
    finally:
        stack.close()


def _pipes_metadata(r: TrainResult) -> dict[str, Any]:
    md: dict[str, Any] = {
        "steps": r.steps,
        "final_loss": r.final_loss,
        "best_loss": r.best_loss,
        "final_val_loss": r.final_val_loss,
        "best_val_loss": r.best_val_loss,
        "samples_per_s": r.samples_per_s,
        "checkpoint_path": {"raw_value": r.checkpoint, "type": "path"} if r.checkpoint else None,
        "output_dir": {"raw_value": r.output_dir, "type": "path"},
        "manifest_hash": r.manifest_hash,
        "world_size": r.world_size,
        "wandb_run": r.wandb_run or "disabled",
        "num_train_samples": r.num_train_samples,
        "num_val_samples": r.num_val_samples,
    }
    return {k: v for k, v in md.items() if v is not None}


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
    try:
        train(settings)
    except BaseException:
        _record_error(settings.output_dir)
        raise
    return 0


if __name__ == "__main__":
    try:
        from torch.distributed.elastic.multiprocessing.errors import record
    except ImportError:  # pragma: no cover
        raise SystemExit(main())
    raise SystemExit(record(main)())
