"""Shard keys and the paths built from them: the one place that decides what a key may look like and where a
key-derived file may be written.

A shard key arrives from outside the code that uses it (a Dagster partition anyone can add with
``instance.add_dynamic_partitions``, a file name the shard sensor finds on disk, a CLI argument) and is then
spliced into file names: ``filtered/{key}.parquet``, ``shards/{key}.tar``, ``latents/{key}.npy``. A key such
as ``../../elsewhere/filtered/00000`` would make those writes land outside the data root (and the latent
manifest would record an entry whose files are elsewhere), so:

- `check_shard_key`: the strict format, exactly what `sd_core.data.filter` names its parts (``00000``,
  ``00001``, …, ``123456``): ASCII digits, zero-padded to `KEY_WIDTH`, no sign, no whitespace, no other
  script's digits. Every boundary that accepts a partition key (the assets, the shard sensor,
  ``filtered_metadata``'s registration) calls it before any file is touched.
- `shard_file`: ``directory/{name}{suffix}`` for the library's own writers, which also accept free-form names
  (tests and tools use ``"s0"``, ``"warmup"``): the name must be one plain file name and the result must stay
  inside ``directory`` once symlinks are resolved.
- `inside_data_root`: the containment check itself (resolve, symlinks included; refuse anything outside).

Only the standard library is imported here, so the trainer and the encoder can use it without pulling in
DuckDB or Dagster.
"""

from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path

KEY_WIDTH = 5  # the zero-padded width of `sd_core.data.filter.shard_key` (tests/test_partition_keys.py ties them)
MAX_KEY_DIGITS = 12  # a trillion shards: more than any run, and far below any file-name length limit
# Canonical form only: exactly KEY_WIDTH digits, or more without a leading zero (what f"{n:05d}" produces).
# re.ASCII keeps other scripts' digits (e.g. fullwidth '０', Arabic-Indic '٠') out of [0-9]/\d.
SHARD_KEY_PATTERN = rf"[0-9]{{{KEY_WIDTH}}}|[1-9][0-9]{{{KEY_WIDTH},{MAX_KEY_DIGITS - 1}}}"
_SHARD_KEY_RE = re.compile(SHARD_KEY_PATTERN, re.ASCII)
SHARD_KEY_FORMAT = (f"the pattern {SHARD_KEY_PATTERN}: {KEY_WIDTH} to {MAX_KEY_DIGITS} ASCII digits, zero-padded to "
                    f"{KEY_WIDTH}, as sd_core.data.filter names its parts (00000, 00001, ..., 123456)")
MAX_NAME_BYTES = 200  # leaves room for the longest suffix and temporary-name decoration under NAME_MAX (255)


def _shown(key: object, limit: int = 60) -> str:
    """``key`` as an error message shows it: ASCII-escaped (a newline, a look-alike digit or a zero-width
    character is visible) and cut short (a 300-character key does not flood the log)."""
    text = ascii(key)
    if isinstance(key, str) and len(text) > limit:
        return f"{text[:limit]}… ({len(key)} characters)"
    return text


def is_shard_key(key: object) -> bool:
    """Whether ``key`` is a shard key in the filter's format (see `check_shard_key`)."""
    return isinstance(key, str) and _SHARD_KEY_RE.fullmatch(key) is not None


def check_shard_key(key: object) -> str:
    """``key`` itself if it is a shard key in the filter's format; else a ValueError naming the key (escaped)
    and the expected format. ``fullmatch``, not ``match`` + ``$``: ``$`` also matches before a final newline,
    so ``"00000\\n"`` would pass."""
    if not is_shard_key(key):
        raise ValueError(f"shard key {_shown(key)} is not a valid shard key: expected {SHARD_KEY_FORMAT}")
    return key  # type: ignore[return-value]  # is_shard_key proved it is a str


def inside_data_root(path: str | os.PathLike[str], root: str | os.PathLike[str], *,
                     root_is: str = "the data root") -> Path:
    """``path`` resolved (every symlink followed, ``..`` collapsed), after checking that it lies inside
    ``root`` (also resolved, so a data root that is itself a symlink is fine); a ValueError naming both
    otherwise (``root_is`` says what ``root`` is, for the message). For paths about to be written: a symlink
    inside the root that points outside is refused too."""
    try:
        root_resolved = Path(root).resolve()
        resolved = Path(path).resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python < 3.13)
        raise ValueError(f"cannot resolve {path} (data root {root}): {e}") from None
    if not resolved.is_relative_to(root_resolved):
        shown = str(path) if str(path) == str(resolved) else f"{path} (resolves to {resolved})"
        raise ValueError(f"{shown} is outside {root_is} {root_resolved}: refusing to write there")
    return resolved


def check_file_name(name: object) -> str:
    """``name`` if it is usable as one plain file name: a non-empty string with no path separator, NUL or
    other control character, not ``.``/``..``, and at most `MAX_NAME_BYTES` bytes of UTF-8."""
    problem = None
    if not isinstance(name, str) or not name:
        problem = "it is empty" if name == "" else f"it is a {type(name).__name__}, not a string"
    elif "/" in name or os.sep in name or (os.altsep and os.altsep in name):
        problem = "it contains a path separator"
    elif name in (".", ".."):
        problem = "it names a directory"
    elif any(unicodedata.category(c) == "Cc" for c in name):
        problem = "it contains a control character"
    elif len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        problem = f"it is longer than {MAX_NAME_BYTES} bytes"
    if problem:
        raise ValueError(f"shard name {_shown(name)} cannot be used in a file name: {problem}")
    return name  # type: ignore[return-value]


def shard_file(directory: str | os.PathLike[str], name: str, suffix: str) -> Path:
    """``directory/{name}{suffix}``, after checking that ``name`` is one plain file name (`check_file_name`)
    and that the file stays inside ``directory`` with symlinks resolved (a ``{name}{suffix}`` symlink
    pointing elsewhere is refused). Returned unresolved, so callers see the paths they always saw."""
    path = Path(directory) / f"{check_file_name(name)}{suffix}"
    inside_data_root(path, directory, root_is="its folder")
    return path
