"""Method registry, typed method configs and recipe parsing.

A *method* is a class registered under a name with a config dataclass. A *recipe* is an ordered
list of stages ``[{method: {arg: value}}, ...]``; stages of different kinds compose
(``smoothquant → gptq → kivi``). Recipes are data: parsing fills defaults and validates every
argument, so the resolved recipe (a plain list of dicts) can be hashed, stored in the checkpoint
manifest and passed to Snakemake ``params:``.

Config fields declare their constraints in ``dataclasses.field(metadata=...)``:
``choices`` (allowed values), ``range`` (inclusive numeric bounds), ``doc`` (one line).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from torch import nn

__all__ = [
    "Method", "MethodConfig", "Stage", "register", "get_method", "available_methods",
    "parse_recipe", "resolve_recipe", "ConfigError", "opt", "QuantContext",
]


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and the allowed values."""


def opt(default, doc: str = "", choices=None, range=None):  # noqa: A002 - dataclass option helper
    md = {"doc": doc}
    if choices is not None:
        md["choices"] = tuple(choices)
    if range is not None:
        md["range"] = tuple(range)
    return dataclasses.field(default=default, metadata=md)


@dataclass
class MethodConfig:
    """Base class of method configs. Subclasses add fields built with :func:`opt`."""

    def validate(self, key: str) -> None:  # cross-field checks; raise ConfigError
        return None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class QuantContext:
    """What a method may use while it runs."""

    tokenizer: Any = None
    device: str = "cpu"
    calibration: Any = None  # callable(corpus: str, n: int, seqlen: int, seed: int) -> LongTensor [n, seqlen]
    calib_stats: Any = None  # callable(corpus, n, seqlen, seed) -> dict of shared statistics
    progress: bool = True
    log: Any = print


class Method:
    """Base class: subclasses set ``name``, ``kind``, ``Config`` and implement :meth:`apply`."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "weight"  # weight | weight_act | activation | kv | transform
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    #: True when the method changes the model at run time (e.g. quantized KV caches) in a way
    #: that is not captured by module replacement / state dict, so loading a checkpoint re-applies
    #: :meth:`attach`.
    runtime: ClassVar[bool] = False
    #: True when the method reads shared activation statistics (``ctx.calib_stats``); the workflow
    #: then computes them once per calibration set in the ``calib_stats`` rule.
    uses_act_stats: ClassVar[bool] = False
    #: True when :meth:`apply` changes the model only through the block-by-block runner
    #: (:func:`qbench.calib.blockwise.run_blockwise`, which moves one decoder block at a time to
    #: ``ctx.device`` and back): the model can then stay in CPU memory while a GPU does the work
    #: (see :func:`qbench.api.quantize_home`).
    blockwise: ClassVar[bool] = False

    def check(self, model: nn.Module, cfg: MethodConfig, key: str) -> None:
        """Cheap checks against the model before any heavy work (e.g. group sizes)."""

    def apply(self, model: nn.Module, cfg: MethodConfig, ctx: QuantContext) -> dict:
        """Transform ``model`` in place; return statistics for the record."""
        raise TypeError(f"{type(self).__name__} must implement apply()")

    def attach(self, model: nn.Module, cfg: MethodConfig) -> None:
        """Re-install run-time behaviour on a loaded checkpoint (only for ``runtime`` methods)."""

    def calib_requests(self, cfg: MethodConfig) -> list[dict]:
        """Calibration sets this stage needs: ``[{corpus, n, seqlen, seed}]`` (for the DAG)."""
        c = getattr(cfg, "calib", None)
        if not c:
            return []
        return [{"corpus": c, "n": cfg.nsamples, "seqlen": cfg.seqlen, "seed": cfg.seed}]


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin() -> None:
    # Import every module in qbench.methods so their @register decorators run.
    import importlib
    import pkgutil

    from .. import methods as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name not in ("base",):
            importlib.import_module(f"{pkg.__name__}.{mod.name}")


def available_methods() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_method(name: str, key: str = "method") -> Method:
    _load_builtin()
    if name not in _REGISTRY:
        raise ConfigError(f"{key}: unknown method {name!r}; allowed: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()


# ----------------------------------------------------------------------------- config building
def _coerce(value, ftype, key: str):
    origin = typing.get_origin(ftype)
    args = typing.get_args(ftype)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        errs = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errs.append(str(e))
        raise ConfigError(errs[0] if errs else f"{key}: bad value {value!r}")
    if ftype is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if ftype is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected an integer")
    if ftype is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}={value!r}: expected a number")
    if ftype is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r}: expected a string")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list")
        return list(value)
    if origin is dict or ftype is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: expected a mapping")
        return dict(value)
    return value


def build_config(cls: type[MethodConfig], args: dict | None, key: str) -> MethodConfig:
    args = dict(args or {})
    hints = typing.get_type_hints(cls)
    allowed = {f.name: f for f in fields(cls)}
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise ConfigError(f"{key}: unknown argument(s) {', '.join(map(repr, unknown))}; "
                          f"allowed: {', '.join(allowed)}")
    values = {}
    for name, value in args.items():
        f = allowed[name]
        k = f"{key}.{name}"
        v = _coerce(value, hints[name], k)
        md = f.metadata
        if "choices" in md and v not in md["choices"]:
            raise ConfigError(f"{k}={v!r}: allowed values are {', '.join(map(repr, md['choices']))}")
        if "range" in md and v is not None:
            lo, hi = md["range"]
            if not lo <= v <= hi:
                raise ConfigError(f"{k}={v!r}: allowed range is {lo}..{hi}")
        values[name] = v
    cfg = cls(**values)
    cfg.validate(key)
    return cfg


@dataclass
class Stage:
    method: str
    config: MethodConfig

    def to_dict(self) -> dict:
        return {self.method: self.config.to_dict()}


def parse_recipe(raw: list | None, key: str = "recipe") -> list[Stage]:
    """Parse ``[{method: {args}}, ...]`` into validated stages (defaults filled)."""
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise ConfigError(f"{key}: a recipe is a list of stages like [{{rtn: {{w_bits: 4}}}}], got {raw!r}")
    stages = []
    for i, st in enumerate(raw):
        k = f"{key}[{i}]"
        if isinstance(st, str):
            st = {st: {}}
        if not isinstance(st, dict) or len(st) != 1:
            raise ConfigError(f"{k}: each stage is a mapping with exactly one method name, got {st!r}")
        (name, args), = st.items()
        m = get_method(name, k)
        stages.append(Stage(name, build_config(m.Config, args, f"{k}.{name}")))
    return stages


def resolve_recipe(raw: list | None, key: str = "recipe") -> list[dict]:
    """The recipe with every default filled in: plain data for params, hashing and manifests."""
    return [s.to_dict() for s in parse_recipe(raw, key)]


def recipe_slug_ok(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", name))
