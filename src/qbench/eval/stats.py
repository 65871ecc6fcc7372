"""Per-layer weight / activation statistics and layer-wise hidden-state distance (the seed's
``analyze_stats`` and ``get_layerwise_distance`` analysis tools).

For every decoder-block linear layer (:func:`qbench.modules.target_linears`, in module order):

* **weights** — of the fp layer and of the quantized layer (its dequantized weight:
  ``dequantized_weight()`` where the module has it, else ``.weight``): mean, std, excess kurtosis
  (Fisher, population moments — ``scipy.stats.kurtosis(bias=True)``), min, max, absmax, and
  *outlier input channels*; plus SQNR (dB) and MSE of the quantized weight against the fp one.
* **activations** — the inputs of each linear on a few token windows, captured with forward
  pre-hooks on both models: the same statistics for the fp model's inputs and for the quantized
  model's inputs, ``sqnr_db`` of the input the quantized layer actually multiplies (after its own
  activation quantizer ``quant_input`` when it has one) against the fp model's input to the same
  layer (the error accumulated up to that matmul), and ``act_quant_sqnr_db`` of the layer's own
  activation quantizer alone (``quant_input(x)`` vs ``x``; None for layers without one).
  Moments are accumulated in float64 with Pébay's pairwise update (:class:`Moments`), so the
  numbers do not depend on how the tokens are batched.

Definitions (also in every record's ``definitions``):

* ``SQNR = 10·log10(Σ ref² / Σ (ref − test)²)`` dB over all elements (∞ for identical tensors; JSON
  holds null then and ``identical: true``). ``MSE = mean (ref − test)²``.
* **Outlier channel**: an input channel whose absmax (over output rows for weights, over tokens for
  activations) exceeds ``outlier_k`` × the median channel absmax of that layer (default k = 20: a
  scale-free rule, so it reads the same for weights and activations and for any model width;
  ``absmax_ratio`` = max/median is the continuous version). For activations also
  ``int8_outlier_channels``: channels with absmax ≥ 6.0, LLM.int8()'s outlier-feature threshold.
* ``*_rescaled`` SQNRs: recipes that fold exact per-channel rescalings into the weights
  (SmoothQuant, AWQ: ``W·diag(s)``, ``x·diag(s)⁻¹``) change weights and activations by more than
  the quantization error. The rescaled SQNR first fits the best diagonal gains to the fp reference
  — weights: ``diag(r)·W·diag(c)`` by alternating least squares, activations: per input channel
  ``c_j`` by least squares — and measures the error left over. For recipes without rescaling it
  is slightly optimistic (the fit absorbs per-channel gain error); ``primary_sqnr`` in the record
  says which one the summary uses.

``layerwise_distance`` compares the hidden states after every decoder block of the fp and the
quantized model on the same inputs: ``rel_l2 = ‖h_q − h_fp‖_F / ‖h_fp‖_F`` over all tokens,
``rel_l2_token_mean`` (the per-token ratio, averaged — not dominated by a few massive-activation
tokens), and ``cosine`` (mean per-token cosine similarity).
"""

from __future__ import annotations

import csv
import math
import time
import weakref
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from ..errors import ConfigError

__all__ = [
    "OUTLIER_K", "INT8_THRESHOLD", "Moments", "sqnr_db", "mse", "kurtosis",
    "tensor_stats", "outlier_channels", "channel_absmax", "rescaled_weight_sqnr_db",
    "layer_weight", "weight_stats", "activation_stats", "layerwise_distance", "write_csv",
    "plot_stats", "evaluate_stats",
]

OUTLIER_K = 20.0
INT8_THRESHOLD = 6.0
DEFINITIONS = {
    "sqnr_db": "10*log10(sum(ref^2)/sum((ref-test)^2)) over all elements; null when identical",
    "kurtosis": "Fisher (excess) kurtosis, population moments (normal = 0)",
    "outlier_channels": "input channels with absmax > outlier_k * median channel absmax",
    "int8_outlier_channels": "activation input channels with absmax >= 6.0 (LLM.int8() threshold)",
    "act sqnr_db": "input the quantized layer multiplies (after its quant_input) vs fp model input",
    "act_quant_sqnr_db": "the layer's own activation quantizer: quant_input(x) vs x",
    "rescaled": "after the best diagonal rescaling of the fp reference (SmoothQuant/AWQ folding)",
    "rel_l2": "||h_q - h_fp||_F / ||h_fp||_F after each block, all tokens",
    "rel_l2_token_mean": "mean over tokens of ||h_q - h_fp|| / ||h_fp||",
    "cosine": "mean over tokens of the cosine similarity of h_q and h_fp",
}


