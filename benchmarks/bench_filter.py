"""Filter benchmark: `sd_core.data.filter.filter_metadata` (DuckDB) vs the same filter in pandas.

10M synthetic LAION rows (laion2B-en-aesthetic schema, generated with numpy/pyarrow, not via images) in four
parquet files of 2.5M rows. Each measurement runs in its own subprocess and reports wall time of the filter
(imports excluded), rows/s and peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of that process):

- DuckDB at 2.5M, 5M and 10M rows (memory must stay flat as rows grow);
- pandas at 2.5M and 10M rows: files read one at a time (the memory-frugal way; reading all at once needs
  ~7 GB at 10M rows), the same stages in the same order, then drop_duplicates and the same parts.

The two implementations must agree on the funnel and on the rows written. Prints a markdown section for
BENCHMARKS.md. Usage: ``python benchmarks/bench_filter.py [--rows 10000000] [--data DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FILE_ROWS = 2_500_000
SHARD_SIZE = 10_000


# ------------------------------------------------------------------------------------------ data
def generate(path: Path, rows: int, seed: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    # ~3 % duplicate URLs across the whole set (ids drawn from a slightly smaller range).
    ids = pa.array(rng.integers(0, int(rows * 4 * 0.97), rows))
    url = pc.binary_join_element_wise("https://img.example.com/", pc.cast(ids, pa.string()), ".jpg", "")
    words = np.array("a photo of the red blue big small old new house car dog cat tree river city night sunset "
                     "portrait painting art design woman man beach mountain watercolor oil print poster".split())
    pool_rng = np.random.default_rng(12345)
    pool = pa.array([" ".join(pool_rng.choice(words, int(k))) for k in pool_rng.integers(1, 40, 20_000)])
    text = pool.take(pa.array(rng.integers(0, len(pool), rows)))
    sides = np.array([256, 384, 480, 512, 600, 640, 768, 800, 1024, 1200, 1600, 2048], dtype=np.int32)
    table = pa.table({
        "URL": url,
        "TEXT": text,
        "WIDTH": pa.array(rng.choice(sides, rows)),
        "HEIGHT": pa.array(rng.choice(sides, rows)),
        "similarity": pa.array(rng.normal(0.31, 0.035, rows)),
        "hash": pa.array(rng.integers(-2**63, 2**63 - 1, rows, dtype=np.int64)),
        "punsafe": pa.array(rng.beta(1, 12, rows).astype(np.float32)),
        "pwatermark": pa.array(rng.beta(1.2, 5, rows).astype(np.float32)),
        "aesthetic": pa.array(rng.normal(5.6, 0.7, rows).astype(np.float32)),
    })
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp, row_group_size=250_000, compression="snappy")
    os.replace(tmp, path)


def ensure_data(folder: Path, rows: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range((rows + FILE_ROWS - 1) // FILE_ROWS):
        p = folder / f"laion-synthetic-{i:02d}.parquet"
        if not p.exists():
            generate(p, min(FILE_ROWS, rows - i * FILE_ROWS), seed=i)
        files.append(p)
    return files


# ---------------------------------------------------------------------------------------- workers
def pandas_filter(files: list[str], out: Path) -> dict:
    """The same funnel as filter_metadata, in pandas, one file at a time."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sd_core.config import FilterConfig

    cfg = FilterConfig()
    stages = ["url", "min_aesthetic", "min_similarity", "min_side", "aspect", "caption_len", "max_pwatermark",
              "safety"]
    removed = dict.fromkeys(stages, 0)
    kept = []
    for f in sorted(files):
        d = pd.read_parquet(f)
        alive = np.ones(len(d), bool)
        ratio = d.WIDTH / d.HEIGHT.where(d.HEIGHT > 0)
        length = d.TEXT.str.len()
        conds = {
            "url": d.URL.notna() & (d.URL != ""),
            "min_aesthetic": d.aesthetic >= cfg.min_aesthetic,
            "min_similarity": d.similarity >= cfg.min_similarity,
            "min_side": (d.WIDTH >= cfg.min_side) & (d.HEIGHT >= cfg.min_side),
            "aspect": (ratio >= cfg.min_aspect) & (ratio <= cfg.max_aspect),
            "caption_len": (length >= cfg.min_caption_len) & (length <= cfg.max_caption_len),
            "max_pwatermark": d.pwatermark < cfg.max_pwatermark,
            "safety": d.punsafe < cfg.max_punsafe,
        }
        for s in stages:
            ok = conds[s].fillna(False).to_numpy(bool)
            removed[s] += int((alive & ~ok).sum())
            alive &= ok
        kept.append(d[alive])
        del d, conds
    survivors = pd.concat(kept, ignore_index=True)
    deduped = survivors.drop_duplicates("URL", keep="first")
    removed["dedup_url"] = len(survivors) - len(deduped)
    removed["already_sharded"] = 0
    removed["url_policy"] = 0  # every generated URL is https://img.example.com/N.jpg: the URL policy keeps all
    norm = pd.DataFrame({"url": deduped.URL, "caption": deduped.TEXT, "width": deduped.WIDTH,
                         "height": deduped.HEIGHT, "similarity": deduped.similarity,
                         "aesthetic": deduped.aesthetic.astype(float), "punsafe": deduped.punsafe.astype(float),
                         "pwatermark": deduped.pwatermark.astype(float), "nsfw": None, "hash": deduped.hash})
    out.mkdir(parents=True, exist_ok=True)
    for i, start in enumerate(range(0, len(norm), SHARD_SIZE)):
        pq.write_table(pa.Table.from_pandas(norm.iloc[start:start + SHARD_SIZE], preserve_index=False),
                       out / f"{i:05d}.parquet", compression="zstd")
    return {"removed_by": removed, "rows_out": len(norm)}


