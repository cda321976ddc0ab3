"""Jobs: the graph cut into the pieces users run on their own.

Selections go by asset group (the group names are a contract with `sd_assets/assets/*`):
``metadata`` (laion_metadata, filtered_metadata), ``images`` (image_shards), ``components``
(frozen_components), ``encoding`` (latents), ``training`` (unet_checkpoint), ``sampling`` (sample_grid).
"""

import dagster as dg

from sd_assets.partitions import shards

data_job = dg.define_asset_job(
    "data_job", selection=dg.AssetSelection.groups("metadata"),
    description="Bring in the source metadata and filter it into shard parts (registers shard partitions).",
)
shards_job = dg.define_asset_job(
    "shards_job", selection=dg.AssetSelection.groups("images"), partitions_def=shards,
    description="Download one shard's images with img2dataset (one run per shard partition).",
)
components_job = dg.define_asset_job(
    "components_job", selection=dg.AssetSelection.groups("components"),
    description="Build (tiny profile) or resolve (sd15) the frozen VAE, text encoder and tokenizer.",
)
encode_job = dg.define_asset_job(
    "encode_job", selection=dg.AssetSelection.groups("encoding"), partitions_def=shards,
    description="Encode one shard into the latent cache (one run per shard partition).",
)
train_job = dg.define_asset_job(
    "train_job", selection=dg.AssetSelection.groups("training", "sampling"),
    description="Train the UNet on every encoded shard, then render the sample grid.",
)

jobs = [data_job, shards_job, components_job, encode_job, train_job]
