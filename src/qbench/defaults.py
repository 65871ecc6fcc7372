"""Every default of the configuration, written once: in the config schema.

``workflow/schemas/config.schema.yaml`` is the one place a default value is written (beside the
key's description). Snakemake fills it into the config it validates; everything else reads it from
here: the rules (:func:`settings`: the configured section over its defaults), the Python entry
points (``api.evaluate_*`` and the eval functions' keyword defaults), the command line
(``qbench eval ...`` option defaults) — so a command, a library call and a pipeline job left at
their defaults do the same thing. ``tests/test_structure.py`` checks that every default of the
Python entry points equals the schema's, key by key.

Reading the schema needs the source tree (qbench is installed editable by ``tools/setup.sh``);
without it importing this module fails with a message saying so. No heavy imports: the CLI reads
this before deciding what to load.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

#: the configuration schema: the one source of every default
SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"

_NO_DEFAULT = object()


@lru_cache(maxsize=1)
def schema() -> dict:
    if not SCHEMA_PATH.exists():
        raise RuntimeError(f"qbench needs its source tree: the config schema {SCHEMA_PATH} (where every "
                           "default is written) is missing; install qbench with `pip install -e .`")
    with open(SCHEMA_PATH, encoding="utf-8") as f:
        return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _node(path: str) -> dict:
    """The schema node of a dotted key path (``eval.ppl.dtype``; ``corpora.*`` / ``export.*``
    step into the per-entry schema of a mapping / list)."""
    node = schema()
    for part in path.split("."):
        if part == "*":
            node = node.get("additionalProperties") or node["items"]
        else:
            node = node["properties"][part]
        if "$ref" in node:  # only local refs: "#/definitions/x"
            node = schema()["definitions"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def default(path: str) -> Any:
    """The schema's default of one key, e.g. ``default("eval.ppl.dtype")`` → ``"bfloat16"``
    (a fresh copy: lists may be changed by the caller)."""
    node = _node(path)
    if "default" not in node:
        raise KeyError(f"{path}: the config schema states no default")
    return copy.deepcopy(node["default"])


def section(path: str) -> dict:
    """Every key of one config section that has a default, with it (nested sections with their own
    defaults included), e.g. ``section("eval.speed")``."""
    out = {}
    for key, sub in _node(path).get("properties", {}).items():
        if "default" in sub:
            out[key] = copy.deepcopy(sub["default"])
        elif sub.get("type") == "object" and section(f"{path}.{key}"):
            out[key] = section(f"{path}.{key}")
    return out


def settings(config: dict, path: str) -> dict:
    """A configured section over its defaults (one level of nested sections merged too): what a
    rule passes to its job, and what the command of the same step uses when given no option."""
    node = config
    for part in path.split("."):
        node = (node or {}).get(part) or {}
    out = section(path)
    for k, v in node.items():
        out[k] = {**out[k], **v} if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def enum(path: str) -> tuple:
    return tuple(_node(path)["enum"])


#: evaluation / quantization dtypes by name (``eval.*.dtype``, ``--dtype``)
DTYPE_NAMES = enum("eval.ppl.dtype")
#: window length of the perplexity protocol (GPTQ / qllm-infer): ``eval.ppl.seqlen``, ``--seqlen``
PPL_SEQLEN = default("eval.ppl.seqlen")
#: the defaults of every evaluation section and of ``runtime``, by section name
EVAL = {k: section(f"eval.{k}") for k in ("ppl", "kv", "tasks", "chat", "stats", "speed")}
RUNTIME = section("runtime")
