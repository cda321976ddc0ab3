"""Resources: the pipeline settings every asset reads (profile name, data root, profile overrides)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dagster as dg

from sd_core.config import ConfigError, Profile, get_profile

SETTINGS_KEY = "sd/settings"  # definition metadata: the profile settings an asset's result depends on


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


def settings_read(*names: str) -> dict[str, str]:
    """Definition metadata naming the profile settings an asset's result depends on: sections (``"train"``) or
    fields (``"encode.precision"``). `make demo` re-runs the asset when one changed since its last
    materialisation (`sd_core.config.setting_changes`); the UI lists them with the asset's definition."""
    return {SETTINGS_KEY: ", ".join(names)}


def declared_settings(metadata: Mapping[str, Any]) -> tuple[str, ...]:
    """The names an asset declared with `settings_read` (none: its result depends on no setting of its own)."""
    value = metadata.get(SETTINGS_KEY)
    text = getattr(value, "value", value) or ""
    return tuple(name.strip() for name in str(text).split(",") if name.strip())
