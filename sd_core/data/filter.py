"""The metadata filter: one streaming DuckDB query over the normalised view, written as shard parts.

`filter_metadata(inputs, out_dir, config, shard_size)`:

1. One streaming DuckDB query over every input file (`sd_core.data.metadata.normalized_select`: one
   ``read_parquet`` per run of files sharing a schema) computes for each row the first funnel stage it fails
   (``_stage``, NULL = passes everything) and aggregates: one group (a count) per stage for the dropped rows,
   one group per survivor. Memory follows the survivors, not the input (measured flat from 2.5M to 10M rows:
   BENCHMARKS.md).
2. Survivors are de-duplicated by URL (the first row in file order, then row order, wins), and rows whose
   URL is already in an existing part are dropped: new input only ever adds shard keys.
3. The rest, in a stable order (input file, then row number in the file), is cut into parts of exactly
   ``shard_size`` rows (the last part of a run may be shorter) and each part is written by us, to a
   temporary name and renamed (DuckDB's own multi-file output order is not reproducible). Part keys continue
   after the highest existing key (``00000``, ``00001``, …); existing parts are never rewritten.

The funnel (`FilterReport.removed_by`) counts the rows each stage removed, in the order applied: `STAGES`.
Right after "url present" comes ``url_policy`` (`sd_core.data.url_policy`): rows whose URL is not ``http(s)``
or names a loopback, link-local, private or unspecified address or ``localhost`` (`FilterConfig.allow_hosts`:
the exceptions) never reach a shard part. A regex passes the plain ``http(s)://name/...`` rows in SQL; only
the others go to the Python check (a DuckDB UDF), so its cost follows the odd rows, not the input.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from sd_core.atomic import write_parquet_atomic, write_text_atomic
from sd_core.config import FilterConfig
from sd_core.data import url_policy
from sd_core.data.metadata import (
    CANONICAL,
    NAN_MACRO,
    FileColumns,
    MetadataError,
    group_files,
    inspect_file,
    normalized_select,
    sql_literal,
)

# Funnel stages in the order applied. Those whose config field is None are skipped.
STAGES: tuple[str, ...] = (
    "url",  # url present (not NULL, not empty)
    "url_policy",  # http(s) to a public host (sd_core.data.url_policy), unless in allow_hosts
    "min_aesthetic",
    "min_similarity",
    "min_side",
    "aspect",  # min_aspect <= width / height <= max_aspect
    "caption_len",  # min_caption_len <= length(caption) <= max_caption_len
    "max_pwatermark",
    "safety",  # NSFW in nsfw_allowed (files with the NSFW column), else punsafe < max_punsafe
    "dedup_url",
    "already_sharded",  # url already in an existing part
)

STATE_FILE = "_filter.json"
KEY_WIDTH = 5
_KEY_RE = re.compile(r"^(\d{%d,})\.parquet$" % KEY_WIDTH)
_COLUMNS = ", ".join(CANONICAL)  # the canonical columns, as a SQL select list


@dataclass
class FilterReport:
    """What one `filter_metadata` call did.

    ``rows_in``: input rows; ``removed_by``: stage → rows it removed, in funnel order; ``rows_out``: rows
    written to new parts by this call (``rows_in - sum(removed_by.values())``); ``shard_keys``: keys of the
    parts written by this call; ``existing_keys``: parts that were already there (untouched).
    """

    rows_in: int
    rows_out: int
    removed_by: dict[str, int]
    shard_keys: list[str]
    existing_keys: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    shard_rows: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def funnel_markdown(self) -> str:
        """The funnel as a markdown table: stage, rows removed, rows left."""
        lines = ["| stage | removed | remaining |", "|---|---:|---:|", f"| input | | {self.rows_in:,} |"]
        left = self.rows_in
        for stage, n in self.removed_by.items():
            left -= n
            lines.append(f"| {stage} | {n:,} | {left:,} |")
        lines.append(f"| **new shard rows** | | **{self.rows_out:,}** |")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def as_metadata(self) -> dict[str, Any]:
        """This call's funnel totals as plain JSON values (what an orchestrator shows for the step)."""
        return {"rows_in": self.rows_in, "rows_out": self.rows_out, "removed_by": dict(self.removed_by),
                "new_shards": list(self.shard_keys), "seconds": self.seconds}


