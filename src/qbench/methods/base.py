"""Method registry, typed method configs and recipe parsing.

A *method* is a class registered under a name with a config dataclass. A *recipe* is an ordered
list of stages ``[{method: {arg: value}}, ...]``; stages of different kinds compose
(``smoothquant → gptq → kivi``). Recipes are data: parsing fills defaults and validates every
argument, so the resolved recipe (a plain list of dicts) can be hashed, stored in the checkpoint
manifest and passed to Snakemake ``params:``.

Config fields declare their constraints in ``dataclasses.field(metadata=...)``:
``choices`` (allowed values), ``range`` (inclusive numeric bounds), ``doc`` (one line).

Every method *describes* what a stage produces (:meth:`Method.describe` → a
:class:`qbench.descriptor.Descriptor`); the report and the manifest read that, never method names.
KV-cache methods subclass :class:`KVMethod`: they provide their cache and their attention hook, and
:meth:`KVMethod.attach` binds both to the model (:mod:`qbench.modules.kv_binding`).
How to add a method: ``docs/DEVELOPING.md``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from torch import nn

from ..calib.spec import CalibSet
from ..descriptor import Descriptor, describe_stages
from ..errors import ConfigError
from ..modules import attention as attn
from ..modules.kv_base import is_served
from ..modules.kv_binding import KVBinding, bind_kv

__all__ = [
    "Method", "KVMethod", "MethodConfig", "CalibArgs", "calib_field", "Stage", "register", "get_method",
    "available_methods", "parse_recipe", "resolve_recipe", "describe_recipe", "ConfigError", "opt",
    "QuantContext", "Descriptor",
]


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


# ----------------------------------------------------------------------------- calibration args
#: the calibration arguments every calibrating method shares: one doc and one range each
_CALIB_FIELDS = {
    "calib": ("wiki", "calibration corpus", None),
    "nsamples": (128, "calibration sequences", (1, 1 << 20)),
    "seqlen": (2048, "tokens per calibration sequence", (2, 1 << 20)),
    "seed": (0, "calibration sampling seed", (0, 2**31 - 1)),
}


def calib_field(name: str, default=None, doc: str | None = None):
    """A calibration argument with the shared doc and range and a method's own default (methods
    differ in how much calibration they need, e.g. KVQuant 16×512 vs GPTQ 128×2048)."""
    d, text, rng = _CALIB_FIELDS[name]
    return opt(d if default is None else default, doc or text, range=rng)


@dataclass
class CalibArgs(MethodConfig):
    """Config mixin of methods that calibrate: ``calib``, ``nsamples``, ``seqlen``, ``seed``.
    Subclasses may redeclare a field with :func:`calib_field` to change its default."""

    calib: str = calib_field("calib")
    nsamples: int = calib_field("nsamples")
    seqlen: int = calib_field("seqlen")
    seed: int = calib_field("seed")

    def calib_set(self) -> CalibSet:
        """The calibration set these arguments name (the one place a :class:`CalibSet` is built
        from a config)."""
        return CalibSet(self.calib, self.nsamples, self.seqlen, self.seed)


@dataclass
class QuantContext:
    """What a method may use while it runs."""

    tokenizer: Any = None
    device: str = "cpu"
    calibration: Any = None  # callable(corpus: str, n: int, seqlen: int, seed: int) -> LongTensor [n, seqlen]
    calib_stats: Any = None  # callable(corpus, n, seqlen, seed) -> dict of shared statistics
    progress: bool = True
    log: Any = print

    def calib_tokens(self, spec: CalibSet, method: str = "this method"):
        """Token ids ``[n, seqlen]`` of a calibration set (ConfigError without a source)."""
        if self.calibration is None:
            raise ConfigError(f"{method}: needs calibration data but the context has no calibration source")
        return self.calibration(spec.corpus, spec.n, spec.seqlen, spec.seed)


class Method:
    """Base class: subclasses set ``name``, ``kind``, ``Config`` and implement :meth:`apply`."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "weight"  # weight | weight_act | activation | kv | transform (for `qbench info`)
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

    def describe(self, cfg: MethodConfig) -> Descriptor:
        """What this stage produces (family, bits, group, grid, storage); every method implements it."""
        raise TypeError(f"{type(self).__name__} must implement describe()")

    def calib_requests(self, cfg: MethodConfig) -> list[CalibSet]:
        """Calibration sets this stage needs (for the DAG): its :class:`CalibArgs`, if any."""
        if not isinstance(cfg, CalibArgs) or not cfg.calib:
            return []
        return [cfg.calib_set()]


