"""The trainer's command line: flags, their validation, and the run settings resolved from flags + profile.

Every recipe flag defaults to ``None`` and, when given, overrides its field of the profile's ``TrainConfig``
(``--profile``, ``--overrides`` JSON); ``--help`` lists each flag's value in every profile. Bad values fail in
argparse with the flag's name and the config field's own check, the one run-config overrides go through
too ("argument --lr: train.lr = -1.0: must be a finite number > 0"): ranges live only in `sd_core.config`.
No torch here: the parser and the settings are cheap to build and to test; the trainer
(`sd_core.training.trainer`) reads :class:`Settings`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

from sd_core.config import (PROFILES, Profile, TrainConfig, field_arg, field_choices, get_profile,
                            json_object_arg, positive_int_arg)


def _train(name: str):
    """The argparse ``type=`` of the flag for ``TrainConfig.name``: the string read as the field's type and
    checked by the config's own check (`sd_core.config.field_arg`), the one every override goes through too;
    so argparse reports "argument --batch-size: train.batch_size = 0: must be an integer >= 1"."""
    return field_arg(TrainConfig, name)



GAMMA_OFF = 0.0  # what --min-snr-gamma 0/none parses to: resolve_settings turns it into min_snr_gamma=None


def _gamma(s: str) -> float:
    """Min-SNR γ: a positive number; 0 or 'none' turns the weighting off (`GAMMA_OFF`)."""
    if s.strip().lower() in ("none", "off", "0", "0.0"):
        return GAMMA_OFF
    return _train("min_snr_gamma")(s)


def _resume(s: str) -> str:
    if s in ("auto", "none"):
        return s
    if not Path(s).exists():
        raise argparse.ArgumentTypeError(f"'auto', 'none' or an existing checkpoint path, got {s!r} (not found)")
    return s



def _shard_list(s: str) -> list[str]:
    names = [x.strip() for x in s.split(",") if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated shard names")
    return names


# the flags that override the profile's TrainConfig: each dest is the field's name
_TRAIN_FLAGS = (
    "batch_size", "grad_accum", "lr", "weight_decay", "warmup_steps", "max_steps", "epochs", "seed",
    "min_snr_gamma", "noise_offset", "prediction_type", "zero_terminal_snr", "cfg_dropout", "ema_decay", "grad_clip", "grad_ckpt", "compile", "channels_last",
    "precision", "checkpoint_every", "keep_last", "log_every", "val_share", "val_every", "val_max_samples",
    "wandb", "wandb_mode", "wandb_project", "num_workers", "min_lr_ratio",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sd train",
        description="Train the UNet on the latent cache (run it under torchrun for several processes). "
                    "Recipe flags default to the profile's TrainConfig; any flag given overrides it.",
        epilog="Example: torchrun --standalone --nproc_per_node=2 -m sd_core.train --profile tiny "
               "--data-root data --max-steps 300. Test-only fault injection: SD_TRAIN_FAULT=nan@STEP or "
               "crash@STEP[:RANK] (documented in sd_core/training/trainer.py).",
    )
    _add_run_flags(p.add_argument_group("data and output"))
    _add_recipe_flags(p.add_argument_group("recipe (defaults: the profile's TrainConfig)"))
    _add_logging_flags(p.add_argument_group("checkpoints, validation, logging"))
    _annotate_profile_defaults(p)
    return p


def _add_run_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--profile", default=None, help="profile name (default: $SD_PROFILE or tiny)")
    g.add_argument("--data-root", default=None, help="data root (default: $SD_DATA_ROOT or ./data)")
    g.add_argument("--overrides", type=json_object_arg, default=None,
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
    g.add_argument("--stop-after", type=positive_int_arg, default=None, metavar="STEP",
                   help="end this invocation at step STEP (checkpointed) while the LR schedule keeps its full "
                        "length; continue later with --resume (for time-limited jobs)")


def _add_recipe_flags(r: argparse._ArgumentGroup) -> None:
    r.add_argument("--batch-size", type=_train("batch_size"), default=None, help="micro-batch size per process")
    r.add_argument("--grad-accum", type=_train("grad_accum"), default=None, help="micro-batches per optimiser step")
    r.add_argument("--lr", type=_train("lr"), default=None, help="peak learning rate")
    r.add_argument("--min-lr-ratio", type=_train("min_lr_ratio"), default=None,
                   help="final lr of the cosine decay as a fraction of --lr")
    r.add_argument("--weight-decay", type=_train("weight_decay"), default=None, help="AdamW weight decay")
    r.add_argument("--warmup-steps", type=_train("warmup_steps"), default=None, help="linear warmup steps")
    r.add_argument("--max-steps", type=_train("max_steps"), default=None,
                   help="optimiser steps to train (with --epochs: whichever ends first)")
    r.add_argument("--epochs", type=_train("epochs"), default=None,
                   help="epochs to train (given alone, it replaces the profile's max steps)")
    r.add_argument("--seed", type=_train("seed"), default=None, help="seed of init, data order, noise")
    r.add_argument("--min-snr-gamma", type=_gamma, default=None, help="Min-SNR γ (0 or 'none': unweighted)")
    r.add_argument("--noise-offset", type=_train("noise_offset"), default=None,
                   help="std of a per-image, per-channel constant added to the noise (0: plain Gaussian)")
    r.add_argument("--prediction-type", choices=field_choices(TrainConfig, "prediction_type"), default=None,
                   help="what the UNet predicts: ε (SD 1.x) or v")
    r.add_argument("--zero-terminal-snr", action=argparse.BooleanOptionalAction, default=None,
                   help="rescale the schedule to end at zero SNR (needs --prediction-type v_prediction)")
    r.add_argument("--cfg-dropout", type=_train("cfg_dropout"), default=None,
                   help="probability of replacing a caption by the empty prompt")
    r.add_argument("--ema-decay", type=_train("ema_decay"), default=None, help="EMA decay (warmup-corrected)")
    r.add_argument("--grad-clip", type=_train("grad_clip"), default=None, help="gradient-norm clip")
    r.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=None,
                   help="gradient checkpointing")
    r.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the UNet")
    r.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format")
    r.add_argument("--precision", choices=field_choices(TrainConfig, "precision"), default=None,
                   help="bf16 autocast (fp32 weights) or fp32; the profile's None = bf16 on CUDA, fp32 on CPU")
    r.add_argument("--num-workers", type=_train("num_workers"), default=None, help="DataLoader worker processes")


def _add_logging_flags(c: argparse._ArgumentGroup) -> None:
    c.add_argument("--checkpoint-every", type=_train("checkpoint_every"), default=None,
                   help="checkpoint interval (steps)")
    c.add_argument("--keep-last", type=_train("keep_last"), default=None, help="checkpoints to keep")
    c.add_argument("--log-every", type=_train("log_every"), default=None, help="metrics interval (steps)")
    c.add_argument("--val-share", type=_train("val_share"), default=None, help="held-out share of samples")
    c.add_argument("--val-every", type=_train("val_every"), default=None, help="validation interval (steps)")
    c.add_argument("--val-max-samples", type=_train("val_max_samples"), default=None,
                   help="validation samples scored")
    c.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=None, help="log to wandb")
    c.add_argument("--wandb-mode", choices=field_choices(TrainConfig, "wandb_mode"), default=None,
                   help="wandb mode ($WANDB_MODE wins when set)")
    c.add_argument("--wandb-project", type=_train("wandb_project"), default=None, help="wandb project")
    c.add_argument("--wandb-run-name", default=None, help="wandb run name (default: the run id)")


def _annotate_profile_defaults(parser: argparse.ArgumentParser) -> None:
    """Append each recipe flag's profile defaults to its help, e.g. "[tiny: 32, sd15: 128]"."""
    trains = {name: make().train for name, make in PROFILES.items()}
    for action in parser._actions:
        if action.dest not in _TRAIN_FLAGS:
            continue
        values = ", ".join(f"{name}: {getattr(t, action.dest)}" for name, t in trains.items())
        action.help = f"{action.help} [{values}]"


# ------------------------------------------------------------------------------------------------ settings
@dataclass
class Settings:
    """Everything one training run needs, resolved from flags + profile."""

    profile: Profile  # with the final TrainConfig
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
    def train(self) -> TrainConfig:
        return self.profile.train


def _default_run_id() -> str:
    rid = os.environ.get("DAGSTER_RUN_ID")
    if rid:
        return rid
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def resolve_settings(args: argparse.Namespace) -> Settings:
    """The run's settings: the profile with the recipe flags applied, and where the run reads and writes."""
    profile = get_profile(args.profile, args.data_root, args.overrides)
    changes = {field: getattr(args, field) for field in _TRAIN_FLAGS if getattr(args, field) is not None}
    if args.epochs is not None and args.max_steps is None:
        changes["max_steps"] = None
    if changes.get("min_snr_gamma") == GAMMA_OFF:
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
