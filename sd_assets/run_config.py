"""Run config files: the YAML a user passes with ``-c`` to `make demo`, ``dagster asset materialize`` and
``python -m sd_assets.materialize_batch``, read once here so that each refuses a bad file the same way: one
line naming the file and what is wrong with it, before any run starts."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from sd_core.config import ConfigError, Profile, get_profile


class RunConfigError(ConfigError):
    """A run config file that cannot be read or is not a run config; the message names the file."""


def load_run_config(paths: Sequence[str | os.PathLike[str]]) -> dict[str, Any]:
    """Merge YAML run config files (later files win, nested mappings merged)."""
    merged: dict[str, Any] = {}
    for p in paths:
        try:
            loaded = yaml.safe_load(Path(p).read_text())
        except OSError as exc:
            raise RunConfigError(f"{p}: cannot read it ({exc.strerror or exc})") from None
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
            raise RunConfigError(f"{p}: not valid YAML{at} ({getattr(exc, 'problem', None) or exc})") from None
        if not isinstance(loaded, (dict, type(None))):
            raise RunConfigError(f"{p}: a run config is a YAML mapping (resources: sd: config: ...), "
                                 f"got {type(loaded).__name__}")
        merged = deep_merge(merged, loaded or {})
    return merged


def deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``a`` with ``b`` laid over it: nested mappings merged, any other value of ``b`` replacing ``a``'s."""
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def sd_resource_config(run_config: dict[str, Any]) -> dict[str, Any]:
    """The ``resources.sd.config`` mapping of ``run_config`` (created empty where absent)."""
    level, path = run_config, []
    for key in ("resources", "sd", "config"):
        path.append(key)
        if level.get(key) is None:  # absent, or left empty in the YAML
            level[key] = {}
        level = level[key]
        if not isinstance(level, dict):
            raise RunConfigError(f"{'.'.join(path)} must be a mapping, got {type(level).__name__}")
    return level


def run_profile(run_config: Mapping[str, Any]) -> Profile:
    """The profile a run is configured with: its ``resources.sd.config``, empty values resolved as
    `sd_assets.resources.SDConfig.get` does. Raises `ConfigError` for settings that do not load (an unknown
    field, a value out of range, a section that is not a mapping)."""
    cfg = sd_resource_config(copy.deepcopy(dict(run_config)))  # a copy: a stored run's config stays as it is
    return get_profile(cfg.get("profile") or None, cfg.get("data_root") or None, cfg.get("overrides") or None)
