"""Metadata sources and schema normalisation: the LAION variants, bad inputs, the hub path up to the network."""

import functools
import hashlib
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sd_core.config import FilterConfig, SourceConfig
from sd_core.data.filter import connect
from sd_core.data.metadata import (
    MetadataError,
    download_hf,
    fetch_source,
    hf_download_kwargs,
    inspect_file,
    normalized_select,
)
from sd_core.data.synthetic import generate_synthetic


def _table(**cols) -> pa.Table:
    return pa.table(cols)


def _relaion(n=3) -> pa.Table:
    """Re-LAION style: lowercase url/caption, int widths, punsafe."""
    return _table(url=[f"https://r.example/{i}" for i in range(n)], caption=["a long enough caption here"] * n,
                  width=pa.array([512] * n, pa.int32()), height=pa.array([600] * n, pa.int32()),
                  similarity=[0.3] * n, punsafe=pa.array([0.1] * n, pa.float32()),
                  pwatermark=pa.array([0.1] * n, pa.float32()), aesthetic=pa.array([7.0] * n, pa.float32()))


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_schema_variants_normalise_to_one_schema(tmp_path):
    v2 = tmp_path / "v2.parquet"
    pq.write_table(_table(URL=["u1", "u2"], TEXT=["t1", None], WIDTH=[1024.0, float("nan")], HEIGHT=[512.9, 600.0],
                          similarity=[0.3, float("nan")], punsafe=pa.array([0.1, 0.2], pa.float32()),
                          pwatermark=pa.array([0.1, 0.2], pa.float32()),
                          AESTHETIC_SCORE=pa.array([6.6, float("nan")], pa.float32()),
                          hash=pa.array([1, 2], pa.int64()), __index_level_0__=[0, 1]), v2)
    relaion = tmp_path / "relaion.parquet"
    pq.write_table(_relaion(2), relaion)
    cfg = FilterConfig()
    fc = inspect_file(v2, cfg)
    assert fc.columns["aesthetic"] == "AESTHETIC_SCORE" and fc.columns["nsfw"] is None and fc.safety == "punsafe"
    assert "__index_level_0__" not in fc.columns.values()
    fr = inspect_file(relaion, cfg)
    assert fr.columns["url"] == "url" and fr.columns["caption"] == "caption" and fr.columns["hash"] is None

    con = connect()
    rows = con.execute(f"SELECT * FROM ({normalized_select([fc], 0)} UNION ALL BY NAME {normalized_select([fr], 1)}) "
                       "ORDER BY _file, _row").fetchall()
    desc = [d[0] for d in con.description]
    assert desc[:10] == ["url", "caption", "width", "height", "similarity", "aesthetic", "punsafe", "pwatermark",
                         "nsfw", "hash"]
    first, second = dict(zip(desc, rows[0])), dict(zip(desc, rows[1]))
    assert (first["width"], first["height"]) == (1024, 512)  # floats floored to INTEGER
    assert first["aesthetic"] == pytest.approx(6.6, rel=1e-6) and first["_row"] == 0 and first["_file"] == 0
    assert second["width"] is None and second["similarity"] is None and second["aesthetic"] is None  # NaN → NULL
    assert dict(zip(desc, rows[2]))["url"] == "https://r.example/0" and dict(zip(desc, rows[2]))["hash"] is None
    with pytest.raises(duckdb.Error):  # sanity: the macro exists only on our connections
        duckdb.connect().execute("SELECT nan_to_null(1.0)")


def test_laion2b_en_nsfw_needs_its_filters_disabled(tmp_path):
    p = tmp_path / "laion2B-en-part-00000.parquet"
    pq.write_table(_table(SAMPLE_ID=[1], URL=["u"], TEXT=["t"], HEIGHT=[1], WIDTH=[1], LICENSE=["?"],
                          NSFW=["UNLIKELY"], similarity=[0.3]), p)
    with pytest.raises(MetadataError, match=r"laion2B-en-part-00000\.parquet lacks column 'aesthetic'.*AESTHETIC_SCORE"):
        inspect_file(p, FilterConfig())
    fc = inspect_file(p, FilterConfig(min_aesthetic=None, max_pwatermark=None))
    assert fc.safety == "nsfw" and fc.columns["nsfw"] == "NSFW"


