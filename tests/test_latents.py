"""The latent cache: atomic per-shard writes, the locked manifest, and the memory-mapped LatentDataset."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from sd_core.encoding.latent_cache import (
    LatentDataset,
    manifest_hash,
    read_manifest,
    read_shard_table,
    remove_shard,
    shard_paths,
    write_shard,
)


def _shard(n: int, seed: int, shape=(4, 8, 8), L=6):
    rng = np.random.default_rng(seed)
    lat = rng.standard_normal((n, *shape)).astype(np.float32)
    keys = [f"{seed:03d}{i:05d}" for i in range(n)]
    caps = [f"caption {seed} {i}" for i in range(n)]
    tok = rng.integers(0, 100, size=(n, L))
    return lat, keys, caps, tok


def _write(cache, name, n, seed, **kw):
    lat, keys, caps, tok = _shard(n, seed)
    write_shard(cache, name, lat, keys, caps, tok, vae="v", resolution=64, scaling_factor=0.5, **kw)
    return lat, keys, caps, tok


def test_a_shard_is_stored_in_key_order_whatever_order_its_images_came_in(tmp_path):
    # img2dataset writes a shard's images as their downloads finish, a different order on every run; the trainer
    # shuffles the cache's order with a fixed seed, so the cache must not inherit the tar's order (two fresh
    # `make demo` runs of the same code read whole-prompt 1.00 and 0.97 before the cache was sorted)
    lat, keys, caps, tok = _shard(12, 0)
    order = np.random.default_rng(1).permutation(12)
    for name, rows in (("in-order", np.arange(12)), ("shuffled", order)):
        write_shard(tmp_path / name, "00000", lat[rows], [keys[i] for i in rows], [caps[i] for i in rows], tok[rows])
    b = LatentDataset(tmp_path / "shuffled")
    assert read_shard_table(tmp_path / "shuffled", "00000").column("key").to_pylist() == keys
    for i in range(12):
        np.testing.assert_array_equal(b[i][0].numpy(), lat[i].astype(np.float16))
        assert b.caption(i) == caps[i] and b[i][1].tolist() == tok[i].tolist()
    assert read_manifest(tmp_path / "in-order")["00000"]["hash"] == read_manifest(tmp_path / "shuffled")["00000"]["hash"]


def test_write_read_roundtrip(tmp_path):
    cache = tmp_path / "latents"
    a = _write(cache, "00000", 5, 0)
    b = _write(cache, "00001", 3, 1, extra={"skipped": 2})
    m = read_manifest(cache)
    assert sorted(m) == ["00000", "00001"]
    assert m["00000"]["count"] == 5 and m["00001"]["skipped"] == 2 and m["00000"]["latent_shape"] == [4, 8, 8]
    assert m["00000"]["vae"] == "v" and m["00000"]["resolution"] == 64 and m["00000"]["scaling_factor"] == 0.5

    ds = LatentDataset(cache)
    assert len(ds) == 8 and ds.latent_shape == (4, 8, 8)
    for gi, (src, row) in enumerate([(a, i) for i in range(5)] + [(b, i) for i in range(3)]):
        lat, tok = ds[gi]
        assert lat.dtype == torch.float16 and lat.shape == (4, 8, 8) and tok.dtype == torch.int64
        np.testing.assert_array_equal(lat.numpy(), src[0][row].astype(np.float16))
        np.testing.assert_array_equal(tok.numpy(), src[3][row])
    assert ds.caption(6) == "caption 1 1"
    assert ds[-1][1].tolist() == b[3][-1].tolist()
    with pytest.raises(IndexError):
        ds[8]
    # batched reads, arbitrary order and shard mix
    idx = [7, 0, 3, 5, 0]
    bl, bt = ds.get_batch(idx)
    for k, gi in enumerate(idx):
        np.testing.assert_array_equal(bl[k], ds[gi][0].numpy())
        np.testing.assert_array_equal(bt[k], ds[gi][1].numpy())
    t = read_shard_table(cache, "00001")
    assert t.column_names == ["key", "caption", "token_ids"]
    assert t.column("caption").to_pylist() == b[2] and t.column("token_ids").to_pylist() == b[3].tolist()

    # subsets, order of the given shard list, and the manifest hash
    ds1 = LatentDataset(cache, shards=["00001"])
    assert len(ds1) == 3
    assert manifest_hash(cache) == manifest_hash(cache, ["00001", "00000"]) != manifest_hash(cache, ["00000"])
    with pytest.raises(KeyError):
        LatentDataset(cache, shards=["nope"])


def test_dataset_is_memory_mapped_and_picklable(tmp_path):
    cache = tmp_path / "latents"
    _write(cache, "a", 4, 0)
    _write(cache, "b", 4, 1)
    ds = LatentDataset(cache)
    ds[0]
    assert all(isinstance(v, np.memmap) for v in ds._lat.values())
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._lat == {} and len(pickle.dumps(ds)) < 4096  # no array data travels to workers
    np.testing.assert_array_equal(clone[5][0].numpy(), ds[5][0].numpy())


def test_dataset_under_distributed_sampler_and_workers(tmp_path):
    cache = tmp_path / "latents"
    _write(cache, "a", 7, 0)
    _write(cache, "b", 6, 1)
    ds = LatentDataset(cache)
    seen = []
    for rank in range(2):
        sampler = torch.utils.data.distributed.DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True,
                                                                  seed=3, drop_last=False)
        loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler, num_workers=2,
                                             multiprocessing_context="fork")
        for lat, tok in loader:
            assert lat.shape[1:] == (4, 8, 8) and tok.shape[1:] == (6,)
            seen.extend(tok[:, 0].tolist())
    assert len(seen) == 14  # 13 samples padded to 14 by DistributedSampler


def _concurrent_writer(cache, names):
    for n in names:
        _write(cache, n, 2, int(n))


def test_concurrent_partition_writes_keep_every_manifest_entry(tmp_path):
    cache = tmp_path / "latents"
    ctx = mp.get_context("fork")  # numpy-only children; spawn would re-import torch
    procs = [ctx.Process(target=_concurrent_writer, args=(str(cache), [f"{p}{i}" for i in range(5)]))
             for p in range(1, 5)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(read_manifest(cache)) == 20
    assert len(LatentDataset(cache)) == 40


def test_rewrite_is_atomic_and_leaves_other_shards_alone(tmp_path, monkeypatch):
    cache = tmp_path / "latents"
    old = _write(cache, "s0", 3, 0)
    _write(cache, "s1", 3, 1)
    p1 = shard_paths(cache, "s1")
    before = {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in (p1.latents, p1.tokens, p1.table)}

    # a failure while writing (e.g. disk full) leaves the old shard intact and no temporaries behind
    import sd_core.encoding.latent_cache as L

    real_write = L._write_npy_tmp

    def failing_write(path, arr):
        if path.name == "s0.npy":
            raise OSError("simulated disk full")
        return real_write(path, arr)

    monkeypatch.setattr(L, "_write_npy_tmp", failing_write)
    with pytest.raises(OSError):
        _write(cache, "s0", 9, 5)
    monkeypatch.setattr(L, "_write_npy_tmp", real_write)
    ds = LatentDataset(cache, shards=["s0"])
    assert len(ds) == 3
    np.testing.assert_array_equal(ds[0][0].numpy(), old[0][0].astype(np.float16))
    assert not [f for f in os.listdir(cache) if f.endswith(".tmp")]

    # a successful rewrite replaces only s0; s1's files are byte-identical and not rewritten
    h0 = read_manifest(cache)["s0"]["hash"]
    _write(cache, "s0", 4, 7)
    assert read_manifest(cache)["s0"]["count"] == 4 and read_manifest(cache)["s0"]["hash"] != h0
    assert {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in before} == before
    # idempotent: the same content gives the same hash
    _write(cache, "s0", 4, 7)
    assert len(LatentDataset(cache)) == 7

    remove_shard(cache, "s0")
    assert sorted(read_manifest(cache)) == ["s1"] and not shard_paths(cache, "s0").latents.exists()


_KILL_SCRIPT = """
import os, sys, time
import numpy as np
import sd_core.encoding.latent_cache as L
cache, stage = sys.argv[1], sys.argv[2]
if stage == "write":  # stop while the new latents are being written to their temporary file
    real = L._write_npy_tmp
    def slow(path, arr):
        tmp = real(path, arr)
        if path.name == "s0.npy":
            print("ready", flush=True); time.sleep(60)
        return tmp
    L._write_npy_tmp = slow
