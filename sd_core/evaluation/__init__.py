"""Checkpoint evaluation (the `checkpoint_eval` asset's library): every checkpoint step of a run scored on
bucketed validation ε-MSE, its sample grid and the profile's prompt metrics.

- `prompt_scorer`: reads colour, shape and background off generated pixels (tiny profile), calibrated on true
  renders and on the tiny VAE's reconstructions; the one implementation behind `sd_core.sampling.adherence`.
- `eps_buckets`: held-out ε-MSE per timestep bucket at fixed noise (the trainer's split and loss).
- `clip_metrics`: CLIP score and a CLIP-space Fréchet distance (sd15 profile).
- `checkpoint_eval`: which steps of a run are new, scoring one step, the scores file and the best checkpoint.
"""
