"""QuaRot-style rotation (Ashkboos et al., 2024): rotate the residual stream and the heads with
(randomized) Hadamard matrices so activations lose their outlier channels, then quantize weights,
activations and K/V with a later stage (``rotate → rtn`` / ``rotate → gptq`` with ``a_bits: 4``;
``kv_bits: 4`` here for W4A4KV4).

What :meth:`Rotate.apply` does to a float llama-like model (every step exact in real arithmetic;
folded in float64, then cast back):

1. **Fuse the norms** (QuaRot ``fuse_layer_norms``): each RMSNorm's gain is multiplied into the
   columns of the linears that read it (``input_layernorm`` → q/k/v, ``post_attention_layernorm``
   → gate/up, the final norm → ``lm_head``) and set to 1. Tied embeddings are untied first
   (``lm_head`` gets its own copy; ``config.tie_word_embeddings = false``).
2. **Rotate the residual stream** by ``Q`` (``rotation: hadamard`` = QuaRot's randomized Hadamard
   ``diag(±1)·H/√d``; ``random_orthogonal`` = a Haar-random orthogonal matrix, the SpinQuant
   initialisation): embeddings ``E ← E·Q``; readers (q/k/v, gate/up, lm_head) ``W ← W·Q``; writers
   (o_proj, down_proj) ``W ← Qᵀ·W`` (bias ``b ← b·Q``). RMSNorm(xQ) = RMSNorm(x)·Q because Q is
   orthogonal and the gains are now 1.
3. **V/O heads** (``rotate_v``): a Hadamard of ``head_dim`` on each value head folded into the
   rows of ``v_proj`` and the matching input columns of ``o_proj``, so the values (and the K/V
   cache) are rotated. QuaRot additionally applies an *online* Hadamard across heads at
   ``o_proj``'s input; that needs a Hadamard of order ``num_heads`` (9 for SmolLM2, which has
   none), so here only the per-head part is applied — a stated deviation.
4. **Online Hadamard before down_proj** (``online_down``): ``down_proj`` gets ``W ← W·H_f``
   (``H_f`` of the FFN size, e.g. 1536 = 12·128) and the MLP applies ``x·H_f`` to its input at run
   time (two small Kronecker matmuls, :func:`qbench.quant.hadamard.online_hadamard`).
5. **Q/K** (``rotate_qk``): an online Hadamard of ``head_dim`` on queries and keys after RoPE
   (an attention ``qkv`` hook), which leaves ``q·kᵀ`` unchanged and makes the keys (the K cache)
   rotated.

``kv_bits < 16`` then fake-quantizes K and V after the rotation — QuaRot's KV quantizer:
asymmetric, per token and head in groups of ``kv_group_size`` channels (default: the whole head),
range scaled by ``kv_clip_ratio``. Cache-less perplexity sees exactly what a per-token quantized
cache returns; during generation the hooks re-quantize the cached fp K/V, which gives the same
numbers (per-token groups do not depend on other tokens) but not the memory saving.

A later KV-cache stage (``rotate → kivi``) composes in perplexity (its ``qkv`` hook runs after the
rotation's); in generation such a cache stores K as the attention module hands it over, i.e.
before the post-RoPE rotation hook, so there it quantizes unrotated keys — use ``kv_bits`` here
for the rotated-KV recipe.

Run-time parts (steps 4, 5 and the KV quantizer) are not in the state dict; :meth:`attach`
re-installs them on a loaded checkpoint. The rotated-but-unquantized model computes the same
function as the original (tested: logits equal within fp32 tolerance).
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass

import torch
from torch import nn

from ..models import adapters
from ..modules import attention as attn
from ..modules import target_linears
from ..quant.hadamard import is_hadamard_order, online_hadamard, random_signs
from ..quant.uniform import fake_quantize_activation
from .base import ConfigError, Descriptor, Method, MethodConfig, QuantContext, opt, register

__all__ = ["Rotate", "ResidualRotation"]

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
QK_HOOK, KV_HOOK = "rotate.qk", "rotate.kv"


class ResidualRotation:
    """The orthogonal ``Q [n, n]`` of the residual stream, applied without forming it when it is
    a randomized Hadamard ``diag(s)·H/√n`` (``W·Q = online_hadamard(W·diag(s))``): folding costs
    O(n·(k + 2^m)) per row instead of O(n²). Float64 throughout."""

    def __init__(self, n: int, kind: str, seed: int):
        self.n, self.kind = n, kind
        if kind == "hadamard":
            self.signs, self.dense = random_signs(n, seed), None
        else:  # Haar-random orthogonal (QR of a Gaussian matrix, signs fixed by R's diagonal)
            g = torch.Generator().manual_seed(seed)
            A = torch.randn(n, n, generator=g, dtype=torch.float64)
            Qm, R = torch.linalg.qr(A)
            self.signs, self.dense = None, Qm * torch.sign(torch.diagonal(R))[None, :]

    def right(self, W: torch.Tensor) -> torch.Tensor:
        """``W·Q`` (rows of ``W`` are vectors in the residual basis)."""
        W = W.double()
        return W @ self.dense if self.dense is not None else online_hadamard(W * self.signs)

    def left_t(self, W: torch.Tensor) -> torch.Tensor:
        """``Qᵀ·W`` (``W`` writes into the residual stream along its rows)."""
        return self.right(W.double().T).T

    def matrix(self) -> torch.Tensor:
        return self.right(torch.eye(self.n, dtype=torch.float64))


def _dims(model: nn.Module) -> tuple[int, int, int, int, int]:
    tc = model.config.get_text_config(decoder=True)
    heads = tc.num_attention_heads
    kv = getattr(tc, "num_key_value_heads", None) or heads
    hd = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    return tc.hidden_size, heads, kv, hd, tc.intermediate_size


def _rotated_mlp_forward(self, x):
    """The llama MLP with QuaRot's online Hadamard on ``down_proj``'s input."""
    return self.down_proj(online_hadamard(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))


@torch.no_grad()
def _set(lin: nn.Module, w: torch.Tensor, b: torch.Tensor | None = None) -> None:
    lin.weight.data = w.to(lin.weight.dtype).contiguous()
    if b is not None and getattr(lin, "bias", None) is not None:
        lin.bias.data = b.to(lin.bias.dtype)


@register
class Rotate(Method):
    name = "rotate"
    kind = "transform"
    runtime = True

    @dataclass
    class Config(MethodConfig):
        rotation: str = opt("hadamard", "residual rotation: QuaRot's randomized Hadamard or a "
                            "random orthogonal matrix", choices=("hadamard", "random_orthogonal"))
        seed: int = opt(0, "seed of the random signs / random matrix", range=(0, 2**31 - 1))
        rotate_v: bool = opt(True, "per-head Hadamard folded into v_proj rows and o_proj columns")
        online_down: bool = opt(True, "online Hadamard on down_proj's input (folded into its weight)")
        rotate_qk: bool = opt(True, "online Hadamard of queries and keys after RoPE")
        kv_bits: int = opt(16, "K/V bits after rotation (16 = keep)", choices=(2, 3, 4, 8, 16))
        kv_group_size: int = opt(-1, "channels per K/V group (-1 = head_dim)", range=(-1, 1 << 16))
        kv_clip_ratio: float = opt(1.0, "K/V range scale (≤ 1 clips)", range=(0.5, 1.0))

    def describe(self, cfg: Config) -> Descriptor:
        # a transform; with kv_bits < 16 it also quantizes K/V inside attention (no packed cache)
        kv = cfg.kv_bits < 16
        return Descriptor(family="KV cache" if kv else None, kv_bits=cfg.kv_bits if kv else None,
                          grid=f"{cfg.rotation} rotation" + (", K/V uniform-asym" if kv else ""),
                          storage=f"K/V fake-quantized in attention ({cfg.kv_bits} bits)" if kv else None)

    # ------------------------------------------------------------------ checks
    def check(self, model: nn.Module, cfg: Config, key: str) -> None:
        mt = getattr(model.config, "model_type", None)
        if mt not in SUPPORTED:
            raise ConfigError(f"{key}: rotation supports model types {', '.join(SUPPORTED)}; "
                              f"got {mt!r}")
        for name, m in target_linears(model, include_quantized=True).items():
            if type(m) is not nn.Linear:
                raise ConfigError(f"{key}: rotate must come before any quantization stage "
                                  f"(layer {name} is already {type(m).__name__})")
        d, _, _, hd, ffn = _dims(model)
        need = [("hidden_size", d, cfg.rotation == "hadamard"),
                ("head_dim", hd, cfg.rotate_v or cfg.rotate_qk),
                ("intermediate_size", ffn, cfg.online_down)]
        for what, n, on in need:
            if on and not is_hadamard_order(n):
                raise ConfigError(f"{key}: no Hadamard matrix of order {what}={n}; use "
                                  "rotation: random_orthogonal / switch the online part off")
        g = hd if cfg.kv_group_size == -1 else cfg.kv_group_size
        if cfg.kv_bits < 16 and (g <= 0 or hd % g):
            raise ConfigError(f"{key}.kv_group_size={cfg.kv_group_size} must divide head_dim={hd}")

    # ------------------------------------------------------------------ run time
    def attach(self, model: nn.Module, cfg: Config) -> None:
        if cfg.online_down:
            for block in adapters.get_layers(model):
                mlp = adapters.get_mlp(block)
                mlp.forward = types.MethodType(_rotated_mlp_forward, mlp)
        if cfg.rotate_qk or cfg.kv_bits < 16:
            attn.install(model)
        if cfg.rotate_qk:
            attn.register_qkv_hook(model, QK_HOOK, lambda m, q, k, v: (online_hadamard(q),
                                                                      online_hadamard(k), v), order=-20)
        if cfg.kv_bits < 16:
            _, _, _, hd, _ = _dims(model)
            g = hd if cfg.kv_group_size == -1 else cfg.kv_group_size

            def fq(x):
                xg = x.reshape(*x.shape[:-1], x.shape[-1] // g, g)
                return fake_quantize_activation(xg, cfg.kv_bits, "per_token", sym=False,
                                                clip_ratio=cfg.kv_clip_ratio).reshape(x.shape)

            attn.register_qkv_hook(model, KV_HOOK, lambda m, q, k, v: (q, fq(k), fq(v)), order=-10)

    def transform_only(self, model: nn.Module, cfg: Config) -> None:
        """The exact rotation without the KV quantizer (the reference statistics compare to)."""
        self.apply(model, dataclasses.replace(cfg, kv_bits=16), QuantContext(progress=False))

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def apply(self, model: nn.Module, cfg: Config, ctx: QuantContext) -> dict:
        d, heads, kvh, hd, ffn = _dims(model)
        embed, head, final_norm = adapters.get_embed(model), adapters.get_lm_head(model), adapters.get_norm(model)
        tied = head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr()
        if tied:  # fusing the final norm into lm_head needs its own weight
            head.weight = nn.Parameter(embed.weight.detach().clone())
        model.config.tie_word_embeddings = False
        tc = model.config.get_text_config(decoder=True)
        if tc is not model.config:
            tc.tie_word_embeddings = False

        def fuse(norm: nn.Module, readers: list[nn.Module]) -> None:
            gain = norm.weight.detach().double()
            for lin in readers:
                _set(lin, lin.weight.double() * gain[None, :])
            norm.weight.data.fill_(1.0)

        Q = ResidualRotation(d, cfg.rotation, cfg.seed)
        for block in adapters.get_layers(model):
            lin = adapters.block_linears(block)
            if len(lin) != 7:
                raise ValueError("rotate expects separate q/k/v and gate/up projections")
            a, o = block.self_attn, block.self_attn.o_proj
            mlp = adapters.get_mlp(block)
            qkv = [a.q_proj, a.k_proj, a.v_proj]
            fuse(adapters.attn_input_norm(block), qkv)
            fuse(adapters.mlp_input_norm(block), [mlp.gate_proj, mlp.up_proj])
            for r in qkv + [mlp.gate_proj, mlp.up_proj]:
                _set(r, Q.right(r.weight))
            for w in (o, mlp.down_proj):
                b = Q.right(w.bias[None])[0] if getattr(w, "bias", None) is not None else None
                _set(w, Q.left_t(w.weight), b)
            if cfg.rotate_v:  # value head h: rows W_v[h] ← H_dᵀ·W_v[h]; o_proj columns of head j ← ·H_d
                Wv = a.v_proj.weight.double().reshape(kvh, hd, d)
                bv = a.v_proj.bias
                _set(a.v_proj, online_hadamard(Wv.transpose(1, 2)).transpose(1, 2).reshape(kvh * hd, d),
                     online_hadamard(bv.double().reshape(kvh, hd)).reshape(-1) if bv is not None else None)
                _set(o, online_hadamard(o.weight.double().reshape(d, heads, hd)).reshape(d, heads * hd))
            if cfg.online_down:  # W_down ← W_down·H_f
                _set(mlp.down_proj, online_hadamard(mlp.down_proj.weight.double()))
        fuse(final_norm, [head])
        _set(head, Q.right(head.weight))
        embed.weight.data = Q.right(embed.weight).to(embed.weight.dtype)
        self.attach(model, cfg)
        return {"hidden_size": d, "head_dim": hd, "intermediate_size": ffn, "rotation": cfg.rotation,
                "untied_lm_head": bool(tied), "online_hadamard": {
                    "down_proj_input": ffn if cfg.online_down else None,
                    "qk_head_dim": hd if cfg.rotate_qk else None},
                "kv_bits": cfg.kv_bits}
