"""A hookable attention function: where Q, K, V, the attention scores and probabilities can be
transformed (fake-quantized) by recipe stages.

transformers ≥ 5 computes attention through ``AttentionInterface``: every attention module calls
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, q, k, v, mask, scaling=…, …)``
after the projections, RoPE and the KV-cache update. :func:`install` registers one more
implementation, ``"qbench_attn"``, and switches the model to it. It runs the hooks attached to the
calling attention module and then the base kernel the model used before (``sdpa`` or ``eager``):

===========  ==========================================================  ====================
hook point   signature                                                   where
===========  ==========================================================  ====================
``qkv``      ``fn(module, q, k, v) -> (q, k, v)``                        before the kernel;
                                                                         q ``[b, H, s_q, d]``,
                                                                         k/v ``[b, H_kv, s_kv,
                                                                         d]`` (post-RoPE, after
                                                                         the cache update,
                                                                         before GQA repeat)
``scores``   ``fn(module, scores) -> scores``                            ``q·kᵀ·scaling`` (+
                                                                         softcap), before the
                                                                         mask and softmax;
                                                                         ``[b, H, s_q, s_kv]``
``probs``    ``fn(module, probs) -> probs``                              after the softmax, the
                                                                         left operand of
                                                                         ``probs @ v``
``kv_split`` ``fn(module, k, v) -> (kq, vq, bk, bv)``                    after the ``qkv``
             or ``None`` (no split: the base kernel)                     hooks; at most one
===========  ==========================================================  ====================

``kv_split`` (the decode-faithful KV protocol, :mod:`qbench.methods.kv_protocol`): a cache-less
forward in which query ``i`` reads key ``j`` as ``kq[j]`` when ``j < bk[i]`` and as ``k[j]``
otherwise (values likewise with ``vq``/``bv``) — what token-by-token decoding through a quantized
cache shows each query. ``bk, bv`` are ``[s_q]`` integer tensors (positions counted from the first
key). Such layers run :func:`split_kv_attention` (SDPA over the four quantized/full-precision
combinations of K and V, masked per query; eager math when score/probs hooks need the matrices).

With only ``qkv`` hooks the base kernel runs unchanged (``sdpa`` stays fast); a ``scores`` or
``probs`` hook needs the matrices, so those layers run the eager computation below (bit-identical
in math to ``eager_attention_forward``: fp32 softmax, masked positions at ``finfo.min``).

Hooks are stored per attention module (``module._qbench_attn_hooks``), keyed by a name and sorted
by ``order`` then registration. Re-registering a name replaces the hook, so ``attach`` of a
runtime stage is idempotent. Conventions for the stages that plug in here:

* ``attn_quant`` (this package) registers ``"attn_quant.q"`` (qkv point, changes only q),
  ``"attn_quant.s"`` (scores or probs point);
* KV-cache methods simulate quantized K/V for cache-less evaluation (perplexity runs with
  ``use_cache=False``) with a ``qkv`` hook that changes only k and v (suggested name
  ``"<method>.kv"``); their hooks see k/v exactly as the kernel would, i.e. the whole sequence
  including cached tokens. Hooks at the same point compose in ``order``; Q and K/V hooks commute.

Masks: the model builds masks with ``sdpa_mask`` for ``"qbench_attn"`` (registered in
``AttentionMaskInterface``): a boolean ``[b, 1, s_q, s_kv]`` mask (True = attend) or ``None`` for
a plain causal prefix / single-token decode. The eager path handles ``None`` (causal, bottom-right
aligned), boolean and additive float masks.

Nothing here is stored in the state dict: ``_attn_implementation`` is not serialized by
transformers, so a loaded checkpoint comes back with its default kernel and the runtime stages'
``attach`` re-install the hooks (:mod:`qbench.checkpoint` does that).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = [
    "ATTN_IMPL", "HOOK_POINTS", "install", "uninstall", "is_installed", "attention_modules",
    "register_qkv_hook", "register_scores_hook", "register_probs_hook", "register_hook",
    "remove_hook", "hooks_of", "qbench_attention_forward", "eager_attention", "split_kv_attention",
]

ATTN_IMPL = "qbench_attn"
HOOK_POINTS = ("qkv", "scores", "probs", "kv_split")
_SUPPORTED_BASES = ("sdpa", "eager")
_HOOKS_ATTR = "_qbench_attn_hooks"
_BASE_ATTR = "_qbench_attn_base"

QKVHook = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor],
                   tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
TensorHook = Callable[[nn.Module, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- registration
def _register_interface() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    if ATTN_IMPL not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_IMPL, qbench_attention_forward)
    if ATTN_IMPL not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(ATTN_IMPL, sdpa_mask)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Attention modules of a model (those with q/k/v projections or a fused qkv), in order."""
    return [m for _, m in model.named_modules() if _is_attention(m)]


