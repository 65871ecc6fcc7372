"""Statistics of tensors: SQNR, MSE, streaming moments (kurtosis), outlier channels, the SQNR left
after the best diagonal rescaling. Definitions in :data:`DEFINITIONS` (also in every stats record);
the layer-level collection is :mod:`.layer_stats`, the job :mod:`.stats`."""

from __future__ import annotations

import math

import torch

from ..defaults import EVAL

__all__ = ["OUTLIER_K", "INT8_THRESHOLD", "DEFINITIONS", "Moments", "sqnr_db", "mse", "kurtosis",
           "tensor_stats", "outlier_channels", "channel_absmax", "rescaled_weight_sqnr_db"]


#: an outlier channel's absmax exceeds k x the median channel absmax (config eval.stats.outlier_k)
OUTLIER_K = float(EVAL["stats"]["outlier_k"])


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
