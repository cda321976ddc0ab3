"""Training checkpoints: safetensors weights plus a ``weights_only`` trainer state, written atomically.

Layout of one training run's output directory (``--output-dir``, by default
``{data_root}/checkpoints/{run}``)::

    step_00000500/
        unet.safetensors    the live UNet weights (no ``module.`` / ``_orig_mod.`` prefixes)
        ema.safetensors     the EMA shadow weights (float32), same keys
        config.json         a `CheckpointConfig` record: step, UNet config, what it was trained on (lineage)
        state.pt            optimiser, LR schedule, step, RNG states of every rank, data position, EMA counters
                            (plain tensors / dicts / lists / numbers only: loaded with ``weights_only=True``)
    step_00001000/ ...
    latest                  one line: the name of the newest complete checkpoint directory
    metrics.jsonl           the trainer's log (see ``sd_core.train``)

Both safetensors files also carry the UNet config in their header metadata (``sd_unet_config``), so a single
``.safetensors`` file is self-describing.

Atomicity: a checkpoint is written into a temporary directory next to its final name (every file fsynced),
then renamed into place; only then is ``latest`` replaced (temp file + ``os.replace``). A crash at any point
leaves the previous checkpoint and ``latest`` intact; leftover ``.tmp-*`` directories are removed by the next
save. ``keep_last`` prunes older checkpoints after the pointer moved (never the one ``latest`` names).

Loading never unpickles arbitrary objects: weights come from safetensors and ``state.pt`` goes through
``torch.load(weights_only=True)``; a state file that holds anything else is refused as "not a plain tensor
checkpoint", by name.

Integrity (DESIGN.md section 8): ``config.json`` records the sha256 of every file written beside it
(``files``). Loading checks a file against it before use, and the weights for NaN/inf after, raising
:class:`DamagedCheckpointError` naming the file: bytes flipped on disk never reach sampling or a resumed run.
``--resume auto`` uses :func:`newest_intact_checkpoint` (the newest checkpoint that verifies, saying which it
skipped), and pruning never deletes the newest intact checkpoint. Records written before hashes existed
(format 1) still load, with a warning that they are unverified. A full disk during a save raises
`sd_core.atomic.DiskFullError` ("no space left on ..., previous checkpoint ... intact") after removing the
partial directory.

``config.json`` is one typed record, :class:`CheckpointConfig`: the trainer writes it (:func:`save_checkpoint`),
sampling, export and the Dagster assets read it (:func:`read_config`); nothing reads a key it does not define.

Public entry points used elsewhere: :func:`load_unet` (sampling, export, the asset check),
:func:`resolve_checkpoint`, :func:`read_config`, :func:`save_checkpoint` / :func:`load_train_state` (the
trainer), :func:`strip_prefixes`, :func:`nonfinite_tensors`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

from sd_core.atomic import (DiskFullError, atomic_dir, is_disk_full, remove_dir, write_atomic, write_file_atomic,
                            write_json_atomic, write_text_atomic)
from sd_core.config import UNetConfig
from sd_core.model.convert import strip_wrapper_prefixes
from sd_core.model.unet import UNetModel

FORMAT = 2  # 2: config.json records each file's sha256 (``files``); 1: no hashes (loaded as unverified)
UNET_FILE = "unet.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_META_KEY = "sd_unet_config"
HASHED_FILES = (UNET_FILE, EMA_FILE, STATE_FILE)

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointConfig",
    "CheckpointError",
    "DamagedCheckpointError",
    "MissingUNetConfigError",
    "TextConditioning",
    "checkpoint_step",
    "latest_checkpoint",
    "list_checkpoints",
    "load_train_state",
    "load_unet",
    "load_weights",
    "newest_intact_checkpoint",
    "nonfinite_tensors",
    "prune_checkpoints",
    "read_config",
    "read_config_file",
    "resolve_checkpoint",
    "save_checkpoint",
    "save_weights",
    "step_dir_name",
    "stored_unet_config",
    "strip_prefixes",
    "unet_config_from_dict",
    "verify_checkpoint",
    "verify_file",
]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match the model."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint file whose bytes differ from the sha256 its ``config.json`` recorded, or whose weights hold
    NaN/inf: refused by name (``path``), never loaded, resumed from or allowed to replace a good checkpoint."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"damaged checkpoint file {path}: {reason}")
        self.path = path


class MissingUNetConfigError(CheckpointError):
    """A weights file that carries no UNet config (no header metadata, no ``config.json`` beside it): the caller
    must say which ``UNetConfig`` it holds."""

    def __init__(self, weights: Path):
        super().__init__(f"{weights} carries no UNet config; pass config=UNetConfig(...)")
        self.weights = weights


# ------------------------------------------------------------------------------------------- the record
@dataclass(frozen=True)
class TextConditioning:
    """The text side the UNet was trained with: token length, context width, where the components were."""

    max_length: int
    hidden_size: int
    components: str


@dataclass(frozen=True)
class CheckpointConfig:
    """A checkpoint's ``config.json``: which UNet it holds, at which step, and what it was trained on.

    Why the lineage lives here too (profile sections, shards, manifest hash): Dagster stops tracking staleness
    past 100 upstream partitions, and a checkpoint copied to another machine should still say where it came
    from. ``train``, ``filter`` and ``source`` are the profile's sections as plain JSON, as they were when the
    run trained, so a checkpoint stays readable when those config classes grow new fields.
    """

    step: int
    unet: UNetConfig
    profile: str | None = None
    run_id: str | None = None
    world_size: int = 1
    manifest_hash: str = ""
    shards: tuple[str, ...] = ()
    latents_dir: str | None = None
    scaling_factor: float | None = None  # of the latents it trained on (None: the VAE's own)
    text: TextConditioning | None = None
    train: dict[str, Any] = field(default_factory=dict)
    filter: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    saved_at: float | None = None
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256 hex of what was written
    format: int = FORMAT

    def lineage(self) -> dict[str, Any]:
        """What the checkpoint was trained on, as JSON values: the part of the record the assets show."""
        text = dataclasses.asdict(self.text) if self.text is not None else None
        values = {"profile": self.profile, "run_id": self.run_id, "manifest_hash": self.manifest_hash,
                  "shards": list(self.shards), "filter": self.filter, "source": self.source,
                  "latents_dir": self.latents_dir, "text": text}
        return {k: v for k, v in values.items() if v not in (None, "", [], {})}

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["unet"] = _config_dict(self.unet)
        d["shards"] = list(self.shards)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any], source: str = "config.json") -> "CheckpointConfig":
        """The record from its JSON form; a key this record does not define is an error naming ``source``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise CheckpointError(f"{source}: unknown checkpoint config keys {unknown}")
        if "step" not in d or "unet" not in d:
            raise CheckpointError(f"{source}: not a checkpoint config (needs 'step' and 'unet')")
        values = dict(d)
        values["unet"] = unet_config_from_dict(d["unet"])
        values["shards"] = tuple(d.get("shards") or ())
        if d.get("text") is not None:
            values["text"] = TextConditioning(**d["text"])
        return cls(**values)


