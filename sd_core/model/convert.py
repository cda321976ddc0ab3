"""Weights in and out of our UNet: diffusers ``UNet2DConditionModel`` and original CompVis/``ldm`` checkpoints.

Our module names are CompVis' (``sd_core.model.unet``), so a CompVis checkpoint is a prefix strip away and the
diffusers mapping is diffusers' own ``convert_ldm_unet_checkpoint`` logic, written for any ``UNetConfig``:

    ours (= CompVis model.diffusion_model.*)       diffusers
    time_embed.{0,2}                               time_embedding.linear_{1,2}
    input_blocks.0.0                               conv_in
    input_blocks.{1+i(R+1)+j}.{0,1}                down_blocks.i.{resnets,attentions}.j
    input_blocks.{(i+1)(R+1)}.0.op                 down_blocks.i.downsamplers.0.conv
    middle_block.{0,1,2}                           mid_block.{resnets.0, attentions.0, resnets.1}
    output_blocks.{i(R+1)+j}.{0,1}                 up_blocks.i.{resnets,attentions}.j
    output_blocks.{i(R+1)+R}.{1|2}.conv            up_blocks.i.upsamplers.0.conv  (2 when the level has attention)
    out.{0,2}                                      conv_norm_out, conv_out
    ResBlock in_layers.{0,2} emb_layers.1 out_layers.{0,3} skip_connection
                                                   norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut
    SpatialTransformer internals                   the same names

(R = res_blks, i = level from 0; up block i is the i-th level counted from the deepest.) Every conversion
checks the full key set: unknown or missing keys are a ``StateDictMismatchError`` that lists them, never a
silent ``strict=False``. diffusers is imported lazily, only by the functions that build a diffusers model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from sd_core.config import UNetConfig
from sd_core.model.unet import UNetModel

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import UNet2DConditionModel

_RESBLOCK_TO_DIFFUSERS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile
COMPVIS_PREFIX = "model.diffusion_model."


class StateDictMismatchError(KeyError):
    """A state dict does not have exactly the keys the target model needs."""

    def __init__(self, what: str, missing: list[str], unexpected: list[str]):
        self.missing, self.unexpected = missing, unexpected
        lines = [f"{what}: state dict does not match ({len(missing)} missing, {len(unexpected)} unexpected keys)"]
        if missing:
            lines.append("missing keys: " + ", ".join(missing))
        if unexpected:
            lines.append("unexpected keys: " + ", ".join(unexpected))
        self.message = "\n".join(lines)
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return self.message


# --------------------------------------------------------------------------------------- key mapping
def _module_map(config: UNetConfig) -> list[tuple[str, str, bool]]:
    """(our module prefix, diffusers module prefix, is_resblock) for every mapped module of `config`."""
    R, L = config.res_blks, len(config.ch_mults)
    m: list[tuple[str, str, bool]] = [
        ("time_embed.0", "time_embedding.linear_1", False),
        ("time_embed.2", "time_embedding.linear_2", False),
        ("input_blocks.0.0", "conv_in", False),
        ("middle_block.0", "mid_block.resnets.0", True),
        ("middle_block.1", "mid_block.attentions.0", False),
        ("middle_block.2", "mid_block.resnets.1", True),
        ("out.0", "conv_norm_out", False),
        ("out.2", "conv_out", False),
    ]
    for i in range(L):
        attn = (i + 1) in config.attn_lvls
        for j in range(R):
            n = 1 + i * (R + 1) + j
            m.append((f"input_blocks.{n}.0", f"down_blocks.{i}.resnets.{j}", True))
            if attn:
                m.append((f"input_blocks.{n}.1", f"down_blocks.{i}.attentions.{j}", False))
        if i < L - 1:
            m.append((f"input_blocks.{(i + 1) * (R + 1)}.0.op", f"down_blocks.{i}.downsamplers.0.conv", False))
    for i in range(L):  # up block i = level L-1-i (0-based)
        attn = (L - i) in config.attn_lvls
        for j in range(R + 1):
            n = i * (R + 1) + j
            m.append((f"output_blocks.{n}.0", f"up_blocks.{i}.resnets.{j}", True))
            if attn:
                m.append((f"output_blocks.{n}.1", f"up_blocks.{i}.attentions.{j}", False))
        if i < L - 1:
            n = i * (R + 1) + R
            m.append((f"output_blocks.{n}.{2 if attn else 1}.conv", f"up_blocks.{i}.upsamplers.0.conv", False))
    return m


def _expected_keys(config: UNetConfig) -> list[str]:
    with torch.device("meta"):
        return list(UNetModel(config).state_dict())


def _key_map(config: UNetConfig) -> dict[str, str]:
    """Our state-dict key -> diffusers state-dict key, for every key of ``UNetModel(config)``."""
    modules = sorted(_module_map(config), key=lambda e: -len(e[0]))  # longest prefix first
    out: dict[str, str] = {}
    for key in _expected_keys(config):
        for ours, theirs, is_res in modules:
            if key.startswith(ours + "."):
                rest = key[len(ours) + 1 :]
                if is_res:
                    for a, b in _RESBLOCK_TO_DIFFUSERS.items():
                        if rest.startswith(a + "."):
                            rest = b + rest[len(a) :]
                            break
                    else:  # pragma: no cover - guards the table against unet.py changes
                        raise AssertionError(f"no diffusers name for ResBlock key {key}")
                out[key] = f"{theirs}.{rest}"
                break
        else:  # pragma: no cover
            raise AssertionError(f"no diffusers name for {key}")
    return out


def _remap(sd: Mapping[str, torch.Tensor], mapping: dict[str, str], what: str) -> dict[str, torch.Tensor]:
    missing = sorted(set(mapping) - set(sd))
    unexpected = sorted(set(sd) - set(mapping))
    if missing or unexpected:
        raise StateDictMismatchError(what, missing, unexpected)
    return {mapping[k]: sd[k] for k in mapping}


def unet_state_dict_to_diffusers(sd: Mapping[str, torch.Tensor], config: UNetConfig) -> dict[str, torch.Tensor]:
    """Our (= CompVis) UNet state dict -> diffusers ``UNet2DConditionModel`` state dict. Tensors are shared."""
    return _remap(sd, _key_map(config), "our UNet -> diffusers")


def unet_state_dict_from_diffusers(sd: Mapping[str, torch.Tensor], config: UNetConfig) -> dict[str, torch.Tensor]:
    """diffusers ``UNet2DConditionModel`` state dict -> our UNet state dict. Tensors are shared."""
    inverse = {v: k for k, v in _key_map(config).items()}
    return _remap(sd, inverse, "diffusers -> our UNet")


def strip_wrapper_prefixes(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Drop DDP/DataParallel (``module.``) and torch.compile (``_orig_mod.``) prefixes, in any nesting."""
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in WRAPPER_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p) :], True
        out[k] = v
    return out


