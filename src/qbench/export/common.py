"""What every export shares: refusing recipes a format cannot express (naming the blocking stage),
loading the checkpoint, writing the output directory atomically with its export manifest."""

from __future__ import annotations


import torch
from torch import nn

from ..errors import QbenchError
from ..methods.base import get_method, parse_recipe
from ..modules import is_quantized_module

FORMATS = ("compressed-tensors", "gguf")
EXPORT_MANIFEST = "qbench-export.json"
EXPORT_FORMAT_VERSION = 1

#: What a stored layer type is, for refusal messages (class name → description).
LAYER_KINDS = {
    "SDRLinear": "QRazor significant-data-razoring codes (per-group razor positions and flags)",
    "BCQLinear": "binary-coding (BCQ / LUT-GEMM) bit-planes with per-group α: a non-uniform grid",
    "SpQRLinear": "SpQR weights: bi-level quantized statistics plus fp16 outliers in CSR",
    "Int8Linear": "LLM.int8() vector-wise int8 with a 16-bit outlier decomposition of activations",
    "ActQuantLinear": "16-bit weights with dynamic activation quantization only",
    "SDRActLinear": "16-bit weights with QRazor SDR activations",
    "HQQLinear": "HQQ weights with fractional (fp16) zero points; the target's zero points are integers",
    "FPLinear": "floating-point-format weights (FP8 / MX / NVFP4)",
}


class ExportError(QbenchError, ValueError):
    """A checkpoint the requested format cannot represent; the message names the recipe stage."""


class Refusal(Exception):
    """Raised by a format's per-layer mapping: why this layer cannot be exported."""


def stage_key(manifest: dict, i: int, method: str) -> str:
    name = (manifest.get("stats") or {}).get("recipe_name")
    return f"recipes.{name}[{i}].{method}" if name else f"recipe[{i}].{method}"


def check_stages(manifest: dict, fmt: str) -> None:
    """Refuse stages whose effect is not stored in the weights: KV-cache quantization and
    attention/activation quantization installed at run time (``Method.runtime``)."""
    for i, st in enumerate(parse_recipe(manifest.get("recipe") or [], "checkpoint.recipe")):
        m = get_method(st.method)
        if m.kind == "kv":
            what = "quantizes the KV cache at run time (its grids, groups and fp windows live in the cache)"
        elif m.runtime:
            what = (f"changes the forward pass at run time (a {m.kind} stage re-attached on every load: "
                    "online rotations, attention or KV quantization)")
        else:
            continue
        raise ExportError(f"{stage_key(manifest, i, st.method)}: {fmt} export refused: this stage {what}; "
                          f"{fmt} stores only the weights and cannot express it. Export a recipe "
                          "without this stage.")


def producing_stage(manifest: dict) -> str:
    """The stage that produced the stored quantized layers: the last weight-quantizing stage."""
    stages = parse_recipe(manifest.get("recipe") or [], "checkpoint.recipe")
    for i in range(len(stages) - 1, -1, -1):
        if get_method(stages[i].method).kind in ("weight", "weight_act"):
            return stage_key(manifest, i, stages[i].method)
    return "recipe"


def map_layers(model: nn.Module, manifest: dict, fmt: str, mapper) -> dict[str, object]:
    """``mapper(name, module)`` for every quantized layer; the first :class:`Refusal` becomes an
    :class:`ExportError` naming the stage that produced the layer."""
    out = {}
    for name, mod in model.named_modules():
        if not is_quantized_module(mod):
            continue
        try:
            out[name] = mapper(name, mod)
        except Refusal as r:
            raise ExportError(f"{producing_stage(manifest)}: {fmt} export refused: layer {name}: {r}") from None
    return out


def describe(mod: nn.Module) -> str:
    return LAYER_KINDS.get(type(mod).__name__, f"layer type {type(mod).__name__}")


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