# ------------------------------------------------------------------------------------------- helpers
def step_dir_name(step: int) -> str:
    return f"step_{int(step):08d}"


def checkpoint_step(path: str | os.PathLike[str]) -> int:
    """The step of a ``step_XXXXXXXX`` checkpoint directory."""
    m = _STEP_DIR.match(Path(path).name)
    if not m:
        raise CheckpointError(f"{path} is not a checkpoint directory (expected a name like step_00000500)")
    return int(m.group(1))


def strip_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Remove DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) wrapper prefixes, in any nesting;
    two keys that collapse to one name are an error (they would silently overwrite each other)."""
    out = strip_wrapper_prefixes(state_dict)
    if len(out) != len(state_dict):
        raise CheckpointError("state dict has keys that differ only by wrapper prefixes (module./_orig_mod.)")
    return out


def _config_dict(config: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(config):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
    return dict(config)


def unet_config_from_dict(d: Mapping[str, Any]) -> UNetConfig:
    """A ``UNetConfig`` from its JSON form (lists back to tuples; unknown keys are an error)."""
    names = {f.name for f in dataclasses.fields(UNetConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise CheckpointError(f"unknown UNetConfig fields in checkpoint: {unknown}")
    return UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# ------------------------------------------------------------------------------------------- weights
def save_weights(path: str | os.PathLike[str], state_dict: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> None:
    """Write a state dict as safetensors (prefixes stripped, tensors made contiguous on CPU), atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in strip_prefixes(state_dict).items()}
    write_file_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=dict(metadata or {})))


