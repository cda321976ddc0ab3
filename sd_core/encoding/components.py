"""The frozen components: VAE, CLIP text encoder and tokenizer, loaded one way for every profile.

``load_components(profile)`` resolves three sources (a hub id or a local directory each) and loads them with
``AutoencoderKL.from_pretrained`` (diffusers), ``CLIPTextModel.from_pretrained`` and
``AutoTokenizer.from_pretrained`` (transformers). Production defaults (`ComponentsConfig`):
``stabilityai/sd-vae-ft-mse`` and ``openai/clip-vit-large-patch14``. Everything comes back frozen
(``requires_grad_(False)``, ``eval()``); the latent scaling factor is read from the VAE config (0.18215 for
SD 1.x).

The ``tiny`` profile (``components.build_tiny``) first builds its components into
``{data_root}/components/{vae,text_encoder,tokenizer}`` with `build_tiny_components` (the
`frozen_components` asset does this) and then loads them from there through the same code:

- tokenizer: a word-level ``tokenizers`` model over the synthetic captions' vocabulary
  (`sd_core.data.synthetic.vocabulary`), wrapped in ``PreTrainedTokenizerFast`` with CLIP's special tokens
  (``<|startoftext|>`` / ``<|endoftext|>``, padding with ``<|endoftext|>`` like SD 1.x);
- text encoder: a small ``CLIPTextModel`` (hidden = the UNet's ``ctx_dim``, seeded random weights, frozen as
  in the measured baseline of DESIGN.md section 4);
- VAE: a small ``AutoencoderKL`` (64 px → 4×8×8) fitted on synthetic renders (`sd_core.encoding.vae_fit`), with the
  config's ``scaling_factor`` set to 1 / (latent std) measured after fitting, as SD did.

The build goes to a temporary directory next to the target and is renamed into place, so a killed build
never leaves a half-written ``components/``. ``build.json`` records the build settings, the fit's
PSNR and colour fidelity, and a digest of the weights.

Without the hub, for the sd15 path (``sd components ...``, `sd_core.encoding.components_cli`):
`build_clip_tokenizer` writes the real CLIP BPE tokenizer (SD 1.x's ids) from the merges file in the
``open_clip_torch`` wheel (`sd_core.encoding.clip_bpe`); `build_sd15_random_components` writes sd-vae-ft-mse-
and CLIP ViT-L/14-shaped models with random weights (`sd_core.encoding.sd15_configs`) next to it, what
configs/sd15-smoke.yaml loads through the same ``from_pretrained(dir)`` path as the hub ids.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from sd_core.atomic import atomic_dir
from sd_core.config import Profile
from sd_core.encoding import vae_fit
from sd_core.encoding.shipped_vae import ShippedFit, load_shipped_weights, shipped_fit_for, vae_fit_settings
from sd_core.encoding.versions import (BUILD_FILE, ComponentSources, component_sources, read_build_info,
                                       tiny_build_settings)
from sd_core.machine import cpu_model

BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<|unk|>"


# -------------------------------------------------------------------------------------------- loading
def vae_downsampling(block_out_channels: Sequence[int]) -> int:
    """Pixel → latent side ratio of an ``AutoencoderKL`` with these block widths: it halves the side between
    consecutive blocks (SD's four blocks: 8; the tiny VAE's four: 64 px → 8×8)."""
    return 2 ** (len(block_out_channels) - 1)


@dataclass
class FrozenComponents:
    """The loaded, frozen VAE / text encoder / tokenizer and the helpers every stage uses."""

    vae: Any  # diffusers.AutoencoderKL
    text_encoder: Any  # transformers.CLIPTextModel
    tokenizer: Any  # a transformers tokenizer
    sources: ComponentSources
    max_length: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def downsample(self) -> int:
        """Pixel → latent side ratio (8 for SD's VAE)."""
        return vae_downsampling(self.vae.config.block_out_channels)

    @property
    def context_dim(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return tokenize(self.tokenizer, texts, self.max_length)

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        return encode_text(self.text_encoder, token_ids)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] → scaled latents (B, 4, H/f, W/f): the posterior *mean* × scaling factor
        (deterministic; SD samples the posterior, whose std is tiny for a KL-1e-6 VAE)."""
        x = pixels.to(self.device, self.vae.dtype)
        return self.vae.encode(x).latent_dist.mean * self.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → images in [-1, 1] (not clamped)."""
        z = latents.to(self.device, self.vae.dtype) / self.scaling_factor
        return self.vae.decode(z).sample

    def param_counts(self) -> dict[str, int]:
        return {"vae": sum(p.numel() for p in self.vae.parameters()),
                "text_encoder": sum(p.numel() for p in self.text_encoder.parameters())}


def _freeze(m: torch.nn.Module) -> torch.nn.Module:
    m.requires_grad_(False)
    m.eval()
    return m


def load_vae(source: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(source, torch_dtype=dtype) if dtype else AutoencoderKL.from_pretrained(source)
    return _freeze(vae.to(device))


def load_text_encoder(source: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    from transformers import CLIPTextModel

    kw = {"dtype": dtype} if dtype else {}
    te = CLIPTextModel.from_pretrained(source, **kw)
    return _freeze(te.to(device))


def load_tokenizer(source: str, max_length: int | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source)
    if max_length is not None and (tok.model_max_length is None or tok.model_max_length > 10**6):
        tok.model_max_length = max_length
    return tok


def load_components(profile: Profile, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    *, text_encoder: bool = True) -> FrozenComponents:
    """Load the profile's frozen components (tiny: from its built directory; see module docstring).

    ``text_encoder=False`` skips the text model (encoding needs only the VAE and the tokenizer).
    """
    src = component_sources(profile)
    if profile.components.build_tiny and not (profile.components_dir / BUILD_FILE).exists():
        raise FileNotFoundError(
            f"tiny components not built under {profile.components_dir}: materialise the `frozen_components` "
            "asset first (or call sd_core.encoding.components.build_tiny_components)")
    dev = torch.device(device)
    vae = load_vae(src.vae, dev, dtype)
    te = load_text_encoder(src.text_encoder, dev, dtype) if text_encoder else None
    tok = load_tokenizer(src.tokenizer, profile.components.max_length)
    return FrozenComponents(vae, te, tok, src, profile.components.max_length, dev)


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> torch.Tensor:
    """Captions → (B, max_length) int64 token ids: BOS, tokens, EOS, padded (with EOS for CLIP) and
    truncated to ``max_length``."""
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt")
    return enc["input_ids"].long()


@torch.no_grad()
def encode_text(text_encoder, token_ids: torch.Tensor) -> torch.Tensor:
    """Token ids → (B, L, D) context: the text encoder's last hidden state (SD 1.x convention)."""
    dev = next(text_encoder.parameters()).device
    return text_encoder(token_ids.to(dev)).last_hidden_state


# ----------------------------------------------------------------------------------------- tiny build
def build_tiny_tokenizer(words: Sequence[str], max_length: int):
    """A word-level fast tokenizer: lower-cased, split on whitespace and punctuation, unknown words →
    ``<|unk|>``, wrapped as BOS … EOS and padded with EOS (CLIP's convention). ids: BOS 0, EOS 1, UNK 2,
    then the words in the given order."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {BOS: 0, EOS: 1, UNK: 2}
    for w in words:
        vocab.setdefault(w.lower(), len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tk.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single=f"{BOS} $A {EOS}", special_tokens=[(BOS, 0), (EOS, 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=EOS,
                                   model_max_length=max_length, padding_side="right", truncation_side="right")


def build_tiny_text_encoder(vocab_size: int, hidden: int, layers: int, heads: int, max_length: int, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden,
                         projection_dim=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         max_position_embeddings=max_length, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(seed)
    return CLIPTextModel(cfg).eval()


def tiny_vae_config(channels: Sequence[int], layers_per_block: int, image_size: int,
                    norm_groups: int = 1) -> dict[str, Any]:
    n = len(channels)
    return dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=list(channels),
                layers_per_block=layers_per_block, latent_channels=4, norm_num_groups=norm_groups,
                sample_size=image_size, scaling_factor=1.0)


def build_tiny_vae(channels: Sequence[int], layers_per_block: int, image_size: int, seed: int,
                   norm_groups: int = 1):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**tiny_vae_config(channels, layers_per_block, image_size, norm_groups))
    # Start the posterior narrow (std e^-4 ≈ 0.02 instead of 1) so the sampled training latents are not mostly
    # noise at the start; the KL term (weight 1e-6) barely moves it. See sd_core.encoding.vae_fit for what mattered.
    with torch.no_grad():
        lc = vae.config.latent_channels
        vae.quant_conv.bias[lc:] = -8.0
    return vae


def _dir_digest(d: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(d.rglob("*")):
        if f.is_file() and f.name != BUILD_FILE:
            h.update(f.relative_to(d).as_posix().encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def build_tiny_components(profile: Profile, *, force: bool = False,
                          log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Build the tiny profile's tokenizer, text encoder and fitted VAE into ``profile.components_dir``.

    Reuses an existing build whose settings match (returns its build.json) unless ``force``. Returns the
    build info: settings, sources, parameter counts, VAE fit steps/seconds, reconstruction PSNR and colour
    fidelity on held-out renders, the measured scaling factor and a digest of the weights.
    """
    c = profile.components
    settings = tiny_build_settings(profile)
    info = read_build_info(profile.components_dir)
    if info and not force and info.get("settings") == settings:
        return info

    log = log or (lambda s: None)
    t0 = time.perf_counter()
    tok = build_tiny_tokenizer(settings["vocabulary"], c.max_length)
    te = build_tiny_text_encoder(len(tok), profile.unet.ctx_dim, c.tiny_text_layers, c.tiny_text_heads,
                                 c.max_length, c.seed)
    vae = build_tiny_vae(c.tiny_vae_channels, c.tiny_vae_layers_per_block, profile.encode.resolution, c.seed,
                         c.tiny_vae_norm_groups)
    shipped = shipped_fit_for(profile)
    fit, report, std = _fit_and_scale_vae(vae, profile, log, shipped)
    info = {
        "profile": profile.name,
        "settings": settings,
        "params": {"vae": sum(p.numel() for p in vae.parameters()),
                   "text_encoder": sum(p.numel() for p in te.parameters())},
        "vocab_size": len(tok),
        "fit": {**_fit_record(fit, c.vae_fit_batch_size), "source": "shipped" if shipped else "fitted here"},
        "reconstruction": asdict(report),
        "latent_std_unscaled": std,
        "scaling_factor": float(vae.config.scaling_factor),
    }
    with atomic_dir(profile.components_dir) as tmp:
        tok.save_pretrained(tmp / "tokenizer")
        te.save_pretrained(tmp / "text_encoder")
        vae.save_pretrained(tmp / "vae")
        info.update(digest=_dir_digest(tmp), build_seconds=round(time.perf_counter() - t0, 1), built_at=time.time())
        with open(tmp / BUILD_FILE, "w") as f:
            json.dump(info, f, indent=1, sort_keys=True)
    return info


def _fit_record(fit: vae_fit.FitResult, batch_size: int) -> dict[str, Any]:
    """The fit as build.json and fit.json record it."""
    return {"steps": fit.steps, "seconds": round(fit.seconds, 1), "final_loss": fit.final_loss, "batch_size": batch_size}


def _fit_and_scale_vae(vae: Any, profile: Profile, log: Callable[[str], None],
                       shipped: ShippedFit | None) -> tuple[vae_fit.FitResult, vae_fit.ColourReport, float]:
    """Fit the tiny VAE (`sd_core.encoding.vae_fit`), then, on held-out renders, set its scaling factor to
    1 / latent std (as SD did) and measure its colour fidelity. Returns (fit result, colour report, latent std).
    With ``shipped`` (the repository's fit of exactly these settings, `sd_core.encoding.shipped_vae`), its weights
    and recorded measurements are used instead."""
    if shipped is not None:
        load_shipped_weights(vae, shipped)
        log(f"tiny VAE: the shipped fit of these settings ({shipped.fit['steps']} steps on {shipped.fitted_on}, "
            f"PSNR {shipped.reconstruction['psnr']:.2f} dB; components.vae_shipped_fit: false fits here)")
        fit = vae_fit.FitResult(int(shipped.fit["steps"]), 0.0, float(shipped.fit["final_loss"]), [])
        return fit, vae_fit.ColourReport(**shipped.reconstruction), shipped.latent_std_unscaled
    c = profile.components
    log(f"fitting the tiny VAE ({sum(p.numel() for p in vae.parameters()):,} params) for "
        f"{c.vae_fit_steps} steps of {c.vae_fit_batch_size} images")
    fit = vae_fit.fit_tiny_vae(vae, c.vae_fit_steps, size=profile.encode.resolution,
                               batch_size=c.vae_fit_batch_size, lr=c.vae_fit_lr, seed=c.seed, log=log)
    held_out = vae_fit.synthetic_batch(192, profile.encode.resolution, random.Random(c.seed + 10_007))
    std = vae_fit.latent_std(vae, held_out.images)
    scaling = 1.0 / max(std, 1e-6)
    vae.register_to_config(scaling_factor=float(round(scaling, 6)))
    report = vae_fit.colour_report(held_out, vae_fit.reconstruct(vae, held_out.images))
    log(f"tiny VAE: {fit.steps} steps in {fit.seconds:.0f}s, PSNR {report.psnr:.2f} dB, colour accuracy "
        f"{report.colour_accuracy:.3f}, scaling factor {scaling:.4f}")
    return fit, report, std


def fit_tiny_vae_for_shipping(profile: Profile, log: Callable[[str], None] | None = print) -> tuple[Any, ShippedFit]:
    """Fit the tiny VAE of ``profile``'s settings here (never the shipped weights) and return it with the
    `ShippedFit` record that `sd_core.encoding.shipped_vae.write_shipped_fit` stores beside it."""
    c = profile.components
    vae = build_tiny_vae(c.tiny_vae_channels, c.tiny_vae_layers_per_block, profile.encode.resolution, c.seed,
                         c.tiny_vae_norm_groups)
    fit, report, std = _fit_and_scale_vae(vae, profile, log or (lambda s: None), shipped=None)
    record = ShippedFit(settings=vae_fit_settings(profile), reconstruction=asdict(report),
                        fit=_fit_record(fit, c.vae_fit_batch_size),
                        latent_std_unscaled=std, scaling_factor=float(vae.config.scaling_factor),
                        fitted_on=cpu_model(), params={"vae": sum(p.numel() for p in vae.parameters())})
    return vae, record


# ------------------------------------------------------------------------------- pretrained sources
def _config_params(cfg: dict[str, Any], cls_name: str) -> int:
    """Parameter count of a model from its config alone (instantiated on the meta device)."""
    import torch

    with torch.device("meta"):
        if cls_name == "vae":
            from diffusers import AutoencoderKL

            m = AutoencoderKL.from_config(cfg)
        else:
            from transformers import CLIPTextConfig, CLIPTextModel

            m = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in cfg.items() if not k.startswith("_")}))
    return sum(p.numel() for p in m.parameters())


