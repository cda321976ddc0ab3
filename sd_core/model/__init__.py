"""The model stage: what is trained and how noise is added and removed.

- `unet`: the SD 1.x denoising UNet (CompVis module names).
- `schedulers`: the DDPM training schedule and the DDIM sampler (diffusers-exact).
- `ema`: the exponential moving average of the weights.
- `convert`: weights in and out of diffusers and CompVis checkpoints.
"""