def load_weights(path: str | os.PathLike[str], device: str | torch.device = "cpu"
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict with wrapper prefixes stripped, header metadata) of a safetensors file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:  # a garbled or truncated header / data section
        raise DamagedCheckpointError(path, f"not a readable safetensors file ({exc})") from exc
    return strip_prefixes(sd), meta


# ------------------------------------------------------------------------------------------ integrity
def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 (hex) of a file's bytes, read in chunks (weights files are GBs)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_file(path: str | os.PathLike[str], record: CheckpointConfig | None) -> bool:
    """Check one file of a checkpoint against the sha256 its ``config.json`` recorded: True when it matches,
    False (with a warning) when the record has no hash for it (a checkpoint written before hashes, or a foreign
    file); :class:`DamagedCheckpointError` naming the file when the bytes differ or the file is missing."""
    path = Path(path)
    expected = record.files.get(path.name) if record is not None else None
    if not expected:
        what = "its config.json records no hash for it" if record is not None else "no config.json beside it"
        log.warning(f"warning: {path} is unverified ({what}: saved before checkpoints carried content hashes, "
                    f"or not by this trainer)")
        return False
    if not path.is_file():
        raise DamagedCheckpointError(path, "the file is missing (config.json records it)")
    actual = file_sha256(path)
    if actual != expected:
        raise DamagedCheckpointError(
            path, f"its sha256 is {actual[:16]}…, config.json recorded {expected[:16]}… (the bytes changed "
                  f"after it was saved): use another checkpoint")
    return True


def require_finite(path: Path, state_dict: Mapping[str, torch.Tensor]) -> None:
    """:class:`DamagedCheckpointError` when any floating-point tensor of ``path`` holds NaN/inf (such weights
    sample black images and poison a resumed run)."""
    bad = sorted(k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if bad:
        raise DamagedCheckpointError(path, f"{len(bad)} tensor(s) hold NaN/inf: {bad[:5]}"
                                           f"{' ...' if len(bad) > 5 else ''}")


def verify_checkpoint(path: str | os.PathLike[str], files: Iterable[str] = HASHED_FILES) -> CheckpointConfig:
    """Check a checkpoint before use: each of ``files`` that its record lists (or that exists) against its
    sha256, and the weights files for NaN/inf. Returns the record; raises :class:`DamagedCheckpointError`
    naming the first bad file."""
    ckpt = resolve_checkpoint(path)
    record = read_config_file(ckpt / CONFIG_FILE)
    for name in files:
        f = ckpt / name
        if name not in record.files and not f.exists():
            continue  # e.g. a checkpoint saved without EMA
        verify_file(f, record)
        if name.endswith(".safetensors"):
            sd, _ = load_weights(f)
            require_finite(f, sd)
    return record


# ------------------------------------------------------------------------------------- run directory
def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    run = Path(run_dir)
    if not run.is_dir():
        return []
    found = [p for p in run.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / STATE_FILE).exists()]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint ``latest`` names (``None`` when the run has none)."""
    run = Path(run_dir)
    pointer = run / LATEST
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    ckpt = run / name
    if not (ckpt / STATE_FILE).exists():
        raise CheckpointError(f"{pointer} names {name!r}, which is not a complete checkpoint in {run}")
    return ckpt


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A checkpoint directory from a checkpoint directory, a run directory (follows ``latest``) or a file
    inside a checkpoint directory."""
    p = Path(path)
    if p.is_file():
        p = p.parent
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if (p / CONFIG_FILE).exists() and ((p / UNET_FILE).exists() or (p / EMA_FILE).exists()):
        return p
    ckpt = latest_checkpoint(p)
    if ckpt is None:
        raise CheckpointError(f"{path} is neither a checkpoint directory nor a run directory with a '{LATEST}' "
                              f"pointer")
    return ckpt


