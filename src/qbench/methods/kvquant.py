"""KVQuant: non-uniform, pre-RoPE, dense-and-sparse KV-cache quantization (Hooper et al., 2024),
following the reference code (SqueezeAILab/KVQuant ``quant/``: ``llama_simquant.py`` with
``--nuq --include_sparse --first_few_fp16``, the seed's settings ``sparsity_threshold 0.99``,
``first_few_fp16 1``; issue 16).

What is learned (offline, from calibration text) and stored in the checkpoint as fp16 buffers of
``model.qbench_kvquant`` (:class:`qbench.modules.kv_cache.KVCodebooks`):

* per layer and channel, the **pre-RoPE** keys' outlier thresholds (``lo``, ``hi``: the
  ``outlier_fraction/2`` and ``1 - outlier_fraction/2`` quantiles of the channel's calibration
  values), which also normalize the channel to ``[-1, 1]``;
* per layer, **one** codebook of ``2^bits`` levels for the per-channel-normalized keys;
* per layer, one codebook of ``2^bits`` levels for the values in the per-token normalized
  domain ``[-1, 1]`` (calibrated on values normalized by their per-token quantile thresholds).

Codebooks are sensitivity-weighted 1-D k-means (Lloyd) fits on the inliers, started from the
uniform grid on ``[-1, 1]`` (so the learned NUQ grid is never worse than uniform on the
calibration objective; the reference runs scikit-learn's k-means++ with 50 iterations — a
deviation in the optimizer, not in the objective). Sensitivity weights (``sensitivity``):

* ``fisher`` (default, KVQuant's choice): the diagonal Fisher information of each K/V activation,
  i.e. the squared gradient of the next-token loss w.r.t. that activation, from one backward pass
  per calibration sequence (weights frozen; gradients of K are rotated back to the pre-RoPE frame,
  where the keys are quantized). It weights an activation by how much its error moves the loss.
* ``sq_act``: squared activations — a cheap proxy (no backward);
* ``uniform``: plain k-means.

Before issue 16 qbench fitted one codebook per channel on raw key values and picked value outliers
by magnitude; the figures measured then are not comparable with this implementation.

At run time (see :mod:`qbench.quant.kv`): K values outside their channel's thresholds, and the
values of each V token at or beyond its per-token ``outlier_fraction/2`` quantiles (the ``m``
lowest and ``m`` highest, :func:`qbench.quant.kv.n_value_outliers`; V's inlier range is
recentred with the token's median, as the reference does) are kept in fp16 (values + int16
indices); the first ``first_fp16`` tokens (the attention sink) are kept exactly.

Pre-RoPE keys: the attention side only sees post-RoPE keys (transformers v5 ``Cache.update``
receives no cos/sin), so keys are rotated back with the model's rotary embedding at their positions,
quantized, and rotated again after dequantization (KVQuant's kernels also store pre-RoPE codes and
apply RoPE on the fly). One code path serves the packed cache and the perplexity hook, it works
with fused or weight-quantized ``k_proj`` layers, and the orthogonal round trip costs ~1 ulp.

Paths: generation uses :class:`qbench.modules.kv_cache.KVQuantCache` (``cache_for_model``);
perplexity (``use_cache=False``) goes through the ``"kvquant.kv"`` ``qkv`` attention hook, which
quantizes every window token but the first ``first_fp16`` (as the seed's perplexity runs do).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers.cache_utils import Cache, DynamicLayer

from ..models.adapters import get_embed, get_rotary_emb
from ..modules import set_module
from ..modules import attention as attn
from ..modules.kv_cache import (KVCodebooks, KVQuantCache, is_served, kvquant_expected_nbytes, rope_is_scaled,
                                rope_tables)
from ..quant.kv import fit_kvquant_layer, invert_rope, kvquant_fake_quant
from .base import CalibArgs, ConfigError, Descriptor, KVMethod, QuantContext, calib_field, opt, register
from .common import check_full_attention, kv_dims

HOOK = "kvquant.kv"
MODULE_NAME = "qbench_kvquant"


class _CaptureLayer(DynamicLayer):
    """Records the K/V handed to the cache during one forward (no concatenation)."""

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.requires_grad:
            key_states.retain_grad()
            value_states.retain_grad()
        self.keys, self.values = key_states, value_states
        return key_states, value_states


def collect_kv_calibration(model: nn.Module, calib_ids: torch.Tensor, *, first_fp16: int = 1,
                           sensitivity: str = "fisher", progress: bool = False,
                           device: str | None = None) -> list[dict[str, torch.Tensor]]:
    """Per layer: pre-RoPE keys ``k``, values ``v`` and their sensitivity weights ``wk``, ``wv``,
    all ``[N, C]`` float32 on CPU (``N`` = calibration tokens minus the first ``first_fp16`` of
    each sequence, which stay in fp16 at run time and are not modelled)."""
    rot = get_rotary_emb(model)
    n_layers, h, d = kv_dims(model)
    device = device or next(model.parameters()).device
    acc: list[dict[str, list]] = [{"k": [], "v": [], "wk": [], "wv": []} for _ in range(n_layers)]
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    try:
        for i in tqdm(range(calib_ids.shape[0]), desc="kvquant calib", disable=not progress, leave=False):
            ids = calib_ids[i:i + 1].to(device)
            cache = Cache(layers=[_CaptureLayer() for _ in range(n_layers)])
            if sensitivity == "fisher":
                with torch.enable_grad():
                    emb = get_embed(model)(ids).detach().requires_grad_(True)
                    logits = model(inputs_embeds=emb, cache=cache, use_cache=True).logits
                    loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
                    loss.backward()
            else:
                with torch.no_grad():
                    model(input_ids=ids, cache=cache, use_cache=True)
            t = ids.shape[1]
            f = min(first_fp16, t)
            for li, layer in enumerate(cache.layers):
                k, v = layer.keys, layer.values
                cos, sin = rope_tables(rot, k, 0, t)
                kpre = invert_rope(k.detach(), cos, sin, rope_is_scaled(rot))
                vv = v.detach().float()
                if sensitivity == "fisher":
                    # K_post = s·R·K_pre ⇒ dL/dK_pre = s·Rᵀ·dL/dK_post (the unscaled inverse formula)
                    gk = invert_rope(k.grad, cos, sin, False)
                    wk, wv = gk.square(), v.grad.float().square()
                elif sensitivity == "sq_act":
                    wk, wv = kpre.square(), vv.square()
                else:
                    wk, wv = torch.ones_like(kpre), torch.ones_like(vv)
                for name, x in (("k", kpre), ("v", vv), ("wk", wk), ("wv", wv)):
                    acc[li][name].append(x[0, :, f:].transpose(0, 1).reshape(t - f, h * d).cpu())
            del cache
    finally:
        for p in params:
            p.requires_grad_(True)
        model.train(was_training)
    return [{n: torch.cat(xs, 0) for n, xs in a.items()} for a in acc]


def make_kvquant_fake_quant(model: nn.Module, cfg):
    """``kv_fake_quant(key_states, value_states, layer_idx) -> (k, v)`` for the perplexity path
    (positions ``0..T-1``)."""
    cb = getattr(model, MODULE_NAME)
    rot = get_rotary_emb(model)
    scaled = rope_is_scaled(rot)

    def kv_fake_quant(key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int):
        if is_served(key_states):
            return key_states, value_states
        cos, sin = rope_tables(rot, key_states, 0, key_states.shape[2])
        return kvquant_fake_quant(key_states, value_states, cos, sin, **cb.layer(layer_idx),
                                  outlier_fraction=cfg.outlier_fraction, first_fp16=cfg.first_fp16,
                                  scaled_rope=scaled)

    return kv_fake_quant


def make_kvquant_decode_view(model: nn.Module, cfg):
    """Decode-faithful view: KVQuant quantizes every token on arrival (the sink tokens stay exact
    inside the fake-quant), so query ``i`` reads tokens ``0..i`` quantized — the same K/V as the
    prefill protocol (:meth:`KVQuant.decode_equals_prefill`)."""
    fq = make_kvquant_fake_quant(model, cfg)

    def view(k: torch.Tensor, v: torch.Tensor, layer_idx: int):
        kq, vq = fq(k, v, layer_idx)
        i = torch.arange(k.shape[-2]) + 1
        return kq, vq, i, i

    return view


@register
class KVQuant(KVMethod):
    name = "kvquant"

    @dataclass
    class Config(CalibArgs):
        bits: int = opt(4, "bits per K/V value (codebook of 2^bits levels)", choices=(2, 3, 4))
        outlier_fraction: float = opt(0.01, "fraction of values per vector kept in fp16 (sparse)",
                                      range=(0.0, 0.5))
        first_fp16: int = opt(1, "first tokens (attention sink) kept in full precision", range=(0, 4096))
        nsamples: int = calib_field("nsamples", 16)
        seqlen: int = calib_field("seqlen", 512)
        kmeans_iters: int = opt(20, "Lloyd iterations of the weighted k-means", range=(0, 1000))
        sensitivity: str = opt("fisher", "k-means weights: squared loss gradients (Fisher), squared "
                               "activations, or none", choices=("fisher", "sq_act", "uniform"))
        prefill_with_quant: bool = opt(False, "a generation prefill attends to its own tokens "
                                       "quantized (true) or in full precision (false)")

        def validate(self, key: str) -> None:
            if self.seqlen <= self.first_fp16:
                raise ConfigError(f"{key}.seqlen={self.seqlen}: must exceed first_fp16={self.first_fp16} "
                                  "(the sink tokens are not calibrated)")

    def check(self, model: nn.Module, cfg: Config, key: str) -> None:
        check_full_attention(model, key)
        rot = get_rotary_emb(model)
        if rot is None:
            raise ConfigError(f"{key}: {type(model).__name__} has no model-level rotary embedding; "
                              "pre-RoPE key quantization needs one")
        _, h, d = kv_dims(model)
        cos, _ = rope_tables(rot, torch.zeros(1, dtype=torch.float32,
                                              device=next(model.parameters()).device), 0, 1)
        if cos.shape[-1] != d:
            raise ConfigError(f"{key}: partial rotary embeddings (rotary dim {cos.shape[-1]} != "
                              f"head_dim {d}) are not supported")
        if h * d >= 1 << 15:
            raise ConfigError(f"{key}: kv_heads*head_dim={h * d} exceeds the int16 outlier indices")

    def describe(self, cfg: Config) -> Descriptor:
        return Descriptor(family="KV cache", kv_bits=cfg.bits,
                          grid="NUQ codebook per layer (K per-channel normalized, pre-RoPE; V per token), "
                               "sparse quantile outliers",
                          storage="KVQuantCache")

    def attach(self, model: nn.Module, cfg: Config) -> None:
        if not isinstance(getattr(model, MODULE_NAME, None), KVCodebooks):
            raise RuntimeError("kvquant: the model has no learned codebooks (model.qbench_kvquant); "
                               "run the kvquant stage or load a kvquant checkpoint")
        super().attach(model, cfg)

    def make_cache(self, model: nn.Module, cfg: Config, prefill_with_quant: bool | None = None):
        pwq = cfg.prefill_with_quant if prefill_with_quant is None else prefill_with_quant
        return KVQuantCache.from_model(model, outlier_fraction=cfg.outlier_fraction,
                                       first_fp16=cfg.first_fp16, prefill_with_quant=pwq)

    def kv_fake_quant(self, model: nn.Module, cfg: Config):
        return make_kvquant_fake_quant(model, cfg)

    def kv_decode_view(self, model: nn.Module, cfg: Config):
        return make_kvquant_decode_view(model, cfg)

    def decode_equals_prefill(self, cfg: Config) -> bool:
        return True

    @staticmethod
    def _k_outliers(cache) -> int:
        return sum(int(layer.k_val.numel()) for layer in cache.layers if getattr(layer, "k_val", None) is not None)

    def expected_nbytes(self, cfg: Config, n_tokens: int, *, cache=None, **dims) -> int:
        """Layout formula; K outliers are data dependent: counted in ``cache`` when given."""
        return kvquant_expected_nbytes(n_tokens, bits=cfg.bits, outlier_fraction=cfg.outlier_fraction,
                                       first_fp16=cfg.first_fp16,
                                       k_outliers=None if cache is None else self._k_outliers(cache), **dims)

    def cache_stats(self, cfg: Config, cache, n_tokens: int, *, n_layers: int, n_kv_heads: int,
                    head_dim: int) -> dict:
        k_out = self._k_outliers(cache)
        return {"k_outliers": k_out, "k_outlier_rate": k_out / max(1, n_layers * max(n_tokens - cfg.first_fp16, 0)
                                                                      * n_kv_heads * head_dim)}

    def apply(self, model: nn.Module, cfg: Config, ctx: QuantContext) -> dict:
        t0 = time.perf_counter()
        calib = ctx.calib_tokens(cfg.calib_set(), self.name)
        # A KV hook of an earlier attach (re-quantizing) must not distort the statistics.
        attn.remove_hook(model, self.hook_name)
        data = collect_kv_calibration(model, calib, first_fp16=cfg.first_fp16,
                                      sensitivity=cfg.sensitivity, progress=ctx.progress)
        t1 = time.perf_counter()
        n_layers, h, d = kv_dims(model)
        cb = KVCodebooks(n_layers, h * d, cfg.bits)
        layer_stats = []
        for li, x in enumerate(tqdm(data, desc="kvquant k-means", disable=not ctx.progress, leave=False)):
            fit = fit_kvquant_layer(x["k"], x["v"], x["wk"], x["wv"], bits=cfg.bits,
                                    outlier_fraction=cfg.outlier_fraction, iters=cfg.kmeans_iters)
            for n in ("k_levels", "k_lo", "k_hi", "v_levels"):
                getattr(cb, n)[li].copy_(fit[n])
            layer_stats.append(fit["stats"])
        del data
        set_module(model, MODULE_NAME, cb.to(next(model.parameters()).device))
        self.attach(model, cfg)

        def mean(key):
            return sum(s[key] for s in layer_stats) / len(layer_stats)

        def ratio(a, b):
            tot_a = sum(s[a] for s in layer_stats)
            tot_b = sum(s[b] for s in layer_stats)
            return tot_a / tot_b if tot_b > 0 else 1.0

        return {
            "layers": n_layers, "channels": h * d, "calib_tokens": int(calib.numel()),
            "k_outlier_rate": mean("k_outlier_rate"),
            "v_outliers_per_token": layer_stats[0]["v_outliers_per_token"] if layer_stats else 0,
            # weighted calibration error of the learned NUQ grid relative to the uniform grid
            "k_nuq_vs_uniform_err": ratio("k_err_nuq", "k_err_uniform"),
            "v_nuq_vs_uniform_err": ratio("v_err_nuq", "v_err_uniform"),
            "codebook_bits": cb.storage_bits(),
            "calib_seconds": t1 - t0, "kmeans_seconds": time.perf_counter() - t1,
            "per_layer": layer_stats,
        }
