"""latents assets (filled by its issue)."""
