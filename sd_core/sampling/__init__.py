"""The sampling stage: images from a checkpoint, and what they are judged by.

- `generate`: DDIM with classifier-free guidance, loading a checkpoint for sampling, `sd generate`.
- `grid`: the fixed prompts × seeds sample grid of one checkpoint.
- `adherence`: the tiny profile's prompt-adherence score.
- `export`: `sd export-diffusers`, a checkpoint as a diffusers pipeline folder.
"""