def _config_of(model: nn.Module):
    return getattr(model, "config", None)


def is_installed(model: nn.Module) -> bool:
    cfg = _config_of(model)
    return cfg is not None and getattr(cfg, "_attn_implementation", None) == ATTN_IMPL


def install(model: nn.Module, base: str | None = None) -> str:
    """Route the model's attention through ``"qbench_attn"``; returns the base kernel name.

    ``base`` defaults to the model's current implementation; implementations other than ``sdpa``
    and ``eager`` (flash/flex: different mask formats, no score access) fall back to ``sdpa``.
    Idempotent. Hooks registered before or after :func:`install` are honoured.
    """
    _register_interface()
    cfg = _config_of(model)
    if cfg is None:
        raise ValueError(f"{type(model).__name__} has no config: install() needs the full model")
    current = getattr(cfg, "_attn_implementation", None) or "eager"
    if base is None:
        base = getattr(model, _BASE_ATTR, None) if current == ATTN_IMPL else current
    if base not in _SUPPORTED_BASES:
        base = "sdpa"
    mods = attention_modules(model)
    if not mods:
        raise ValueError(f"{type(model).__name__}: no attention modules found")
    for m in mods:
        setattr(m, _BASE_ATTR, base)
    setattr(model, _BASE_ATTR, base)
    if current != ATTN_IMPL:
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(ATTN_IMPL)
        if getattr(cfg, "_attn_implementation", None) != ATTN_IMPL:
            cfg._attn_implementation = ATTN_IMPL
        # Sub-modules sharing another config object (rare) must see it too.
        for m in mods:
            c = getattr(m, "config", None)
            if c is not None and c is not cfg and getattr(c, "_attn_implementation", None) != ATTN_IMPL:
                c._attn_implementation = ATTN_IMPL
    return base


def uninstall(model: nn.Module) -> None:
    """Remove every hook and restore the base kernel."""
    base = getattr(model, _BASE_ATTR, None) or "sdpa"
    for m in attention_modules(model):
        if hasattr(m, _HOOKS_ATTR):
            delattr(m, _HOOKS_ATTR)
    if is_installed(model):
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(base)
        else:
            model.config._attn_implementation = base


def _is_attention(m: nn.Module) -> bool:
    return (hasattr(m, "q_proj") or hasattr(m, "qkv_proj")) and hasattr(m, "o_proj")


def _targets(target: nn.Module, layers=None) -> list[nn.Module]:
    mods = [target] if _is_attention(target) else attention_modules(target)
    if layers is not None:
        keep = set(layers)
        mods = [m for i, m in enumerate(mods) if getattr(m, "layer_idx", i) in keep]
    return mods


def register_hook(target: nn.Module, point: str, name: str, fn: Callable, *, order: int = 0,
                  layers=None) -> int:
    """Attach ``fn`` at ``point`` (one of :data:`HOOK_POINTS`) under ``name`` to every attention
    module of ``target`` (a model) or to ``target`` itself (one attention module); ``layers``
    restricts to those layer indices. Returns the number of modules hooked. Replaces an existing
    hook of the same name at that point. Does not :func:`install` — call it on the model."""
    if point not in HOOK_POINTS:
        raise ValueError(f"hook point {point!r}: allowed values are {', '.join(HOOK_POINTS)}")
    mods = _targets(target, layers)
    for m in mods:
        table = getattr(m, _HOOKS_ATTR, None)
        if table is None:
            table = {p: {} for p in HOOK_POINTS}
            setattr(m, _HOOKS_ATTR, table)
        seq = len(table[point]) if name not in table[point] else table[point][name][1]
        table[point][name] = (order, seq, fn)
    return len(mods)


def register_qkv_hook(target: nn.Module, name: str, fn: QKVHook, *, order: int = 0, layers=None) -> int:
    return register_hook(target, "qkv", name, fn, order=order, layers=layers)


def register_scores_hook(target: nn.Module, name: str, fn: TensorHook, *, order: int = 0,
                         layers=None) -> int:
    return register_hook(target, "scores", name, fn, order=order, layers=layers)


def register_probs_hook(target: nn.Module, name: str, fn: TensorHook, *, order: int = 0,
                        layers=None) -> int:
    return register_hook(target, "probs", name, fn, order=order, layers=layers)