class KVMethod(Method):
    """Base of KV-cache methods. A subclass provides

    * :meth:`make_cache` — the ``transformers`` cache holding its packed K/V (generation);
    * :meth:`kv_fake_quant` — ``fn(k, v, layer_idx) -> (k, v)``, the same quantization applied
      inside attention for cache-less forwards (perplexity), installed as the ``qkv`` attention
      hook ``"<name>.kv"``;
    * :meth:`expected_nbytes` — the layout formula of the cache's bytes (checked against the
      measured bytes by the KV evaluation); optionally :meth:`cache_stats`.

    :meth:`attach` binds them to the model; :func:`qbench.modules.kv_binding.cache_for_model`
    and the evaluations find them there — nothing dispatches on the method's name.
    """

    kind = "kv"
    runtime = True

    @property
    def hook_name(self) -> str:
        return f"{self.name}.kv"

    def make_cache(self, model: nn.Module, cfg: MethodConfig, prefill_with_quant: bool | None = None):
        raise TypeError(f"{type(self).__name__} must implement make_cache()")

    def kv_fake_quant(self, model: nn.Module, cfg: MethodConfig):
        raise TypeError(f"{type(self).__name__} must implement kv_fake_quant()")

    def expected_nbytes(self, cfg: MethodConfig, n_tokens: int, *, n_layers: int, n_kv_heads: int,
                        head_dim: int, batch: int = 1, fp_bytes: int = 2, cache=None) -> int:
        raise TypeError(f"{type(self).__name__} must implement expected_nbytes()")

    def cache_stats(self, cfg: MethodConfig, cache, n_tokens: int, *, n_layers: int, n_kv_heads: int,
                    head_dim: int) -> dict:
        """Extra measured fields of a filled cache for the memory record (default none)."""
        return {}

    def kv_decode_view(self, model: nn.Module, cfg: MethodConfig):
        """``fn(k, v, layer_idx) -> (kq, vq, bk, bv)`` for the decode-faithful perplexity protocol
        (:mod:`qbench.methods.kv_protocol`): ``kq``/``vq`` every token as the cache stores it once
        quantized, ``bk[i]``/``bv[i]`` how many of the oldest keys/values query ``i`` reads in that
        form during token-by-token decoding (the rest in full precision)."""
        raise TypeError(f"{type(self).__name__} must implement kv_decode_view()")

    def decode_equals_prefill(self, cfg: MethodConfig) -> bool:
        """True when every query reads the same K/V under both protocols (no full-precision
        window beyond what the prefill protocol keeps): the decode score is then the prefill one."""
        return False

    def attach(self, model: nn.Module, cfg: MethodConfig) -> None:
        bind_kv(model, KVBinding(self, cfg))
        self.install_protocol(model, cfg, "prefill_quant")

    def install_protocol(self, model: nn.Module, cfg: MethodConfig, protocol: str) -> None:
        """Route cache-less forwards through one KV protocol: ``prefill_quant`` (the ``qkv`` hook:
        every query reads the K/V a cache holding the whole window returns) or ``decode`` (the
        ``kv_split`` hook: each query reads what it would read decoding token by token)."""
        if protocol == "prefill_quant":
            attn.remove_hook(model, self.hook_name, "kv_split")
            install_kv_hook(model, self.hook_name, self.kv_fake_quant(model, cfg))
        elif protocol == "decode":
            attn.remove_hook(model, self.hook_name, "qkv")
            view = self.kv_decode_view(model, cfg)

            def hook(module, k, v):
                if k.shape[-2] <= 1 or is_served(k):
                    return None  # a cache's output (generation): already quantized
                return view(k, v, getattr(module, "layer_idx", 0))

            attn.install(model)
            attn.register_hook(model, "kv_split", self.hook_name, hook)
        else:
            raise ConfigError(f"kv_protocol={protocol!r}: allowed values are prefill_quant, decode")


def install_kv_hook(model: nn.Module, name: str, kv_fake_quant) -> None:
    """Register ``kv_fake_quant(k, v, layer_idx)`` as a ``qkv`` attention hook (changes k and v)."""

    def hook(module, q, k, v):
        k, v = kv_fake_quant(k, v, getattr(module, "layer_idx", 0))
        return q, k, v

    attn.install(model)
    attn.register_qkv_hook(model, name, hook)


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry. A method must describe itself (and a KV
    method provide its cache and hook): missing pieces fail here, not as a wrong report row."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    missing = [m for m in ("apply", "describe") if getattr(cls, m) is getattr(Method, m)]
    if issubclass(cls, KVMethod):
        missing += [m for m in ("make_cache", "kv_fake_quant", "kv_decode_view", "expected_nbytes")
                    if getattr(cls, m) is getattr(KVMethod, m)]
    if missing:
        raise TypeError(f"method {cls.name!r} ({cls.__name__}) must implement {', '.join(missing)}")
    _REGISTRY[cls.name] = cls
    return cls


#: environment variable naming extra method modules (comma separated), imported with the builtins
PLUGINS_ENV = "QBENCH_METHODS"
#: entry-point group of installed packages that provide methods
ENTRY_POINTS = "qbench.methods"
_loaded = False


def _load_builtin() -> None:
    """Import every module in ``qbench.methods`` and every plugin module (:data:`PLUGINS_ENV`,
    entry points :data:`ENTRY_POINTS`) so their ``@register`` decorators run. Plugins let a method
    live in its own package: nothing in qbench is edited to add one (``docs/DEVELOPING.md``)."""
    global _loaded
    if _loaded:
        return
    import importlib
    import os
    import pkgutil
    from importlib.metadata import entry_points

    from .. import methods as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name not in ("base", "common"):
            importlib.import_module(f"{pkg.__name__}.{mod.name}")
    for ep in entry_points(group=ENTRY_POINTS):
        ep.load()
    for name in filter(None, (s.strip() for s in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"{PLUGINS_ENV}={name!r}: cannot import this method module ({e})") from e
    _loaded = True


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


def stage_descriptors(raw: list | None, key: str = "recipe") -> list[dict]:
    """``[{"method": name, **Descriptor.to_dict()}, ...]``: what each stage of a recipe produces,
    as stored in the checkpoint manifest (``descriptor.stages``) and the records."""
    return [{"method": st.method, **get_method(st.method).describe(st.config).to_dict()}
            for st in parse_recipe(raw, key)]


def describe_recipe(raw: list | None, key: str = "recipe") -> dict:
    """A recipe's report row labels (family, method, W, A, KV, group, ...) from its descriptors."""
    return describe_stages([(d.pop("method"), Descriptor.from_dict(d)) for d in stage_descriptors(raw, key)])