def _pred(stage: str, cfg: FilterConfig) -> str | None:
    """The SQL condition a row must satisfy to pass ``stage`` (None: stage disabled). NULL → fails."""
    if stage == "url":
        return "url IS NOT NULL AND url <> ''"
    if stage == "url_policy":
        return url_policy.sql_condition("url")
    if stage == "min_aesthetic" and cfg.min_aesthetic is not None:
        return f"aesthetic >= {float(cfg.min_aesthetic)!r}"
    if stage == "min_similarity" and cfg.min_similarity is not None:
        return f"similarity >= {float(cfg.min_similarity)!r}"
    if stage == "min_side" and cfg.min_side is not None:
        return f"width >= {int(cfg.min_side)} AND height >= {int(cfg.min_side)}"
    if stage == "aspect" and (cfg.min_aspect is not None or cfg.max_aspect is not None):
        conds = ["height > 0", "width IS NOT NULL"]
        if cfg.min_aspect is not None:
            conds.append(f"CAST(width AS DOUBLE) / height >= {float(cfg.min_aspect)!r}")
        if cfg.max_aspect is not None:
            conds.append(f"CAST(width AS DOUBLE) / height <= {float(cfg.max_aspect)!r}")
        return " AND ".join(conds)
    if stage == "caption_len" and (cfg.min_caption_len is not None or cfg.max_caption_len is not None):
        conds = ["caption IS NOT NULL"]
        if cfg.min_caption_len is not None:
            conds.append(f"length(caption) >= {int(cfg.min_caption_len)}")
        if cfg.max_caption_len is not None:
            conds.append(f"length(caption) <= {int(cfg.max_caption_len)}")
        return " AND ".join(conds)
    if stage == "max_pwatermark" and cfg.max_pwatermark is not None:
        return f"pwatermark < {float(cfg.max_pwatermark)!r}"
    if stage == "safety" and (cfg.max_punsafe is not None or cfg.nsfw_allowed):
        allowed = ", ".join(sql_literal(v) for v in cfg.nsfw_allowed) or "NULL"
        by_punsafe = f"punsafe < {float(cfg.max_punsafe)!r}" if cfg.max_punsafe is not None else "false"
        return f"CASE WHEN _safety_nsfw THEN nsfw IN ({allowed}) ELSE {by_punsafe} END"
    return None


def active_stages(cfg: FilterConfig) -> list[tuple[str, str]]:
    """The enabled row-level stages with their SQL conditions, in funnel order."""
    out = []
    for stage in STAGES:
        if stage in ("dedup_url", "already_sharded"):
            continue
        pred = _pred(stage, cfg)
        if pred is not None:
            out.append((stage, pred))
    return out


def existing_parts(out_dir: Path) -> dict[str, Path]:
    """Shard key → part path of the parts already in ``out_dir``."""
    if not out_dir.is_dir():
        return {}
    found = {}
    for p in out_dir.iterdir():
        m = _KEY_RE.match(p.name)
        if m and p.is_file():
            found[m.group(1)] = p
    return dict(sorted(found.items()))


def shard_key(n: int) -> str:
    return f"{n:0{KEY_WIDTH}d}"


@contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    """One filter run per output folder at a time (two would pick the same new keys)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def connect(threads: int | None = None, memory_limit: str | None = None,
            allow_hosts: Sequence[str] = ()) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection set up for the filter, with the URL policy's UDF (``allow_hosts`` exempt)."""
    con = duckdb.connect()
    con.execute("SET preserve_insertion_order = false")  # order comes from (_file, _row), explicitly
    # DuckDB caches the bytes of every parquet file it reads in its buffer pool (evictable, but it grows with
    # the input up to memory_limit): a one-pass filter never re-reads, so keep memory flat instead.
    con.execute("SET enable_external_file_cache = false")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    if memory_limit:
        con.execute(f"SET memory_limit = {sql_literal(memory_limit)}")
    con.execute(NAN_MACRO)
    url_policy.register_udf(con, url_policy.UrlPolicy.from_entries(allow_hosts))
    return con


