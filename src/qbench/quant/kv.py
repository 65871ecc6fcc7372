"""KV-cache quantizers: KIVI and KVQuant (tensor-level; the caches live in ``modules/kv_cache.py``).

Both the perplexity path (fake-quant inside attention) and the packed caches call the functions
below, so the two paths produce the same numbers bit for bit (same codes, same fp16 parameters,
same float32 dequantization, same cast back to the compute dtype).

Tensor conventions: attention K/V are ``[batch, kv_heads, tokens, head_dim]``; the quantizers work
on 2-D/3-D "row" views with the quantized axis last:

* K rows (per-channel):  ``[batch, C, tokens]`` with ``C = kv_heads * head_dim`` (channel ``h*D+d``);
* V rows (per-token):    ``[batch, tokens, C]``.

KIVI (Liu et al., 2024) — asymmetric uniform, scale and minimum stored in fp16:

* K per channel: groups of ``group_size`` consecutive tokens of one channel share (scale, min);
* V per token: groups of ``group_size`` consecutive channels of one token's ``C``-vector share
  (scale, min). Groups follow the flattened ``kv_heads*head_dim`` vector, so with
  ``head_dim >= group_size`` (every real model) they never cross a head, and tiny test models
  with ``head_dim < group_size`` still work;
* ``x ≈ q*scale + min`` with ``q = clamp(round((x-min)/scale), 0, 2^b-1)``. ``min`` is rounded
  *down* and ``scale`` *up* to fp16, so every value of the group lies inside the representable
  range and the round-trip error is at most ``scale/2`` (the stored fp16 scale);
* residual window (KIVI's reference, ``models/llama_kivi.py``): K leaves the window in blocks of
  ``residual`` tokens — the window is flushed (quantized in groups of ``group_size`` tokens) when
  it holds ``residual`` keys, so ``T mod residual`` keys are fp after ``T`` tokens; V token by
  token, the newest ``residual`` values fp. After ``T`` tokens ``kivi_quant_lengths(T)`` tokens of
  K / V are quantized, whatever the update pattern was (prefill + decode or token by token). In a
  decode step the flush happens after attention (:func:`kivi_decode_bounds`).

KVQuant (Hooper et al., 2024), as its reference code (SqueezeAILab/KVQuant
``quant/kvquant/simquant_module_quantizer.py``, ``llama_simquant.py``: keys per channel, values
per token, NUQ with dense-and-sparse outliers):

* K is quantized **pre-RoPE**, per channel: each channel is normalized to ``[-1, 1]`` with its
  calibrated outlier thresholds (``lo_c``, ``hi_c``: the ``outlier_fraction/2`` and
  ``1 - outlier_fraction/2`` quantiles of the channel on the calibration set, stored in fp16), then
  snapped to **one** non-uniform codebook of ``2^b`` levels per layer, learned offline on every
  channel's normalized inliers (a streaming cache cannot know a channel's future range: that is
  why KVQuant calibrates K offline). Values outside ``[lo_c, hi_c]`` are kept in fp16 as a sparse
  matrix (per-token CSR: counts int16, channel indices int16, values fp16).
* V is quantized per token: the ``m`` lowest and ``m`` highest values of each token vector — the
  values at or beyond its per-token quantile thresholds (:func:`n_value_outliers`) — are kept in
  fp16 (values + int16 indices); the inliers are recentred with the token's median as the
  reference does, normalized with the token's (center, half-range) (fp16) to ``[-1, 1]`` and
  snapped to a per-layer codebook of ``2^b`` levels learned offline.
* Codebooks come from sensitivity-weighted 1-D k-means (Lloyd iterations starting from the uniform
  grid on ``[-1, 1]``, so NUQ is never worse than uniform on the calibration objective; the
  weighted squared error is non-increasing in every iteration). See :func:`weighted_kmeans_1d`.
* The first ``first_fp16`` tokens (attention sink) are kept exactly (post-RoPE, compute dtype).
* Pre-RoPE: the attention side (cache ``update`` and the attention hook) only sees post-RoPE K in
  transformers v5 (``Cache.update`` receives no cos/sin). We invert the rotation with the model's
  own rotary embedding at the token positions (``k·cos − rot(k)·sin``, divided by
  ``cos²+sin²`` when the rope type scales), quantize, and re-apply RoPE after dequantization.
  RoPE is orthogonal, so the round trip costs ~1 ulp, far below the quantization error; it keeps
  one code path for the packed cache (which stores pre-RoPE codes and rotates on read, as KVQuant's
  kernels do) and the fake-quant perplexity path, works for fused ``qkv_proj`` and for weight-
  quantized ``k_proj`` replacements, and needs no hooks on linears. It assumes positions
  ``0..T-1`` (no left padding), which is what perplexity windows and single-prompt generation use.
"""

