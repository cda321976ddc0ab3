"""Resources: the pipeline settings every asset reads (profile name, data root, profile overrides)."""

from __future__ import annotations

from typing import Any

import dagster as dg

from sd_core.config import ConfigError, Profile, get_profile


class SDConfig(dg.ConfigurableResource):
    """Selects the `sd_core.config.Profile` for a run.

    Empty values fall back to the environment (`SD_PROFILE`, `SD_DATA_ROOT`) and then to `tiny` / `./data`.
    `overrides` is a nested mapping applied with `Profile.with_overrides`, e.g.
    `{"train": {"max_steps": 200}}` — set it from a YAML run config (`-c config.yaml`).
    """

    profile: str = ""
    data_root: str = ""
    overrides: dict[str, Any] = {}

    def get(self) -> Profile:
        """The run's profile; a bad value (wrong type, out of range, unknown field) fails the step with the
        config's own message (section, field, value, allowed range) instead of a stack trace."""
        try:
            return get_profile(self.profile or None, self.data_root or None, self.overrides or None)
        except ConfigError as e:
            raise dg.Failure(description=f"run config: {e}") from None