def describe_pretrained(p: Profile) -> tuple[dict[str, Any], str]:
    """sd15 (or any pretrained source): read the configs (hub id or local dir; no weights are loaded),
    check they fit the profile (a ``ValueError`` listing every mismatch), count parameters.
    Returns (a description of plain values, a version digest of the sources and their configs)."""
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, CLIPTextConfig

    src = component_sources(p)
    vae_cfg = dict(AutoencoderKL.load_config(src.vae))
    te_cfg = CLIPTextConfig.from_pretrained(src.text_encoder).to_dict()
    tok = AutoTokenizer.from_pretrained(src.tokenizer)
    problems = []
    if vae_cfg.get("latent_channels") != p.unet.in_ch:
        problems.append(f"VAE latent_channels {vae_cfg.get('latent_channels')} != UNet in_ch {p.unet.in_ch}")
    if te_cfg.get("hidden_size") != p.unet.ctx_dim:
        problems.append(f"text encoder hidden_size {te_cfg.get('hidden_size')} != UNet ctx_dim {p.unet.ctx_dim}")
    if te_cfg.get("max_position_embeddings", 0) < p.components.max_length:
        problems.append(f"text encoder max_position_embeddings {te_cfg.get('max_position_embeddings')} < "
                        f"max_length {p.components.max_length}")
    if problems:
        raise ValueError("components do not fit the profile: " + "; ".join(problems))
    meta = {
        "vae": src.vae, "text_encoder": src.text_encoder, "tokenizer": src.tokenizer,
        "vae_params": _config_params(vae_cfg, "vae"),
        "text_encoder_params": _config_params(te_cfg, "te"),
        "scaling_factor": float(vae_cfg.get("scaling_factor", 0.18215)),
        "latent_shape": [vae_cfg["latent_channels"]] + [
            p.encode.resolution // vae_downsampling(vae_cfg["block_out_channels"])] * 2,
        "context_shape": [p.components.max_length, te_cfg["hidden_size"]],
        "vocab_size": len(tok),
    }
    version = hashlib.sha256(json.dumps([src.vae, src.text_encoder, src.tokenizer, vae_cfg, te_cfg],
                                        sort_keys=True, default=str).encode()).hexdigest()[:16]
    return meta, version


# ------------------------------------------------------------------- the real CLIP tokenizer, offline
SD15_RANDOM_FILE = "sd15-random.json"


def _refuse_foreign_dir(out_dir: Path, marker: str, what: str) -> None:
    """Building replaces ``out_dir`` as a whole: refuse a non-empty folder that is not an earlier build (no
    ``marker`` file), so ``--out .`` or a typo never deletes someone's files."""
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / marker).exists())):
        raise ValueError(f"{out_dir} exists and is not {what} (no {marker}): refusing to replace it; "
                         "choose a new or empty folder")


