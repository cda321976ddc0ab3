"""LAION metadata sources and the normalising view over their schema variants.

Real LAION files disagree on column names and types (DESIGN.md section 1, notes/data-pipeline.md):
``aesthetic`` vs ``AESTHETIC_SCORE``, WIDTH/HEIGHT int32 vs float64, an ``NSFW`` string (laion2B-en) vs a
``punsafe`` float, lowercase ``url``/``caption`` (Re-LAION), a stray ``__index_level_0__``. `inspect_file`
maps one file's columns to the canonical schema `CANONICAL`; `normalized_select` turns that mapping into a
DuckDB ``SELECT`` over the file (names mapped, types cast, NaN → NULL), which `sd_core.data.filter` unions
over all files. A column a configured filter needs but the file lacks is a `MetadataError` naming both.

`fetch_source` brings a configured source's parquet files into the data root (``metadata/``), validating
everything before it writes anything.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import os
import shutil
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from sd_core.atomic import fsync_dir
from sd_core.config import FilterConfig, SourceConfig

# canonical name → DuckDB type of the normalised view
CANONICAL: dict[str, str] = {
    "url": "VARCHAR",
    "caption": "VARCHAR",
    "width": "INTEGER",
    "height": "INTEGER",
    "similarity": "DOUBLE",
    "aesthetic": "DOUBLE",
    "punsafe": "DOUBLE",
    "pwatermark": "DOUBLE",
    "nsfw": "VARCHAR",
    "hash": "BIGINT",
}

# canonical name → source spellings, preferred first (matched exactly, then case-insensitively)
ALIASES: dict[str, tuple[str, ...]] = {
    "url": ("URL", "url"),
    "caption": ("TEXT", "caption", "text"),
    "width": ("WIDTH", "width"),
    "height": ("HEIGHT", "height"),
    "similarity": ("similarity",),
    "aesthetic": ("aesthetic", "AESTHETIC_SCORE", "aesthetic_score"),
    "punsafe": ("punsafe",),
    "pwatermark": ("pwatermark",),
    "nsfw": ("NSFW",),
    "hash": ("hash",),
}

# A synthetic source file's name in metadata/
SYNTHETIC_FILE = "synthetic.parquet"


class MetadataError(ValueError):
    """A metadata source or file cannot be used; the message names the file and, where relevant, the column."""


@dataclass(frozen=True)
class FileColumns:
    """How one parquet file maps onto the canonical schema.

    ``columns``: canonical name → the file's column (None: absent, NULL in the view). ``safety``: which
    column the safety filter reads in this file (``nsfw``, ``punsafe`` or None when disabled).
    """

    path: Path
    columns: dict[str, str | None]
    safety: str | None
    rows: int
    bytes: int
    schema: pa.Schema = field(repr=False)


def required_columns(cfg: FilterConfig) -> dict[str, str]:
    """Canonical columns the configured filters read (column → the config field that needs it)."""
    need = {"url": "url (always needed)", "caption": "caption (always needed)"}
    if cfg.min_aesthetic is not None:
        need["aesthetic"] = "filter.min_aesthetic"
    if cfg.min_similarity is not None:
        need["similarity"] = "filter.min_similarity"
    size_field = "filter.min_side" if cfg.min_side is not None else (
        "filter.min_aspect/max_aspect" if (cfg.min_aspect is not None or cfg.max_aspect is not None) else None)
    if size_field:
        need["width"] = size_field
        need["height"] = size_field
    if cfg.max_pwatermark is not None:
        need["pwatermark"] = "filter.max_pwatermark"
    return need


def _match(names: list[str], canonical: str) -> str | None:
    for alias in ALIASES[canonical]:
        if alias in names:
            return alias
    lower = {n.lower(): n for n in names}
    for alias in ALIASES[canonical]:
        if alias.lower() in lower:
            return lower[alias.lower()]
    return None


def read_schema(path: str | os.PathLike[str], origin: str | None = None) -> pa.Schema:
    """`pq.read_schema` with a clear error for missing or non-parquet files; ``origin`` names the file in that
    error where ``path`` is only a staged copy (default: ``path``)."""
    p = Path(path)
    shown = origin or str(p)
    if not p.is_file():
        raise MetadataError(f"metadata file {shown} does not exist")
    try:
        return pq.read_schema(p)
    except (pa.ArrowInvalid, OSError) as e:
        raise MetadataError(f"{shown} is not a readable parquet file ({type(e).__name__}: {e})") from e


def inspect_file(path: str | os.PathLike[str], cfg: FilterConfig, origin: str | None = None) -> FileColumns:
    """Map one file's columns to the canonical schema; raise `MetadataError` naming the file (``origin``, where
    ``path`` is only a staged copy) and the column when a configured filter needs a column the file lacks."""
    p = Path(path)
    shown = origin or str(p)
    schema = read_schema(p, origin)
    names = [n for n in schema.names if not n.startswith("__index_level_")]
    cols = {c: _match(names, c) for c in CANONICAL}
    for canon, why in required_columns(cfg).items():
        if cols[canon] is None:
            raise MetadataError(
                f"metadata file {shown} lacks column {canon!r} (looked for {', '.join(ALIASES[canon])}), which "
                f"{why} needs; its columns are {names}. Disable that filter (set it to null) or use another source."
            )
    safety: str | None = None
    if cfg.max_punsafe is not None or cfg.nsfw_allowed:
        if cols["nsfw"] is not None and cfg.nsfw_allowed:
            safety = "nsfw"
        elif cols["punsafe"] is not None and cfg.max_punsafe is not None:
            safety = "punsafe"
        else:
            raise MetadataError(
                f"metadata file {shown} lacks column 'punsafe' (or the laion2B-en 'NSFW' string column), which "
                f"filter.max_punsafe / filter.nsfw_allowed need; its columns are {names}. Set filter.max_punsafe "
                f"to null and filter.nsfw_allowed to [] to disable the safety filter."
            )
    md = pq.read_metadata(p)
    return FileColumns(path=p, columns=cols, safety=safety, rows=md.num_rows, bytes=p.stat().st_size,
                       schema=schema)


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def sql_literal(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def normalized_select(files: list[FileColumns], first_index: int = 0) -> str:
    """A DuckDB SELECT producing the canonical columns of ``files`` (which must share one column mapping and
    safety rule, see `group_files`) in one ``read_parquet`` scan, plus ``_file`` (``first_index`` + position
    in ``files``), ``_row`` (row number within its file) and ``_safety_nsfw`` (whether the safety filter reads
    NSFW).

    One scan per schema group, not one per file: DuckDB runs the branches of a UNION side by side, each with
    its own buffers, so a union of N per-file scans needs ~N times the memory.

    Floats: NaN → NULL (DuckDB orders NaN above every number, so ``NaN >= 6.5`` would pass). WIDTH/HEIGHT:
    any numeric type → INTEGER, floored (so ``width >= 512`` means the same as on the float; out of range →
    NULL)."""
    fc = files[0]
    if any(f.columns != fc.columns or f.safety != fc.safety for f in files[1:]):
        raise ValueError("normalized_select: files must share one column mapping (use group_files)")
    exprs = []
    for canon, typ in CANONICAL.items():
        src = fc.columns[canon]
        if src is None:
            e = f"CAST(NULL AS {typ})"
        elif typ == "DOUBLE":
            e = f"nan_to_null(TRY_CAST({_q(src)} AS DOUBLE))"
        elif typ == "INTEGER":
            e = f"TRY_CAST(floor(nan_to_null(TRY_CAST({_q(src)} AS DOUBLE))) AS INTEGER)"
        else:
            e = f"TRY_CAST({_q(src)} AS {typ})"
        exprs.append(f"{e} AS {canon}")
    if len(files) == 1:
        exprs.append(f"{first_index} AS _file")
    else:
        whens = " ".join(f"WHEN {sql_literal(str(f.path))} THEN {first_index + i}" for i, f in enumerate(files))
        exprs.append(f"CASE filename {whens} END AS _file")
    exprs.append("file_row_number AS _row")
    exprs.append(f"{'true' if fc.safety == 'nsfw' else 'false'} AS _safety_nsfw")
    paths = ", ".join(sql_literal(str(f.path)) for f in files)
    return (f"SELECT {', '.join(exprs)} FROM read_parquet([{paths}], file_row_number = true, filename = true, "
            f"union_by_name = true)")


def group_files(files: list[FileColumns]) -> list[list[tuple[int, FileColumns]]]:
    """Runs of consecutive files (in the given order) that share a column mapping and safety rule, with their
    positions: each run is one `normalized_select` scan."""
    groups: list[list[tuple[int, FileColumns]]] = []
    for i, fc in enumerate(files):
        if groups and groups[-1][-1][1].columns == fc.columns and groups[-1][-1][1].safety == fc.safety:
            groups[-1].append((i, fc))
        else:
            groups.append([(i, fc)])
    return groups


NAN_MACRO = "CREATE OR REPLACE TEMP MACRO nan_to_null(x) AS CASE WHEN isnan(x) THEN NULL ELSE x END"


# ------------------------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class SourceFiles:
    """What `fetch_source` wrote into ``metadata/``."""

    files: list[Path]
    rows: int
    bytes: int
    columns: dict[str, dict[str, str | None]]  # file name → canonical → source column
    schema: str  # the first file's arrow schema, as text
    removed: list[Path]  # stale files of an earlier source, removed
    synthetic: dict[str, Any] | None = None  # what the synthetic generator planted

    def column_mapping_markdown(self) -> str:
        """Canonical column → each file's source column, as a markdown table with one column per file."""
        lines = ["| canonical | " + " | ".join(self.columns) + " |", "|---|" + "---|" * len(self.columns)]
        for canon in CANONICAL:
            lines.append(f"| {canon} | " + " | ".join(str(cols[canon] or "—") for cols in self.columns.values())
                         + " |")
        return "\n".join(lines)

    def as_metadata(self) -> dict[str, Any]:
        """What was fetched, as plain JSON values (what an orchestrator shows for the step)."""
        out: dict[str, Any] = {"files": [str(f) for f in self.files], "num_files": len(self.files),
                               "rows": self.rows, "bytes": self.bytes}
        if self.synthetic:
            out["synthetic_planted"] = self.synthetic
        return out