def remove_hook(target: nn.Module, name: str, point: str | None = None) -> int:
    """Remove hooks called ``name`` (at ``point`` or at every point); returns how many."""
    n = 0
    for m in _targets(target):
        table = getattr(m, _HOOKS_ATTR, None)
        if not table:
            continue
        for p in ([point] if point else HOOK_POINTS):
            if table[p].pop(name, None) is not None:
                n += 1
    return n


def hooks_of(module: nn.Module, point: str) -> list[Callable]:
    table = getattr(module, _HOOKS_ATTR, None)
    if not table:
        return []
    return [fn for _, _, fn in sorted(table[point].values(), key=lambda t: (t[0], t[1]))]


# ----------------------------------------------------------------------------- kernels
def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def eager_attention(module: nn.Module, query, key, value, attention_mask, scaling: float | None = None,
                    dropout: float = 0.0, softcap: float | None = None, is_causal: bool | None = None,
                    scores_hooks=(), probs_hooks=(), **kwargs):
    """Eager attention with hook points on the scores and probabilities.

    Same math as transformers' ``eager_attention_forward`` (scores in the compute dtype, softmax
    in fp32, cast back), plus ``None``/boolean mask handling and Gemma-style ``softcap``.
    """
    n_rep = query.shape[1] // key.shape[1]
    k = _repeat_kv(key, n_rep)
    v = _repeat_kv(value, n_rep)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, k.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    for fn in scores_hooks:
        scores = fn(module, scores)
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    probs = _masked_probs(module, scores, attention_mask, causal, probs_hooks, dropout, query.dtype)
    out = torch.matmul(probs, v)
    return out.transpose(1, 2).contiguous(), probs


def _masked_probs(module: nn.Module, scores, attention_mask, causal: bool, probs_hooks, dropout: float, dtype):
    """Mask (the given mask, or bottom-right-aligned causal when none), softmax in fp32, probs hooks,
    dropout: the part of eager attention after the scores, shared by both attention paths."""
    q_len, kv_len = scores.shape[-2], scores.shape[-1]
    if attention_mask is None:
        if causal and q_len > 1:
            # bottom-right aligned: query i (of the last q_len positions) sees keys ≤ its position
            qi = torch.arange(q_len, device=scores.device)[:, None] + (kv_len - q_len)
            ki = torch.arange(kv_len, device=scores.device)[None, :]
            scores = scores.masked_fill(ki > qi, torch.finfo(scores.dtype).min)
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[..., :kv_len], torch.finfo(scores.dtype).min)
    else:
        scores = scores + attention_mask[..., :kv_len]
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
    for fn in probs_hooks:
        probs = fn(module, probs)
    return nn.functional.dropout(probs, p=dropout, training=module.training)


SPLIT_BLOCK = 128  # queries per SDPA call in the split-KV fast path


def _split_kv_sdpa(query, key, value, kq, vq, bk, bv, allowed, scaling: float, n_rep: int,
                   block: int = SPLIT_BLOCK):
    """:func:`split_kv_attention` without score/probs hooks, on SDPA.

    The per-(query, key) choice between the quantized and the full-precision K and V is one of four
    combinations (kq·vq, kq·v, k·vq, k·v). Each query block attends to the concatenation of the
    combinations' key/value column ranges that some query of the block uses, with a boolean mask
    selecting, for every (query, key), exactly the one combination it reads (and causality). The
    softmax over the concatenation is the softmax over the keys the query reads, so this is the same
    attention as the eager two-score-matrix form, at SDPA's speed (about 9× faster on CPU for 2048
    tokens; blocks also skip the keys after the block, i.e. half of a causal window). ``allowed``:
    boolean ``[s_q, s_kv]`` or ``[b, 1|H, s_q, s_kv]``, True = may attend."""
    s_q, kv_len = query.shape[-2], key.shape[-2]
    ki = torch.arange(kv_len, device=query.device)[None, :]
    use_kq = ki < bk.to(query.device)[:, None]
    use_vq = ki < bv.to(query.device)[:, None]
    combos = ((kq, vq, use_kq & use_vq), (kq, value, use_kq & ~use_vq),
              (key, vq, ~use_kq & use_vq), (key, value, ~use_kq & ~use_vq))
    outs = []
    for a in range(0, s_q, block):
        e = min(s_q, a + block)
        allow = allowed[..., a:e, :]
        ks, vs, ms = [], [], []
        for k_src, v_src, sel in combos:
            m = sel[a:e] & allow
            cols = m.reshape(-1, kv_len).any(0).nonzero()
            if cols.numel() == 0:
                continue
            lo, hi = int(cols[0]), int(cols[-1]) + 1
            ks.append(k_src[..., lo:hi, :])
            vs.append(v_src[..., lo:hi, :])
            ms.append(m[..., lo:hi])
        mask = torch.cat(ms, dim=-1)
        outs.append(nn.functional.scaled_dot_product_attention(
            query[..., a:e, :], _repeat_kv(torch.cat(ks, dim=-2), n_rep),
            _repeat_kv(torch.cat(vs, dim=-2), n_rep), attn_mask=mask, scale=scaling))
    return torch.cat(outs, dim=-2)


