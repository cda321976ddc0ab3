"""The per-shard latent cache (DESIGN.md section 3) and the dataset the trainer reads it through.

Layout of one cache directory (``profile.latents_dir``)::

    {shard}.npy          (N, 4, h, w) float16, already multiplied by the VAE scaling factor
    {shard}.tokens.npy   (N, L) int32 token ids (the same ids as the parquet; a memory-mappable copy so
                         training never parses parquet per sample)
    {shard}.parquet      one row per latent: key (str), caption (str), token_ids (list<int32>)
    manifest.json        {"format": 1, "shards": {shard: {count, hash, vae, resolution, scaling_factor,
                          latent_shape, max_length, code_version, written_at, files, ...}}}

``files`` describes each file of the shard as written: ``{"latents"|"tokens"|"table": {"size", "sha256",
"sample_sha256"}}``. `LatentDataset` checks a shard before memory-mapping it (``verify``): by default its size
and the hash of a fixed sample of its bytes (the header and 16 blocks spread over the file: a few reads
however big the shard), or the full sha256 (``verify="full"``, or ``$SD_LATENT_VERIFY=full``). A truncated
or altered shard is refused naming the shard and the file ("latents/00001.npy is 1,234 bytes, the manifest
says 5,678: re-encode shard 00001") instead of numpy's "mmap length is greater than file size". Shards
written before ``files`` existed get the size check their ``.npy`` header implies.

Writes are atomic: every file is first written to a temporary name in the same directory and fsynced (the
slow part; a crash there leaves the previous files of the shard valid). The commit then happens under a
file lock on the manifest: the planned renames are journalled in the manifest (one atomic JSON replace),
the ``os.replace`` calls run, and the new entry is recorded. A process killed between those renames leaves a
journal that the next reader or writer rolls forward, so a reader never sees a mix of old and new files of
one shard. Concurrent partition runs never lose each other's manifest entries, and a shard's write never
touches another shard's files.

`LatentDataset` memory-maps every shard (``np.load(mmap_mode="r")``): nothing but the per-shard row counts
is held in RAM, a global index maps to (shard, row) in O(log shards) via ``np.searchsorted`` on cumulative
counts (O(1) in practice: a few hundred to ~10k shards), it pickles without its file handles (workers
re-open lazily) and works under ``DistributedSampler`` (it is a plain map-style dataset).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from sd_core.atomic import DiskFullError, fsync_dir, write_json_atomic, write_temp
from sd_core.paths import shard_file

MANIFEST = "manifest.json"
LOCK = ".manifest.lock"
FORMAT = 1
VERIFY_ENV = "SD_LATENT_VERIFY"  # none | size | sample (default) | full
VERIFY_LEVELS = ("none", "size", "sample", "full")
_SAMPLE_BLOCK = 4096
_SAMPLE_BLOCKS = 16

__all__ = [
    "MANIFEST",
    "DamagedShardError",
    "LatentDataset",
    "ShardEntry",
    "manifest_hash",
    "read_manifest",
    "read_shard_table",
    "remove_shard",
    "shard_paths",
    "verify_shard",
    "write_shard",
]


class DamagedShardError(RuntimeError):
    """A latent shard whose files do not match its manifest entry (truncated, altered, missing): the message
    names the shard and the file and says to re-encode it."""

    def __init__(self, shard: str, path: Path, problem: str):
        super().__init__(f"{path.parent.name}/{path.name} {problem}: re-encode shard {shard} ({path})")
        self.shard, self.path = shard, path


# ---------------------------------------------------------------------------------------- file helpers
@dataclass(frozen=True)
class ShardPaths:
    latents: Path
    tokens: Path
    table: Path


def shard_paths(cache_dir: str | os.PathLike[str], shard: str) -> ShardPaths:
    """The shard's files; a ValueError if ``shard`` is not one plain file name or a file would land outside
    ``cache_dir`` (`sd_core.paths.shard_file`): the manifest's renames are by file name within ``cache_dir``,
    so a temporary written elsewhere would leave a committed entry with no files behind it."""
    d = Path(cache_dir)
    return ShardPaths(shard_file(d, shard, ".npy"), shard_file(d, shard, ".tokens.npy"),
                      shard_file(d, shard, ".parquet"))


# ------------------------------------------------------------------------------------------- integrity
def _sample_offsets(size: int) -> list[int]:
    """Where the sampled blocks start: the header, then evenly spread blocks up to the file's last bytes."""
    last = max(size - _SAMPLE_BLOCK, 0)
    return sorted({0, *(last * i // (_SAMPLE_BLOCKS - 1) for i in range(_SAMPLE_BLOCKS))})


def _sample_sha256(path: Path, size: int) -> str:
    """sha256 over the size and a fixed sample of the file's blocks: catches truncation, a rewritten header and
    most in-place damage in a few reads, where the full hash would read the whole (GB-sized) shard."""
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for off in _sample_offsets(size):
            f.seek(off)
            h.update(f.read(_SAMPLE_BLOCK))
    return h.hexdigest()


def _full_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _describe_file(path: Path) -> dict[str, Any]:
    """A file's manifest record: size, full sha256, sampled sha256."""
    size = path.stat().st_size
    return {"size": size, "sha256": _full_sha256(path), "sample_sha256": _sample_sha256(path, size)}


def _check_file(shard: str, path: Path, rec: dict[str, Any], level: str) -> None:
    """Compare one file of a shard with its manifest record at ``level`` (size, sample or full)."""
    if not path.is_file():
        raise DamagedShardError(shard, path, "is missing (the manifest lists it)")
    size = path.stat().st_size
    if size != rec["size"]:
        raise DamagedShardError(shard, path, f"is {size:,} bytes, the manifest says {rec['size']:,}")
    if level == "sample" and _sample_sha256(path, size) != rec["sample_sha256"]:
        raise DamagedShardError(shard, path, "differs from what was written (sampled sha256 mismatch)")
    if level == "full" and _full_sha256(path) != rec["sha256"]:
        raise DamagedShardError(shard, path, "differs from what was written (sha256 mismatch)")


def _check_npy_size(shard: str, path: Path) -> None:
    """For shards recorded without ``files``: the size the ``.npy`` header implies must be the file's size."""
    if not path.is_file():
        raise DamagedShardError(shard, path, "is missing (the manifest lists it)")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)  # 2.0 and 3.0 share the layout
            shape, _, dtype = read_header(f)
            header = f.tell()
    except (ValueError, OSError, EOFError) as exc:
        raise DamagedShardError(shard, path, f"has no readable .npy header ({exc})") from None
    expected = header + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if size != expected:
        raise DamagedShardError(shard, path, f"is {size:,} bytes, its header describes {tuple(shape)} {dtype} = "
                                             f"{expected:,} bytes")


def verify_shard(cache_dir: str | os.PathLike[str], shard: str, entry: ShardEntry, level: str = "sample") -> None:
    """Check a shard's files against its manifest ``entry`` at ``level`` ("none", "size", "sample", "full");
    :class:`DamagedShardError` naming the shard and file on a mismatch."""
    if level not in VERIFY_LEVELS:
        raise ValueError(f"latent verify level must be one of {VERIFY_LEVELS}, got {level!r}")
    if level == "none":
        return
    paths = shard_paths(cache_dir, shard)
    files = entry.get("files")
    if not files:  # written before the manifest described its files
        _check_npy_size(shard, paths.latents)
        _check_npy_size(shard, paths.tokens)
        return
    for role in ("latents", "tokens"):
        _check_file(shard, getattr(paths, role), files[role], level)


def _write_npy_tmp(path: Path, arr: np.ndarray) -> Path:
    return write_temp(path, lambda f: np.save(f, arr, allow_pickle=False))


def _write_parquet_tmp(path: Path, table: Any) -> Path:
    import pyarrow.parquet as pq

    return write_temp(path, lambda f: pq.write_table(table, f))


@contextmanager
def _manifest_lock(cache_dir: Path, timeout: float = 600.0) -> Iterator[None]:
    from filelock import FileLock

    with FileLock(str(cache_dir / LOCK), timeout=timeout):
        yield


# --------------------------------------------------------------------------------------------- manifest
ShardEntry = dict[str, Any]


def read_manifest(cache_dir: str | os.PathLike[str]) -> dict[str, ShardEntry]:
    """Shard name → manifest entry (``{}`` when the cache does not exist yet)."""
    cache = Path(cache_dir)
    path = cache / MANIFEST
    if not path.exists():
        return {}
    with open(path) as f:
        data = json.load(f)
    shards = data.get("shards", {})
    if any("pending" in e for e in shards.values()):  # a writer died mid-commit: finish its commit
        with _manifest_lock(cache):
            data = _load_manifest_file(cache)
            _roll_forward(cache, data)
            shards = data["shards"]
    return {k: v for k, v in shards.items() if "count" in v}


def manifest_hash(cache_dir: str | os.PathLike[str], shards: Sequence[str] | None = None) -> str:
    """A stable hash of the cache content a trainer reads: over the sorted (shard, count, content hash,
    vae, resolution, scaling factor) of the selected shards (all when ``shards`` is None). Used as the
    training data version; independent of write times and of unselected shards."""
    entries = read_manifest(cache_dir)
    names = sorted(entries) if shards is None else sorted(shards)
    missing = [s for s in names if s not in entries]
    if missing:
        raise KeyError(f"shards not in the latent manifest of {cache_dir}: {missing[:10]}")
    h = hashlib.sha256()
    for s in names:
        e = entries[s]
        h.update(json.dumps([s, e["count"], e["hash"], e.get("vae"), e.get("resolution"),
                             e.get("scaling_factor")], sort_keys=True).encode())
    return h.hexdigest()[:16]


def _content_hash(latents: np.ndarray, tokens: np.ndarray, keys: Sequence[str], captions: Sequence[str]) -> str:
    h = hashlib.sha256()
    for arr in (latents, tokens):
        h.update(str((arr.dtype.str, arr.shape)).encode())
        h.update(np.ascontiguousarray(arr).data)
    for k, c in zip(keys, captions):
        h.update(k.encode())
        h.update(b"\0")
        h.update(c.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def write_shard(
    cache_dir: str | os.PathLike[str],
    shard: str,
    latents: np.ndarray,
    keys: Sequence[str],
    captions: Sequence[str],
    token_ids: np.ndarray | Sequence[Sequence[int]],
    *,
    vae: str = "",
    resolution: int | None = None,
    scaling_factor: float | None = None,
    code_version: str | None = None,
    extra: dict[str, Any] | None = None,
) -> ShardEntry:
    """Write one shard's cache atomically and record it in the manifest; returns the manifest entry.

    ``latents``: (N, C, h, w), stored as float16 (already scaled). ``token_ids``: (N, L) integers. Rows are
    stored sorted by key: a shard's tar holds its images in the order their downloads finished, which changes
    from run to run, and the trainer's shuffle is a permutation of the cache's order, so only a canonical order
    lets the same config train the same model twice.
    Re-writing a shard replaces its files atomically; other shards' files are never touched.
    ``extra`` is merged into the manifest entry (e.g. skipped count, source tar).
    """
    cache = Path(cache_dir)
    paths = shard_paths(cache, shard)  # refuses a hostile shard name before anything is made
    cache.mkdir(parents=True, exist_ok=True)
    lat, tok, keys, captions = _sorted_by_key(*_checked_shard(shard, latents, keys, captions, token_ids))
    tmps: list[tuple[Path, Path]] = []
    committed = False
    try:
        _write_temporaries(paths, lat, tok, keys, captions, tmps)
        entry: ShardEntry = {
            "count": int(lat.shape[0]),
            "hash": _content_hash(lat, tok, keys, captions),
            "vae": vae,
            "resolution": resolution,
            "scaling_factor": scaling_factor,
            "latent_shape": list(lat.shape[1:]),
            "max_length": int(tok.shape[1]) if tok.ndim == 2 else 0,
            "code_version": code_version,
            "written_at": time.time(),
            "files": _describe_files(paths, tmps),
        }
        if extra:
            entry.update(extra)
        with _manifest_lock(cache):
            data = _journal_commit(cache, shard, tmps, entry)
            committed = True  # journalled: from here on an interrupted commit is rolled forward, not undone
            _roll_forward(cache, data)
            _remove_stale_tmps(cache, shard)
    except DiskFullError as exc:  # `finally` removes the temporaries; the shard's current files were not touched
        raise DiskFullError(exc.path, f"the previous files of shard {shard} are intact") from exc
    finally:
        if not committed:
            for tmp, _ in tmps:
                tmp.unlink(missing_ok=True)
    return entry


def _describe_files(paths: ShardPaths, tmps: list[tuple[Path, Path]]) -> dict[str, dict[str, Any]]:
    """The manifest's ``files`` record of a shard, from its temporaries (the bytes that will be renamed in)."""
    roles = {paths.latents: "latents", paths.tokens: "tokens", paths.table: "table"}
    return {roles[final]: _describe_file(tmp) for tmp, final in tmps}


def _checked_shard(shard: str, latents: np.ndarray, keys: Sequence[str], captions: Sequence[str],
                   token_ids: np.ndarray | Sequence[Sequence[int]]
                   ) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """A shard's content as stored, (float16 latents, int32 token ids, keys, captions), after checking that the
    shapes and lengths agree and that the latents are finite in float16."""
    lat = np.asarray(latents)
    if lat.ndim != 4:
        raise ValueError(f"latents must be (N, C, h, w), got shape {lat.shape}")
    lat = lat.astype(np.float16, copy=False)
    tok = np.asarray(token_ids, dtype=np.int32)
    n = lat.shape[0]
    if tok.ndim != 2 and n:
        raise ValueError(f"token_ids must be (N, L), got shape {tok.shape}")
    if n == 0:
        tok = tok.reshape(0, tok.shape[-1] if tok.ndim == 2 else 0)
    keys = [str(k) for k in keys]
    captions = [str(c) for c in captions]
    if not (len(keys) == len(captions) == tok.shape[0] == n):
        raise ValueError(f"length mismatch: {n} latents, {len(keys)} keys, {len(captions)} captions, "
                         f"{tok.shape[0]} token rows")
    if not np.isfinite(lat).all():
        raise ValueError(f"shard {shard}: latents contain NaN/inf (after float16 cast)")
    return lat, tok, keys, captions


def _sorted_by_key(lat: np.ndarray, tok: np.ndarray, keys: list[str], captions: list[str]
                   ) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """The shard's rows in key order (a stable sort: rows of equal keys keep their order)."""
    order = sorted(range(len(keys)), key=keys.__getitem__)
    if order == list(range(len(keys))):
        return lat, tok, keys, captions
    return lat[order], tok[order], [keys[i] for i in order], [captions[i] for i in order]


def _write_temporaries(paths: ShardPaths, lat: np.ndarray, tok: np.ndarray, keys: list[str], captions: list[str],
                       tmps: list[tuple[Path, Path]]) -> None:
    """Step 1 of a shard write, the slow part: every file to a temporary name beside its final one (a crash
    here leaves the old shard untouched). Each (temporary, final) pair is appended to ``tmps`` as soon as it
    exists, so the caller can delete them if the write fails."""
    import pyarrow as pa

    tmps.append((_write_npy_tmp(paths.tokens, tok), paths.tokens))
    table = pa.table({
        "key": pa.array(keys, pa.string()),
        "caption": pa.array(captions, pa.string()),
        "token_ids": pa.array(list(tok), pa.list_(pa.int32())) if len(tok) else pa.array([], pa.list_(pa.int32())),
    })
    tmps.append((_write_parquet_tmp(paths.table, table), paths.table))
    tmps.append((_write_npy_tmp(paths.latents, lat), paths.latents))


def _journal_commit(cache: Path, shard: str, tmps: list[tuple[Path, Path]], entry: ShardEntry) -> dict[str, Any]:
    """Step 2, with the manifest lock held: journal the shard's renames and new entry in the manifest (one
    atomic replace); returns the manifest for `_roll_forward` to carry them out. A crash between the renames
    is rolled forward by the next reader or writer."""
    data = _load_manifest_file(cache)
    _roll_forward(cache, data)
    data["shards"][shard] = dict(data["shards"].get(shard, {}),
                                 pending={"renames": [[t.name, f.name] for t, f in tmps], "entry": entry})
    write_json_atomic(cache / MANIFEST, data)
    return data


def _load_manifest_file(cache: Path) -> dict[str, Any]:
    path = cache / MANIFEST
    if not path.exists():
        return {"format": FORMAT, "shards": {}}
    with open(path) as f:
        data = json.load(f)
    data.setdefault("shards", {})
    data["format"] = FORMAT
    return data


def _roll_forward(cache: Path, data: dict[str, Any]) -> bool:
    """Finish every journalled commit (call with the lock held): rename each pending temporary that still
    exists (those already gone were renamed before the crash), install the new entry, save the manifest."""
    changed = False
    for name, e in list(data["shards"].items()):
        pending = e.get("pending")
        if not pending:
            continue
        for tmp, final in pending["renames"]:
            if (cache / tmp).exists():
                os.replace(cache / tmp, cache / final)
        fsync_dir(cache)
        data["shards"][name] = pending["entry"]
        changed = True
    if changed:
        write_json_atomic(cache / MANIFEST, data)
    return changed


def _remove_stale_tmps(cache: Path, shard: str, older_than_s: float = 3600.0) -> None:
    """Delete temporaries of ``shard`` left by killed writers (old enough not to belong to a live one)."""
    now = time.time()
    for pattern in (f".{shard}.npy.*.tmp", f".{shard}.tokens.npy.*.tmp", f".{shard}.parquet.*.tmp"):
        for f in cache.glob(pattern):
            try:
                if now - f.stat().st_mtime > older_than_s:
                    f.unlink()
            except FileNotFoundError:
                pass


def remove_shard(cache_dir: str | os.PathLike[str], shard: str) -> None:
    """Drop a shard from the manifest, then delete its files (manifest first: readers never see a listed
    shard without files)."""
    cache = Path(cache_dir)
    with _manifest_lock(cache):
        data = _load_manifest_file(cache)
        _roll_forward(cache, data)
        if data["shards"].pop(shard, None) is not None:
            write_json_atomic(cache / MANIFEST, data)
    p = shard_paths(cache, shard)
    for f in (p.latents, p.tokens, p.table):
        f.unlink(missing_ok=True)


def read_shard_table(cache_dir: str | os.PathLike[str], shard: str):
    """The shard's parquet (key, caption, token_ids) as a pyarrow Table."""
    import pyarrow.parquet as pq

    return pq.read_table(shard_paths(cache_dir, shard).table)


# ---------------------------------------------------------------------------------------------- dataset
def _mmap(shard: str, path: Path) -> np.ndarray:
    """``np.load(mmap_mode="r")`` of one file of a shard; numpy's own errors ("mmap length is greater than file
    size") become a :class:`DamagedShardError` naming the shard and the file."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        size = f"{path.stat().st_size:,} bytes" if path.exists() else "missing"
        raise DamagedShardError(shard, path, f"cannot be memory-mapped ({size}: {exc})") from None


class LatentDataset:
    """Map-style dataset over cached shards: ``ds[i] -> (latent float16 (C, h, w), token_ids int64 (L,))``
    as torch tensors.

    ``shards``: which shards to read (default: every shard in the manifest, sorted by name). The order is
    fixed at construction, so a global index means the same sample in every process (DDP ranks,
    DataLoader workers). Shards are memory-mapped lazily on first access in each process.

    ``verify``: how each shard is checked against its manifest entry before it is first mapped (`verify_shard`):
    "sample" (default: size + sampled hash), "full" (the whole sha256), "size" or "none"; None reads
    ``$SD_LATENT_VERIFY``. A shard is checked once per dataset (copies in DataLoader workers inherit that).
    """

    def __init__(self, cache_dir: str | os.PathLike[str], shards: Sequence[str] | None = None,
                 *, validate: bool = True, verify: str | None = None):
        self.verify = verify or os.environ.get(VERIFY_ENV) or "sample"
        if self.verify not in VERIFY_LEVELS:
            raise ValueError(f"latent verify level ({'verify=' if verify else '$' + VERIFY_ENV}) must be one of "
                             f"{VERIFY_LEVELS}, got {self.verify!r}")
        self.cache_dir = Path(cache_dir)
        manifest = read_manifest(self.cache_dir)
        if shards is None:
            names = sorted(manifest)
        else:
            names = list(shards)
            missing = [s for s in names if s not in manifest]
            if missing:
                raise KeyError(f"shards not in the latent manifest of {self.cache_dir}: {missing[:10]}")
        self.shards: list[str] = [s for s in names if manifest[s]["count"] > 0]
        self.counts = np.array([manifest[s]["count"] for s in self.shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        shapes = {tuple(manifest[s]["latent_shape"]) for s in self.shards}
        if len(shapes) > 1:
            raise ValueError(f"latent shapes differ across shards: {sorted(shapes)} (mixed VAE/resolution?)")
        self.latent_shape: tuple[int, ...] = shapes.pop() if shapes else ()
        scalings = {manifest[s].get("scaling_factor") for s in self.shards}
        # the factor the latents were multiplied by (None when unrecorded or mixed): sampling divides by it
        self.scaling_factor: float | None = scalings.pop() if len(scalings) == 1 else None
        self.manifest_hash = manifest_hash(self.cache_dir, names) if names else ""
        self._files: list[dict[str, Any] | None] = [manifest[s].get("files") for s in self.shards]
        self._verified: set[int] = set()  # kept when pickled: a worker does not re-hash what its parent checked
        self._lat: dict[int, np.ndarray] = {}
        self._tok: dict[int, np.ndarray] = {}
        if validate:
            for j in range(len(self.shards)):
                self._open(j)

    # -- process-local file handles
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_lat"], state["_tok"] = {}, {}
        return state

    def _open(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        lat = self._lat.get(j)
        if lat is None:
            shard = self.shards[j]
            p = shard_paths(self.cache_dir, shard)
            if j not in self._verified:
                verify_shard(self.cache_dir, shard, {"files": self._files[j]}, self.verify)
                self._verified.add(j)
            lat, tok = _mmap(shard, p.latents), _mmap(shard, p.tokens)
            n = int(self.counts[j])
            if lat.shape[0] != n or tok.shape[0] != n:
                raise RuntimeError(
                    f"latent shard {self.shards[j]!r} is inconsistent with its manifest entry ({n} rows; "
                    f"{p.latents.name} has {lat.shape[0]}, {p.tokens.name} has {tok.shape[0]}): re-encode it")
            self._lat[j], self._tok[j] = lat, tok
        return lat, self._tok[j]

    # -- indexing
    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """Global index → (shard position in ``self.shards``, row within that shard)."""
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} latents")
        j = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return j, int(index - self.offsets[j])

    def __getitem__(self, index: int):
        import torch

        j, r = self.locate(int(index))
        lat, tok = self._open(j)
        return torch.from_numpy(np.array(lat[r])), torch.from_numpy(tok[r].astype(np.int64))

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Read many samples at once as numpy ((B, C, h, w) float16, (B, L) int64), in the given order:
        rows are gathered per shard with one sorted fancy-index read each (fewer page faults than B
        single reads)."""
        idx = np.asarray(indices, dtype=np.int64)
        n = len(self)
        idx = np.where(idx < 0, idx + n, idx)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"indices out of range for {n} latents")
        js = np.searchsorted(self.offsets, idx, side="right") - 1
        out_lat = np.empty((idx.size, *self.latent_shape), dtype=np.float16)
        L = None
        out_tok = None
        for j in np.unique(js):
            sel = np.nonzero(js == j)[0]
            rows = idx[sel] - self.offsets[j]
            order = np.argsort(rows, kind="stable")
            lat, tok = self._open(int(j))
            if out_tok is None:
                L = tok.shape[1]
                out_tok = np.empty((idx.size, L), dtype=np.int64)
            out_lat[sel[order]] = lat[rows[order]]
            out_tok[sel[order]] = tok[rows[order]]
        if out_tok is None:
            out_tok = np.empty((0, 0), dtype=np.int64)
        return out_lat, out_tok

    def caption(self, index: int) -> str:
        """The caption of one sample (reads the shard's parquet; for inspection, not for training)."""
        j, r = self.locate(int(index))
        return str(read_shard_table(self.cache_dir, self.shards[j]).column("caption")[r])

    def __repr__(self) -> str:
        return (f"LatentDataset({str(self.cache_dir)!r}, {len(self.shards)} shards, {len(self)} latents "
                f"of shape {self.latent_shape})")
