"""Crash-safe writes: write to a temporary sibling, fsync, rename over the target, fsync the folder.

Every artefact a crash could cut short (checkpoints, the `latest` pointer, the latent manifest, shard parts,
the frozen components, an exported pipeline, run results) goes through here, so a reader sees either the old
file or folder or the new one, never a truncated one.

- files: `write_atomic(path, write)` for any writer of a binary file (PNG, ``torch.save``, parquet),
  `write_file_atomic` for a writer that needs a file name (safetensors),
  `write_text_atomic`, `write_json_atomic`, `write_parquet_atomic`; `write_temp` when the rename must wait;
- folders: ``with atomic_dir(final) as tmp: ...`` builds into a temporary sibling and swaps it into place only
  when the block succeeds (`replace_dir`); `remove_dir` deletes a folder so that a half-deleted one is never
  mistaken for a complete one.

Temporary names are hidden and end with ``.tmp`` (folders start with ``.tmp-``), so leftovers of a killed
process are easy to find.

A full disk is reported as :class:`DiskFullError` ("no space left on DIR while writing NAME"), whatever the
writer said (numpy's "N requested and M written", torch's "[enforce fail at inline_container.cc] unexpected
pos", safetensors' "I/O error"), after the temporary file is removed: the previous version stays untouched.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator


class DiskFullError(OSError):
    """No space left where an artefact was being written (``errno`` is ENOSPC; ``path`` is the file). The
    message names the folder and the file; callers add what stays intact (see `sd_core.training.checkpoint`)."""

    def __init__(self, path: str | os.PathLike[str], note: str = ""):
        self.path = Path(path)
        message = f"no space left on {self.path.parent} while writing {self.path.name}"
        super().__init__(errno.ENOSPC, message + (f", {note}" if note else ""))

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28]" prefix
        return str(self.strerror)


# what writers say when a write came up short; torch's zip writer and numpy lose the errno on the way
_SHORT_WRITE_MARKERS = ("No space left on device", "os error 28", "inline_container", "PytorchStreamWriter",
                        "requested and", "file write failed")
_NEARLY_FULL_BYTES = 1 << 20


def _free_bytes(directory: Path) -> int | None:
    try:
        st = os.statvfs(directory)
    except (OSError, AttributeError):  # pragma: no cover - platforms without statvfs
        return None
    return st.f_bavail * st.f_frsize


def is_disk_full(exc: BaseException, directory: str | os.PathLike[str]) -> bool:
    """Whether a failed write into ``directory`` failed for lack of space: an ENOSPC/EDQUOT ``OSError``, or a
    writer's short-write error while the filesystem is (nearly) full. Call it before deleting the partial
    file: once that is gone, the space is free again."""
    if isinstance(exc, DiskFullError):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    if "No space left on device" in text or "os error 28" in text:
        return True
    if any(marker in text for marker in _SHORT_WRITE_MARKERS):
        free = _free_bytes(Path(directory))
        return free is not None and free < _NEARLY_FULL_BYTES
    return False


def fsync_dir(d: str | os.PathLike[str]) -> None:
    """Persist a rename inside ``d`` (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def temp_sibling(path: str | os.PathLike[str]) -> Path:
    """A new, unique, hidden temporary file next to ``path`` (same filesystem, so ``os.replace`` is atomic)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def write_temp(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> Path:
    """A temporary sibling of ``path`` holding what ``write(file)`` wrote, fsynced, for the caller to rename into
    place (deleted again if the write fails). Use it where the rename must wait (the latent cache journals its
    renames first); otherwise `write_atomic` does both."""

    def write_to(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write(f)

    return _written_temp(Path(path), write_to)


def _written_temp(path: Path, write_to: Callable[[Path], None]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        write_to(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException as exc:
        full = isinstance(exc, Exception) and is_disk_full(exc, path.parent)  # before the unlink frees space
        tmp.unlink(missing_ok=True)
        if full and not isinstance(exc, DiskFullError):
            raise DiskFullError(path) from exc
        raise
    return tmp


def _replace_with(tmp: Path, path: Path) -> None:
    try:
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_atomic(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> None:
    """Replace ``path`` with what ``write(file)`` writes into a binary file, atomically and durably."""
    _replace_with(write_temp(path, write), Path(path))


def write_file_atomic(path: str | os.PathLike[str], write_to: Callable[[Path], None]) -> None:
    """`write_atomic` for writers that need a file name, not a file (e.g. safetensors' ``save_file``, which
    streams the tensors out instead of building the whole file in memory)."""
    path = Path(path)
    _replace_with(_written_temp(path, write_to), path)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically and durably."""
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Replace ``path`` with ``obj`` as indented, key-sorted JSON, atomically."""
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")


def write_parquet_atomic(table: Any, path: str | os.PathLike[str], **kwargs: Any) -> None:
    """Replace ``path`` with the Arrow ``table`` as parquet (``kwargs`` go to `pyarrow.parquet.write_table`)."""
    import pyarrow.parquet as pq

    write_atomic(path, lambda f: pq.write_table(table, f, **kwargs))


def replace_dir(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Move folder ``src`` to ``dst``, replacing an existing ``dst``: rename the old one away, rename the new one
    in, then delete the old one (a crash in between leaves a complete folder under one of the two names)."""
    src, dst = Path(src), Path(dst)
    old = None
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".tmp-old-{dst.name}-", suffix=".tmp", dir=dst.parent))
        os.replace(dst, old)
    os.replace(src, dst)
    fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_dir(path: str | os.PathLike[str]) -> None:
    """Delete a folder, renaming it to a temporary name first so a half-deleted folder never keeps its name."""
    path = Path(path)
    doomed = Path(tempfile.mkdtemp(prefix=f".tmp-del-{path.name}-", suffix=".tmp", dir=path.parent))
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a new empty folder beside ``final`` to build into; when the block ends without an exception it is
    fsynced and swapped into place (`replace_dir`), otherwise it is deleted and ``final`` stays as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        fsync_dir(tmp)
        replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