def test_fetch_local_glob_folder_and_stale_files(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    pq.write_table(_relaion(3), src / "a.parquet")
    pq.write_table(_relaion(4), src / "sub" / "b.parquet")
    meta = tmp_path / "data" / "metadata"
    res = fetch_source(SourceConfig(kind="parquet", uri=str(src)), FilterConfig(), meta, tmp_path / "cache")
    assert [p.name for p in res.files] == ["a.parquet", "b.parquet"] and res.rows == 7 and res.bytes > 0
    assert "url: string" in res.schema
    res = fetch_source(SourceConfig(kind="parquet", uri=str(src / "*.parquet")), FilterConfig(), meta, tmp_path / "c")
    assert [p.name for p in res.files] == ["a.parquet"] and [p.name for p in res.removed] == ["b.parquet"]
    assert sorted(p.name for p in meta.iterdir()) == ["a.parquet"]  # no staging leftovers


def test_fetch_over_http(tmp_path):
    served = tmp_path / "www"
    served.mkdir()
    pq.write_table(_relaion(5), served / "remote.parquet")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        uri = f"http://127.0.0.1:{httpd.server_address[1]}/remote.parquet"
        res = fetch_source(SourceConfig(kind="parquet", uri=uri), FilterConfig(), tmp_path / "m", tmp_path / "c")
        assert [p.name for p in res.files] == ["remote.parquet"] and res.rows == 5
        with pytest.raises(MetadataError, match="cannot read metadata file .*/nope.parquet"):
            fetch_source(SourceConfig(kind="parquet", uri=uri.replace("remote", "nope")), FilterConfig(),
                         tmp_path / "m", tmp_path / "c")
        assert [p.name for p in (tmp_path / "m").iterdir()] == ["remote.parquet"]
    finally:
        httpd.shutdown()
        httpd.server_close()
        t.join()


def test_bad_sources_are_clear_errors_and_damage_nothing(tmp_path):
    meta = tmp_path / "data" / "metadata"
    good = tmp_path / "good"
    good.mkdir()
    pq.write_table(_relaion(3), good / "ok.parquet")
    fetch_source(SourceConfig(kind="parquet", uri=str(good)), FilterConfig(), meta, tmp_path / "c")
    before = _digests(meta)

    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(_relaion(3).drop_columns(["similarity"]), bad / "no_sim.parquet")
    with pytest.raises(MetadataError, match=rf"{bad / 'no_sim.parquet'} lacks column 'similarity'.*min_similarity"):
        fetch_source(SourceConfig(kind="parquet", uri=str(bad / "no_sim.parquet")), FilterConfig(), meta, tmp_path / "c")
    (bad / "table.csv.parquet").write_text("url,caption\nx,y\n")
    with pytest.raises(MetadataError, match=r"table\.csv\.parquet is not a readable parquet file"):
        fetch_source(SourceConfig(kind="parquet", uri=str(bad / "table.csv.parquet")), FilterConfig(), meta,
                     tmp_path / "c")
    with pytest.raises(MetadataError, match=r"matches no file"):
        fetch_source(SourceConfig(kind="parquet", uri=str(bad / "*.nothing")), FilterConfig(), meta, tmp_path / "c")
    pq.write_table(_relaion(0), bad / "empty.parquet")
    with pytest.raises(MetadataError, match=r"is empty .*empty\.parquet.*0 rows"):
        fetch_source(SourceConfig(kind="parquet", uri=str(bad / "empty.parquet")), FilterConfig(), meta, tmp_path / "c")
    with pytest.raises(MetadataError, match="needs source.uri"):
        fetch_source(SourceConfig(kind="parquet"), FilterConfig(), meta, tmp_path / "c")
    assert _digests(meta) == before  # nothing already written was touched
    assert sorted(p.name for p in meta.iterdir()) == ["ok.parquet"]


def test_synthetic_source(tmp_path):
    meta = tmp_path / "metadata"
    res = fetch_source(SourceConfig(), FilterConfig(min_side=64), meta, tmp_path / "c",
                       synthetic_writer=lambda d: generate_synthetic(d, rows=80).to_json())
    assert [p.name for p in res.files] == ["synthetic.parquet"] and res.rows == 80
    assert res.synthetic["planted"]["dedup_url"] >= 1


def test_hf_source_builds_the_right_call_and_fails_clearly_offline(tmp_path, monkeypatch):
    kw = hf_download_kwargs("ChristophSchuhmann/improved_aesthetics_6.5plus", None, tmp_path)
    assert kw == {"repo_id": "ChristophSchuhmann/improved_aesthetics_6.5plus", "repo_type": "dataset",
                  "revision": None, "allow_patterns": ["*.parquet"], "cache_dir": str(tmp_path)}
    kw = hf_download_kwargs("laion/relaion2B-en-research-safe/data/part-0000*.parquet", "v1", tmp_path)
    assert kw["repo_id"] == "laion/relaion2B-en-research-safe" and kw["allow_patterns"] == ["data/part-0000*.parquet"]
    assert kw["revision"] == "v1"
    with pytest.raises(MetadataError, match="not a dataset repo id"):
        hf_download_kwargs("just-a-name", None, tmp_path)

    # The real huggingface_hub call, stopped at the network boundary by offline mode.
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MetadataError, match=r"cannot fetch Hugging Face dataset 'ChristophSchuhmann/improved_aes"
                                            r"thetics_6\.5plus' .*HF_HUB_OFFLINE"):
        download_hf("ChristophSchuhmann/improved_aesthetics_6.5plus", None, tmp_path / "hf")
    meta = tmp_path / "metadata"
    with pytest.raises(MetadataError, match="cannot fetch Hugging Face dataset"):
        fetch_source(SourceConfig(kind="hf", uri="laion/laion2B-en-aesthetic"), FilterConfig(), meta, tmp_path / "hf")
    assert not list(meta.glob("*.parquet"))


def test_filter_needs_decide_required_columns(tmp_path):
    p = tmp_path / "minimal.parquet"
    pq.write_table(_table(url=["u"], caption=["c"]), p)
    cfg = FilterConfig(min_aesthetic=None, min_similarity=None, min_side=None, min_aspect=None, max_aspect=None,
                       max_pwatermark=None, max_punsafe=None, nsfw_allowed=())
    fc = inspect_file(p, cfg)
    assert fc.safety is None and fc.columns["width"] is None
    with pytest.raises(MetadataError, match="lacks column 'width'"):
        inspect_file(p, FilterConfig(min_aesthetic=None, min_similarity=None, max_pwatermark=None))