# ----------------------------------------------------------------------------------------- diffusers
def diffusers_config(config: UNetConfig, sample_size: int = 64) -> dict[str, Any]:
    """The ``UNet2DConditionModel`` config equivalent to our ``UNetConfig`` (SD 1.x conventions)."""
    L = len(config.ch_mults)
    attn = [(i + 1) in config.attn_lvls for i in range(L)]
    return dict(
        sample_size=sample_size,
        in_channels=config.in_ch,
        out_channels=config.out_ch,
        center_input_sample=False,
        flip_sin_to_cos=True,
        freq_shift=0,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        only_cross_attention=False,
        block_out_channels=tuple(config.ch * m for m in config.ch_mults),
        layers_per_block=config.res_blks,
        downsample_padding=1,
        mid_block_scale_factor=1,
        dropout=config.dropout,
        act_fn="silu",
        norm_num_groups=config.norm_groups,
        norm_eps=1e-5,
        cross_attention_dim=config.ctx_dim,
        transformer_layers_per_block=config.transformer_depth,
        attention_head_dim=config.heads,  # in SD 1.x configs this field is the number of heads
        use_linear_projection=False,
        upcast_attention=False,
        resnet_time_scale_shift="default",
        time_embedding_type="positional",
        conv_in_kernel=3,
        conv_out_kernel=3,
    )


# What from_diffusers supports: every field that changes the architecture or the maths, with the value our
# UNet implements. Fields not listed (sample_size, upcast_attention, ...) do not change fp32 outputs.
_REQUIRED_DIFFUSERS_FIELDS: dict[str, Any] = {
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_eps": 1e-5,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "use_linear_projection": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_time_embed_dim": None,
    "reverse_transformer_layers_per_block": None,
}