else:  # stop between the renames of the commit (tokens renamed, parquet and latents not yet)
    real_replace = os.replace
    def replace(src, dst):
        real_replace(src, dst)
        if str(dst).endswith("s0.tokens.npy"):
            print("ready", flush=True); time.sleep(60)
    os.replace = replace
n = 64
L.write_shard(cache, "s0", np.ones((n, 4, 8, 8), np.float32), [str(i) for i in range(n)], ["c"] * n,
              np.full((n, 6), 9), vae="new")
"""


@pytest.mark.parametrize("stage", ["write", "commit"])
def test_killed_writer_leaves_a_consistent_shard(tmp_path, stage):
    """SIGKILL a writer mid-write: the previous version still reads. SIGKILL it mid-commit: the next reader
    rolls the journalled commit forward, so the shard is entirely new, never a mix."""
    cache = tmp_path / "latents"
    old = _write(cache, "s0", 3, 0)
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(cache), stage], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    ds = LatentDataset(cache)
    if stage == "write":
        assert len(ds) == 3 and read_manifest(cache)["s0"]["vae"] == "v"
        np.testing.assert_array_equal(ds[2][0].numpy(), old[0][2].astype(np.float16))
    else:
        assert len(ds) == 64 and read_manifest(cache)["s0"]["vae"] == "new"
        assert ds[63][0].float().mean() == 1.0 and ds[63][1].tolist() == [9] * 6
        assert len(read_shard_table(cache, "s0")) == 64
    _write(cache, "s0", 2, 1)  # a later run succeeds over whatever the killed one left
    assert len(LatentDataset(cache)) == 2


def test_rejects_bad_input(tmp_path):
    lat, keys, caps, tok = _shard(3, 0)
    with pytest.raises(ValueError, match="length mismatch"):
        write_shard(tmp_path, "x", lat, keys[:2], caps, tok)
    lat[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        write_shard(tmp_path, "x", lat, keys, caps, tok)
    assert read_manifest(tmp_path) == {}
    # an empty shard is recorded (count 0) and skipped by the dataset
    write_shard(tmp_path, "empty", np.zeros((0, 4, 8, 8)), [], [], np.zeros((0, 6), int))
    assert read_manifest(tmp_path)["empty"]["count"] == 0 and len(LatentDataset(tmp_path)) == 0