# --------------------------------------------------------------------------------------------
# elementary statistics


def _f(x) -> float:
    return float(x.item()) if torch.is_tensor(x) else float(x)


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """``10·log10(Σ ref² / Σ (ref − test)²)``; ``inf`` when the tensors are equal."""
    ref, test = ref.detach().double(), test.detach().double()
    err = (ref - test).pow(2).sum()
    sig = ref.pow(2).sum()
    return _ratio_db(_f(sig), _f(err))


def _ratio_db(sig: float, err: float) -> float:
    if err <= 0:
        return math.inf
    if sig <= 0:
        return -math.inf
    return 10.0 * math.log10(sig / err)


def mse(ref: torch.Tensor, test: torch.Tensor) -> float:
    return _f((ref.detach().double() - test.detach().double()).pow(2).mean())


def _err_stats(ref: torch.Tensor, test: torch.Tensor) -> dict:
    ref, test = ref.detach().double(), test.detach().double()
    err = _f((ref - test).pow(2).sum())
    return {"sqnr_db": _ratio_db(_f(ref.pow(2).sum()), err), "mse": err / max(1, ref.numel())}


class Moments:
    """Streaming count, mean, central moments M2..M4, min and max of all elements, merged batch by
    batch with Pébay's pairwise formulas (exact up to rounding). Float64 inputs are reduced in
    float64; others in float32 with float64 accumulation (``sum(dtype=float64)``)."""

    __slots__ = ("n", "mean", "m2", "m3", "m4", "min", "max")

    def __init__(self):
        self.n, self.mean, self.m2, self.m3, self.m4 = 0, 0.0, 0.0, 0.0, 0.0
        self.min, self.max = math.inf, -math.inf

    @classmethod
    def of(cls, x: torch.Tensor) -> "Moments":
        """The moments of one tensor's elements."""
        m = cls()
        x = x.detach().reshape(-1)
        if x.dtype != torch.float64:
            x = x.float()
        n = x.numel()
        if n == 0:
            return m
        f64 = torch.float64
        mean = _f(x.sum(dtype=f64)) / n
        d = x - mean
        d2 = d * d
        lo, hi = torch.aminmax(x)
        m.n, m.mean = n, mean
        m.m2, m.m3, m.m4 = _f(d2.sum(dtype=f64)), _f((d2 * d).sum(dtype=f64)), _f((d2 * d2).sum(dtype=f64))
        m.min, m.max = _f(lo), _f(hi)
        return m

    def merge(self, b: "Moments") -> "Moments":
        """Fold the moments of another set of elements into this one (in place)."""
        if b.n == 0:
            return self
        self.min, self.max = min(self.min, b.min), max(self.max, b.max)
        na, nb = self.n, b.n
        if na == 0:
            self.n, self.mean, self.m2, self.m3, self.m4 = nb, b.mean, b.m2, b.m3, b.m4
            return self
        n = na + nb
        delta = b.mean - self.mean
        m2a, m3a, m4a = self.m2, self.m3, self.m4
        self.m4 = (m4a + b.m4 + delta ** 4 * na * nb * (na * na - na * nb + nb * nb) / n ** 3
                   + 6 * delta ** 2 * (na * na * b.m2 + nb * nb * m2a) / n ** 2
                   + 4 * delta * (na * b.m3 - nb * m3a) / n)
        self.m3 = (m3a + b.m3 + delta ** 3 * na * nb * (na - nb) / n ** 2
                   + 3 * delta * (na * b.m2 - nb * m2a) / n)
        self.m2 = m2a + b.m2 + delta ** 2 * na * nb / n
        self.mean += delta * nb / n
        self.n = n
        return self

    def update(self, x: torch.Tensor) -> "Moments":
        return self.merge(Moments.of(x))

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.n) if self.n else math.nan

    @property
    def kurtosis(self) -> float:
        """Fisher (excess) kurtosis with population moments: ``n·M4/M2² − 3``."""
        if not self.n or self.m2 <= 0:
            return math.nan
        return self.n * self.m4 / (self.m2 * self.m2) - 3.0

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "kurtosis": self.kurtosis, "min": self.min,
                "max": self.max, "absmax": max(abs(self.min), abs(self.max)), "numel": self.n}


