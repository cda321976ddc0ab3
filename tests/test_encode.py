"""Encoding shard tars into the latent cache: decoding, skips, order, tokens, and round-trip quality."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sd_core.encoding.components import load_components
from sd_core.encoding.encode import ShardCountError, encode_shard, latent_stats, load_image, recorded_samples
from sd_core.encoding.latent_cache import LatentDataset, read_manifest, read_shard_table
from sd_core.encoding.vae_fit import psnr
from latents_support import PSNR_FLOOR_DB, SD_VAE_FT_MSE, install_components, write_synthetic_tar


@pytest.fixture
def profile(tiny_built, tiny_profile, tmp_path):
    p = tiny_profile(tmp_path / "data")
    install_components(tiny_built, p)
    return p


def test_load_image_resizes_and_centre_crops():
    import io

    from PIL import Image

    im = Image.new("RGB", (200, 100), (255, 0, 0))
    im.paste((0, 0, 255), (50, 0, 150, 100))  # a blue centre square, red margins that the crop removes
    buf = io.BytesIO()
    im.save(buf, "PNG")
    arr = load_image(buf.getvalue(), 32)
    assert arr.shape == (3, 32, 32) and arr.dtype == np.uint8
    assert arr[2].mean() > 240 and arr[0].mean() < 15
    grey = Image.new("L", (40, 40), 7)
    buf = io.BytesIO()
    grey.save(buf, "JPEG")
    assert load_image(buf.getvalue(), 40).shape == (3, 40, 40)  # greyscale → RGB


def test_encode_shard_skips_corrupt_and_round_trips(profile):
    tar = profile.shards_dir / "00000.tar"
    samples = write_synthetic_tar(tar, 24, seed=1, corrupt=(5,), extras=True)
    comps = load_components(profile)
    seen = []
    report = encode_shard(tar, profile.latents_dir, "00000", profile, components=comps, progress=seen.append)
    assert report.encoded == 23 and report.skipped == 1 and report.skipped_examples[0].startswith("000100005:")
    assert report.latent_shape == [4, 8, 8] and report.images_per_s > 0
    assert 0.6 < report.latent_std < 1.5 and abs(report.latent_mean) < 0.5

    good = [s for s in samples if s["image"] is not None]
    entry = read_manifest(profile.latents_dir)["00000"]
    assert entry["count"] == 23 and entry["skipped"] == 1 and entry["resolution"] == 64
    assert entry["scaling_factor"] == pytest.approx(comps.scaling_factor)
    table = read_shard_table(profile.latents_dir, "00000")
    assert table.column("key").to_pylist() == [s["key"] for s in good]  # tar order, corrupt one left out
    assert table.column("caption").to_pylist() == [s["caption"] for s in good]
    ds = LatentDataset(profile.latents_dir)
    assert len(ds) == 23 and ds.latent_shape == (4, 8, 8)
    lat, ids = ds[0]
    assert lat.dtype == torch.float16 and ids.tolist() == comps.tokenize([good[0]["caption"]])[0].tolist()
    stats = latent_stats(profile.latents_dir, "00000")
    assert stats["nonfinite"] == 0 and stats["std"] == pytest.approx(report.latent_std, rel=1e-3)

    # decoding the cached (float16, scaled) latents gives the originals back (the square ones: the PNG and
    # the JPEGs; the wide sample was centre-cropped, compared against its crop = the original render)
    z = torch.from_numpy(np.asarray(ds.get_batch(range(len(ds)))[0], dtype=np.float32))
    rec = comps.decode_latents(z)
    orig = torch.stack([torch.from_numpy(np.asarray(s["image"], dtype=np.float32)).permute(2, 0, 1)
                        for s in good]) / 127.5 - 1
    value = psnr(rec, orig)
    assert value >= PSNR_FLOOR_DB, value

    # re-encoding is deterministic (posterior mean): same content hash
    again = encode_shard(tar, profile.latents_dir, "00000", profile, components=comps)
    assert again.manifest_entry["hash"] == entry["hash"]


def test_multi_process_path_matches_single_process(profile):
    """The one-process-per-GPU path (here: 2 CPU encoder processes) gives the single-process cache: same
    samples in the same order, latents equal up to float reassociation (other batch sizes and thread counts)."""
    tar = profile.shards_dir / "00001.tar"
    write_synthetic_tar(tar, 10, seed=2, corrupt=(3,))
    one = encode_shard(tar, profile.latents_dir, "one", profile, device="cpu")
    two = encode_shard(tar, profile.latents_dir, "two", profile, device="cpu", num_processes=2)
    assert two.processes == 2 and (two.encoded, two.skipped) == (one.encoded, one.skipped) == (9, 1)
    t1, t2 = read_shard_table(profile.latents_dir, "one"), read_shard_table(profile.latents_dir, "two")
    assert t1.to_pylist() == t2.to_pylist()
    a, b = LatentDataset(profile.latents_dir, ["one"]), LatentDataset(profile.latents_dir, ["two"])
    np.testing.assert_allclose(a.get_batch(range(9))[0].astype(np.float32), b.get_batch(range(9))[0].astype(np.float32),
                               atol=2e-2, rtol=1e-2)


def test_empty_and_missing_tars(profile):
    with pytest.raises(FileNotFoundError):
        encode_shard(profile.shards_dir / "nope.tar", profile.latents_dir, "nope", profile)
    tar = profile.shards_dir / "00002.tar"
    write_synthetic_tar(tar, 2, corrupt=(0, 1))
    r = encode_shard(tar, profile.latents_dir, "00002", profile, device="cpu")
    assert (r.encoded, r.skipped) == (0, 2)
    assert read_manifest(profile.latents_dir)["00002"]["count"] == 0


def test_a_tar_shorter_than_img2datasets_record_is_refused_and_the_cache_kept(profile):
    """img2dataset records how many samples it wrote (``_stats.json``, per row in the ``.parquet``); a tar
    that reads short (cut off, damaged on disk) ends without a decode error, so only that count shows it."""
    tar = profile.shards_dir / "00003.tar"
    write_synthetic_tar(tar, 16, seed=3, corrupt=(4,))
    stats = profile.shards_dir / "00003_stats.json"
    stats.write_text(json.dumps({"count": 18, "successes": 16, "failed_to_download": 2}))
    first = encode_shard(tar, profile.latents_dir, "00003", profile, device="cpu")
    assert (first.encoded, first.skipped) == (15, 1)  # an undecodable sample is read (and skipped), not missing
    cache = [profile.latents_dir / f"00003{ext}" for ext in (".npy", ".tokens.npy", ".parquet")]
    cache.append(profile.latents_dir / "manifest.json")
    before = {f: f.read_bytes() for f in cache}

    with open(tar, "r+b") as f:
        f.truncate(tar.stat().st_size // 2)
    with pytest.raises(ShardCountError, match=rf"shard 00003: {tar} holds \d+ readable sample\(s\) but img2dataset "
                                              rf"wrote 16 into it \(per {stats}\)") as e:
        encode_shard(tar, profile.latents_dir, "00003", profile, device="cpu")
    assert 0 < e.value.read < 16
    # without the stats file, img2dataset's per-row results say the same
    stats.unlink()
    results = profile.shards_dir / "00003.parquet"
    pq.write_table(pa.table({"status": ["success"] * 16 + ["failed_to_download"] * 2}), results)
    assert recorded_samples(tar) == (16, str(results))
    with pytest.raises(ShardCountError, match="wrote 16 into it"):
        encode_shard(tar, profile.latents_dir, "00003", profile, device="cpu")
    assert {f: f.read_bytes() for f in cache} == before


@pytest.mark.slow
def test_sd15_shapes_encode_a_512px_image(tmp_path):
    """The full SD 1.5 path on CPU: one 512 px image through a random sd-vae-ft-mse-config VAE → 4×64×64."""
    from diffusers import AutoencoderKL

    from sd_core.encoding.components import build_tiny_tokenizer
    from sd_core.config import Profile
    from sd_core.data import synthetic as S

    root = tmp_path / "c"
    torch.manual_seed(0)
    AutoencoderKL(**SD_VAE_FT_MSE).save_pretrained(root / "vae")
    build_tiny_tokenizer(S.vocabulary(), 77).save_pretrained(root / "tokenizer")
    p = Profile.sd15(tmp_path / "data").with_overrides({
        "components": {"vae": str(root / "vae"), "text_encoder": str(root / "te"), "tokenizer": str(root / "tokenizer")},
        "encode": {"batch_size": 1, "decode_workers": 0}})
    write_synthetic_tar(p.shards_dir / "00000.tar", 1, size=512)
    r = encode_shard(p.shards_dir / "00000.tar", p.latents_dir, "00000", p, device="cpu")
    assert r.encoded == 1 and r.latent_shape == [4, 64, 64]
    lat, ids = LatentDataset(p.latents_dir)[0]
    assert lat.shape == (4, 64, 64) and ids.shape == (77,)
