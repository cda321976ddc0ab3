"""training assets (filled by its issue)."""
