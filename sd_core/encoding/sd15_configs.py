"""The architecture configs of SD 1.x's frozen components, written out so they can be built without a hub.

Copied from the hub repos' ``config.json`` files (architecture fields only; no weights):

- `SD_VAE_FT_MSE`: ``stabilityai/sd-vae-ft-mse`` (diffusers ``AutoencoderKL``, 83,653,863 parameters;
  512 px → 4×64×64; ``scaling_factor`` 0.18215 is diffusers' default for it, spelled out here).
- `CLIP_VIT_L14_TEXT`: the ``text_config`` of ``openai/clip-vit-large-patch14`` (transformers
  ``CLIPTextModel``, 123,060,480 parameters, 77 positions, hidden 768 = SD 1.x's ``ctx_dim``). Its
  ``eos_token_id`` 2 is the hub's historic value: with it, ``CLIPTextModel`` pools at the highest id in each
  row, which with the real tokenizer is ``<|endoftext|>`` (49407), as in the original model.

`sd_core.encoding.components.build_sd15_random_components` instantiates both with random weights: the
production loading path, shapes and costs without the production weights (the sd15 smoke run).
"""

from __future__ import annotations

from typing import Any

SD_VAE_FT_MSE: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": 0.18215,
}

CLIP_VIT_L14_TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