def kurtosis(x: torch.Tensor) -> float:
    """Fisher (excess) kurtosis of all elements of ``x`` (population moments; normal → 0)."""
    return Moments().update(x).kurtosis


def tensor_stats(x: torch.Tensor) -> dict:
    """mean, std, kurtosis, min, max, absmax, numel of all elements."""
    return Moments().update(x).to_dict()


def channel_absmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """absmax per channel along ``dim`` (the channel axis), over every other axis."""
    x = x.detach().movedim(dim, -1)
    return x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()


def outlier_channels(absmax: torch.Tensor, k: float = OUTLIER_K) -> int:
    """Channels whose absmax exceeds ``k`` × the median channel absmax (module docstring)."""
    absmax = absmax.detach().float().reshape(-1)
    med = absmax.median()
    if med <= 0:
        return int((absmax > 0).sum())
    return int((absmax > k * med).sum())


def _channel_summary(absmax: torch.Tensor, k: float) -> dict:
    med = _f(absmax.median())
    return {"outlier_channels": outlier_channels(absmax, k),
            "absmax_ratio": _f(absmax.max()) / med if med > 0 else math.inf,
            "channels": int(absmax.numel())}


def rescaled_weight_sqnr_db(w_fp: torch.Tensor, w_q: torch.Tensor, iters: int = 6) -> float:
    """SQNR of ``w_q`` against the best ``diag(r)·w_fp·diag(c)`` (alternating least squares;
    the fit in float32 unless the inputs are float64, the SQNR in float64)."""
    dt = torch.float64 if w_fp.dtype == torch.float64 else torch.float32
    w, q = w_fp.detach().to(dt), w_q.detach().to(dt)
    r = torch.ones(w.shape[0], dtype=dt)
    c = torch.ones(w.shape[1], dtype=dt)
    wq, w2 = w * q, w * w
    eps = torch.finfo(dt).tiny
    for _ in range(iters):  # the products w·q and w² are fixed; only the gains move
        c = (r[:, None] * wq).sum(0) / ((r * r)[:, None] * w2).sum(0).clamp_min(eps)
        r = (wq * c[None, :]).sum(1) / (w2 * (c * c)[None, :]).sum(1).clamp_min(eps)
    return sqnr_db(r.double()[:, None] * w_fp.double() * c.double()[None, :], w_q)


# --------------------------------------------------------------------------------------------
# weights


def layer_weight(m: nn.Module) -> torch.Tensor:
    """The dense weight a layer computes with (dequantized for quantized modules)."""
    if hasattr(m, "dequantized_weight"):
        return m.dequantized_weight().detach()
    return m.weight.detach()


def _layer_names(model: nn.Module) -> dict[str, nn.Module]:
    from ..modules import target_linears

    return target_linears(model, include_quantized=True)


def _block_of(name: str) -> int | None:
    import re

    m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _short(name: str) -> str:
    import re

    return re.sub(r"^.*?layers\.\d+\.", "", name)


@torch.no_grad()
def weight_stats(fp_model: nn.Module, q_model: nn.Module, *, outlier_k: float = OUTLIER_K,
                 rescaled: bool = False) -> list[dict]:
    """One dict per decoder-block linear (module order): ``fp`` and ``q`` weight statistics
    (:func:`tensor_stats` + outlier input channels), ``sqnr_db``, ``mse`` and, with ``rescaled``,
    ``sqnr_db_rescaled`` (:func:`rescaled_weight_sqnr_db`)."""
    fp_layers, q_layers = _layer_names(fp_model), _layer_names(q_model)
    out = []
    for name, fm in fp_layers.items():
        qm = q_layers.get(name)
        if qm is None:
            continue
        wf, wq = layer_weight(fm).double().cpu(), layer_weight(qm).double().cpu()
        if wf.shape != wq.shape:
            raise ValueError(f"{name}: weight shapes differ (fp {tuple(wf.shape)}, q {tuple(wq.shape)})")
        row = {"layer": name, "block": _block_of(name), "name": _short(name),
               "in_features": wf.shape[1], "out_features": wf.shape[0],
               "quantized_module": type(qm).__name__,
               "fp": {**tensor_stats(wf), **_channel_summary(channel_absmax(wf, 1), outlier_k)},
               "q": {**tensor_stats(wq), **_channel_summary(channel_absmax(wq, 1), outlier_k)},
               **_err_stats(wf, wq)}
        if rescaled:
            row["sqnr_db_rescaled"] = rescaled_weight_sqnr_db(wf.float(), wq.float())
        out.append(row)
    return out