def _split_allowed(query, kv_len: int, attention_mask):
    """Boolean attend-mask for the SDPA split path, or ``None`` when only the eager path applies
    (additive float masks; a query that may attend to nothing, where eager's uniform softmax over
    ``finfo.min`` and SDPA differ)."""
    s_q = query.shape[-2]
    if attention_mask is None:
        qi = torch.arange(s_q, device=query.device)[:, None] + (kv_len - s_q)
        return torch.arange(kv_len, device=query.device)[None, :] <= qi
    if attention_mask.dtype != torch.bool:
        return None
    allowed = attention_mask[..., :kv_len]
    return allowed if bool(allowed.any(-1).all()) else None


def split_kv_attention(module: nn.Module, query, key, value, kq, vq, bk, bv, attention_mask,
                       scaling: float | None = None, dropout: float = 0.0, softcap: float | None = None,
                       scores_hooks=(), probs_hooks=(), **kwargs):
    """Attention in which query ``i`` reads key ``j`` as ``kq[j]`` if ``j < bk[i]`` else
    ``key[j]`` and value ``j`` as ``vq[j]`` if ``j < bv[i]`` else ``value[j]`` (see the module
    docstring). Same math as :func:`eager_attention` otherwise (causal when no mask is given).

    Without score/probs hooks, softcap or dropout (the perplexity case) it runs on SDPA
    (:func:`_split_kv_sdpa`) and returns no probabilities, as the ``sdpa`` kernel does; otherwise
    the eager form (two score matrices) below."""
    n_rep = query.shape[1] // key.shape[1]
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    kv_len = key.shape[-2]
    if not (scores_hooks or probs_hooks or softcap is not None or (dropout and module.training)):
        allowed = _split_allowed(query, kv_len, attention_mask)
        if allowed is not None:
            out = _split_kv_sdpa(query, key, value, kq, vq, bk, bv, allowed, scaling, n_rep)
            return out.transpose(1, 2).contiguous(), None
    ki = torch.arange(kv_len, device=query.device)[None, :]
    use_kq = ki < bk.to(query.device)[:, None]  # [s_q, s_kv]
    use_vq = ki < bv.to(query.device)[:, None]
    s_fp = torch.matmul(query, _repeat_kv(key, n_rep).transpose(2, 3))
    s_q = torch.matmul(query, _repeat_kv(kq, n_rep).transpose(2, 3))
    scores = torch.where(use_kq, s_q, s_fp) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    for fn in scores_hooks:
        scores = fn(module, scores)
    probs = _masked_probs(module, scores, attention_mask, True, probs_hooks, dropout, query.dtype)
    zero = torch.zeros((), dtype=probs.dtype, device=probs.device)
    out = (torch.matmul(torch.where(use_vq, probs, zero), _repeat_kv(vq, n_rep))
           + torch.matmul(torch.where(use_vq, zero, probs), _repeat_kv(value, n_rep)))
    return out.transpose(1, 2).contiguous(), probs


def qbench_attention_forward(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """The ``"qbench_attn"`` attention implementation (see the module docstring)."""
    for fn in hooks_of(module, "qkv"):
        query, key, value = fn(module, query, key, value)
    s_hooks, p_hooks = hooks_of(module, "scores"), hooks_of(module, "probs")
    split = hooks_of(module, "kv_split")
    if len(split) > 1:
        raise ValueError(f"{len(split)} kv_split hooks on one attention module; at most one is allowed")
    res = split[0](module, key, value) if split else None
    if res is not None:
        kq, vq, bk, bv = res
        return split_kv_attention(module, query, key, value, kq, vq, bk, bv, attention_mask,
                                  scores_hooks=s_hooks, probs_hooks=p_hooks, **kwargs)
    base = getattr(module, _BASE_ATTR, "sdpa")
    if s_hooks or p_hooks or base == "eager" or kwargs.get("softcap") is not None:
        return eager_attention(module, query, key, value, attention_mask, scores_hooks=s_hooks,
                               probs_hooks=p_hooks, **kwargs)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
