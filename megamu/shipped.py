"""The configs shipped with megamu: configs/*.yaml and ds_configs/*.json, installed as the package data
`megamu.configs` and `megamu.ds_configs`, so a name such as `tiny` works from any directory after
`pip install`, not only from a checkout.
"""
from __future__ import annotations

import os
from importlib import resources
from typing import Optional

from megamu.errors import ConfigError

TRAINING = ("megamu.configs", ".yaml")
DEEPSPEED = ("megamu.ds_configs", ".json")


def shipped_names(kind: tuple[str, str] = TRAINING) -> list[str]:
    """The shipped configs of `kind` (TRAINING or DEEPSPEED), by name without the suffix."""
    package, suffix = kind
    return sorted(entry.name[:-len(suffix)] for entry in resources.files(package).iterdir()
                  if entry.name.endswith(suffix))


def shipped_path(name: str, kind: tuple[str, str] = TRAINING) -> str:
    """The file of the shipped config `name` (`tiny`, `zero1`, ...); ConfigError listing the names if none."""
    package, suffix = kind
    path = resources.files(package) / (name + suffix)
    if not path.is_file():
        raise ConfigError(f"{name!r} is neither a file nor a shipped config; shipped: {', '.join(shipped_names(kind))}")
    # Installed as plain files (setup.py ships them uncompressed), so the path is usable as it is.
    return str(path)


def resolve_config(value: Optional[str], kind: tuple[str, str] = TRAINING) -> Optional[str]:
    """A `--config` value as a file path: an existing file as given, otherwise the shipped config of that name."""
    if value is None or os.path.isfile(value):
        return value
    return shipped_path(value, kind)
