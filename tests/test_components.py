"""Frozen components: the tiny build (tokenizer, text encoder, fitted VAE) and the one loading path, which
also loads production-shaped (SD 1.5) components from local directories without a hub."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from sd_core.encoding.components import build_tiny_components, build_tiny_tokenizer, load_components, tokenize
from sd_core.encoding.versions import BUILD_FILE, component_sources, components_digest, components_version
from sd_core.config import Profile
from sd_core.data import synthetic as S
from latents_support import CLIP_VIT_L14_TEXT, COLOUR_FLOOR, PSNR_FLOOR_DB, SD_VAE_FT_MSE, install_components


def test_tiny_build_reconstructs_and_records_itself(tiny_built, tiny_profile, tmp_path):
    info = json.loads((tiny_built / BUILD_FILE).read_text())
    rec = info["reconstruction"]
    assert rec["psnr"] >= PSNR_FLOOR_DB and rec["colour_accuracy"] >= COLOUR_FLOOR, rec
    assert 0.0 <= rec["colour_accuracy"] <= 1.0 and set(rec["per_colour_accuracy"]) <= set(S.COLORS)
    assert info["fit"]["steps"] > 0 and info["params"]["vae"] > 0 and info["vocab_size"] == len(S.vocabulary()) + 3
    assert sorted(p.name for p in tiny_built.iterdir()) == [BUILD_FILE, "text_encoder", "tokenizer", "vae"]
    assert not [p for p in tiny_built.parent.iterdir() if p.name.endswith(".tmp")]  # built in a temp dir, renamed

    # the scaling factor from the fit makes scaled latents of fresh renders have std ≈ 1
    p = tiny_profile(tmp_path / "data")
    install_components(tiny_built, p)
    c = load_components(p)
    assert c.scaling_factor == pytest.approx(info["scaling_factor"]) and c.scaling_factor != 1.0
    from sd_core.encoding.vae_fit import synthetic_batch

    batch = synthetic_batch(48, 64, random.Random(99))
    z = c.encode_images(batch.images)
    assert z.shape == (48, 4, 8, 8) and 0.75 < float(z.std()) < 1.33
    # same settings → the existing build is reused (no second fit), digest unchanged
    again = build_tiny_components(p, log=None)
    assert again["digest"] == info["digest"] == components_digest(p)
    # the config-only version follows the build settings, the fit's step budget included
    assert components_version(p) != components_version(p.with_overrides({"components": {"vae_fit_steps": 1}}))
    assert components_version(p) != components_version(p.with_overrides({"components": {"seed": 1}}))


def test_tiny_tokenizer_and_text_encoder(tiny_built, tiny_profile, tmp_path):
    p = tiny_profile(tmp_path / "data")
    install_components(tiny_built, p)
    c = load_components(p)
    assert all(not t.requires_grad for m in (c.vae, c.text_encoder) for t in m.parameters())
    assert not c.vae.training and not c.text_encoder.training
    ids = c.tokenize(["a red circle on a white background", "A GREEN  square", "",
                      "a purple hexagon " + "word " * 40])
    L = p.components.max_length
    assert ids.shape == (4, L) and ids.dtype == torch.int64
    bos, eos = c.tokenizer.bos_token_id, c.tokenizer.eos_token_id
    assert c.tokenizer.pad_token_id == eos  # SD 1.x convention: pad with EOS
    assert ids[0, 0] == bos and ids[0, 8] == eos and (ids[0, 9:] == eos).all()  # 7 words
    words = c.tokenizer.convert_ids_to_tokens(ids[0, 1:8].tolist())
    assert words == "a red circle on a white background".split()
    assert c.tokenizer.convert_ids_to_tokens(ids[1, 1:4].tolist()) == ["a", "green", "square"]  # lower-cased
    assert ids[2, 0] == bos and (ids[2, 1:] == eos).all()  # the empty prompt
    assert ids[3, -1] == eos and c.tokenizer.unk_token_id in ids[3].tolist()  # truncated, unknown words
    ctx = c.encode_text(ids)
    assert ctx.shape == (4, L, p.unet.ctx_dim) and torch.isfinite(ctx).all()
    # deterministic: a second load of the same directory gives the same context
    c2 = load_components(p)
    torch.testing.assert_close(c2.encode_text(ids), ctx)
    # distinct words give distinct embeddings (the UNet can tell colours apart)
    two = c.encode_text(c.tokenize(["a red circle", "a blue circle"]))
    assert (two[0, 2] - two[1, 2]).abs().max() > 1e-3


def test_tokenizer_builder_keeps_vocabulary_order():
    tok = build_tiny_tokenizer(["zebra", "apple"], 6)
    assert tok.convert_tokens_to_ids(["zebra", "apple"]) == [3, 4]
    assert tokenize(tok, ["apple zebra"], 6).tolist() == [[0, 4, 3, 1, 1, 1]]


def test_missing_tiny_build_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="frozen_components"):
        load_components(Profile.tiny(tmp_path))


def test_tiny_components_load_in_a_diffusers_pipeline(tiny_built, tiny_profile, tmp_path):
    """The tokenizer/text encoder/VAE directories load with diffusers' StableDiffusionPipeline.from_pretrained
    (what an exported model does), next to a small diffusers UNet."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    p = tiny_profile(tmp_path / "data")
    install_components(tiny_built, p)
    c = load_components(p)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=p.unet.ctx_dim,
                                attention_head_dim=4, norm_num_groups=32)
    pipe = StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe", safety_checker=None)
    assert loaded.vae.config.scaling_factor == pytest.approx(c.scaling_factor)
    out = loaded("a red circle on a white background", num_inference_steps=2, height=64, width=64,
                 output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()


@pytest.fixture(scope="module")
def sd15_dirs(tmp_path_factory):
    """Randomly initialised AutoencoderKL / CLIPTextModel with the real SD 1.5 component configs, saved with
    save_pretrained (fp16 on disk to halve the write), plus a word-level tokenizer with model_max_length 77."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("sd15-components")
    torch.manual_seed(0)
    AutoencoderKL(**SD_VAE_FT_MSE).half().save_pretrained(root / "vae")
    CLIPTextModel(CLIPTextConfig(**CLIP_VIT_L14_TEXT)).half().save_pretrained(root / "text_encoder")
    build_tiny_tokenizer(S.vocabulary(), 77).save_pretrained(root / "tokenizer")
    return root


def test_sd15_loading_path_from_local_directories(sd15_dirs, tmp_path):
    p = Profile.sd15(tmp_path).with_overrides({"components": {
        "vae": str(sd15_dirs / "vae"), "text_encoder": str(sd15_dirs / "text_encoder"),
        "tokenizer": str(sd15_dirs / "tokenizer")}})
    assert component_sources(p).vae == str(sd15_dirs / "vae")
    c = load_components(p, dtype=torch.float32)
    assert c.scaling_factor == pytest.approx(0.18215) and c.downsample == 8 and c.context_dim == 768
    assert c.param_counts()["vae"] == 83_653_863 and c.param_counts()["text_encoder"] == 123_060_480
    ids = c.tokenize(["a red circle on a white background"])
    assert ids.shape == (1, 77)
    assert c.encode_text(ids).shape == (1, 77, 768)
    # 512 px → 4×64×64 through the loaded VAE's architecture; shapes propagated on the meta device (the
    # numerics at 512 px cost ~1 TFLOP per image on CPU: tests/test_encode.py has that as a slow test)
    vae = c.vae.to("meta")
    z = vae.encode(torch.empty(2, 3, 512, 512, device="meta")).latent_dist.mean
    assert tuple(z.shape) == (2, 4, 64, 64)
    assert tuple(vae.decode(z).sample.shape) == (2, 3, 512, 512)
    assert components_digest(p) != ""  # local directories are fingerprinted


# ------------------------------------------------------------------------- the real CLIP BPE tokenizer
# SD 1.x's prompt from the diffusers docs, as openai/clip-vit-large-patch14's tokenizer encodes it.
ASTRONAUT = "a photograph of an astronaut riding a horse"
ASTRONAUT_IDS = [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]
# Upper case, runs of spaces/tabs/newlines, leading/trailing blanks, punctuation runs, contractions, digits.
MESSY = "  A PHOTOGRAPH\tof an   Astronaut...\n riding a HORSE, isn't it?! 42%  "
# Worked out by `_reference_clip_bpe` below (OpenAI's simple_tokenizer.py algorithm): lower-cased, whitespace
# collapsed, a run of punctuation ("...", "?!") one token, "isn't" -> "isn" "'t", digits one by one.
MESSY_IDS = [49406, 320, 8853, 539, 550, 18376, 678, 6765, 320, 4558, 267, 2923, 713, 585, 2835, 275, 273, 260,
             49407]


@pytest.fixture(scope="module")
def clip_tokenizer_dir(tmp_path_factory):
    """The real tokenizer built once (the wheel comes from the shared cache after the first fetch)."""
    from sd_core.encoding.components import build_clip_tokenizer

    out = tmp_path_factory.mktemp("clip") / "tokenizer"
    build_clip_tokenizer(out)
    return out


def _reference_clip_bpe(text: str) -> list[int]:
    """OpenAI's ``simple_tokenizer.py`` for ASCII text, written independently of transformers/tokenizers: the
    vocabulary from the merges file, the pre-token pattern (ASCII classes for \\p{L} and \\p{N}), greedy
    lowest-rank merges, ``</w>`` on each word's last symbol."""
    import re

    from sd_core.encoding import clip_bpe

    lines = clip_bpe.read_bpe_merges(clip_bpe.fetch_open_clip_wheel())
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    byte_sym = clip_bpe.bytes_to_unicode()
    vocab = list(byte_sym.values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    encoder, ranks = {t: i for i, t in enumerate(vocab)}, {m: i for i, m in enumerate(merges)}

    def bpe(token: str) -> list[str]:
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    text = re.sub(r"\s+", " ", text).strip().lower()
    pattern = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+"
    ids = [encoder["<|startoftext|>"]]
    for tok in re.findall(pattern, text):
        ids += [encoder[t] for t in bpe("".join(byte_sym[b] for b in tok.encode("utf-8")))]
    return ids + [encoder["<|endoftext|>"]]


def test_clip_tokenizer_gives_the_hub_ids_padded_with_eos(clip_tokenizer_dir):
    from transformers import AutoTokenizer

    from sd_core.encoding.components import load_tokenizer

    tok = AutoTokenizer.from_pretrained(clip_tokenizer_dir)
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    assert tok(ASTRONAUT).input_ids == ASTRONAUT_IDS
    # the pipeline's own path: load_tokenizer (AutoTokenizer.from_pretrained(dir)) + tokenize to 77
    ids = tokenize(load_tokenizer(str(clip_tokenizer_dir), 77), [ASTRONAUT, ""], 77)
    assert ids.shape == (2, 77) and ids.dtype == torch.int64
    assert ids[0].tolist() == ASTRONAUT_IDS + [49407] * (77 - len(ASTRONAUT_IDS))
    assert ids[1].tolist() == [49406] + [49407] * 76  # the empty prompt (CFG's unconditional input)
    long_ids = tokenize(tok, [" ".join(["horse"] * 100)], 77)[0].tolist()
    assert len(long_ids) == 77 and long_ids[0] == 49406 and long_ids[-1] == 49407  # truncated, still closed
    assert tok.decode(ASTRONAUT_IDS, skip_special_tokens=True) == ASTRONAUT


def test_clip_tokenizer_lowercases_collapses_whitespace_and_splits_punctuation(clip_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(clip_tokenizer_dir)
    assert _reference_clip_bpe(MESSY) == MESSY_IDS
    assert _reference_clip_bpe(ASTRONAUT) == ASTRONAUT_IDS
    assert tok(MESSY).input_ids == MESSY_IDS
    assert tok.convert_ids_to_tokens(MESSY_IDS[5:8]) == ["astronaut</w>", "...</w>", "riding</w>"]
    assert tok("A  Photograph OF an astronaut riding a HORSE").input_ids == ASTRONAUT_IDS


def test_clip_tokenizer_cli_writes_a_loadable_folder(tmp_path):
    import subprocess
    import sys

    from transformers import AutoTokenizer

    sd = [sys.executable, "-m", "sd_core.cli", "components", "clip-tokenizer"]
    res = subprocess.run([*sd, "--out", str(tmp_path / "tok"), "--max-length", "77"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "49408 tokens" in res.stdout
    assert AutoTokenizer.from_pretrained(tmp_path / "tok")(ASTRONAUT).input_ids == ASTRONAUT_IDS



def test_clip_tokenizer_cli_refuses_to_replace_a_foreign_folder(tmp_path, capsys):
    from sd_core.cli import main

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    assert main(["components", "clip-tokenizer", "--out", str(precious)]) == 1
    err = capsys.readouterr().err
    assert "refusing to replace" in err and str(precious) in err
    assert (precious / "notes.txt").read_text() == "keep me"


def _unreachable_index(monkeypatch) -> None:
    """pip pointed at a closed loopback port, with no config file and no local wheel folders to fall back on."""
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    for var in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"):
        monkeypatch.delenv(var, raising=False)


def test_clip_tokenizer_without_the_index_is_a_clear_error_and_the_cache_avoids_a_second_fetch(
        clip_tokenizer_dir, monkeypatch, tmp_path, capsys):
    from sd_core.cli import main
    from sd_core.encoding import clip_bpe
    from sd_core.encoding.components import build_clip_tokenizer

    cached = clip_bpe.fetch_open_clip_wheel()  # what clip_tokenizer_dir was built from
    _unreachable_index(monkeypatch)
    # the cached wheel is used: no fetch, so no index is needed
    assert build_clip_tokenizer(tmp_path / "again")(ASTRONAUT).input_ids == ASTRONAUT_IDS
    # an empty cache and no index: one line naming what failed, exit status 1, nothing written
    capsys.readouterr()
    assert main(["components", "clip-tokenizer", "--out", str(tmp_path / "tok"),
                 "--cache", str(tmp_path / "empty-cache")]) == 1
    err = capsys.readouterr().err
    assert "could not fetch open_clip_torch from the package index: " in err and "127.0.0.1:9" in err, err
    assert not (tmp_path / "tok").exists() and not list((tmp_path / "empty-cache" / "wheels").glob("*.whl"))
    assert cached.exists()


def test_a_broken_or_altered_cached_wheel_is_refused_by_name(tmp_path):
    import gzip
    import zipfile

    from sd_core.encoding import clip_bpe
    from sd_core.encoding.components import build_clip_tokenizer

    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    broken = wheels / "open_clip_torch-9.9.9-py3-none-any.whl"
    broken.write_bytes(b"not a zip")
    with pytest.raises(clip_bpe.ClipBpeError, match=f"cannot read the cached wheel {broken}.*delete it"):
        build_clip_tokenizer(tmp_path / "tok", cache_dir=tmp_path / "cache")
    with zipfile.ZipFile(broken, "w") as zf:  # a wheel whose merges file was edited: every id would shift
        zf.writestr("open_clip/bpe_simple_vocab_16e6.txt.gz", gzip.compress(b"#version: 0.2\ni n\n"))
    with pytest.raises(clip_bpe.ClipBpeError, match="SHA-256"):
        build_clip_tokenizer(tmp_path / "tok", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "tok").exists()
