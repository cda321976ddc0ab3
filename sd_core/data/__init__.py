"""Data stages: the synthetic source, metadata normalisation, the DuckDB filter, img2dataset shards.

- `synthetic`: coloured shapes (`render_shape`, `caption`, `vocabulary`) and the seeded LAION-schema metadata
  generator with planted rejects, 404s and corrupt images (`generate_synthetic`).
- `image_server`: the loopback HTTP server that renders those images on request (`ImageServer`).
- `metadata`: sources (synthetic, parquet path/glob/URL, Hugging Face dataset) brought into ``metadata/``, and
  the normalising view over LAION's schema variants.
- `filter`: `filter_metadata`, one streaming DuckDB query → fixed-size shard parts ``filtered/{shard}.parquet``.
- `url_policy`: which URLs may be fetched (http/https to public addresses, or hosts the config allows), checked
  in the filter's own funnel stage and again, after DNS and on every redirect, inside the downloader.
- `shards`: `download_shard`, img2dataset as a supervised subprocess → ``shards/{shard}.tar``.
- `download_guard` / `guarded_downloader`: the img2dataset entry point that installs the URL policy in every
  worker and kills its process group when its parent dies.
"""
