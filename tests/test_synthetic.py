"""The embedded synthetic source: rendering, captions, the seeded generator and the loopback image server."""

import io
import threading
import urllib.error
import urllib.request

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sd_core.config import FilterConfig
from sd_core.data.image_server import ImageServer
from sd_core.data.synthetic import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    SYNTHETIC_BASE_URL,
    caption,
    generate_synthetic,
    plant_counts,
    read_manifest,
    render_shape,
    render_url_path,
    vocabulary,
)


def test_palettes_are_saturated_and_far_apart():
    assert len(SHAPES) >= 3 and {"red", "green", "blue", "yellow"} <= set(COLORS)
    assert {"white", "black", "gray"} <= set(BACKGROUNDS)
    cols = [np.array(c, float) for c in COLORS.values()]
    for i in range(len(cols)):
        assert cols[i].max() - cols[i].min() > 150  # saturated
        for j in range(i):
            assert np.linalg.norm(cols[i] - cols[j]) > 200  # well separated
    for c in cols:
        for b in BACKGROUNDS.values():
            assert np.linalg.norm(c - np.array(b, float)) > 100  # shape always contrasts with background


def test_render_is_deterministic_jittered_and_coloured():
    a = render_shape("circle", "red", "white", 64, seed=1)
    assert a.size == (64, 64) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(render_shape("circle", "red", "white", 64, seed=1)))
    b = render_shape("circle", "red", "white", 64, seed=2)
    assert not np.array_equal(np.asarray(a), np.asarray(b))  # size/position jitter
    for shape in SHAPES:
        for color, rgb in COLORS.items():
            for seed in range(5):
                img = np.asarray(render_shape(shape, color, "black", 64, seed=seed)).astype(int)
                near = np.abs(img.reshape(-1, 3) - np.array(rgb)).sum(1) < 30
                assert 0.05 < near.mean() < 0.6, (shape, color, near.mean())  # a sizeable shape in its colour
                edges = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
                assert np.abs(edges - np.array(BACKGROUNDS["black"])).max() < 12  # fully inside the image
    with pytest.raises(ValueError, match="unknown color 'purple'"):
        render_shape("circle", "purple", "white")


def test_caption_and_vocabulary():
    assert caption("circle", "red", "blue" if "blue" in BACKGROUNDS else "white").startswith("a red circle on a ")
    assert caption("square", "green", "black") == "a green square on a black background"
    vocab = vocabulary()
    assert vocab == sorted(set(vocab))
    for s in SHAPES:
        for c in COLORS:
            for b in BACKGROUNDS:
                assert set(caption(s, c, b).split()) <= set(vocab)


def test_generator_is_deterministic_and_plants_known_counts(tmp_path):
    m = generate_synthetic(tmp_path / "a.parquet", rows=200, seed=7, image_size=64)
    generate_synthetic(tmp_path / "b.parquet", rows=200, seed=7, image_size=64)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    generate_synthetic(tmp_path / "c.parquet", rows=200, seed=8, image_size=64)
    assert (tmp_path / "a.parquet").read_bytes() != (tmp_path / "c.parquet").read_bytes()

    t = pq.read_table(tmp_path / "a.parquet")
    assert t.column_names == ["URL", "TEXT", "WIDTH", "HEIGHT", "similarity", "hash", "punsafe", "pwatermark",
                              "aesthetic"]
    assert t.num_rows == m.rows == 200
    planted, missing, corrupt = plant_counts(200)
    assert m.planted == planted and m.missing == missing and m.corrupt == corrupt
    assert m.good + m.missing + m.corrupt + sum(planted.values()) == 200
    assert read_manifest(tmp_path / "a.parquet")["planted"] == planted
    urls = [u for u in t.column("URL").to_pylist() if u]
    assert all(u.startswith(SYNTHETIC_BASE_URL + "/") for u in urls)
    assert len(urls) - len(set(urls)) == planted["dedup_url"]
    assert sum("/missing/" in u for u in urls) == missing and sum("/corrupt/" in u for u in urls) == corrupt
    # Good rows sit inside the thresholds they were generated for.
    cfg = FilterConfig(min_side=64)
    df = t.to_pandas()
    good = df[df.URL.str.contains("/shapes/", na=False)]
    assert (good.aesthetic >= cfg.min_aesthetic).mean() > 0.5
    with pytest.raises(ValueError, match="too small"):
        generate_synthetic(tmp_path / "d.parquet", rows=10)


def test_image_server_serves_renders_404_and_corrupt_bytes():
    before = threading.active_count()
    with ImageServer() as srv:
        url = srv.rewrite(f"{SYNTHETIC_BASE_URL}/shapes/triangle/blue/gray/96x64/5.png")
        assert url.startswith(f"http://127.0.0.1:{srv.port}/")
        body = urllib.request.urlopen(url, timeout=5).read()
        img = Image.open(io.BytesIO(body))
        assert img.size == (96, 64)
        assert np.array_equal(np.asarray(img.convert("RGB")),
                              np.asarray(render_url_path("/shapes/triangle/blue/gray/96x64/5.png")))
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(srv.rewrite(f"{SYNTHETIC_BASE_URL}/missing/circle/red/white/64x64/1.png"), timeout=5)
        assert e.value.code == 404
        bad = urllib.request.urlopen(srv.rewrite(f"{SYNTHETIC_BASE_URL}/corrupt/x/1.png"), timeout=5).read()
        with pytest.raises(Exception):
            Image.open(io.BytesIO(bad)).load()
        assert srv.rewrite("https://example.com/a.jpg") == "https://example.com/a.jpg"
        port = srv.port
    # Stopped: the port is closed and the serving thread is gone.
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/shapes/circle/red/white/64x64/1.png", timeout=2)
    assert threading.active_count() <= before


def test_sd15_scale_rows_are_512_to_768_px_and_served_at_that_size(tmp_path):
    # configs/sd15-smoke.yaml: synthetic_image_size 512 with sd15's thresholds (sides >= 512, aspect 0.5-2), so
    # the real filters apply; the clean rows span 512-768 px a side and the server renders them at that size.
    cfg = FilterConfig()
    m = generate_synthetic(tmp_path / "m.parquet", rows=60, seed=0, image_size=512, filter_config=cfg)
    t = pq.read_table(m.path).to_pandas()
    good = t[t.URL.str.contains("/shapes/", na=False) & (t.aesthetic >= cfg.min_aesthetic)
             & (t.similarity >= cfg.min_similarity) & (t.TEXT.str.len() >= cfg.min_caption_len)
             & (t.TEXT.str.len() <= cfg.max_caption_len) & (t.pwatermark < cfg.max_pwatermark)
             & (t.punsafe < cfg.max_punsafe) & (t.WIDTH >= 512) & (t.HEIGHT >= 512)
             & (t.WIDTH / t.HEIGHT).between(0.5, 2.0)]
    assert len(good.drop_duplicates("URL")) == m.good
    assert good.WIDTH.between(512, 768).all() and good.HEIGHT.between(512, 768).all()
    assert good.WIDTH.max() > 600  # a range, not one size
    url = good.URL.iloc[0]
    with ImageServer() as srv:
        img = Image.open(io.BytesIO(urllib.request.urlopen(srv.rewrite(url), timeout=30).read()))
    assert img.size == (int(good.WIDTH.iloc[0]), int(good.HEIGHT.iloc[0]))