def urls_digest(out: Path) -> str:
    """sha256 of the URLs written, in part and row order: both implementations must write the same rows."""
    import hashlib

    import pyarrow.parquet as pq

    h = hashlib.sha256()
    for part in sorted(out.glob("[0-9]*.parquet")):
        for u in pq.read_table(part, columns=["url"]).column("url").to_pylist():
            h.update(u.encode() + b"\n")
    return h.hexdigest()[:16]


def worker(impl: str, files: list[str], out: Path) -> None:
    import pyarrow.parquet as pq

    rows_in = sum(pq.read_metadata(f).num_rows for f in files)
    t0 = time.perf_counter()
    if impl == "duckdb":
        from sd_core.config import FilterConfig
        from sd_core.data.filter import filter_metadata

        r = filter_metadata(files, out, FilterConfig(), SHARD_SIZE)
        res = {"removed_by": r.removed_by, "rows_out": r.rows_out}
    else:
        res = pandas_filter(files, out)
    seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"impl": impl, "rows": rows_in, "seconds": seconds, "peak_mb": peak_mb, **res,
                      "urls": urls_digest(out)}))


def measure(impl: str, files: list[Path], scratch: Path) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"{impl}-", dir=scratch))
    cmd = [sys.executable, __file__, "--worker", impl, "--out", str(out), *map(str, files)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{impl} worker failed:\n{res.stdout}\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def machine() -> str:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import duckdb
    import pandas

    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM; "
            f"Python {platform.python_version()}, DuckDB {duckdb.__version__}, pandas {pandas.__version__}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "sd_bench_filter_v1")
    ap.add_argument("--worker", choices=["duckdb", "pandas"])
    ap.add_argument("--out", type=Path)
    ap.add_argument("files", nargs="*")
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.files, a.out)
        return

    load = os.getloadavg()
    t0 = time.perf_counter()
    files = ensure_data(a.data, a.rows)
    gen_s = time.perf_counter() - t0
    size_mb = sum(f.stat().st_size for f in files) / 2**20
    scratch = Path(tempfile.mkdtemp(prefix="sd_bench_filter_out_"))
    n_files = len(files)
    steps = sorted({max(1, n_files // 4), max(1, n_files // 2), n_files})
    results = []
    for k in steps:
        results.append(measure("duckdb", files[:k], scratch))
    pandas_steps = sorted({steps[0], n_files})
    for k in pandas_steps:
        results.append(measure("pandas", files[:k], scratch))
    subprocess.run(["rm", "-rf", str(scratch)], check=False)

    by = {(r["impl"], r["rows"]): r for r in results}
    full = max(r["rows"] for r in results)
    d, p = by[("duckdb", full)], by[("pandas", full)]
    agree = d["removed_by"] == p["removed_by"] and d["rows_out"] == p["rows_out"] and d["urls"] == p["urls"]

    print(f"## Filter: DuckDB `filter_metadata` vs pandas ({full / 1e6:g}M synthetic LAION rows)\n")
    print(f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"- machine: {machine()}")
    print("- command: `python benchmarks/bench_filter.py` (each row: its own subprocess; time = the filter call, "
          "imports excluded; peak = ru_maxrss of that process)")
    print(f"- input: {n_files} parquet files, {size_mb:,.0f} MiB (generated in {gen_s:.1f} s, cached in {a.data}); "
          f"{d['rows_out']:,} rows pass ({d['rows_out'] / full:.1%}), parts of {SHARD_SIZE:,} rows")
    print(f"- same funnel and same rows written (URL digest) in both implementations: {'yes' if agree else 'NO'}")
    busy = load[0] > 0.5 * (os.cpu_count() or 1)
    print(f"- load average (1/5/15 min) at start: {' / '.join(f'{x:.1f}' for x in load)}"
          + (" (other jobs shared these cores: figures are slower than on an idle machine)" if busy else "") + "\n")
    print("| implementation | rows | seconds | rows/s | peak memory |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['impl']} | {r['rows'] / 1e6:g}M | {r['seconds']:.2f} | {r['rows'] / r['seconds'] / 1e6:.1f}M | "
              f"{r['peak_mb']:,.0f} MB |")
    print(f"\nDuckDB vs pandas at {full / 1e6:g}M rows: {p['seconds'] / d['seconds']:.1f}× faster, "
          f"{p['peak_mb'] / d['peak_mb']:.1f}× less memory. Funnel at {full / 1e6:g}M rows: "
          + ", ".join(f"{k} −{v:,}" for k, v in d["removed_by"].items()))


if __name__ == "__main__":
    main()
