"""data assets (filled by its issue)."""
