"""The encoding stage: images to latents through the frozen components.

- `components`: the frozen VAE, text encoder and tokenizer, loaded one way for every profile (and the tiny
  profile's locally built ones).
- `vae_fit`: fitting the tiny profile's VAE on the synthetic shapes.
- `encode`: one image shard → its latents, with decode workers and one process per GPU.
- `latent_cache`: the memory-mapped per-shard latent cache and the dataset the trainer reads.
- `versions`: what makes latents stale (the components' sources, version and digest, a shard's encode status),
  without torch, for the code location's code versions.
- `shipped_vae`: the tiny VAE fit shipped in ``tiny_vae/``, reused when the settings match.
"""