# --------------------------------------------------------------------------------------------
# activations


class _ActAcc:
    """Per-layer accumulator: input moments and channel absmax; against the fp reference the
    per-channel sums Σr², Σd², Σd·r (d = effective input − reference) in float64; the layer's own
    activation quantizer error."""

    __slots__ = ("mom", "absmax", "srr", "sdd", "sdr", "aq_sig", "aq_err")

    def __init__(self):
        self.mom = Moments()
        self.absmax = None
        self.srr = self.sdd = self.sdr = None
        self.aq_sig = self.aq_err = 0.0

    def add(self, mom: "Moments", absmax: torch.Tensor) -> None:
        self.mom.merge(mom)
        self.absmax = absmax.clone() if self.absmax is None else torch.maximum(self.absmax, absmax)

    def add_err(self, srr, sdd, sdr) -> None:
        if self.srr is None:
            self.srr, self.sdd, self.sdr = srr.clone(), sdd.clone(), sdr.clone()
        else:
            self.srr += srr
            self.sdd += sdd
            self.sdr += sdr

    def summary(self, k: float) -> dict:
        return {**self.mom.to_dict(), **_channel_summary(self.absmax, k),
                "int8_outlier_channels": int((self.absmax >= INT8_THRESHOLD).sum())}


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _as_batches(input_ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    return [input_ids[i:i + batch_size] for i in range(0, input_ids.shape[0], batch_size)]


class _Memo:
    """Results computed once per input tensor within one forward (q/k/v and gate/up share their
    input). Keyed by the tensor *objects* (weak references): a data pointer alone is not an
    identity — once a layer's input is freed, the next layer's input may reuse its address."""

    def __init__(self):
        self._d: dict = {}

    def get(self, tensors: tuple, tag, compute):
        key = (tuple(id(t) for t in tensors), tag)
        hit = self._d.get(key)
        if hit is not None and all(r() is t for r, t in zip(hit[0], tensors)):
            return hit[1]
        value = compute()
        self._d[key] = (tuple(weakref.ref(t) for t in tensors), value)
        return value

    def clear(self) -> None:
        self._d.clear()


def _act_config(mod: nn.Module):
    meta = getattr(mod, "act_meta", None)
    return (type(mod).__name__, tuple(sorted(meta().items()))) if callable(meta) else id(mod)


@torch.no_grad()
def activation_stats(fp_model: nn.Module, q_model: nn.Module, input_ids: torch.Tensor, *,
                     outlier_k: float = OUTLIER_K, batch_size: int = 1, progress: bool = False
                     ) -> list[dict]:
    """Input statistics of every decoder-block linear in both models on ``input_ids``
    (``[n, seqlen]``), see the module docstring. Per batch the fp model runs first and its layer
    inputs are kept (references) until the quantized model has run on the same batch. Layers fed
    the same tensor (q/k/v, gate/up) share one computation."""
    from tqdm.auto import tqdm

    fp_layers, q_layers = _layer_names(fp_model), _layer_names(q_model)
    names = [n for n in fp_layers if n in q_layers]
    acc_fp = {n: _ActAcc() for n in names}
    acc_q = {n: _ActAcc() for n in names}
    a_bits = {n: int(getattr(q_layers[n], "a_bits", 16)) for n in names}
    ref: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name → (fp input, its 2-D view)
    memo = _Memo()  # per forward: input tensor(s) → computed contribution
    f64 = torch.float64

    def observe(x: torch.Tensor, x2: torch.Tensor):
        return memo.get((x,), "obs", lambda: (Moments.of(x2), x2.abs().amax(dim=0).float().cpu()))

    def fp_hook(name):
        def hook(mod, args, kwargs=None):
            x = args[0] if args else kwargs["input"]
            x2 = x.detach().reshape(-1, x.shape[-1])
            ref[name] = (x, x2)
            acc_fp[name].add(*observe(x, x2))
        return hook

    def q_hook(name):
        def hook(mod, args, kwargs=None):
            x_in = args[0] if args else kwargs["input"]
            x = x_in.detach()
            x2 = x.reshape(-1, x.shape[-1])
            a = acc_q[name]
            a.add(*observe(x_in, x2))
            r_in, r = ref.pop(name)
            quantizes = hasattr(mod, "quant_input") and a_bits[name] < 16

            def err():
                xf = x2.float()
                eff, aq = xf, None
                if quantizes:
                    eff = mod.quant_input(x).detach().reshape(x2.shape).float()
                    aq = (_f(xf.pow(2).sum(dtype=f64)), _f((eff - xf).pow(2).sum(dtype=f64)))
                rf = r.to(eff.device).float()
                d = eff - rf
                return ((rf * rf).sum(0, dtype=f64).cpu(), (d * d).sum(0, dtype=f64).cpu(),
                        (d * rf).sum(0, dtype=f64).cpu(), aq)

            srr, sdd, sdr, aq = memo.get((x_in, r_in), ("err", _act_config(mod) if quantizes else None), err)
            a.add_err(srr, sdd, sdr)
            if aq is not None:
                a.aq_sig += aq[0]
                a.aq_err += aq[1]
        return hook

    handles = []
    was = fp_model.training, q_model.training
    fp_model.eval()
    q_model.eval()
    try:
        for n in names:
            handles.append(fp_layers[n].register_forward_pre_hook(fp_hook(n), with_kwargs=True))
            handles.append(q_layers[n].register_forward_pre_hook(q_hook(n), with_kwargs=True))
        dev_fp, dev_q = _model_device(fp_model), _model_device(q_model)
        for batch in tqdm(_as_batches(input_ids, batch_size), desc="act stats", disable=not progress,
                          leave=False):
            fp_model(input_ids=batch.to(dev_fp), use_cache=False)
            memo.clear()
            q_model(input_ids=batch.to(dev_q), use_cache=False)
            ref.clear()
            memo.clear()
    finally:
        for h in handles:
            h.remove()
        fp_model.train(was[0])
        q_model.train(was[1])
    out = []
    for n in names:
        fa, qa = acc_fp[n], acc_q[n]
        if fa.mom.n == 0 or qa.mom.n == 0:
            continue
        # best per-channel gain c_j = 1 + Σd·r/Σr² ; what it leaves: Σd² − (Σd·r)²/Σr²
        srr = qa.srr.clamp_min(1e-300)
        c = 1.0 + qa.sdr / srr
        resid = (qa.sdd - qa.sdr.pow(2) / srr).clamp_min(0).sum()
        out.append({
            "layer": n, "block": _block_of(n), "name": _short(n), "in_features": int(fa.absmax.numel()),
            "tokens": fa.mom.n // max(1, int(fa.absmax.numel())),
            "a_bits": a_bits[n], "quantized_module": type(q_layers[n]).__name__,
            "fp": fa.summary(outlier_k), "q": qa.summary(outlier_k),
            "sqnr_db": _ratio_db(_f(qa.srr.sum()), _f(qa.sdd.sum())),
            "sqnr_db_rescaled": _ratio_db(_f((c.pow(2) * qa.srr).sum()), _f(resid)),
            "act_quant_sqnr_db": _ratio_db(qa.aq_sig, qa.aq_err) if a_bits[n] < 16 and qa.aq_sig else None,
        })
    return out


# --------------------------------------------------------------------------------------------
# layer-wise distance


@torch.no_grad()
def layerwise_distance(fp_model: nn.Module, q_model: nn.Module, input_ids: torch.Tensor, *,
                       batch_size: int = 1) -> list[dict]:
    """Distance between the hidden states of ``fp_model`` and ``q_model`` after every decoder
    block on the same ``input_ids`` (``[n, seqlen]`` or ``[seqlen]``): one dict per block with
    ``rel_l2``, ``rel_l2_token_mean``, ``cosine`` (module docstring) and ``tokens``."""
    from ..models.adapters import get_layers

    fp_blocks, q_blocks = list(get_layers(fp_model)), list(get_layers(q_model))
    if len(fp_blocks) != len(q_blocks):
        raise ValueError(f"block counts differ: fp {len(fp_blocks)}, q {len(q_blocks)}")
    L = len(fp_blocks)
    cur: dict[str, list] = {"fp": [None] * L, "q": [None] * L}

    def hook(kind, i):
        def h(mod, args, output):
            hs = output[0] if isinstance(output, (tuple, list)) else output
            cur[kind][i] = hs.detach()
        return h

    acc = [{"diff2": 0.0, "ref2": 0.0, "tok_rel": 0.0, "cos": 0.0, "n": 0} for _ in range(L)]
    f64 = torch.float64
    handles = [b.register_forward_hook(hook("fp", i)) for i, b in enumerate(fp_blocks)]
    handles += [b.register_forward_hook(hook("q", i)) for i, b in enumerate(q_blocks)]
    was = fp_model.training, q_model.training
    fp_model.eval()
    q_model.eval()
    try:
        for batch in _as_batches(input_ids, batch_size):
            fp_model(input_ids=batch.to(_model_device(fp_model)), use_cache=False)
            q_model(input_ids=batch.to(_model_device(q_model)), use_cache=False)
            for i in range(L):
                a = cur["fp"][i].float().cpu().reshape(-1, cur["fp"][i].shape[-1])
                b = cur["q"][i].float().cpu().reshape(-1, cur["q"][i].shape[-1])
                d = b - a
                # per-token sums accumulated in float64
                aa, bb = (a * a).sum(1, dtype=f64), (b * b).sum(1, dtype=f64)
                dd, ab = (d * d).sum(1, dtype=f64), (a * b).sum(1, dtype=f64)
                st = acc[i]
                st["diff2"] += _f(dd.sum())
                st["ref2"] += _f(aa.sum())
                st["tok_rel"] += _f((dd.sqrt() / aa.sqrt().clamp_min(1e-30)).sum())
                st["cos"] += _f((ab / (aa * bb).sqrt().clamp_min(1e-30)).sum())
                st["n"] += a.shape[0]
            cur["fp"], cur["q"] = [None] * L, [None] * L
    finally:
        for h in handles:
            h.remove()
        fp_model.train(was[0])
        q_model.train(was[1])
    return [{"block": i, "rel_l2": math.sqrt(s["diff2"] / s["ref2"]) if s["ref2"] > 0 else math.nan,
             "rel_l2_token_mean": s["tok_rel"] / s["n"], "cosine": s["cos"] / s["n"], "tokens": s["n"]}
            for i, s in enumerate(acc)]


# --------------------------------------------------------------------------------------------
# outputs


def _flat(row: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}_"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def write_csv(rows: list[dict], path: str | Path) -> Path:
    """Rows (nested dicts flattened to ``fp_kurtosis``, ``q_absmax``…) → CSV, atomically."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = [_flat(r) for r in rows]
    cols: list[str] = []
    for r in flat:
        cols += [k for k in r if k not in cols]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(flat)
    os.replace(tmp, path)
    return path


def _finite(vals: Iterable) -> list[float]:
    return [v if v is not None and math.isfinite(v) else math.nan for v in vals]


def plot_stats(weights: list[dict], activations: list[dict], distance: list[dict],
               out_dir: str | Path, *, title: str = "") -> dict[str, str]:
    """PNG figures (matplotlib Agg): ``stats_kurtosis_absmax.png`` (weights and activations, fp vs
    quantized, per layer), ``stats_sqnr.png`` (weight / activation SQNR per layer),
    ``stats_distance.png`` (relative L2 and 1 − cosine per block). Returns name → path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}

    def save(fig, name):
        p = out_dir / name
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        files[name.removesuffix(".png")] = str(p)

    if weights or activations:
        fig, ax = plt.subplots(2, 2, figsize=(13, 7), sharex="col")
        for col, (rows, what) in enumerate(((weights, "weights"), (activations, "activations"))):
            x = list(range(len(rows)))
            for kind, style in (("fp", "-"), ("q", "--")):
                ax[0, col].plot(x, _finite(r[kind]["kurtosis"] for r in rows), style, label=kind)
                ax[1, col].plot(x, _finite(r[kind]["absmax"] for r in rows), style, label=kind)
            ax[0, col].set_title(f"{what}: excess kurtosis per layer")
            ax[1, col].set_title(f"{what}: absmax per layer")
            for a in ax[:, col]:
                a.set_yscale("symlog")
                a.legend()
            ax[1, col].set_xlabel("linear layer (module order)")
        if title:
            fig.suptitle(title)
        save(fig, "stats_kurtosis_absmax.png")

        fig, ax = plt.subplots(figsize=(10, 4))
        for rows, label in ((weights, "weight"), (activations, "activation input")):
            for key, style, suffix in (("sqnr_db", "-", ""), ("sqnr_db_rescaled", ":", " (rescaled)")):
                ys = _finite(r.get(key) for r in rows)
                if any(math.isfinite(y) for y in ys):
                    ax.plot(range(len(rows)), ys, style, label=f"{label} SQNR{suffix}")
        ax.set_xlabel("linear layer (module order)")
        ax.set_ylabel("dB")
        ax.set_title(f"SQNR per layer {title}".strip())
        ax.legend()
        save(fig, "stats_sqnr.png")
    if distance:
        fig, ax = plt.subplots(figsize=(8, 4))
        x = [d["block"] for d in distance]
        ax.plot(x, _finite(d["rel_l2"] for d in distance), "o-", label="relative L2")
        ax.plot(x, _finite(d["rel_l2_token_mean"] for d in distance), "s--", label="relative L2 (token mean)")
        ax.plot(x, _finite(1 - d["cosine"] for d in distance), "^:", label="1 − cosine")
        ax.set_yscale("log")
        ax.set_xlabel("decoder block")
        ax.set_title(f"hidden-state distance to fp {title}".strip())
        ax.legend()
        save(fig, "stats_distance.png")
    return files