def newest_intact_checkpoint(run_dir: str | os.PathLike[str], say: Callable[[str], None] | None = None
                             ) -> Path | None:
    """The checkpoint ``--resume auto`` continues from: the one ``latest`` names if it verifies
    (:func:`verify_checkpoint`), else the newest older one that does, after ``say``-ing which were skipped and
    why. None when the run has no checkpoint; :class:`CheckpointError` when it has some but none is intact
    (starting afresh would overwrite and prune them)."""
    run = Path(run_dir)
    skipped: list[str] = []
    try:
        latest = latest_checkpoint(run)
    except CheckpointError as exc:  # a pointer to a deleted or half-written directory
        latest, skipped = None, [str(exc)]
    candidates = [latest] if latest is not None else []
    candidates += [c for c in reversed(list_checkpoints(run)) if latest is None or c.name != latest.name]
    for ckpt in candidates:
        try:
            verify_checkpoint(ckpt)
        except CheckpointError as exc:
            skipped.append(str(exc))
            continue
        if skipped and say is not None:
            say(f"warning: resuming from {ckpt}, the newest intact checkpoint, instead: " + "; ".join(skipped))
        return ckpt
    if skipped:
        raise CheckpointError(f"no intact checkpoint to resume from in {run}: " + "; ".join(skipped))
    return None


def read_config(path: str | os.PathLike[str]) -> CheckpointConfig:
    """The ``config.json`` record of a checkpoint (directory, run directory or file inside one)."""
    ckpt = resolve_checkpoint(path)
    return read_config_file(ckpt / CONFIG_FILE)


def read_config_file(config_file: Path) -> CheckpointConfig:
    try:
        d = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config_file}: unreadable checkpoint config ({exc})") from exc
    if not isinstance(d, dict):
        raise CheckpointError(f"{config_file}: not a JSON object")
    return CheckpointConfig.from_json(d, str(config_file))


# --------------------------------------------------------------------------------------------- save
def save_checkpoint(
    run_dir: str | os.PathLike[str],
    config: CheckpointConfig,
    *,
    unet_state: Mapping[str, torch.Tensor],
    ema_state: Mapping[str, torch.Tensor] | None,
    train_state: Mapping[str, Any],
    keep_last: int | None = None,
) -> Path:
    """Write ``{run_dir}/step_XXXXXXXX`` (the step of ``config``) atomically, point ``latest`` at it, prune to
    ``keep_last``. Returns the checkpoint directory.

    ``train_state`` must hold only what ``torch.load(weights_only=True)`` accepts (tensors, dicts, lists,
    tuples, str, numbers, None).
    """
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    for stale in run.glob(".tmp-step_*"):  # left by a crash during an earlier save
        shutil.rmtree(stale, ignore_errors=True)
    config = dataclasses.replace(config, saved_at=time.time())
    ucfg = _config_dict(config.unet)
    meta = {_META_KEY: json.dumps(ucfg), "format": "sd-pipeline", "step": str(int(config.step))}
    name = step_dir_name(config.step)
    with _disk_full_reported(run, name):
        # re-saving a step (a resumed run passing an older run's checkpoint) swaps the old one out
        with atomic_dir(run / name) as tmp:
            save_weights(tmp / UNET_FILE, unet_state, meta)
            if ema_state is not None:
                save_weights(tmp / EMA_FILE, ema_state, meta)
            write_atomic(tmp / STATE_FILE, lambda f: torch.save(dict(train_state), f))
            # the hashes of the bytes as written (read back from the files, not from memory)
            files = {f.name: file_sha256(f) for f in (tmp / n for n in HASHED_FILES) if f.exists()}
            write_json_atomic(tmp / CONFIG_FILE, dataclasses.replace(config, files=files).to_json())
        write_text_atomic(run / LATEST, name + "\n")
    if keep_last is not None and keep_last > 0:
        prune_checkpoints(run, keep_last, intact=run / name)
    return run / name


