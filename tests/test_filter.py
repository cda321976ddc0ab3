"""The DuckDB filter against an independent pandas computation, on the real LAION schema variants."""

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sd_core.config import FilterConfig
from sd_core.data.filter import check_parts, existing_parts, filter_metadata
from sd_core.data.metadata import MetadataError
from sd_core.data.url_policy import UrlPolicy

WORDS = ["a", "photo", "of", "the", "café", "日本", "sunset", "over", "hills", "red", "car", "with", "dog"]


def _captions(rng, n):
    out = []
    for _ in range(n):
        k = int(rng.integers(0, 60))
        out.append(" ".join(rng.choice(WORDS, k)) if rng.random() > 0.03 else None)
    return out


# URLs no image row may point at: other schemes, this host, the cloud metadata endpoint, private networks,
# in the spellings the C resolver accepts; and, mixed in, unusual spellings of public hosts that must pass.
HOSTILE_URLS = [
    "file:///etc/passwd", "data:image/png;base64,iVBORw0KGgo=", "ftp://ftp.example/a.jpg", "gopher://x/",
    "http://127.0.0.1:8080/a.jpg", "http://localhost/a.jpg", "HTTP://LocalHost./a.jpg", "http://a.localhost/x",
    "http://[::1]:9000/a.jpg", "http://[::ffff:127.0.0.1]/a.jpg", "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.1/a.jpg", "http://192.168.1.7/a.jpg", "http://172.16.0.3/a.jpg", "http://0.0.0.0/a.jpg",
    "http://2130706433/a.jpg", "http://0x7f.1/a.jpg", "http://127.1/a.jpg", "http://user@10.1.2.3/a.jpg",
    "http://example.com@127.0.0.1/a.jpg", " file:///etc/shadow", "<URL:file:///etc/hosts>", "http://[fe80::1]/",
    "http://[fd00::5]/a.jpg", "http:///no-host.jpg", "http://[::1/broken.jpg", "javascript:alert(1)",
]
PUBLIC_ODD_URLS = ["https://8.8.8.8/a.jpg", "http://[2606:4700::1111]/a.jpg", "HTTPS://Img.Example.COM/A.JPG",
                   "https://example.com./trailing-dot.jpg", "https://xn--nxasmq6b.example/a.jpg"]