def filter_metadata(
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    config: FilterConfig,
    shard_size: int,
    *,
    threads: int | None = None,
    memory_limit: str | None = None,
) -> FilterReport:
    """Filter the metadata files ``inputs`` into shard parts ``out_dir/{key}.parquet`` (see module doc)."""
    t0 = time.perf_counter()
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    paths = sorted(str(Path(p)) for p in inputs)
    if not paths:
        raise MetadataError("filter_metadata got no input files (is metadata/ empty? materialise laion_metadata)")
    files: list[FileColumns] = [inspect_file(p, config) for p in paths]
    out = Path(out_dir)
    with _locked(out):
        existing = existing_parts(out)
        con = connect(threads, memory_limit, config.allow_hosts)
        try:
            report = _run(con, files, out, config, shard_size, existing)
        finally:
            con.close()
        report.seconds = round(time.perf_counter() - t0, 3)
        _write_state(out, config, shard_size, report)
    return report


def _run(con: duckdb.DuckDBPyConnection, files: list[FileColumns], out: Path, cfg: FilterConfig,
         shard_size: int, existing: dict[str, Path]) -> FilterReport:
    """The funnel, top to bottom: the row-level stages, de-duplication by URL, URLs already in a part; then
    the new parts."""
    stages = active_stages(cfg)
    counts = _stage_rows(con, files, stages)
    removed: dict[str, int] = {name: int(counts.get(i, 0)) for i, (name, _) in enumerate(stages)}
    survivors = int(counts.get(None, 0))
    n_kept = _keep_survivors(con, cfg.dedup_by_url)
    if cfg.dedup_by_url:
        removed["dedup_url"] = survivors - n_kept
    n_new = _drop_already_sharded(con, existing, n_kept)
    removed["already_sharded"] = n_kept - n_new
    written = _write_parts(con, out, shard_size, first_id=max((int(k) for k in existing), default=-1) + 1)
    return FilterReport(
        rows_in=int(sum(counts.values())),
        rows_out=sum(written.values()),
        removed_by=removed,
        shard_keys=list(written),
        existing_keys=list(existing),
        inputs=[str(fc.path) for fc in files],
        shard_rows=written,
    )


def _stage_rows(con: duckdb.DuckDBPyConnection, files: list[FileColumns],
                stages: list[tuple[str, str]]) -> dict[int | None, int]:
    """Table ``staged``: every input row tagged with the first of ``stages`` it fails (``_stage``, its index;
    NULL: passes all). Returns rows per ``_stage``: the row-level funnel and (key None) the survivors."""
    union = "\nUNION ALL BY NAME\n".join(normalized_select([fc for _, fc in g], g[0][0]) for g in group_files(files))
    case = "CASE " + " ".join(f"WHEN NOT coalesce({pred}, false) THEN {i}" for i, (_, pred) in
                              enumerate(stages)) + " END" if stages else "CAST(NULL AS INTEGER)"
    payload = ", ".join(f"any_value({c}) AS {c}" for c in CANONICAL)
    # The one streaming query over the input. Grouping by (stage, file, row) with file and row set only for
    # survivors collapses every dropped row into one group per stage (its count is the funnel) and keeps each
    # survivor as its own group (count 1, payload via any_value): the result holds ~survivors + #stages rows,
    # whatever the input size, and DuckDB's hash aggregate can spill.
    con.execute(f"""
        CREATE TEMP TABLE staged AS
        SELECT _stage, CASE WHEN _stage IS NULL THEN _file END AS _file,
               CASE WHEN _stage IS NULL THEN _row END AS _row, count(*) AS _n, {payload}
        FROM (SELECT *, {case} AS _stage FROM ({union}))
        GROUP BY ALL
    """)
    return dict(con.execute("SELECT _stage, sum(_n) FROM staged GROUP BY _stage").fetchall())


def _keep_survivors(con: duckdb.DuckDBPyConnection, dedup_by_url: bool) -> int:
    """Table ``kept``: the survivors of ``staged`` (which is dropped), with only the first row (file order,
    then row order) of each URL if ``dedup_by_url``. Returns its row count."""
    if dedup_by_url:
        con.execute(f"""
            CREATE TEMP TABLE kept AS
            SELECT _file, _row, {_COLUMNS} FROM staged WHERE _stage IS NULL
            QUALIFY row_number() OVER (PARTITION BY url ORDER BY _file, _row) = 1
        """)
    else:
        con.execute(f"CREATE TEMP TABLE kept AS SELECT _file, _row, {_COLUMNS} FROM staged WHERE _stage IS NULL")
    con.execute("DROP TABLE staged")
    return con.execute("SELECT count(*) FROM kept").fetchall()[0][0]