from __future__ import annotations

import math

import torch

from .packing import pack, packed_words, unpack

__all__ = [
    "FP16_MAX", "round_fp16_down", "round_fp16_up", "minmax_qparams_fp16",
    "quant_groups", "dequant_groups", "pack_codes", "unpack_codes",
    "k_to_rows", "rows_to_k", "v_to_rows", "rows_to_v",
    "kivi_quant_lengths", "kivi_fake_quant",
    "rotate_half", "apply_rope", "invert_rope",
    "n_value_outliers", "weighted_kmeans_1d", "weighted_kmeans_1d_reference", "nearest_level",
    "kvq_quant_k", "kvq_dequant_k", "kvq_quant_v", "kvq_dequant_v", "kvq_norm_params",
    "quantile_linear", "outlier_side_fraction",
    "fit_kvquant_layer", "kvquant_fake_quant",
]

FP16_MAX = 65504.0


# ----------------------------------------------------------------------------- fp16 rounding
def round_fp16_down(x: torch.Tensor) -> torch.Tensor:
    """Largest fp16 value ``<= x`` (as float32)."""
    x = x.float().clamp(-FP16_MAX, FP16_MAX)
    h = x.half()
    lower = torch.nextafter(h, torch.full_like(h, float("-inf")))
    return torch.where(h.float() > x, lower, h).float()


def round_fp16_up(x: torch.Tensor) -> torch.Tensor:
    """Smallest fp16 value ``>= x`` (as float32)."""
    x = x.float().clamp(-FP16_MAX, FP16_MAX)
    h = x.half()
    upper = torch.nextafter(h, torch.full_like(h, float("inf")))
    return torch.where(h.float() < x, upper, h).float()