def list_parquet(uri: str) -> list[str]:
    """Expand a local file, folder or glob into sorted parquet paths (no match → `MetadataError`)."""
    p = Path(uri).expanduser()
    if p.is_dir():
        found = sorted(str(x) for x in p.rglob("*.parquet"))
    elif any(ch in uri for ch in "*?["):
        found = sorted(globlib.glob(str(p), recursive=True))
    else:
        found = [str(p)] if p.exists() else []
    found = [f for f in found if Path(f).is_file()]
    if not found:
        raise MetadataError(f"metadata source {uri!r} matches no file")
    return found


def hf_download_kwargs(uri: str, revision: str | None, cache_dir: Path) -> dict[str, Any]:
    """`huggingface_hub.snapshot_download` arguments for an ``hf`` source: ``org/name`` (every parquet file)
    or ``org/name/<pattern>``."""
    parts = uri.strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise MetadataError(f"hf source {uri!r} is not a dataset repo id like 'org/name' or 'org/name/*.parquet'")
    repo_id = "/".join(parts[:2])
    pattern = "/".join(parts[2:]) or "*.parquet"
    return {
        "repo_id": repo_id,
        "repo_type": "dataset",
        "revision": revision,
        "allow_patterns": [pattern],
        "cache_dir": str(cache_dir),
    }


