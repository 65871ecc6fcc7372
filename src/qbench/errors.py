"""User-facing errors: the exception types every layer raises for things the user can fix, and the
one place that decides what is a user error (one line, non-zero exit) and what is a bug (traceback).

* :class:`QbenchError` — the base: its message is one clear line (what is wrong, where, and what is
  allowed). Subclasses: :class:`ConfigError` (a bad configuration value or input file),
  :class:`NonFiniteError` (a NaN/inf weight, scale, activation or loss, naming the layer or window),
  and ``CheckpointError`` (:mod:`qbench.checkpoint`), ``ExportError`` …
* :func:`user_error_line` — the one line for a user error, or None for an unexpected failure (those
  keep their traceback). Used by the CLI (:func:`qbench.cli.main`) and the Snakemake job wrapper
  (:func:`qbench.workflow.job`).
"""

from __future__ import annotations

import errno
import math
from collections.abc import Iterable

__all__ = ["QbenchError", "ConfigError", "NonFiniteError", "config_error", "user_error_line",
           "check_finite", "first_non_finite", "strict_json_dumps"]


class QbenchError(Exception):
    """An error the user can fix; its message is one line (no traceback is shown for it)."""


class ConfigError(QbenchError, ValueError):
    """A bad configuration value; the message is one line naming the key and the allowed values."""


class NonFiniteError(QbenchError, ValueError):
    """A NaN or infinite value where only finite ones make sense (weights, scales, calibration
    activations, losses, record fields); the message names the tensor, layer or window."""


def config_error(key: str, value, allowed: Iterable | str) -> ConfigError:
    """``key=value: allowed values are a, b, c`` (or ``allowed`` verbatim when it is a sentence)."""
    if isinstance(allowed, str):
        return ConfigError(f"{key}={value!r}: {allowed}")
    return ConfigError(f"{key}={value!r}: allowed values are {', '.join(map(str, allowed))}")


def user_error_line(exc: BaseException) -> str | None:
    """The one line to print for a user error, or None when ``exc`` is an unexpected failure.

    User errors: every :class:`QbenchError`, and operating-system errors about files (missing,
    unreadable, a disk that is full), which name the file."""
    if isinstance(exc, QbenchError):
        return " ".join(str(exc).split("\n")[:1]) or type(exc).__name__
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            where = f" writing {exc.filename}" if exc.filename else ""
            return f"disk full{where}: free some space and re-run"
        if exc.errno is not None and exc.strerror:
            name = f"{exc.filename}: " if exc.filename else ""
            return f"{name}{exc.strerror}"
        if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            return str(exc).split("\n")[0]
    return None


# ------------------------------------------------------------------------------ non-finite values
def check_finite(t, what: str) -> None:
    """Raise :class:`NonFiniteError` naming ``what`` if tensor ``t`` has a NaN or an inf."""
    import torch

    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        raise NonFiniteError(f"{what}: {n_nan} NaN and {n_inf} infinite values (of {t.numel()}); "
                             "a model or data with non-finite values cannot be quantized or evaluated")


def first_non_finite(obj, path: str = "") -> str | None:
    """The key path (``metrics.ppl``, ``results[3].acc``) of the first NaN/inf float in a JSON-like
    object, or None."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (path or "<value>")
    if isinstance(obj, dict):
        for k, v in obj.items():
            hit = first_non_finite(v, f"{path}.{k}" if path else str(k))
            if hit:
                return hit
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            hit = first_non_finite(v, f"{path}[{i}]")
            if hit:
                return hit
    return None


def strict_json_dumps(obj, what: str, **kw) -> str:
    """``json.dumps(obj, allow_nan=False)``: records and manifests are strict JSON (no ``NaN`` /
    ``Infinity`` tokens); a non-finite number is a :class:`NonFiniteError` naming its key path."""
    import json

    hit = first_non_finite(obj)
    if hit:
        raise NonFiniteError(f"{what}: {hit} is not finite; refusing to write a record with "
                             "NaN/inf (strict JSON)")
    return json.dumps(obj, allow_nan=False, default=str, **kw)