def _json_safe(obj):
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _mean(vals) -> float | None:
    v = [x for x in vals if x is not None and math.isfinite(x)]
    return sum(v) / len(v) if v else None


def _summary(weights, acts, dist, primary: str) -> dict:
    s: dict = {}
    if weights:
        key = "sqnr_db_rescaled" if primary == "rescaled" else "sqnr_db"
        finite = [w for w in weights if math.isfinite(w[key])]
        s["weight_sqnr_db_mean"] = _mean(w[key] for w in weights)
        if finite:
            worst = min(finite, key=lambda w: w[key])
            s["weight_sqnr_db_min"], s["weight_sqnr_db_min_layer"] = worst[key], worst["layer"]
        s["weight_identical_layers"] = sum(1 for w in weights if w["sqnr_db"] == math.inf)
        s["weight_kurtosis_max_fp"] = max(w["fp"]["kurtosis"] for w in weights)
        s["weight_kurtosis_max_q"] = max(w["q"]["kurtosis"] for w in weights)
        s["weight_outlier_channels_fp"] = sum(w["fp"]["outlier_channels"] for w in weights)
        s["weight_outlier_channels_q"] = sum(w["q"]["outlier_channels"] for w in weights)
    if acts:
        key = "sqnr_db_rescaled" if primary == "rescaled" else "sqnr_db"
        s["act_sqnr_db_mean"] = _mean(a[key] for a in acts)
        s["act_kurtosis_max_fp"] = max(a["fp"]["kurtosis"] for a in acts)
        s["act_kurtosis_max_q"] = max(a["q"]["kurtosis"] for a in acts)
        s["act_absmax_max_fp"] = max(a["fp"]["absmax"] for a in acts)
        s["act_outlier_channels_fp"] = sum(a["fp"]["outlier_channels"] for a in acts)
        s["act_outlier_channels_q"] = sum(a["q"]["outlier_channels"] for a in acts)
        s["act_int8_outlier_channels_fp"] = sum(a["fp"]["int8_outlier_channels"] for a in acts)
    if dist:
        s["distance_last_rel_l2"] = dist[-1]["rel_l2"]
        s["distance_last_cosine"] = dist[-1]["cosine"]
        s["distance_max_rel_l2"] = max(d["rel_l2"] for d in dist)
    return s