def download_hf(uri: str, revision: str | None, cache_dir: Path) -> list[str]:
    """Download (or reuse from the cache) a Hugging Face dataset's parquet files; return their local paths."""
    kwargs = hf_download_kwargs(uri, revision, cache_dir)
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(**kwargs)
    except Exception as e:  # offline, gated, missing repo, no network: all end here with a clear message
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        hint = " (HF_HUB_OFFLINE is set: downloads are disabled)" if offline else ""
        raise MetadataError(
            f"cannot fetch Hugging Face dataset {kwargs['repo_id']!r} (files {kwargs['allow_patterns'][0]}, "
            f"revision {revision or 'main'}){hint}: {type(e).__name__}: {e}"
        ) from e
    files = sorted(str(p) for p in Path(local).rglob("*.parquet")
                   if fnmatch(str(p.relative_to(local)), kwargs["allow_patterns"][0]))
    if not files:
        raise MetadataError(f"Hugging Face dataset {kwargs['repo_id']!r} has no file matching "
                            f"{kwargs['allow_patterns'][0]!r}")
    return files


def _download_url(url: str, dest: Path) -> None:
    with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as f:  # noqa: S310 - user's URI
        shutil.copyfileobj(r, f, length=1 << 20)


def _remote_files(uri: str) -> list[tuple[str, Callable[[Path], None]]]:
    """Files of a pyarrow-filesystem URI (s3://, gs://, hdfs://, …), optionally with a glob in the last part."""
    from pyarrow import fs as pafs

    base, _, last = uri.rpartition("/")
    if any(ch in last for ch in "*?["):
        filesystem, root = pafs.FileSystem.from_uri(base)
        infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=False))
        paths = sorted(i.path for i in infos if i.type == pafs.FileType.File and fnmatch(i.base_name, last))
    else:
        filesystem, path = pafs.FileSystem.from_uri(uri)
        paths = [path]
    if not paths:
        raise MetadataError(f"metadata source {uri!r} matches no file")

    def copier(src: str) -> Callable[[Path], None]:
        def run(dest: Path) -> None:
            with filesystem.open_input_stream(src) as r, open(dest, "wb") as f:
                shutil.copyfileobj(r, f, length=1 << 20)
        return run

    return [(p, copier(p)) for p in paths]


