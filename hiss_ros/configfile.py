"""Reading configuration files and checking their keys, for every config of the package."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from hiss_ros.errors import ConfigError


def read_yaml(path: str | Path) -> Any:
    """The YAML document at ``path``; an unreadable file or invalid YAML is a ConfigError naming it."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text (UTF-8) YAML file; is it the config?") from None


def reject_unknown(data: dict, cls: type, where: str, noun: str = "key") -> None:
    """ConfigError naming the keys of ``data`` that are not fields of dataclass ``cls``."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(data) - known))
    if unknown:
        raise ConfigError(f"{where}: unknown {noun}(s) {unknown}; known {noun}s are {sorted(known)}")
