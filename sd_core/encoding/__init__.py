"""The encoding stage: images to latents through the frozen components.

- `components`: the frozen VAE, text encoder and tokenizer, loaded one way for every profile (and the tiny
  profile's locally built ones).
- `vae_fit`: fitting the tiny profile's VAE on the synthetic shapes.
- `encode`: one image shard → its latents, with decode workers and one process per GPU.
- `latent_cache`: the memory-mapped per-shard latent cache and the dataset the trainer reads.
"""