def build_clip_tokenizer(out_dir: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None,
                         max_length: int = 77):
    """The real CLIP BPE tokenizer (the ids of ``openai/clip-vit-large-patch14``), built offline from the
    merges file in the ``open_clip_torch`` wheel (`sd_core.encoding.clip_bpe`; the wheel is cached in
    ``cache_dir``), saved with ``save_pretrained`` into ``out_dir`` (atomically) and returned as
    ``AutoTokenizer.from_pretrained(out_dir)`` loads it: lower-cased, BOS … EOS, padded with EOS (49407),
    ``model_max_length`` = ``max_length``. Raises `clip_bpe.ClipBpeError` when the wheel cannot be fetched or
    read, ``ValueError`` for an ``out_dir`` that holds something else."""
    from transformers import AutoTokenizer, CLIPTokenizer

    from sd_core.encoding import clip_bpe

    out = Path(out_dir)
    _refuse_foreign_dir(out, "tokenizer_config.json", "a tokenizer folder")
    vocab, merges = clip_bpe.clip_vocab_and_merges(clip_bpe.read_bpe_merges(clip_bpe.fetch_open_clip_wheel(cache_dir)))
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    with atomic_dir(out) as tmp:
        tok.save_pretrained(tmp)
    return AutoTokenizer.from_pretrained(out)


