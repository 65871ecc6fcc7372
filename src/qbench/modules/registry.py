"""Quantized module types by class name, for rebuilding modules from a checkpoint manifest.

Every module type registers itself with :func:`register_module_type` when its file is imported;
``qbench.modules`` imports every module file, so importing the package registers every type (a
checkpoint loads without importing any method module).
"""

from __future__ import annotations

from torch import nn

__all__ = ["MODULE_TYPES", "register_module_type", "is_quantized_module"]

#: class name → class
MODULE_TYPES: dict[str, type[nn.Module]] = {}


def register_module_type(cls: type[nn.Module]) -> type[nn.Module]:
    MODULE_TYPES[cls.__name__] = cls
    return cls


def is_quantized_module(m: nn.Module) -> bool:
    return type(m).__name__ in MODULE_TYPES