def minmax_qparams_fp16(xmin: torch.Tensor, xmax: torch.Tensor, bits: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric (scale, min) whose fp16 values cover ``[xmin, xmax]`` (KIVI's parameters).

    Returned as float32 tensors holding fp16-representable values. A constant group gets
    ``scale = 1`` (its single value is then exactly ``min`` when ``min`` is fp16-representable)."""
    maxq = 2**bits - 1
    mn = round_fp16_down(xmin)
    scale = round_fp16_up((xmax.float() - mn) / maxq)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, mn


# ----------------------------------------------------------------------------- KIVI primitives
def quant_groups(x: torch.Tensor, bits: int, group_size: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize the last axis of ``x [..., n]`` in groups of ``group_size`` (n % group_size == 0).

    Returns ``codes [..., n] uint8, scale [..., n/g] fp16, min [..., n/g] fp16``."""
    *lead, n = x.shape
    if n % group_size:
        raise ValueError(f"group_size={group_size} does not divide {n}")
    xg = x.float().reshape(*lead, n // group_size, group_size)
    scale, mn = minmax_qparams_fp16(xg.amin(-1), xg.amax(-1), bits)
    q = torch.clamp(torch.round((xg - mn.unsqueeze(-1)) / scale.unsqueeze(-1)), 0, 2**bits - 1)
    return q.reshape(*lead, n).to(torch.uint8), scale.half(), mn.half()


def dequant_groups(codes: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quant_groups` (float32)."""
    *lead, n = codes.shape
    g = n // scale.shape[-1] if scale.shape[-1] else 1
    q = codes.float().reshape(*lead, scale.shape[-1], g)
    return (q * scale.float().unsqueeze(-1) + mn.float().unsqueeze(-1)).reshape(*lead, n)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`qbench.quant.packing.pack`, vectorized for 1/2/4/8 bits and device-agnostic (same
    layout: little-endian bit stream per row cut into int32 words, rows padded to 32 values)."""
    if 32 % bits:
        return pack(codes.cpu(), bits).to(codes.device)
    *lead, n = codes.shape
    per = 32 // bits
    n_pad = -(-n // 32) * 32
    q = codes.to(torch.int64)
    if n_pad != n:
        q = torch.nn.functional.pad(q, (0, n_pad - n))
    shifts = torch.arange(0, 32, bits, device=codes.device, dtype=torch.int64)
    words = (q.reshape(*lead, n_pad // per, per) << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """:func:`qbench.quant.packing.unpack`, vectorized for 1/2/4/8 bits (same layout)."""
    if 32 % bits:
        return unpack(packed.cpu(), bits, n).to(packed.device)
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int64)
    words = packed.to(torch.int64) & 0xFFFFFFFF
    vals = (words.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return vals.reshape(*packed.shape[:-1], packed.shape[-1] * per)[..., :n].to(torch.uint8)


def k_to_rows(k: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, D] → [B, H*D, T]`` (channels × tokens)."""
    b, h, t, d = k.shape
    return k.permute(0, 1, 3, 2).reshape(b, h * d, t)


def rows_to_k(rows: torch.Tensor, h: int, d: int) -> torch.Tensor:
    b, c, t = rows.shape
    return rows.reshape(b, h, d, t).permute(0, 1, 3, 2)


def v_to_rows(v: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, D] → [B, T, H*D]`` (tokens × channels)."""
    b, h, t, d = v.shape
    return v.transpose(1, 2).reshape(b, t, h * d)


def rows_to_v(rows: torch.Tensor, h: int, d: int) -> torch.Tensor:
    b, t, c = rows.shape
    return rows.reshape(b, t, h, d).transpose(1, 2)


def kivi_quant_lengths(n_tokens: int, residual: int, group_size: int) -> tuple[int, int]:
    """Tokens of K and of V held quantized after ``n_tokens`` tokens (the rest is the fp window),
    as KIVI's reference (``models/llama_kivi.py``) and the seed's prefill-with-quant split them:
    K in whole blocks of ``residual`` tokens — the newest ``T mod R`` keys stay in full precision
    and a block is quantized (in groups of ``group_size`` tokens) the moment the window holds
    ``R`` keys; V token by token — the newest ``R`` values stay in full precision.
    ``residual = 0`` (not in the reference, which divides by R): K in whole groups, V all."""
    if residual <= 0:
        return (n_tokens // group_size) * group_size, n_tokens
    return (n_tokens // residual) * residual, max(n_tokens - residual, 0)


def kivi_decode_bounds(n_tokens: int, residual: int, group_size: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode-faithful split for teacher-forced scoring: query ``i`` sees key/value ``j``
    quantized iff ``j < bk[i]`` / ``j < bv[i]``. In KIVI's decode step the new token is appended
    to the full-precision window, attention runs, and only then the window is flushed (K when it
    holds R keys, V its oldest value once it holds R+1), so query ``i`` reads the cache state after
    ``i`` tokens plus itself in full precision: ``bk[i], bv[i] = kivi_quant_lengths(i)``."""
    i = torch.arange(n_tokens)
    if residual <= 0:
        return (i // group_size) * group_size, i
    return (i // residual) * residual, (i - residual).clamp_min(0)


def kivi_v_group(n_channels: int, group_size: int) -> int:
    """Channels per V group (``group_size``; must divide ``kv_heads*head_dim``)."""
    if n_channels % group_size:
        raise ValueError(f"group_size={group_size} does not divide kv_heads*head_dim={n_channels}")
    return group_size


def kivi_fake_quant(k: torch.Tensor, v: torch.Tensor, *, k_bits: int, v_bits: int,
                    group_size: int, residual: int, lengths: tuple[int, int] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """What attention sees from a KIVI cache holding exactly these ``T`` tokens (a prefill with
    quantization): K/V older than the fp window quantized, the window exact. Same numbers as
    :class:`qbench.modules.kv_cache.KIVILayer` with ``prefill_with_quant=True``. ``lengths``
    overrides the quantized ``(K, V)`` prefix lengths (K: a multiple of ``group_size``) — with
    ``(T//G*G, T)`` every token gets the value it has once flushed (the decode-faithful view)."""
    b, h, t, d = k.shape
    nqk, nqv = lengths if lengths is not None else kivi_quant_lengths(t, residual, group_size)
    if k_bits < 16 and nqk:
        rows = k_to_rows(k[:, :, :nqk])
        kq = rows_to_k(dequant_groups(*quant_groups(rows, k_bits, group_size)), h, d).to(k.dtype)
        k = torch.cat([kq, k[:, :, nqk:]], dim=2)
    if v_bits < 16 and nqv:
        rows = v_to_rows(v[:, :, :nqv])
        vq = rows_to_v(dequant_groups(*quant_groups(rows, v_bits, kivi_v_group(h * d, group_size))),
                       h, d).to(v.dtype)
        v = torch.cat([vq, v[:, :, nqv:]], dim=2)
    return k, v


# ----------------------------------------------------------------------------- RoPE
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _bcast(t: torch.Tensor) -> torch.Tensor:
    # cos/sin come as [B or 1, T, D]; K is [B, H, T, D]
    return t.unsqueeze(1) if t.dim() == 3 else t


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF-layout RoPE (``x·cos + rot(x)·sin``) in float32."""
    cos, sin = _bcast(cos).float(), _bcast(sin).float()
    xf = x.float()
    return xf * cos + rotate_half(xf) * sin


def invert_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scaled: bool = False
                ) -> torch.Tensor:
    """Inverse of :func:`apply_rope` (float32); ``scaled`` when ``cos²+sin² != 1`` (rope types
    with an attention scaling factor)."""
    cos, sin = _bcast(cos).float(), _bcast(sin).float()
    xf = x.float()
    out = xf * cos - rotate_half(xf) * sin
    if scaled:
        out = out / (cos * cos + sin * sin)
    return out


# ----------------------------------------------------------------------------- KVQuant primitives
def n_value_outliers(n_channels: int, fraction: float) -> int:
    """Outliers kept per V token vector: ``2m`` — the ``m`` lowest and ``m`` highest values, with
    ``m = floor(p·(C-1)) + 1`` and ``p = outlier_fraction/2``: the number of values at or beyond
    the reference's per-token quantile thresholds (``torch.quantile`` at ``p`` and ``1-p``,
    linear interpolation; ``<=``/``>=``) when the token has no ties there (0 when fraction is 0).
    Ties at a threshold would make the reference keep more; a fixed count keeps the packed layout
    fixed-size."""
    if fraction <= 0:
        return 0
    m = int(math.floor(outlier_side_fraction(fraction) * (n_channels - 1) + 1e-9)) + 1
    return min(2 * m, 2 * ((n_channels - 1) // 2))


_COUNT_MAX_MIDS = 15  # codebooks of up to 16 levels (4 bits) use compare-and-count


def nearest_level(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level. ``levels [..., K]`` sorted ascending, batched like ``x [..., N]``
    (or 1-D ``[K]`` shared by every row). Ties go to the lower level."""
    mids = (levels[..., 1:] + levels[..., :-1]) * 0.5
    if mids.shape[-1] <= _COUNT_MAX_MIDS:
        # The index is the number of midpoints strictly below x (what bucketize/searchsorted
        # return with right=False); for <= 16 levels, K-1 vectorised compares beat the per-element
        # binary search ~5x on the CPU (same integers).
        a = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
        for j in range(mids.shape[-1]):
            a += x > (mids[j] if mids.dim() == 1 else mids[..., j:j + 1])
        return a.long()
    if mids.dim() == 1:
        return torch.bucketize(x.contiguous(), mids.contiguous())
    return torch.searchsorted(mids.contiguous(), x.contiguous())


def _exact_prefix_sums(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compensated prefix sums of ``v [G, N]`` (float64) along the last axis: ``(P, E)``, both
    ``[G, N+1]`` with a leading 0, such that ``P[i] + E[i]`` is ``Σ_{j<i} v_j`` to ~eps² of the
    total. ``P`` is the plain ``cumsum``; ``E`` accumulates the exact rounding error of each of its
    additions (Knuth's TwoSum): a run sum ``P[r]−P[l] + E[r]−E[l]`` is then accurate to float64
    round-off *of the run*, however small the run is next to the total (plain prefix differences
    lose ~eps·total, which swamps runs of tiny sensitivity weights)."""
    zero = torch.zeros(*v.shape[:-1], 1, dtype=v.dtype, device=v.device)
    p = torch.cat([zero, v.cumsum(-1)], -1)
    a, s = p[..., :-1], p[..., 1:]
    bv = s - a
    err = (a - (s - bv)) + (v - bv)  # (a + v) − s exactly
    return p, torch.cat([zero, err.cumsum(-1)], -1)


def _run_sums(p: torch.Tensor, e: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sums over the runs ``[b[:, j], b[:, j+1])`` from :func:`_exact_prefix_sums`."""
    lo, hi = b[:, :-1], b[:, 1:]
    return (p.gather(1, hi) - p.gather(1, lo)) + (e.gather(1, hi) - e.gather(1, lo))


@torch.no_grad()
def weighted_kmeans_1d(x: torch.Tensor, w: torch.Tensor, k: int, iters: int,
                       init: torch.Tensor | None = None, lo: torch.Tensor | None = None,
                       hi: torch.Tensor | None = None) -> tuple[torch.Tensor, list[float]]:
    """Batched, sensitivity-weighted Lloyd k-means in 1-D.

    ``x, w: [G, N]`` (G independent problems, e.g. channels); weight 0 excludes a point.
    Initialization: ``init [G, k]`` or the uniform grid between ``lo`` and ``hi`` (default: the
    min/max of the points with positive weight). Returns the sorted centroids ``[G, k]`` (float32)
    and the total weighted squared error after each assignment step (``iters + 1`` values, float64;
    Lloyd's algorithm makes it non-increasing: an assignment to the nearest centroid and a
    weighted-mean update can each only lower it; an empty cluster keeps its centroid)."""
    x = x.float()
    w = w.float().clamp_min(0)
    g, n = x.shape
    if init is None:
        big = torch.finfo(torch.float32).max
        valid = w > 0
        if lo is None:
            lo = torch.where(valid, x, torch.full_like(x, big)).amin(1)
            lo = torch.where(valid.any(1), lo, x.amin(1) if n else torch.zeros(g))
        if hi is None:
            hi = torch.where(valid, x, torch.full_like(x, -big)).amax(1)
            hi = torch.where(valid.any(1), hi, x.amax(1) if n else torch.zeros(g))
        t = torch.linspace(0, 1, k, device=x.device)
        c = lo.float().unsqueeze(1) + (hi.float() - lo.float()).unsqueeze(1) * t
    else:
        c = init.float().clone()
    c, _ = c.sort(dim=1)
    # Lloyd on sorted data: a cluster is a contiguous run of the sorted points (the nearest level
    # of x is the number of midpoints below it), so the cluster sums Σw, Σw·x, Σw·x² are
    # differences of compensated float64 prefix sums at the run boundaries (``searchsorted`` of the
    # k-1 midpoints) — O(G·k·log N) per iteration instead of O(G·N) assignments, gathers and
    # scatter-adds. Identical assignments; the sums differ from a per-point accumulation by float64
    # round-off only, and the error history is Σ_j (S2_j − 2c_j·S1_j + c_j²·S0_j) in float64.
    xs, order = x.sort(dim=1)
    wd = w.gather(1, order).double()
    xd = xs.double()
    prefix = [_exact_prefix_sums(t) for t in (wd, wd * xd, wd * xd * xd)]
    ends = torch.full((g, 1), n, dtype=torch.long, device=x.device)
    starts = torch.zeros(g, 1, dtype=torch.long, device=x.device)
    history: list[float] = []
    for it in range(iters + 1):
        mids = (c[:, 1:] + c[:, :-1]) * 0.5
        cut = torch.searchsorted(xs, mids.contiguous(), right=True)  # points <= each midpoint
        b = torch.cat([starts, cut, ends], 1)
        s0, s1, s2 = (_run_sums(p, e, b) for p, e in prefix)
        cd = c.double()
        history.append(float((s2 - 2 * cd * s1 + cd * cd * s0).sum()))
        if it == iters:
            break
        c = torch.where(s0 > 0, s1 / s0.clamp_min(1e-300), cd).float()
        c, _ = c.sort(dim=1)
    return c, history


@torch.no_grad()
def weighted_kmeans_1d_reference(x: torch.Tensor, w: torch.Tensor, k: int, iters: int,
                                 lo: torch.Tensor | None = None, hi: torch.Tensor | None = None
                                 ) -> tuple[torch.Tensor, list[float]]:
    """Plain weighted Lloyd (per-point assignment by binary search, scatter-add cluster sums,
    uniform start between ``lo`` and ``hi``, by default the weighted points' min and max): the
    reference :func:`weighted_kmeans_1d` is tested and benchmarked against."""
    x, wd = x.float(), w.float().clamp_min(0).double()
    valid = w > 0
    if lo is None:
        lo = torch.where(valid, x, torch.full_like(x, float("inf"))).amin(1)
    if hi is None:
        hi = torch.where(valid, x, torch.full_like(x, float("-inf"))).amax(1)
    lo, hi = lo.float(), hi.float()
    c = (lo.unsqueeze(1) + (hi - lo).unsqueeze(1) * torch.linspace(0, 1, k, device=x.device)).sort(1).values
    hist = []
    for it in range(iters + 1):
        a = torch.searchsorted(((c[:, 1:] + c[:, :-1]) * 0.5).contiguous(), x.contiguous())
        hist.append(float((wd * (x - c.gather(1, a)).double() ** 2).sum()))
        if it == iters:
            break
        z = torch.zeros(x.shape[0], k, dtype=torch.float64, device=x.device)
        sums, ws = z.clone().scatter_add_(1, a, wd * x.double()), z.clone().scatter_add_(1, a, wd)
        c = torch.where(ws > 0, sums / ws.clamp_min(1e-300), c.double()).float().sort(1).values
    return c, hist


def outlier_side_fraction(outlier_fraction: float) -> float:
    """KVQuant's per-side quantile: ``1 - t`` with ``t = 1 - (1 - sparsity_threshold)/2`` and
    ``sparsity_threshold = 1 - outlier_fraction`` (the reference's arithmetic, same float)."""
    t = 1 - ((1 - (1 - outlier_fraction)) / 2)
    return 1 - t


def quantile_linear(x: torch.Tensor, q: float, dim: int) -> torch.Tensor:
    """``torch.quantile``/``np.percentile`` with linear interpolation along ``dim`` (by sorting:
    no size limit)."""
    s, _ = x.float().sort(dim=dim)
    n = s.shape[dim]
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    a, b = s.narrow(dim, lo, 1).squeeze(dim), s.narrow(dim, hi, 1).squeeze(dim)
    return a + (b - a) * frac


def kvq_norm_params(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(zero point, half range)`` from the stored fp16 thresholds (float32): the
    inliers ``[lo, hi]`` map to ``[-1, 1]``."""
    lo, hi = lo.float(), hi.float()
    rng = (hi - lo) / 2
    return (hi + lo) / 2, torch.where(rng > 0, rng, torch.ones_like(rng))


def kvq_quant_k(rows: torch.Tensor, levels: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """Quantize pre-RoPE K rows ``[N, C]`` (one row per token): each channel normalized with its
    thresholds (``(x - (hi+lo)/2) / ((hi-lo)/2)``), snapped to the layer's one codebook
    ``levels [K]`` (fp16 values in the normalized domain, sorted); values outside ``[lo, hi]`` are
    kept exactly (fp16) as sparse outliers (KVQuant's per-channel dense-and-sparse keys).

    Returns ``codes [N, C] uint8`` and the outliers as CSR over rows:
    ``counts [N] int16, idx [nnz] int16 (channel), val [nnz] fp16`` (row-major order)."""
    x = rows.float()
    zp, rng = kvq_norm_params(lo, hi)
    codes = nearest_level((x - zp) / rng, levels.float()).to(torch.uint8)
    out = (x < lo.float()) | (x > hi.float())
    counts = out.sum(1).to(torch.int16)
    nz = out.nonzero(as_tuple=False)
    idx = nz[:, 1].to(torch.int16)
    val = x[out].half()
    return codes, counts, idx, val


def kvq_dequant_k(codes: torch.Tensor, levels: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                  counts: torch.Tensor, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`kvq_quant_k` → float32 ``[N, C]``."""
    zp, rng = kvq_norm_params(lo, hi)
    x = levels.float()[codes.long()] * rng + zp
    if val.numel():
        rows = torch.repeat_interleave(torch.arange(codes.shape[0], device=codes.device), counts.long())
        x = x.clone()
        x[rows, idx.long()] = val.float()
    return x


def _value_outlier_indices(x: torch.Tensor, n_out: int) -> torch.Tensor:
    """``[N, n_out]`` channel indices of each row's ``n_out/2`` smallest and ``n_out/2`` largest
    values (KVQuant's per-token lower/upper quantile outliers)."""
    m = n_out // 2
    return torch.cat([x.topk(m, dim=1, largest=False).indices, x.topk(m, dim=1).indices], 1)


def kvq_quant_v(rows: torch.Tensor, levels: torch.Tensor, n_out: int):
    """Quantize V rows ``[N, C]`` per token with the per-layer normalized codebook ``levels [K]``
    (fp16 values in [-1, 1], sorted), keeping the ``n_out/2`` lowest and ``n_out/2`` highest values
    of each token exactly (KVQuant's ``get_outliers_dynamic``: per-token quantiles; by rank here,
    see :func:`n_value_outliers`). The inlier range is recentred with the token's median as the
    reference does (outliers replaced by the median before the min/max).

    Returns ``codes [N, C] uint8, center [N] fp16, scale [N] fp16, idx [N, n_out] int16,
    val [N, n_out] fp16``."""
    x = rows.float()
    n, c = x.shape
    inl = torch.ones_like(x, dtype=torch.bool)
    if n_out:
        idx = _value_outlier_indices(x, n_out)
        val = x.gather(1, idx)
        inl.scatter_(1, idx, False)
    else:
        idx = torch.zeros(n, 0, dtype=torch.long, device=x.device)
        val = torch.zeros(n, 0, device=x.device)
    med = x.median(dim=1, keepdim=True).values
    tmp = torch.where(inl, x, med)
    mn, mx = tmp.amin(1), tmp.amax(1)
    center = ((mx + mn) * 0.5).half().float()
    scale = round_fp16_up(torch.maximum(mx - center, center - mn))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    u = (x - center.unsqueeze(1)) / scale.unsqueeze(1)
    codes = nearest_level(u, levels.float()).to(torch.uint8)
    return codes, center.half(), scale.half(), idx.to(torch.int16), val.half()


def kvq_dequant_v(codes, center, scale, idx, val, levels) -> torch.Tensor:
    """Inverse of :func:`kvq_quant_v` → float32 ``[N, C]``."""
    x = levels.float()[codes.long()] * scale.float().unsqueeze(-1) + center.float().unsqueeze(-1)
    if val.numel():
        x = x.scatter(-1, idx.long(), val.float())
    return x


def _percentile_normalized(x: torch.Tensor, fraction: float, dim: int
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's calibration normalization (``SimQuant.quantize``): thresholds at the
    per-side quantiles along ``dim`` (``np.percentile``, linear), ``u = (x - zp) / range`` with
    ``zp, range`` their midpoint and half-distance; inliers are ``|u| <= 1``. Returns
    ``(u, inlier mask, lo, hi)``."""
    p = outlier_side_fraction(fraction)
    if fraction <= 0:
        lo, hi = x.amin(dim), x.amax(dim)
    else:
        lo, hi = quantile_linear(x, p, dim), quantile_linear(x, 1 - p, dim)
    zp, rng = (hi + lo) / 2, (hi - lo) / 2
    rng = torch.where(rng > 0, rng, torch.ones_like(rng))
    u = (x - zp.unsqueeze(dim)) / rng.unsqueeze(dim)
    return u, u.abs() <= 1, lo, hi


@torch.no_grad()
def fit_kvquant_layer(k_pre: torch.Tensor, v: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor,
                      *, bits: int, outlier_fraction: float, iters: int) -> dict:
    """Learn one layer's KVQuant parameters from calibration data, as the reference's
    ``SimQuant.quantize`` (``llama_simquant.py``: ``k_proj`` per channel, ``v_proj`` per token):

    * keys: per-channel thresholds at the ``outlier_fraction/2`` and ``1 - outlier_fraction/2``
      quantiles over the calibration tokens (fp16, rounded outwards); the keys normalized per
      channel to ``[-1, 1]`` with them; **one** codebook of ``2^b`` levels for the layer fitted
      on every channel's normalized inliers, weighted by the sensitivities;
    * values: the same normalization per token (quantile thresholds of each token vector), one
      codebook of ``2^b`` levels for the layer on the normalized inliers.

    ``k_pre, v, wk, wv: [N, C]`` (pre-RoPE keys, values and their sensitivity weights, sink tokens
    already removed). Deviation from the reference: weighted Lloyd iterations from the uniform
    grid on ``[-1, 1]`` (:func:`weighted_kmeans_1d`) instead of scikit-learn's k-means++
    (``max_iter=50``). Returns fp16 ``k_levels [2^b]``, ``k_lo, k_hi [C]``, ``v_levels [2^b]``
    and statistics (weighted error of the uniform grid vs the learned codebook)."""
    k = 2**bits
    kx = k_pre.float()
    _, _, lo, hi = _percentile_normalized(kx, outlier_fraction, 0)
    lo, hi = round_fp16_down(lo), round_fp16_up(hi)  # the stored thresholds, rounded outwards
    zp, rng = kvq_norm_params(lo, hi)  # normalize as the runtime does, with the stored values
    uk = (kx - zp) / rng
    kin = (kx >= lo) & (kx <= hi)
    kw = torch.where(kin, wk.float(), torch.zeros_like(uk))
    edge = (torch.tensor([-1.0]), torch.tensor([1.0]))
    k_levels, k_hist = weighted_kmeans_1d(uk.reshape(1, -1), kw.reshape(1, -1), k, iters,
                                          lo=edge[0], hi=edge[1])
    k_levels, _ = k_levels[0].half().float().sort()

    uv, vin, _, _ = _percentile_normalized(v.float(), outlier_fraction, 1)
    vw = torch.where(vin, wv.float(), torch.zeros_like(uv))
    v_levels, v_hist = weighted_kmeans_1d(uv.reshape(1, -1), vw.reshape(1, -1), k, iters,
                                          lo=edge[0], hi=edge[1])
    v_levels, _ = v_levels[0].half().float().sort()
    outside = (kx < lo.float()) | (kx > hi.float())
    return {
        "k_levels": k_levels.half(), "k_lo": lo.half(), "k_hi": hi.half(), "v_levels": v_levels.half(),
        "stats": {
            "k_err_uniform": k_hist[0], "k_err_nuq": k_hist[-1],
            "v_err_uniform": v_hist[0], "v_err_nuq": v_hist[-1],
            "k_outlier_rate": float(outside.float().mean()) if outside.numel() else 0.0,
            "v_outliers_per_token": n_value_outliers(v.shape[1], outlier_fraction),
        },
    }


def kvquant_fake_quant(k_post: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       *, k_levels: torch.Tensor, k_lo: torch.Tensor, k_hi: torch.Tensor,
                       v_levels: torch.Tensor, outlier_fraction: float, first_fp16: int,
                       scaled_rope: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """KVQuant-simulated K/V for attention (same numbers as the packed
    :class:`qbench.modules.kv_cache.KVQuantLayer`): the first ``first_fp16`` tokens exact, the others
    quantized (K pre-RoPE). ``cos, sin`` are the rotary tables for the positions of ``k_post``."""
    b, h, t, d = k_post.shape
    f = min(first_fp16, t)
    if t == f:
        return k_post, v
    kq = k_post[:, :, f:]
    cs, sn = _bcast(cos)[..., f:, :], _bcast(sin)[..., f:, :]
    pre = invert_rope(kq, cs, sn, scaled_rope)
    rows = pre.transpose(1, 2).reshape(b * (t - f), h * d)
    codes, counts, idx, val = kvq_quant_k(rows, k_levels, k_lo, k_hi)
    deq = kvq_dequant_k(codes, k_levels, k_lo, k_hi, counts, idx, val).reshape(b, t - f, h, d).transpose(1, 2)
    kq = apply_rope(deq, cs, sn).to(k_post.dtype)
    vrows = v[:, :, f:].transpose(1, 2).reshape(b * (t - f), h * d)
    n_out = n_value_outliers(h * d, outlier_fraction)
    vd = kvq_dequant_v(*kvq_quant_v(vrows, v_levels, n_out), v_levels)
    vq = vd.reshape(b, t - f, h, d).transpose(1, 2).to(v.dtype)
    return torch.cat([k_post[:, :, :f], kq], 2), torch.cat([v[:, :, :f], vq], 2)


def packed_nbytes(n_values: int, bits: int) -> int:
    """Bytes of one packed row of ``n_values`` codes (int32 words, see :mod:`.packing`)."""
    return packed_words(n_values, bits) * 4


__all__ += ["packed_nbytes", "kivi_v_group", "kivi_decode_bounds"]