def _urls(rng, n, pool, prefix):
    urls = [f"https://{prefix}.example/{i}.jpg" for i in rng.integers(0, pool, n)]  # duplicates on purpose
    for j in rng.choice(n, max(1, n // 100), replace=False):
        urls[j] = None if j % 2 else ""
    odd = HOSTILE_URLS + PUBLIC_ODD_URLS
    for k, j in enumerate(range(7, n, max(1, n // len(odd)))):  # fixed rows: the other columns stay as they were
        if urls[j]:
            urls[j] = odd[k % len(odd)]
    return urls


def _maybe_nan(rng, values, share=0.03):
    values = np.asarray(values, dtype=float)
    values[rng.random(len(values)) < share] = np.nan
    return values


def v2_frame(n=3000, seed=0, pool=2500, prefix="v2") -> pd.DataFrame:
    """ChristophSchuhmann/improved_aesthetics_6.5plus: AESTHETIC_SCORE, float64 WIDTH/HEIGHT, a stray index."""
    rng = np.random.default_rng(seed)
    sides = rng.choice([256.0, 511.0, 512.0, 513.0, 640.0, 768.0, 1024.0, 1100.0, 2048.0], size=(n, 2))
    return pd.DataFrame({
        "URL": _urls(rng, n, pool, prefix),
        "TEXT": _captions(rng, n),
        "WIDTH": _maybe_nan(rng, sides[:, 0]),
        "HEIGHT": _maybe_nan(rng, sides[:, 1]),
        "similarity": _maybe_nan(rng, rng.choice([0.2, 0.27, 0.28, 0.29, 0.35], n)),
        "punsafe": _maybe_nan(rng, rng.choice([0.0, 0.1, 0.49, 0.5, 0.9], n)).astype(np.float32),
        "pwatermark": _maybe_nan(rng, rng.choice([0.05, 0.3, 0.5, 0.51, 0.8], n)).astype(np.float32),
        "AESTHETIC_SCORE": _maybe_nan(rng, rng.choice([5.0, 6.4, 6.5, 6.6, 7.5], n)).astype(np.float32),
        "hash": rng.integers(-2**62, 2**62, n),
        "__index_level_0__": np.arange(n) * 3,
    })


def nsfw_frame(n=2500, seed=1, pool=2000, prefix="v2") -> pd.DataFrame:
    """laion/laion2B-en: an NSFW string column, int32 WIDTH/HEIGHT, no aesthetic/punsafe/pwatermark."""
    rng = np.random.default_rng(seed)
    nsfw = rng.choice(np.array(["UNLIKELY", "UNSURE", "NSFW", None], dtype=object), n, p=[0.7, 0.15, 0.1, 0.05])
    return pd.DataFrame({
        "SAMPLE_ID": np.arange(n, dtype=np.int64),
        "URL": _urls(rng, n, pool, prefix),
        "TEXT": _captions(rng, n),
        "HEIGHT": rng.choice([100, 511, 512, 600, 1024, 1200], n).astype(np.int32),
        "WIDTH": rng.choice([300, 512, 700, 1024, 2100], n).astype(np.int32),
        "LICENSE": "?",
        "NSFW": nsfw,
        "similarity": _maybe_nan(rng, rng.choice([0.2, 0.28, 0.3, 0.4], n)),
    })


def write(df: pd.DataFrame, path: Path) -> Path:
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path)
    return path


# ------------------------------------------------------------------------------- the pandas reference
def normalise_v2(df):
    return pd.DataFrame({"url": df.URL, "caption": df.TEXT, "width": df.WIDTH, "height": df.HEIGHT,
                         "similarity": df.similarity, "aesthetic": df.AESTHETIC_SCORE.astype(float),
                         "punsafe": df.punsafe.astype(float), "pwatermark": df.pwatermark.astype(float),
                         "nsfw": None, "by_nsfw": False})


def normalise_nsfw(df):
    return pd.DataFrame({"url": df.URL, "caption": df.TEXT, "width": df.WIDTH.astype(float),
                         "height": df.HEIGHT.astype(float), "similarity": df.similarity, "aesthetic": np.nan,
                         "punsafe": np.nan, "pwatermark": np.nan, "nsfw": df.NSFW, "by_nsfw": True})


def pandas_filter(frames: list[pd.DataFrame], cfg: FilterConfig):
    """Sequential boolean masks, NaN/None → fail, then drop_duplicates(url, keep=first)."""
    d = pd.concat(frames, ignore_index=True)
    alive = pd.Series(True, index=d.index)
    removed = {}

    def stage(name, ok):
        nonlocal alive
        ok = pd.Series(ok, index=d.index).fillna(False).astype(bool)
        removed[name] = int((alive & ~ok).sum())
        alive = alive & ok

    stage("url", d.url.notna() & (d.url.fillna("") != ""))
    policy = UrlPolicy.from_entries(cfg.allow_hosts)  # the Python check on every row; SQL pre-checks in regex
    stage("url_policy", [u is not None and policy.url_refusal(u) is None for u in d.url])
    if cfg.min_aesthetic is not None:
        stage("min_aesthetic", d.aesthetic >= cfg.min_aesthetic)
    if cfg.min_similarity is not None:
        stage("min_similarity", d.similarity >= cfg.min_similarity)
    stage("min_side", (d.width >= cfg.min_side) & (d.height >= cfg.min_side))
    ratio = d.width / d.height
    stage("aspect", (d.height > 0) & (ratio >= cfg.min_aspect) & (ratio <= cfg.max_aspect))
    length = d.caption.str.len()
    stage("caption_len", (length >= cfg.min_caption_len) & (length <= cfg.max_caption_len))
    if cfg.max_pwatermark is not None:
        stage("max_pwatermark", d.pwatermark < cfg.max_pwatermark)
    stage("safety", np.where(d.by_nsfw, d.nsfw.isin(list(cfg.nsfw_allowed)), d.punsafe < cfg.max_punsafe))
    kept = d[alive]
    out = kept.drop_duplicates("url", keep="first")
    removed["dedup_url"] = len(kept) - len(out)
    removed["already_sharded"] = 0
    return removed, out.reset_index(drop=True)


def read_parts(out_dir: Path) -> pd.DataFrame:
    parts = existing_parts(out_dir)
    return pd.concat([pq.read_table(p).to_pandas() for p in parts.values()], ignore_index=True)


def assert_same_rows(ours: pd.DataFrame, ref: pd.DataFrame):
    assert ours.url.tolist() == ref.url.tolist()  # same rows, same (file, row) order
    assert ours.caption.tolist() == ref.caption.tolist()
    np.testing.assert_array_equal(ours.width.to_numpy(float), ref.width.to_numpy(float))
    np.testing.assert_allclose(ours.similarity.to_numpy(float), ref.similarity.to_numpy(float))


# ------------------------------------------------------------------------------------------- tests
def test_v2_column_names_match_pandas(tmp_path):
    src = write(v2_frame(), tmp_path / "improved_aesthetics_6.5plus.parquet")
    cfg = FilterConfig()
    report = filter_metadata([src], tmp_path / "out", cfg, shard_size=100)
    removed, ref = pandas_filter([normalise_v2(pd.read_parquet(src))], cfg)
    assert report.removed_by == removed
    assert list(report.removed_by) == ["url", "url_policy", "min_aesthetic", "min_similarity", "min_side", "aspect",
                                       "caption_len", "max_pwatermark", "safety", "dedup_url", "already_sharded"]
    assert report.rows_in == 3000 and report.rows_out == len(ref) > 0
    assert all(v > 0 for k, v in removed.items() if k != "already_sharded"), removed  # every stage exercised
    ours = read_parts(tmp_path / "out")
    assert_same_rows(ours, ref)
    sizes = list(report.shard_rows.values())
    assert all(s == 100 for s in sizes[:-1]) and 0 < sizes[-1] <= 100
    assert ours.width.dtype == np.int32 and ours.aesthetic.dtype == np.float64
    assert not set(ours.url) & set(HOSTILE_URLS)
    assert check_parts(list(existing_parts(tmp_path / "out").values()), cfg) == dict.fromkeys(
        ["url", "url_policy", "min_aesthetic", "min_similarity", "min_side", "aspect", "caption_len", "max_pwatermark",
         "safety", "duplicate_url"], 0)


def test_nsfw_string_column_and_mixed_schemas_match_pandas(tmp_path):
    a = write(v2_frame(n=1500), tmp_path / "a_v2.parquet")
    b = write(nsfw_frame(), tmp_path / "b_laion2b_en.parquet")  # shares URLs with a: cross-file dedup
    # laion2B-en has neither aesthetic nor pwatermark: those filters are disabled.
    cfg = FilterConfig(min_aesthetic=None, max_pwatermark=None)
    report = filter_metadata([b], tmp_path / "only_b", cfg, shard_size=64)
    removed, ref = pandas_filter([normalise_nsfw(pd.read_parquet(b))], cfg)
    assert report.removed_by == removed and removed["safety"] > 0
    assert_same_rows(read_parts(tmp_path / "only_b"), ref)

    report = filter_metadata([b, a], tmp_path / "both", cfg, shard_size=64)  # inputs are sorted by path
    removed, ref = pandas_filter([normalise_v2(pd.read_parquet(a)), normalise_nsfw(pd.read_parquet(b))], cfg)
    assert report.removed_by == removed
    assert_same_rows(read_parts(tmp_path / "both"), ref)
    assert set(read_parts(tmp_path / "both").nsfw.dropna()) == {"UNLIKELY"}


def test_output_is_reproducible_and_new_input_only_adds_keys(tmp_path):
    a = write(v2_frame(seed=3), tmp_path / "a.parquet")
    cfg = FilterConfig()
    r1 = filter_metadata([a], tmp_path / "x", cfg, shard_size=50)
    filter_metadata([a], tmp_path / "y", cfg, shard_size=50)
    digest = lambda d: {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in existing_parts(d).values()}  # noqa: E731
    first = digest(tmp_path / "x")
    assert first == digest(tmp_path / "y") and list(first) == [f"{k}.parquet" for k in r1.shard_keys]

    # Same input again: nothing new, nothing rewritten.
    r2 = filter_metadata([a], tmp_path / "x", cfg, shard_size=50)
    assert r2.shard_keys == [] and r2.rows_out == 0 and r2.removed_by["already_sharded"] == r1.rows_out
    assert digest(tmp_path / "x") == first

    # New file with new URLs and some already sharded: only new keys, after the existing ones.
    b = write(v2_frame(seed=4, pool=5000, prefix="v2"), tmp_path / "b.parquet")
    r3 = filter_metadata([a, b], tmp_path / "x", cfg, shard_size=50)
    assert r3.existing_keys == r1.shard_keys
    assert r3.shard_keys[0] == f"{len(r1.shard_keys):05d}"
    after = digest(tmp_path / "x")
    assert {k: after[k] for k in first} == first  # existing parts untouched
    _, ref = pandas_filter([normalise_v2(pd.read_parquet(a)), normalise_v2(pd.read_parquet(b))], cfg)
    old_urls = set(read_parts(tmp_path / "y").url)
    new_ref = ref[~ref.url.isin(old_urls)].reset_index(drop=True)
    assert r3.removed_by["already_sharded"] == len(old_urls) and r3.rows_out == len(new_ref) > 0
    new_parts = pd.concat([pq.read_table(tmp_path / "x" / f"{k}.parquet").to_pandas() for k in r3.shard_keys],
                          ignore_index=True)
    assert_same_rows(new_parts, new_ref)
    assert check_parts(list(existing_parts(tmp_path / "x").values()), cfg)["duplicate_url"] == 0


def test_bad_inputs_are_clear_errors_and_damage_nothing(tmp_path):
    good = write(v2_frame(n=400), tmp_path / "good.parquet")
    out = tmp_path / "out"
    filter_metadata([good], out, FilterConfig(), shard_size=40)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    no_aes = write(v2_frame(n=50).drop(columns=["AESTHETIC_SCORE"]), tmp_path / "no_aesthetic.parquet")
    with pytest.raises(MetadataError, match=r"no_aesthetic\.parquet lacks column 'aesthetic'.*min_aesthetic"):
        filter_metadata([good, no_aes], out, FilterConfig(), shard_size=40)
    no_safety = write(v2_frame(n=50).drop(columns=["punsafe"]), tmp_path / "no_punsafe.parquet")
    with pytest.raises(MetadataError, match=r"no_punsafe\.parquet lacks column 'punsafe'"):
        filter_metadata([no_safety], out, FilterConfig(), shard_size=40)
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(MetadataError, match=r"junk\.parquet is not a readable parquet file"):
        filter_metadata([good, tmp_path / "junk.parquet"], out, FilterConfig(), shard_size=40)
    with pytest.raises(MetadataError, match="no input files"):
        filter_metadata([], out, FilterConfig(), shard_size=40)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
