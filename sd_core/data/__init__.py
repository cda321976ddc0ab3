"""Data stages: the synthetic source, metadata normalisation, the DuckDB filter, img2dataset shards."""