@dataclass(frozen=True)
class _Staged:
    """One source file in the staging folder: its name in ``metadata/``, the staged copy, and where it came
    from (what error messages name)."""

    name: str
    path: Path
    origin: str


def fetch_source(
    source: SourceConfig,
    filter_cfg: FilterConfig,
    metadata_dir: Path,
    cache_dir: Path,
    synthetic_writer: Callable[[Path], dict[str, Any]] | None = None,
) -> SourceFiles:
    """Bring the configured source's parquet files into ``metadata_dir``.

    Every file is staged under a temporary name and validated (readable parquet, every column the
    configured filters need, at least one row in total) before any of them replaces a file in
    ``metadata_dir``, so a bad source leaves what is already there untouched. Parquet files in
    ``metadata_dir`` that the source no longer has are removed afterwards (the filter reads the whole folder).
    """
    metadata_dir.mkdir(parents=True, exist_ok=True)
    staging = metadata_dir / f".staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        staged, synthetic_info = _stage_source(source, staging, cache_dir, synthetic_writer)
        inspected = _inspect_staged(staged, filter_cfg, source)
        final = _move_into(metadata_dir, staged)
        removed = _remove_stale(metadata_dir, keep={p.name for p in final})
        return SourceFiles(
            files=final,
            rows=sum(fc.rows for fc in inspected),
            bytes=sum(fc.bytes for fc in inspected),
            columns={f.name: fc.columns for f, fc in zip(staged, inspected)},
            schema=inspected[0].schema.remove_metadata().to_string(show_schema_metadata=False),
            removed=removed,
            synthetic=synthetic_info,
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _stage_source(source: SourceConfig, staging: Path, cache_dir: Path,
                  synthetic_writer: Callable[[Path], dict[str, Any]] | None,
                  ) -> tuple[list[_Staged], dict[str, Any] | None]:
    """Write (synthetic) or copy (parquet, hf) every file of ``source`` into ``staging``; also return what the
    synthetic generator planted (None for the other kinds)."""
    match source.kind:
        case "synthetic":
            if synthetic_writer is None:
                raise MetadataError("synthetic source needs a synthetic_writer")
            dest = staging / SYNTHETIC_FILE
            info = synthetic_writer(dest)
            return [_Staged(SYNTHETIC_FILE, dest, f"synthetic source ({SYNTHETIC_FILE})")], info
        case "parquet":
            uri = _required_uri(source)
            return _stage_copies(_parquet_copies(uri), staging, uri), None
        case "hf":
            uri = _required_uri(source)
            files = download_hf(uri, source.hf_revision, cache_dir)
            return _stage_copies([(f, _local_copier(f)) for f in files], staging, uri), None
        case _:
            raise MetadataError(f"unknown source.kind {source.kind!r}; expected synthetic, parquet or hf")


def _required_uri(source: SourceConfig) -> str:
    if not source.uri:
        raise MetadataError(f"source.kind={source.kind!r} needs source.uri")
    return source.uri


def _parquet_copies(uri: str) -> list[tuple[str, Callable[[Path], None]]]:
    """A parquet source's files, each with the function that copies it to a given path, by what ``uri`` is:
    an http(s) URL, a pyarrow filesystem URI (s3://, gs://, …) or a local file, folder or glob."""
    if uri.startswith(("http://", "https://")):
        return [(uri, lambda dest: _download_url(uri, dest))]
    if "://" in uri and not uri.startswith("file://"):
        return _remote_files(uri)
    return [(f, _local_copier(f)) for f in list_parquet(uri.removeprefix("file://"))]


def _stage_copies(copies: list[tuple[str, Callable[[Path], None]]], staging: Path, uri: str) -> list[_Staged]:
    """Copy each file into ``staging`` under its base name, which must be unique: ``metadata/`` is flat."""
    names = [Path(src.split("?")[0]).name or "source.parquet" for src, _ in copies]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise MetadataError(f"metadata source {uri!r} has several files named {dupes}; "
                            f"metadata/ keeps one flat folder, so file names must be unique")
    staged = []
    for (src, copy), name in zip(copies, names):
        if not name.endswith(".parquet"):
            name += ".parquet"
        dest = staging / name
        try:
            copy(dest)
        except OSError as e:
            raise MetadataError(f"cannot read metadata file {src}: {e}") from e
        staged.append(_Staged(name, dest, src))
    return staged


def _inspect_staged(staged: list[_Staged], filter_cfg: FilterConfig, source: SourceConfig) -> list[FileColumns]:
    """Check every staged file against the configured filters (errors name the source file, not the staged
    copy) and that the source has at least one row."""
    inspected = [inspect_file(f.path, filter_cfg, origin=f.origin) for f in staged]
    if sum(fc.rows for fc in inspected) == 0:
        what = "synthetic source" if source.kind == "synthetic" else f"metadata source {source.uri!r}"
        raise MetadataError(f"{what} is empty ({', '.join(f.origin for f in staged)}): "
                            f"{len(inspected)} file(s), 0 rows")
    return inspected


def _move_into(metadata_dir: Path, staged: list[_Staged]) -> list[Path]:
    """Rename the validated files into ``metadata_dir`` (same filesystem: each rename is atomic)."""
    final = []
    for f in staged:
        target = metadata_dir / f.name
        os.replace(f.path, target)
        final.append(target)
    fsync_dir(metadata_dir)
    return final


def _remove_stale(metadata_dir: Path, keep: set[str]) -> list[Path]:
    """Delete the parquet files of an earlier source that the new one does not have."""
    removed = []
    for old in sorted(metadata_dir.glob("*.parquet")):
        if old.name not in keep:
            old.unlink()
            removed.append(old)
    return removed


def _local_copier(src: str) -> Callable[[Path], None]:
    return lambda dest: shutil.copyfile(src, dest)


def files_version(paths: Sequence[Path]) -> str:
    """A data version for parquet files: name, size and footer bytes of each (cheap for 100 GB of metadata,
    and any rewrite changes the footer)."""
    h = hashlib.sha256()
    for p in sorted(paths):
        size = p.stat().st_size
        h.update(f"{p.name}\0{size}\0".encode())
        with open(p, "rb") as f:
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read())
    return h.hexdigest()[:16]
