"""Software-defined assets, one module per stage of the graph (data → latents → training → sampling)."""