def reference_in_recipe_basis(fp_model: nn.Module, recipe: list) -> list[str]:
    """Apply the recipe's exact change-of-basis stages to the fp reference, in order: methods of
    kind ``transform`` that provide ``transform_only(model, config)`` (e.g. ``rotate``: the same
    rotation, without its KV quantizer). A rotated model's weights, activations and hidden states
    live in another basis than the original's, so without this every SQNR would measure the
    rotation, not the quantization. Returns the names of the stages applied."""
    from ..methods.base import get_method, parse_recipe

    done = []
    for st in parse_recipe(recipe, "manifest.recipe"):
        m = get_method(st.method)
        if m.kind == "transform" and callable(getattr(m, "transform_only", None)):
            m.transform_only(fp_model, st.config)
            done.append(st.method)
    return done


def evaluate_stats(fp_path: str | Path, q_path: str | Path, out_json: str | Path | None = None,
                   out_csv_dir: str | Path | None = None, *, corpus_dir: str | Path,
                   split: str = "test", n_windows: int = 4, seqlen: int = 256, seed: int = 0,
                   outlier_k: float = OUTLIER_K, activations: bool = True, distance: bool = True,
                   plots: bool = True, batch_size: int = 1, dtype: str = "float32",
                   device: str | None = None, progress: bool = False, model_name: str | None = None,
                   recipe_name: str | None = None) -> dict:
    """Weight / activation statistics and layer-wise distance of the quantized model at ``q_path``
    against the fp model at ``fp_path``: one ``kind: "stats"`` record (per-layer lists
    ``weights``, ``activations``, ``distance``; ``metrics`` = summary scalars) plus CSVs
    (``weights.csv``, ``activations.csv``, ``distance.csv``) and PNG plots in ``out_csv_dir``.

    Token windows: ``split="test"``: the first ``n_windows`` non-overlapping ``seqlen`` windows of
    the corpus test split (the perplexity windows); ``"calib"``: ``n_windows`` calibration windows
    sampled with ``seed`` (:func:`qbench.data.corpora.sample_calibration`)."""
    from ..records import base_record, descriptor_of, load_for_eval, pick_device, write_record
    from ..data.corpora import load_tokens, sample_calibration
    from .ppl import windows

    if split not in ("test", "calib"):
        raise ConfigError(f"split={split!r}; allowed values: test, calib")
    if n_windows < 1 or seqlen < 2:
        raise ConfigError(f"n_windows={n_windows} and seqlen={seqlen} must be >= 1 and >= 2")
    if outlier_k <= 1:
        raise ConfigError(f"outlier_k={outlier_k} must be > 1 (a multiple of the median absmax)")
    device = pick_device(device)
    ids = (windows(load_tokens(corpus_dir, "test"), seqlen, n_windows) if split == "test"
           else sample_calibration(corpus_dir, n_windows, seqlen, seed))
    t0 = time.perf_counter()
    fp_model, _, _ = load_for_eval(fp_path, dtype=dtype, device=device)
    q_model, _, manifest = load_for_eval(q_path, dtype=dtype, device=device)
    transformed = reference_in_recipe_basis(fp_model, manifest.get("recipe", []))
    rescaling = [d["method"] for d in descriptor_of(manifest)["stages"] if d.get("rescales_weights")]
    primary = "rescaled" if rescaling else "plain"
    w = weight_stats(fp_model, q_model, outlier_k=outlier_k, rescaled=bool(rescaling))
    a = activation_stats(fp_model, q_model, ids, outlier_k=outlier_k, batch_size=batch_size,
                         progress=progress) if activations else []
    d = layerwise_distance(fp_model, q_model, ids, batch_size=batch_size) if distance else []
    seconds = time.perf_counter() - t0
    files: dict[str, str] = {}
    if out_csv_dir is not None:
        out_csv_dir = Path(out_csv_dir)
        for name, rows in (("weights", w), ("activations", a), ("distance", d)):
            if rows:
                files[f"{name}_csv"] = str(write_csv(rows, out_csv_dir / f"{name}.csv"))
        if plots:
            files.update(plot_stats(w, a, d, out_csv_dir, title=recipe_name or ""))
    metrics = _summary(w, a, d, primary)
    rec = base_record(
        "stats", manifest, model=model_name, recipe=recipe_name, device=device, dtype=dtype,
        metrics=_json_safe(metrics), weights=_json_safe(w), activations=_json_safe(a),
        distance=_json_safe(d), identical=metrics.get("weight_identical_layers") == len(w) and bool(w),
        primary_sqnr=primary, rescaling_methods=rescaling, reference_transforms=transformed,
        definitions=DEFINITIONS, files=files,
        seconds=seconds,
        eval={"fp_path": str(fp_path), "corpus_dir": str(corpus_dir), "split": split,
              "n_windows": int(ids.shape[0]), "seqlen": seqlen, "seed": seed if split == "calib" else None,
              "outlier_k": outlier_k, "int8_threshold": INT8_THRESHOLD, "batch_size": batch_size})
    if out_json is not None:
        write_record(out_json, rec)
    return rec
