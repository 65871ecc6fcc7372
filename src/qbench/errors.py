"""The one exception type for bad configuration values (every layer raises it)."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["ConfigError", "config_error"]


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the key and the allowed values."""


def config_error(key: str, value, allowed: Iterable | str) -> ConfigError:
    """``key=value: allowed values are a, b, c`` (or ``allowed`` verbatim when it is a sentence)."""
    if isinstance(allowed, str):
        return ConfigError(f"{key}={value!r}: {allowed}")
    return ConfigError(f"{key}={value!r}: allowed values are {', '.join(map(str, allowed))}")
