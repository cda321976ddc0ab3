"""The real CLIP BPE vocabulary, offline: read from the ``open_clip_torch`` wheel on the package index.

SD 1.x was trained on the token ids of ``openai/clip-vit-large-patch14``'s tokenizer, whose vocabulary is
built from one file, ``bpe_simple_vocab_16e6.txt.gz`` (the BPE merges OpenAI published with CLIP). The model
hub is out of reach here, the package index is not, and the ``open_clip_torch`` wheel ships that file. So:

1. `fetch_open_clip_wheel` runs ``pip download --no-deps open_clip_torch`` once into a cache folder
   (``$SD_CACHE_DIR``, else ``$XDG_CACHE_HOME/sd-pipeline``, else ``~/.cache/sd-pipeline``) and reuses the
   wheel afterwards. open_clip is never imported or installed (it would pull torchvision and more).
2. `read_bpe_merges` reads only that one member out of the wheel with ``zipfile`` and checks its SHA-256, so a
   changed or tampered file is refused instead of silently shifting every token id.
3. `clip_vocab_and_merges` builds the vocabulary exactly as OpenAI's ``simple_tokenizer.py`` does:
   the 256 byte symbols of ``bytes_to_unicode``, the same with ``</w>``, one token per merge
   (``merges[1:49152-256-2+1]``), then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).

`sd_core.encoding.components.build_clip_tokenizer` wraps the result in transformers' CLIP tokenizer.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path

OPEN_CLIP_PACKAGE = "open_clip_torch"
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# SHA-256 of the gzipped merges file (the same bytes in every open_clip_torch release since 2021)
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
VOCAB_SIZE = 49408
# merges[1 : 49152 - 256 - 2 + 1]: line 0 is a header; 48,894 merges fill the vocabulary up to the two specials
N_MERGES = 49152 - 256 - 2
CACHE_ENV = "SD_CACHE_DIR"
PIP_TIMEOUT_S = 300


class ClipBpeError(RuntimeError):
    """The merges file could not be fetched or read (the message says which step and which file)."""


def default_cache_dir() -> Path:
    """``$SD_CACHE_DIR``, else ``$XDG_CACHE_HOME/sd-pipeline``, else ``~/.cache/sd-pipeline``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sd-pipeline"


def cached_wheel(cache_dir: Path) -> Path | None:
    """The newest open_clip_torch wheel already in ``cache_dir/wheels``, if any."""
    wheels = sorted((cache_dir / "wheels").glob(f"{OPEN_CLIP_PACKAGE}-*.whl"))
    return wheels[-1] if wheels else None


def fetch_open_clip_wheel(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The open_clip_torch wheel in the cache, downloaded with ``pip download --no-deps`` if not there yet.

    The download goes to a temporary folder inside the cache and is renamed into place, so an interrupted
    fetch never leaves a truncated wheel to be reused. A failure raises `ClipBpeError` with pip's last words.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    found = cached_wheel(cache)
    if found is not None:
        return found
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=wheels) as tmp:
        _pip_download(Path(tmp))
        got = sorted(Path(tmp).glob("*.whl"))
        if not got:
            raise ClipBpeError(f"could not fetch {OPEN_CLIP_PACKAGE} from the package index: pip reported "
                               f"success but left no wheel in {tmp}")
        final = wheels / got[-1].name
        os.replace(got[-1], final)
    return final


def _pip_download(dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--dest", str(dest), OPEN_CLIP_PACKAGE]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ClipBpeError(f"could not fetch {OPEN_CLIP_PACKAGE} from the package index: pip download took "
                           f"over {PIP_TIMEOUT_S}s") from None
    if res.returncode != 0:
        # pip's errors, after the line naming the index it tried (what a user needs to see what went wrong)
        where = [ln.strip() for ln in res.stdout.splitlines() if ln.startswith("Looking in")]
        errors = [ln.strip() for ln in res.stderr.splitlines() if ln.strip()][-3:]
        said = " | ".join(where[:1] + errors) or f"pip exited with status {res.returncode}"
        raise ClipBpeError(f"could not fetch {OPEN_CLIP_PACKAGE} from the package index: {said}")


def read_bpe_merges(wheel: str | os.PathLike[str]) -> list[str]:
    """The merge lines of ``bpe_simple_vocab_16e6.txt.gz`` inside ``wheel`` (header line included), after
    checking the file's SHA-256."""
    wheel = Path(wheel)
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = [n for n in zf.namelist() if n.endswith("/" + BPE_FILE)]
            if not names:
                raise ClipBpeError(f"{wheel} holds no {BPE_FILE}: not an open_clip_torch wheel?")
            raw = zf.read(names[0])
    except (zipfile.BadZipFile, OSError) as e:
        raise ClipBpeError(f"cannot read the cached wheel {wheel} ({e}); delete it to fetch it again") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != BPE_SHA256:
        raise ClipBpeError(f"{wheel}: {BPE_FILE} has SHA-256 {digest}, expected {BPE_SHA256} (the CLIP merges "
                           "file changed: token ids would no longer match SD 1.x)")
    return gzip.decompress(raw).decode("utf-8").split("\n")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible byte → printable-character table (GPT-2's): printable Latin-1 bytes map to
    themselves, the other 68 to code points from 256 on, so BPE never sees whitespace or control bytes."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_vocab_and_merges(merge_lines: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token → id, merges in rank order), built as in OpenAI's ``simple_tokenizer.py`` (module docstring)."""
    merges = [tuple(line.split()) for line in merge_lines[1:N_MERGES + 1]]
    bad = [i + 1 for i, m in enumerate(merges) if len(m) != 2]
    if bad or len(merges) != N_MERGES:
        raise ClipBpeError(f"{BPE_FILE}: expected {N_MERGES} merges of two symbols, got {len(merges)} "
                           f"(malformed lines: {bad[:5]})")
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ClipBpeError(f"{BPE_FILE}: vocabulary has {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab, merges  # type: ignore[return-value]