def _drop_already_sharded(con: duckdb.DuckDBPyConnection, existing: dict[str, Path], n_kept: int) -> int:
    """Delete from ``kept`` the rows whose URL is in an ``existing`` part (new input only adds shard keys);
    return the rows left."""
    if not existing:
        return n_kept
    plist = ", ".join(sql_literal(str(p)) for p in existing.values())
    con.execute(f"DELETE FROM kept WHERE url IN (SELECT url FROM read_parquet([{plist}]))")
    return con.execute("SELECT count(*) FROM kept").fetchall()[0][0]


def _write_parts(con: duckdb.DuckDBPyConnection, out: Path, shard_size: int, first_id: int) -> dict[str, int]:
    """Write ``kept`` in input order (file, then row) as parts of ``shard_size`` rows, keyed from ``first_id``
    on; return key → rows. We cut the parts ourselves: DuckDB's multi-file output order is not reproducible."""
    reader = con.sql(f"SELECT {_COLUMNS} FROM kept ORDER BY _file, _row").to_arrow_reader(min(shard_size, 100_000))
    written: dict[str, int] = {}
    for n, batches in enumerate(_runs_of(reader, shard_size), start=first_id):
        key = shard_key(n)
        table = pa.Table.from_batches(batches)
        write_parquet_atomic(table, out / f"{key}.parquet", compression="zstd")
        written[key] = table.num_rows
    return written


def _runs_of(batches: Iterable[pa.RecordBatch], size: int) -> Iterator[list[pa.RecordBatch]]:
    """Regroup a stream of record batches into runs of exactly ``size`` rows (the last may be shorter)."""
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    for batch in batches:
        while batch.num_rows:
            take = min(batch.num_rows, size - pending_rows)
            pending.append(batch.slice(0, take))
            pending_rows += take
            batch = batch.slice(take)
            if pending_rows == size:
                yield pending
                pending, pending_rows = [], 0
    if pending_rows:
        yield pending


def _write_state(out: Path, cfg: FilterConfig, shard_size: int, report: FilterReport) -> None:
    """``_filter.json``: the config and funnel of every run that wrote parts (lineage for later stages)."""
    state_path = out / STATE_FILE
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError):
        state = {"runs": []}
    if report.shard_keys or not state["runs"]:
        state["runs"].append({
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "filter": dataclasses.asdict(cfg),
            "shard_size": shard_size,
            "report": report.to_json(),
        })
    write_text_atomic(state_path, json.dumps(state, indent=1, default=str))


def check_parts(parts: Sequence[str | os.PathLike[str]], cfg: FilterConfig) -> dict[str, int]:
    """Rows in the written parts that violate each enabled threshold, plus URLs present more than once.

    All zeros means the output satisfies every configured filter. Rows whose ``nsfw`` is set came from a
    file with the NSFW column (so the safety rule is NSFW in nsfw_allowed), the others from punsafe files.
    """
    if not parts:
        return {}
    con = connect(allow_hosts=cfg.allow_hosts)
    try:
        plist = ", ".join(sql_literal(str(p)) for p in parts)
        exprs = []
        names = []
        for stage, pred in active_stages(cfg):
            pred = pred.replace("_safety_nsfw", "nsfw IS NOT NULL")
            exprs.append(f"count(*) FILTER (WHERE NOT coalesce({pred}, false))")
            names.append(stage)
        exprs.append("count(*) - count(DISTINCT url)")
        names.append("duplicate_url")
        row = con.execute(f"SELECT {', '.join(exprs)} FROM read_parquet([{plist}])").fetchall()[0]
        return {n: int(v) for n, v in zip(names, row)}
    finally:
        con.close()


def parts_version(parts: dict[str, Path]) -> str:
    """A data version of the shard parts: their keys and row counts (parts are never rewritten, so a new
    version means new parts)."""
    counts = {k: pq.read_metadata(v).num_rows for k, v in parts.items()}
    return hashlib.sha256(json.dumps(counts, sort_keys=True).encode()).hexdigest()[:16]
