"""compressed-tensors export (what transformers and vLLM load), written by the library itself.

The ``compressed-tensors`` package builds the config and packs the tensors, the way llm-compressor
uses it: the dense weights (our dequantized grid) get a ``QuantizationScheme`` through
``apply_quantization_config``, our scales and zero points are copied into the parameters it
creates, and ``ModelCompressor`` quantizes, packs and writes ``quantization_config`` into
``config.json``. The library picks the format from the scheme: weight-only integers →
``pack-quantized``, integer weights with int8 activations → ``int-quantized``.

Grid mapping (exact; checked after packing with the library's own decompressor):

* qbench codes are unsigned ``q ∈ [0, 2^b)`` with ``w = (q − z)·s``; compressed-tensors codes are
  signed ``q' ∈ [−2^(b−1), 2^(b−1))`` with ``w = (q' − z')·s``. So ``q' = q − 2^(b−1)`` and
  ``z' = z − 2^(b−1)``. qbench's symmetric grid has the constant midpoint ``z = 2^(b−1)``
  (``scale = 2·absmax/(2^b − 1)``), i.e. ``z' = 0``: compressed-tensors' symmetric grid, whose
  dynamic activation scale is also ``absmax / ((2^b − 1)/2)``.
* per-channel → ``strategy: channel``; group → ``strategy: group``; qbench's per-tensor weights
  are stored as equal per-row scales and exported as ``channel`` (same values).
* scales are fp16 in qbench; the export keeps the float32 staging dtype, so they are exact.
* dynamic activations: 8-bit symmetric per token → ``strategy: token, dynamic: true``; per
  tensor → ``strategy: tensor, dynamic: true``.
* FP8 E4M3 weights (fp32 scale ``amax/448`` per channel or tensor) with optional dynamic FP8 E4M3
  activations → ``type: float`` schemes (``float-quantized``, vLLM's FP8_DYNAMIC for channel +
  token); both sides round to nearest even with saturation.

Refused: GPTQ act-order with *dynamic* groups (a per-column ``g_idx``) — compressed-tensors
removed activation ordering ``group`` (≥ 0.19; only the static ``weight`` ordering remains, which
stores contiguous groups, i.e. our ``static_groups: true``); activation bits other than 8 or
asymmetric activations (the int schemes runtimes serve are int8); every non-uniform or
outlier-carrying layer (BCQ, SpQR, QRazor SDR, LLM.int8()).
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict

import torch
from torch import nn

from ..modules import set_module
from ..modules.fp_linear import FPLinear
from ..modules.qlinear import QuantLinear
from .common import Refusal, describe, map_layers, max_abs_diff

FMT = "compressed-tensors"


def _scheme_args(name: str, mod: nn.Module) -> dict:
    """JSON-able description of the compressed-tensors scheme of one layer (or :class:`Refusal`)."""
    if type(mod) is FPLinear:
        return _fp_scheme_args(mod)
    if type(mod) is not QuantLinear:  # exact type: HQQLinear subclasses it with fractional zeros
        raise Refusal(f"{describe(mod)} has no compressed-tensors scheme")
    if mod.g_idx is not None:
        raise Refusal("GPTQ act-order with dynamic groups stores a per-column group index (g_idx); "
                      "compressed-tensors removed activation ordering 'group' (only the static "
                      "'weight' ordering with contiguous groups remains): quantize with "
                      "static_groups: true to export")
    weights = {"num_bits": mod.bits, "type": "int", "symmetric": bool(mod.sym)}
    if mod.group_size in (-1, 0):
        weights.update(strategy="channel")
    else:
        weights.update(strategy="group", group_size=mod.group_size)
    acts = None
    if mod.a_bits < 16:
        if mod.a_bits != 8 or not mod.a_sym:
            raise Refusal(f"{mod.a_bits}-bit {'symmetric' if mod.a_sym else 'asymmetric'} activations: "
                          "the compressed-tensors integer schemes served by runtimes use symmetric "
                          "int8 activations")
        if getattr(mod, "a_sym_grid", "midpoint") != "midpoint":
            raise Refusal("symmetric int8 activations on the restricted ±127 grid (absmax/127): "
                          "compressed-tensors' dynamic int8 activations use absmax/127.5 "
                          "(codes -128..127); quantize with sym_grid: midpoint to export")
        acts = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True,
                "strategy": "token" if mod.a_granularity == "per_token" else "tensor"}
    return {"weights": weights, "input_activations": acts}


def _fp_scheme_args(mod) -> dict:
    """FP8 E4M3 weights (fp32 scale per channel or tensor) and optional dynamic FP8 E4M3
    activations per token / tensor: compressed-tensors' FP8 schemes (FP8_DYNAMIC = channel + token).
    Both use ``scale = amax / 448`` and round-to-nearest-even saturating casts."""
    if mod.w_format != "fp8_e4m3":
        raise Refusal(f"{mod.w_format} weights: this exporter maps FP8 E4M3 only (compressed-tensors "
                      "FP8 is E4M3; its MXFP4 / NVFP4 formats are not mapped here)")
    weights = {"num_bits": 8, "type": "float", "symmetric": True,
               "strategy": "channel" if mod.w_granularity == "per_channel" else "tensor"}
    acts = None
    if mod.a_format != "none":
        if mod.a_format != "fp8_e4m3":
            raise Refusal(f"{mod.a_format} activations: only dynamic FP8 E4M3 activations are mapped")
        acts = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True,
                "strategy": "token" if mod.a_granularity == "per_token" else "tensor"}
    return {"weights": weights, "input_activations": acts}


def _qparams(mod) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale, zero point in compressed-tensors' signed convention or None)."""
    if type(mod) is FPLinear:
        return mod.scales.float(), None
    z = mod.zero_points()
    if not torch.equal(z, z.round()):
        raise RuntimeError("fractional zero points cannot be exported")  # guarded by _scheme_args
    return mod.scales.float(), (z - 2 ** (mod.bits - 1)).to(torch.int8)