@contextlib.contextmanager
def _disk_full_reported(run: Path, name: str) -> Iterator[None]:
    """Turn a full disk during a save into one `DiskFullError` naming the run directory and the checkpoint
    that stays ``latest`` (the partial directory is already gone: `atomic_dir` removes it)."""
    previous = _pointer_name(run)
    try:
        yield
    except Exception as exc:
        if not is_disk_full(exc, run):
            raise
        kept = f"previous checkpoint {run / previous} intact" if previous else "no previous checkpoint to keep"
        raise DiskFullError(run / name, kept) from exc


def _pointer_name(run: Path) -> str | None:
    try:
        return (run / LATEST).read_text().strip() or None
    except OSError:
        return None


def prune_checkpoints(run_dir: str | os.PathLike[str], keep_last: int, intact: Path | None = None) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints, never the one ``latest`` names nor the newest
    intact one: ``intact`` when the caller knows it (a save that just hashed what it wrote), else the newest
    that passes :func:`verify_checkpoint` (so a damaged newer checkpoint never gets a good one pruned)."""
    run = Path(run_dir)
    ckpts = list_checkpoints(run)
    doomed = ckpts[:-keep_last] if keep_last > 0 else []
    if not doomed:
        return []
    keep = {p.name for p in (latest_checkpoint(run), intact or _newest_verified(ckpts)) if p is not None}
    removed = []
    for p in doomed:
        if p.name in keep:
            continue
        remove_dir(p)
        removed.append(p)
    return removed


def _newest_verified(ckpts: list[Path]) -> Path | None:
    for ckpt in reversed(ckpts):
        try:
            verify_checkpoint(ckpt)
            return ckpt
        except CheckpointError:
            continue
    return None


# --------------------------------------------------------------------------------------------- load
def load_train_state(path: str | os.PathLike[str], map_location: str | torch.device = "cpu", *,
                     verify: bool = True) -> dict[str, Any]:
    """The trainer state of a checkpoint, loaded with ``weights_only=True`` (never arbitrary unpickling), after
    checking its sha256 against ``config.json`` (``verify``). A pickled object is refused as "not a plain
    tensor checkpoint" naming the file; a garbled file as :class:`DamagedCheckpointError`."""
    ckpt = resolve_checkpoint(path)
    state_path = ckpt / STATE_FILE
    if not state_path.exists():
        raise CheckpointError(f"{ckpt} has no {STATE_FILE}: it holds weights only and cannot be resumed from")
    if verify:
        verify_file(state_path, read_config_file(ckpt / CONFIG_FILE))
    try:
        return torch.load(state_path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused a pickled object: say so without torch's advice
        raise CheckpointError(f"{state_path} is not a plain tensor checkpoint: it holds {_refused_object(exc)}, "
                              f"which is never unpickled (a state file holds only tensors, dicts, lists, "
                              f"strings and numbers)") from None
    except (RuntimeError, EOFError, OSError) as exc:  # a truncated or garbled zip archive
        raise DamagedCheckpointError(state_path, f"not a readable torch file ({exc})") from exc


def _refused_object(exc: BaseException) -> str:
    """What the weights-only unpickler refused, from its message ("Unsupported global: GLOBAL mod.Name ...")."""
    m = re.search(r"(?:Unsupported global|GLOBAL|Unsupported operand)\W+(?:GLOBAL\s+)?([\w.]+)", str(exc))
    return f"a pickled Python object ({m.group(1)})" if m else "a pickled Python object"


def weights_path(path: Path, ema: bool) -> tuple[Path, CheckpointConfig | None]:
    """The safetensors file to load and, when it sits in a checkpoint directory, its config.json record."""
    if path.is_file() and path.suffix == ".safetensors":
        cfg_file = path.parent / CONFIG_FILE
        return path, (read_config_file(cfg_file) if cfg_file.exists() else None)
    ckpt = resolve_checkpoint(path)
    config = read_config_file(ckpt / CONFIG_FILE)
    wanted = ckpt / (EMA_FILE if ema else UNET_FILE)
    if not wanted.exists():
        if ema and (ckpt / UNET_FILE).exists():
            wanted = ckpt / UNET_FILE  # a checkpoint saved without EMA
        else:
            raise CheckpointError(f"{wanted} not found")
    return wanted, config


def stored_unet_config(weights: Path, meta: Mapping[str, str], ckpt_config: CheckpointConfig | None) -> UNetConfig:
    """The UNet config a weights file carries: its safetensors header first, else the ``config.json`` beside it;
    :class:`MissingUNetConfigError` when it has neither."""
    if _META_KEY in meta:
        return unet_config_from_dict(json.loads(meta[_META_KEY]))
    if ckpt_config is not None:
        return ckpt_config.unet
    raise MissingUNetConfigError(weights)


def load_unet(
    path: str | os.PathLike[str],
    *,
    ema: bool = True,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    config: UNetConfig | None = None,
    use_ema: bool | None = None,
    verify: bool = True,
) -> Any:
    """A ``UNetModel`` (eval mode) with a checkpoint's weights.

    ``path``: a checkpoint directory, a run directory (its ``latest`` checkpoint) or a ``.safetensors`` file
    (ours, or any UNet state dict, with or without ``module.`` / ``_orig_mod.`` prefixes). ``ema``: the EMA
    weights (default; falls back to the live weights when the checkpoint has no EMA) or the live ones.
    ``config``: a ``UNetConfig`` for files that do not carry one. ``use_ema``: an alias of ``ema``.
    ``verify``: check the file's sha256 against ``config.json`` and its tensors for NaN/inf first
    (:class:`DamagedCheckpointError` naming the file); off only for tools that inspect damage themselves.
    The checkpoint's ``config.json`` (step, lineage) is :func:`read_config`.
    """
    if use_ema is not None:
        ema = use_ema

    weights, ckpt_config = weights_path(Path(path), ema)
    if verify:
        verify_file(weights, ckpt_config)
    sd, meta = load_weights(weights)
    if verify:
        require_finite(weights, sd)
    if config is None:
        config = stored_unet_config(weights, meta, ckpt_config)
    model = UNetModel(config)
    expected = model.state_dict()
    wrong = sorted(k for k in sd.keys() & expected.keys() if tuple(sd[k].shape) != tuple(expected[k].shape))
    if wrong:
        raise CheckpointError(f"{weights} does not match the UNet config: shape mismatch in {wrong[:5]}"
                              f"{' ...' if len(wrong) > 5 else ''}")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not match the UNet config: missing {sorted(missing)[:10]}, "
                              f"unexpected {sorted(unexpected)[:10]}")
    model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval().requires_grad_(False)


def nonfinite_tensors(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Names of tensors holding NaN/inf in a checkpoint's weight files: ``{file name: [tensor names]}``
    (empty lists when clean). Used by the ``unet_checkpoint`` asset check."""
    ckpt = resolve_checkpoint(path)
    out: dict[str, list[str]] = {}
    for name in (UNET_FILE, EMA_FILE):
        f = ckpt / name
        if f.exists():
            sd, _ = load_weights(f)
            out[name] = sorted(k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all())
    return out
