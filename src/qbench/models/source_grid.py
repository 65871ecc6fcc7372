"""How far a model from a quantized GGUF is from "full precision": the grid its weights already sit on.

A GGUF whose linear weights are stored in a llama.cpp block format is dequantized once
(:func:`qbench.models.loading.prepare_model`); the "fp" baseline of every comparison is then a
4-bit (or 5/8-bit) model, and quantizers whose grid contains the source grid reproduce it exactly,
while other grids (symmetric, power-of-two / FP4, binary-coded, integer zero points) pay for
re-quantizing an already-quantized model. :func:`source_grid` measures that bias on the prepared
weights and the report states it (the model card's ``source_grid``):

* ``tensor_types``: how many GGUF tensors of each storage type;
* ``on_source_grid``: the share of decoder-linear weights that lie exactly on the source format's
  per-block grid, rebuilt from each block of ``block`` inputs (Q4_1/Q5_1: ``min + k·(max−min)/(2^b−1)``;
  Q4_0/Q5_0: ``k·d`` with ``d = v/−2^(b−1)`` from the block's signed extreme ``v``; Q8_0:
  ``d = absmax/127``) — 1.0 means the format is reproduced exactly;
* ``integer_grid``: qbench's RTN (integer zero point, the GPTQ convention) at the source's bits and block,
  asymmetric and symmetric: SQNR in dB and the share of weights reproduced exactly.

Measured on every ``stride``-th decoder block (default 3) to keep the prepare step cheap.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import torch

__all__ = ["BLOCK_FORMATS", "gguf_tensor_types", "on_block_grid", "source_grid"]

#: llama.cpp legacy block formats: type → (bits, block, kind)
BLOCK_FORMATS = {"Q4_0": (4, 32, "sym"), "Q4_1": (4, 32, "asym"), "Q5_0": (5, 32, "sym"),
                 "Q5_1": (5, 32, "asym"), "Q8_0": (8, 32, "sym8")}
_DECODER_LINEAR = re.compile(r"\.layers\.(\d+)\..*_proj\.weight$")


def gguf_tensor_types(path) -> dict[str, int]:
    """Storage type name → number of tensors in a GGUF file."""
    import gguf

    return dict(Counter(t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors))


def _grid(w: torch.Tensor, bits: int, block: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w rounded onto the block format's grid rebuilt from each block's values, each entry's
    grid step)``, both [out, in]."""
    g = w.double().reshape(w.shape[0], -1, block)
    if kind == "asym":
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        step = (hi - lo) / (2**bits - 1)
        step = torch.where(step > 0, step, torch.ones_like(step))
        out = torch.round((g - lo) / step).clamp(0, 2**bits - 1) * step + lo
    else:
        if kind == "sym8":
            step = g.abs().amax(-1, keepdim=True) / 127
            qmin, qmax = -127, 127
        else:  # the signed extreme maps to -2^(b-1)
            idx = g.abs().argmax(-1, keepdim=True)
            step = torch.gather(g, -1, idx) / -(2 ** (bits - 1))
            qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        step = torch.where(step != 0, step, torch.ones_like(step))
        out = torch.round(g / step).clamp(qmin, qmax) * step
    return out.reshape(w.shape), step.abs().expand_as(g).reshape(w.shape)


#: "on the grid": within this fraction of the block's grid step (fp32 rounding of the dequantized
#: value and of the rebuilt step is ~1e-7 of a step)
TOL = 1e-4


def on_block_grid(w: torch.Tensor, fmt: str) -> float:
    """Share of ``w``'s entries that lie exactly on ``fmt``'s per-block grid."""
    bits, block, kind = BLOCK_FORMATS[fmt]
    if w.shape[-1] % block:
        return float("nan")
    q, step = _grid(w, bits, block, kind)
    return ((q - w.double()).abs() <= TOL * step).double().mean().item()


def _sqnr_db(err2: float, sig2: float) -> float:
    return float("inf") if err2 == 0 else 10 * math.log10(sig2 / err2)


def source_grid(state_dict: dict, tensor_types: dict[str, int], stride: int = 3) -> dict | None:
    """The card's ``source_grid`` (see the module docstring), or None when no decoder linear
    weights are stored in a known block format."""
    from ..quant.uniform import WeightQuantSpec, fake_quantize_weight

    known = {t: n for t, n in tensor_types.items() if t in BLOCK_FORMATS}
    if not known:
        return {"tensor_types": tensor_types} if tensor_types else None
    fmt = max(known, key=known.get)  # the format of most tensors (the linear layers)
    bits, block, _ = BLOCK_FORMATS[fmt]
    ws = [w.float() for name, w in state_dict.items()
          if (m := _DECODER_LINEAR.search(name)) and int(m.group(1)) % stride == 0 and w.dim() == 2
          and w.shape[1] % block == 0]
    if not ws:
        return {"tensor_types": tensor_types, "format": fmt}
    total = sum(w.numel() for w in ws)
    sig2 = sum(w.double().pow(2).sum().item() for w in ws)
    on_grid = sum(on_block_grid(w, fmt) * w.numel() for w in ws) / total
    kind = BLOCK_FORMATS[fmt][2]
    steps = [_grid(w, bits, block, kind)[1] for w in ws]
    ints = {}
    for sym in (False, True):
        spec = WeightQuantSpec(bits=min(bits, 8), group_size=block, sym=sym)
        err2, exact = 0.0, 0
        for w, step in zip(ws, steps):
            e = (fake_quantize_weight(w, spec).double() - w.double()).abs()
            err2 += e.pow(2).sum().item()
            exact += int((e <= TOL * step).sum().item())
        ints[f"w{bits}-g{block}-{'sym' if sym else 'asym'}"] = {"sqnr_db": _sqnr_db(err2, sig2),
                                                               "exact_fraction": exact / total}
    return {"tensor_types": tensor_types, "format": fmt, "bits": bits, "block": block,
            "weights_measured": total, "block_stride": stride, "on_source_grid": on_grid, "integer_grid": ints}