def _targets(names: list[str], all_linear: list[str]) -> list[str]:
    """Compact, exact target list: ``re:`` patterns for projection names that this group covers in
    every decoder layer, exact module names otherwise."""
    def suffix(n):
        return re.sub(r"^.*?layers\.\d+\.", "", n)

    mine = set(names)
    if mine == {n for n in all_linear if re.search(r"layers\.\d+\.", n)}:
        return ["Linear"]  # every decoder-block linear (what llm-compressor writes; the rest is ignored)
    by_suffix: dict[str, list[str]] = {}
    for n in all_linear:
        by_suffix.setdefault(suffix(n), []).append(n)
    out, done = [], set()
    for n in names:
        s = suffix(n)
        if s in done:
            continue
        group = by_suffix.get(s, [n])
        if s != n and all(m in mine for m in group):
            out.append("re:.*layers\\.\\d+\\." + re.escape(s) + "$")
            done.add(s)
        else:
            out.append(n)
    return out


def export_compressed_tensors(model: nn.Module, tok, manifest: dict, out, *, source=None,
                              log=print) -> dict:
    import compressed_tensors
    from compressed_tensors.compressors import BaseCompressor, ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig,
                                                 QuantizationScheme, QuantizationStatus,
                                                 apply_quantization_config)
    from compressed_tensors.utils import get_direct_state_dict

    plan = map_layers(model, manifest, FMT, _scheme_args)
    if not plan:
        raise_unquantized(manifest)
    # 1. Dense float32 staging weights = our dequantized grid; keep the integer parameters.
    qparams = {}
    for name, mod in list(model.named_modules()):
        if name not in plan:
            continue
        lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, dtype=torch.float32)
        with torch.no_grad():
            lin.weight.copy_(mod.dequantized_weight().float())
            if mod.bias is not None:
                lin.bias.copy_(mod.bias.float())
        qparams[name] = (*_qparams(mod), lin.weight.detach().clone())
        set_module(model, name, lin)
    model.to(torch.float32)
    # 2. One config group per distinct scheme.
    all_linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    groups: OrderedDict[str, list[str]] = OrderedDict()
    for name, args in plan.items():
        groups.setdefault(json.dumps(args, sort_keys=True), []).append(name)
    config_groups = {}
    for i, (key, names) in enumerate(groups.items()):
        args = json.loads(key)
        acts = args["input_activations"]
        config_groups[f"group_{i}"] = QuantizationScheme(
            targets=_targets(names, all_linear), weights=QuantizationArgs(**args["weights"]),
            input_activations=QuantizationArgs(**acts) if acts else None)
    ignore = [n for n in all_linear if n not in plan]
    qconfig = QuantizationConfig(config_groups=config_groups, ignore=ignore,
                                 quantization_status=QuantizationStatus.FROZEN)
    apply_quantization_config(model, qconfig, show_progress=False)
    for name, (scale, zp, _) in qparams.items():
        mod = model.get_submodule(name)
        if not hasattr(mod, "quantization_scheme"):
            raise RuntimeError(f"compressed-tensors did not match layer {name} (targets {config_groups})")
        with torch.no_grad():
            if scale.numel() != mod.weight_scale.numel():
                raise RuntimeError(f"{name}: {scale.numel()} scales, compressed-tensors expects "
                                   f"{tuple(mod.weight_scale.shape)}")
            mod.weight_scale.copy_(scale.reshape(mod.weight_scale.shape))
            if zp is not None and getattr(mod, "weight_zero_point", None) is not None:
                mod.weight_zero_point.copy_(zp.reshape(mod.weight_zero_point.shape).to(mod.weight_zero_point.dtype))
    unmatched = [n for n, m in model.named_modules() if hasattr(m, "quantization_scheme") and n not in plan]
    if unmatched:
        raise RuntimeError(f"compressed-tensors targets matched unquantized layers {unmatched[:3]}")
    # 3. The library quantizes, packs and writes the config.
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    # 4. Decode every packed layer with the library's decompressor: it must give our weights.
    worst, formats = 0.0, {}
    for name, (_, _, dense) in qparams.items():
        mod = model.get_submodule(name)
        fmt = mod.quantization_scheme.format
        formats[name] = str(getattr(fmt, "value", fmt))
        dec = BaseCompressor.get_value_from_registry(formats[name]).decompress(
            dict(get_direct_state_dict(mod)), mod.quantization_scheme)["weight"]
        d = max_abs_diff(dec, dense)
        if d != 0.0:
            raise RuntimeError(f"compressed-tensors round trip of {name} differs from the checkpoint "
                               f"by {d:g} (expected exact)")
        worst = max(worst, d)
    model.save_pretrained(out)
    compressor.update_config(str(out))
    if tok is not None:
        tok.save_pretrained(out)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    log(f"[qbench] compressed-tensors {qc.get('format')}: {len(plan)} layers, "
        f"{len(config_groups)} scheme group(s), round trip exact")
    return {
        "layers": {n: {"scheme": plan[n], "format": formats[n]} for n in plan},
        "quantization_config": qc,
        "verification": {"reader": f"compressed-tensors {compressed_tensors.__version__} decompress",
                         "max_abs_weight_error": worst, "exact": worst == 0.0},
        "versions": {"compressed-tensors": compressed_tensors.__version__},
    }


def raise_unquantized(manifest):
    from .common import ExportError

    raise ExportError("recipe: compressed-tensors export refused: the checkpoint has no quantized "
                      "layers (an unquantized model is a plain transformers directory already)")
