"""Per-layer statistics of an fp and a quantized model: weights, the inputs each linear multiplies
(forward pre-hooks on both models), and the hidden-state distance after every block."""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn

from ..modules import target_linears
from .tensor_stats import (INT8_THRESHOLD, OUTLIER_K, Moments, _channel_summary, _err_stats, _f, _ratio_db,
                           channel_absmax, rescaled_weight_sqnr_db, tensor_stats)

__all__ = ["layer_weight", "weight_stats", "activation_stats", "layerwise_distance"]


def layer_weight(m: nn.Module) -> torch.Tensor:
    """The dense weight a layer computes with (dequantized for quantized modules)."""
    if hasattr(m, "dequantized_weight"):
        return m.dequantized_weight().detach()
    return m.weight.detach()


def _layer_names(model: nn.Module) -> dict[str, nn.Module]:
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