def _single(value: Any, name: str, problems: list[str]) -> Any:
    """A per-block list/tuple whose entries are all equal -> that entry; otherwise record a problem."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            problems.append(f"{name}={list(value)} (per-block values must all be equal)")
            return value[0] if value else None
        return value[0]
    return value


def unet_config_from_diffusers(dconfig: Mapping[str, Any]) -> UNetConfig:
    """Our ``UNetConfig`` for a diffusers ``UNet2DConditionModel`` config, or a ``ValueError`` listing every
    setting our UNet does not implement."""
    problems = [
        f"{k}={dconfig.get(k, v)!r} (supported: {v!r})"
        for k, v in _REQUIRED_DIFFUSERS_FIELDS.items()
        if dconfig.get(k, v) != v and not (v is None and dconfig.get(k) in (False,))
    ]
    down, up = list(dconfig["down_block_types"]), list(dconfig["up_block_types"])
    down_ok = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
    if any(b not in down_ok for b in down):
        problems.append(f"down_block_types={down} (supported: CrossAttnDownBlock2D, DownBlock2D)")
    elif up != [down_ok[b] for b in reversed(down)]:
        problems.append(f"up_block_types={up} (must mirror down_block_types={down})")
    widths = list(dconfig["block_out_channels"])
    ch = widths[0]
    if any(w % ch for w in widths):
        problems.append(f"block_out_channels={widths} (each must be a multiple of the first)")
    heads = dconfig.get("num_attention_heads") or dconfig["attention_head_dim"]
    heads = _single(heads, "num_attention_heads/attention_head_dim", problems)
    res_blks = _single(dconfig["layers_per_block"], "layers_per_block", problems)
    depth = _single(dconfig.get("transformer_layers_per_block", 1), "transformer_layers_per_block", problems)
    ctx_dim = _single(dconfig["cross_attention_dim"], "cross_attention_dim", problems)
    if problems:
        raise ValueError("diffusers UNet config not supported by sd_core.model.unet.UNetModel: " + "; ".join(problems))
    return UNetConfig(
        in_ch=dconfig["in_channels"],
        out_ch=dconfig["out_channels"],
        ch=ch,
        res_blks=int(res_blks),
        attn_lvls=tuple(i + 1 for i, b in enumerate(down) if b == "CrossAttnDownBlock2D"),
        ch_mults=tuple(w // ch for w in widths),
        heads=int(heads),
        ctx_dim=int(ctx_dim),
        transformer_depth=int(depth),
        norm_groups=dconfig["norm_num_groups"],
        dropout=float(dconfig.get("dropout", 0.0)),
    )


def to_diffusers(unet: UNetModel, sample_size: int = 64) -> "UNet2DConditionModel":
    """A diffusers ``UNet2DConditionModel`` with our UNet's config and a copy of its weights (same dtype and
    device). ``sample_size`` (latent px) is only the default resolution diffusers pipelines use."""
    from diffusers import UNet2DConditionModel

    sd = unet_state_dict_to_diffusers(unet.state_dict(), unet.config)
    with torch.device("meta"):
        model = UNet2DConditionModel(**diffusers_config(unet.config, sample_size))
    # assign=True: the parameters become the copies, so they keep our dtype and device
    model.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=True, assign=True)
    return model.train(unet.training)


def from_diffusers(model: "UNet2DConditionModel") -> UNetModel:
    """Our ``UNetModel`` with the config derived from ``model.config`` (``ValueError`` if unsupported) and a
    copy of its weights (same dtype and device)."""
    config = unet_config_from_diffusers(dict(model.config))
    sd = unet_state_dict_from_diffusers(model.state_dict(), config)
    return _build(config, sd).train(model.training)


def _build(config: UNetConfig, sd: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> UNetModel:
    """A UNetModel whose parameters are copies of `sd` (same device; their dtype unless `dtype` is given)."""
    with torch.device("meta"):
        unet = UNetModel(config)
    unet.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=True, assign=True)
    return unet if dtype is None else unet.to(dtype=dtype)


# ------------------------------------------------------------------------------------------- CompVis
def load_compvis_state_dict(
    sd: Mapping[str, Any], config: UNetConfig | None = None, use_ema: bool = False
) -> dict[str, torch.Tensor]:
    """Our UNet state dict from an original CompVis/``ldm`` checkpoint (or any state dict of our UNet).

    Accepts a whole LDM checkpoint (``{"state_dict": ...}`` or its contents: the ``model.diffusion_model.*``
    keys are taken and the VAE/text encoder/EMA entries ignored), or UNet-only keys without that prefix, with
    or without ``module.``/``_orig_mod.`` wrapper prefixes. ``use_ema`` takes CompVis' EMA copy
    (``model_ema.diffusion_model<key without dots>``) instead. The result is checked against ``config``
    (default SD 1.5): missing or unknown UNet keys are a ``StateDictMismatchError`` listing them.
    """
    config = config or UNetConfig.sd15()
    if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    sd = strip_wrapper_prefixes(sd)
    expected = _expected_keys(config)
    if use_ema:
        ema = {k: "model_ema.diffusion_model" + k.replace(".", "") for k in expected}
        missing = sorted(v for v in ema.values() if v not in sd)
        if missing:
            raise StateDictMismatchError("CompVis checkpoint EMA weights", missing, [])
        return {k: sd[v] for k, v in ema.items()}
    if any(k.startswith(COMPVIS_PREFIX) for k in sd):
        sd = {k[len(COMPVIS_PREFIX) :]: v for k, v in sd.items() if k.startswith(COMPVIS_PREFIX)}
    return _remap(sd, {k: k for k in expected}, "CompVis checkpoint -> our UNet")


def from_compvis(
    sd: Mapping[str, Any], config: UNetConfig | None = None, use_ema: bool = False, dtype: torch.dtype | None = None
) -> UNetModel:
    """Our ``UNetModel`` holding a CompVis/``ldm`` checkpoint's UNet (see ``load_compvis_state_dict``)."""
    config = config or UNetConfig.sd15()
    return _build(config, load_compvis_state_dict(sd, config, use_ema), dtype)


def to_compvis_state_dict(unet: UNetModel) -> dict[str, torch.Tensor]:
    """Our weights under CompVis' ``model.diffusion_model.*`` keys (what ``ldm`` checkpoints hold)."""
    return {COMPVIS_PREFIX + k: v for k, v in unet.state_dict().items()}
