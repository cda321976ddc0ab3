"""sampling assets (filled by its issue)."""
