"""Quantized modules and helpers to find / replace the layers a recipe quantizes."""

from __future__ import annotations

import re

from torch import nn

# Every module type, imported so that each registers itself (see :mod:`.registry`).
from .bcq_linear import BCQLinear  # noqa: F401
from .fp_linear import FPLinear  # noqa: F401
from .hqq_linear import HQQLinear  # noqa: F401
from .int8_linear import Int8Linear  # noqa: F401
from .kv_codebooks import KVCodebooks  # noqa: F401
from .qlinear import ActQuantLinear, QuantLinear  # noqa: F401
from .registry import MODULE_TYPES, is_quantized_module, register_module_type  # noqa: F401
from .sdr_linear import SDRActLinear, SDRLinear  # noqa: F401
from .spqr_linear import SpQRLinear  # noqa: F401

#: Decoder-block linear layers (the ones papers quantize); embeddings and lm_head stay in 16 bits.
BLOCK_LINEAR = re.compile(r"(^|\.)layers\.\d+\.")


def target_linears(model: nn.Module, skip: list[str] | tuple = (), include_quantized: bool = False
                   ) -> dict[str, nn.Module]:
    """Linear layers inside decoder blocks, in module order, minus names matching ``skip`` regexes."""
    out = {}
    for name, m in model.named_modules():
        if not BLOCK_LINEAR.search(name):
            continue
        if not (type(m) is nn.Linear or (include_quantized and is_quantized_module(m))):
            continue
        if any(re.search(p, name) for p in skip):
            continue
        out[name] = m
    return out


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def effective_bits(model: nn.Module) -> float:
    """Average stored bits per weight over the decoder-block linear layers (16 for fp layers)."""
    bits = n = 0
    for _, m in target_linears(model, include_quantized=True).items():
        numel = m.in_features * m.out_features
        bits += m.storage_bits() if hasattr(m, "storage_bits") else numel * 16
        n += numel
    return bits / n if n else 16.0


def quantized_layout(model: nn.Module) -> dict[str, dict]:
    """Module name → {class, meta} for every quantized module (stored in the manifest)."""
    return {name: {"class": type(m).__name__, "meta": m.meta()}
            for name, m in model.named_modules() if is_quantized_module(m)}
