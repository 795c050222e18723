"""YAML run files ↔ TrainConfig: unknown keys and wrong types are reported together, by name."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from slimtune.errors import ConfigError
from slimtune.train.config import TrainConfig

_TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool, "None": type(None), "dict": dict,
          "list[str]": list}


def _type_ok(value, annotation: str) -> bool:
    """Check a YAML value against a field annotation such as 'int | None' (bool is never accepted as int)."""
    for part in (p.strip() for p in annotation.split("|")):
        expected = _TYPES.get(part)
        if expected is None:
            continue
        if isinstance(value, bool) and part in ("int", "float"):
            continue
        if isinstance(value, expected):
            if part == "list[str]" and not all(isinstance(v, str) for v in value):
                continue
            return True
    return False


def check_overrides(values: dict, source: str) -> None:
    """Raise one ConfigError naming every unknown key and every value of the wrong type."""
    fields = {f.name: f.type for f in dataclasses.fields(TrainConfig) if f.name != "extra"}
    problems = [f"unknown key {k!r}" for k in values if k not in fields]
    problems += [f"{k}: expected {fields[k]}, got {type(v).__name__} {v!r}"
                 for k, v in values.items() if k in fields and not _type_ok(v, str(fields[k]))]
    if problems:
        hint = f"valid keys: {', '.join(sorted(fields))}" if any("unknown" in p for p in problems) else ""
        raise ConfigError(f"{source}:\n  - " + "\n  - ".join(problems) + (f"\n{hint}" if hint else ""))


def load_config_file(path) -> dict:
    """Read a YAML run file into a dict of TrainConfig fields (validated for keys and types)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist.")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must be a mapping of settings, got {type(values).__name__}.")
    check_overrides(values, str(path))
    return values


def resolve_config(config_file=None, **overrides) -> TrainConfig:
    """File values, then explicit overrides (flags), validated as one TrainConfig."""
    values = load_config_file(config_file) if config_file else {}
    check_overrides(overrides, "command-line options")
    values.update(overrides)
    cfg = TrainConfig(**values)
    # What the user wrote (file or flags), as opposed to defaults: the memory planner only changes defaults.
    cfg.explicit_keys = frozenset(values)
    return cfg
