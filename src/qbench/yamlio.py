"""Strict YAML for config, overlay and recipe files: a duplicate key is an error (PyYAML's safe
loader silently keeps the last one, so ``w4-rtn: ...`` written twice would run only one of them),
and a malformed file is one :class:`~qbench.errors.ConfigError` line naming the file and line."""

from __future__ import annotations

from pathlib import Path

import yaml

from .errors import ConfigError

__all__ = ["StrictLoader", "load_yaml_text", "load_yaml_file"]


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate mapping keys (with their line)."""


def _construct_mapping(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False):
    loader.flatten_mapping(node)  # merge keys (<<) first: overriding a merged key is allowed
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            continue  # the base constructor reports unhashable keys
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"duplicate key {key!r} (first defined on line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping_default(node, deep=deep)


StrictLoader.construct_mapping_default = yaml.SafeLoader.construct_mapping
StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml_text(text: str, source: str = "<text>"):
    """Parse YAML (or JSON) text strictly; errors name ``source`` and the line."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = e.problem or e.context or "invalid YAML"
        raise ConfigError(f"{where}: {problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML ({' '.join(str(e).split())})") from None


def load_yaml_file(path: str | Path):
    """Read and parse a YAML/JSON file strictly (see :func:`load_yaml_text`); a missing, unreadable
    or binary file is one :class:`ConfigError` naming it."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a UTF-8 text file (byte {e.start}); expected YAML or JSON") from None
    except IsADirectoryError:
        raise ConfigError(f"{p}: is a directory; expected a YAML or JSON file") from None
    except OSError as e:
        raise ConfigError(f"{p}: {e.strerror or e}") from None
    return load_yaml_text(text, str(p))