def build_sd15_random_components(out_dir: str | os.PathLike[str], *, seed: int = 0,
                                 cache_dir: str | os.PathLike[str] | None = None,
                                 log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """SD 1.x-shaped frozen components with random weights, for running the sd15 path without the hub:
    ``out_dir/vae`` (``AutoencoderKL`` with sd-vae-ft-mse's config), ``out_dir/text_encoder``
    (``CLIPTextModel`` with CLIP ViT-L/14's text config; configs in `sd_core.encoding.sd15_configs`), both
    seeded and saved in fp32 like the hub's, and ``out_dir/tokenizer`` (the real BPE tokenizer,
    `build_clip_tokenizer`, 77 tokens). Point ``components.{vae,text_encoder,tokenizer}`` at them
    (configs/sd15-smoke.yaml). An earlier build with the same seed is reused; returns the ``sd15-random.json``
    record (seed, parameter counts)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from sd_core.encoding.sd15_configs import CLIP_VIT_L14_TEXT, SD_VAE_FT_MSE

    out, log = Path(out_dir), log or (lambda s: None)
    _refuse_foreign_dir(out, SD15_RANDOM_FILE, "an sd15-random components folder")
    record = {"format": 1, "seed": seed, "vae_config": SD_VAE_FT_MSE, "text_encoder_config": CLIP_VIT_L14_TEXT}
    if (out / SD15_RANDOM_FILE).exists():
        old = json.loads((out / SD15_RANDOM_FILE).read_text())
        if {k: old.get(k) for k in record} == record:
            return old
    with atomic_dir(out) as tmp:
        max_length = CLIP_VIT_L14_TEXT["max_position_embeddings"]
        build_clip_tokenizer(tmp / "tokenizer", cache_dir=cache_dir, max_length=max_length)
        torch.manual_seed(seed)
        vae = AutoencoderKL(**SD_VAE_FT_MSE)
        te = CLIPTextModel(CLIPTextConfig(**CLIP_VIT_L14_TEXT))
        record["params"] = {"vae": sum(p.numel() for p in vae.parameters()),
                            "text_encoder": sum(p.numel() for p in te.parameters())}
        log(f"saving a random AutoencoderKL ({record['params']['vae']:,} params) and CLIPTextModel "
            f"({record['params']['text_encoder']:,} params) under {out}")
        vae.save_pretrained(tmp / "vae")
        te.save_pretrained(tmp / "text_encoder")
        (tmp / SD15_RANDOM_FILE).write_text(json.dumps(record, indent=1, sort_keys=True))
    return record
