"""Jobs: the graph cut into the pieces users run on their own.

Selections go by asset group (the group names are a contract with `sd_assets/assets/*`):
``metadata`` (laion_metadata, filtered_metadata), ``images`` (image_shards), ``components``
(frozen_components), ``encoding`` (latents), ``training`` (unet_checkpoint), ``sampling`` (sample_grid), ``evaluation``
(checkpoint_eval).
"""

import dagster as dg

from sd_assets.partitions import shards


def _group_job(name: str, *groups: str, description: str, per_shard: bool = False):
    """A job over whole asset groups; ``per_shard``: one run per `shards` partition."""
    return dg.define_asset_job(name, selection=dg.AssetSelection.groups(*groups),
                               partitions_def=shards if per_shard else None, description=description)


data_job = _group_job(
    "data_job", "metadata",
    description="Bring in the source metadata and filter it into shard parts (registers shard partitions).")
shards_job = _group_job(
    "shards_job", "images", per_shard=True,
    description="Download one shard's images with img2dataset (one run per shard partition).")
components_job = _group_job(
    "components_job", "components",
    description="Build (tiny profile) or resolve (sd15) the frozen VAE, text encoder and tokenizer.")
encode_job = _group_job(
    "encode_job", "encoding", per_shard=True,
    description="Encode one shard into the latent cache (one run per shard partition).")
train_job = _group_job(
    "train_job", "training", "sampling", "evaluation",
    description="Train the UNet on every encoded shard, then render the sample grid and score every new checkpoint.")
eval_job = _group_job(
    "eval_job", "evaluation",
    description="Score the latest run's checkpoints not yet scored (checkpoint_eval), without training.")

jobs = [data_job, shards_job, components_job, encode_job, train_job, eval_job]
