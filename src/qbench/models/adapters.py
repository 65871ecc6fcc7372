"""Per-family model adapters: where the decoder blocks, norms and linears of a causal LM live.

Everything quantization code needs to know about a model family goes through this module, so
methods never hard-code ``model.model.layers[i].self_attn.q_proj``. Only llama-like decoder
families are supported for now (pre-norm blocks with ``self_attn`` and a gated ``mlp``);
:data:`SUPPORTED_MODEL_TYPES` lists them by ``config.model_type``.

Family differences handled here:

* ``phi3`` fuses ``q/k/v`` into ``self_attn.qkv_proj`` and ``gate/up`` into ``mlp.gate_up_proj``.
* ``gemma2`` / ``gemma3_text`` have a ``pre_feedforward_layernorm`` feeding the MLP; their
  ``post_attention_layernorm`` normalises the attention *output* (before the residual add), so it
  must not be used for smoothing the MLP inputs.
* Gemma RMSNorms multiply by ``(1 + weight)``, not ``weight``; use :func:`fold_scale_into_norm_`
  instead of dividing ``norm.weight`` directly.
"""

from __future__ import annotations

import torch
from torch import nn

SUPPORTED_MODEL_TYPES: tuple[str, ...] = (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
)

# Candidate linear names inside one decoder block, in execution order. A family has a subset.
_BLOCK_LINEAR_NAMES: tuple[str, ...] = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.qkv_proj",
    "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.gate_up_proj",
    "mlp.down_proj",
)


def check_supported(model_type: str) -> None:
    """Raise a ConfigError (a ValueError) naming ``model_type`` and the supported list if it is not
    llama-like."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        from ..errors import ConfigError

        raise ConfigError(
            f"unsupported model architecture: config.model_type={model_type!r}; "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def _base(model: nn.Module) -> nn.Module:
    """The decoder stack (``LlamaModel`` & co.) of a ``*ForCausalLM`` (or the stack itself)."""
    base = getattr(model, "model", None)
    if base is not None and hasattr(base, "layers"):
        return base
    if hasattr(model, "layers"):
        return model
    raise ValueError(f"cannot find decoder layers in {type(model).__name__}: not a llama-like model")


def get_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks, in order."""
    return _base(model).layers


def get_embed(model: nn.Module) -> nn.Embedding:
    """The input token embedding."""
    return model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else _base(model).embed_tokens


def get_norm(model: nn.Module) -> nn.Module:
    """The final norm applied before the LM head."""
    return _base(model).norm


def get_lm_head(model: nn.Module) -> nn.Linear:
    """The output projection (may share its weight with the embedding: ``tie_word_embeddings``)."""
    return model.lm_head


def get_rotary_emb(model: nn.Module) -> nn.Module | None:
    """The model-level rotary embedding (transformers ≥ 4.48 computes ``position_embeddings``
    once per forward and passes ``(cos, sin)`` into every block); None if the family has none."""
    return getattr(_base(model), "rotary_emb", None)


def get_attention(block: nn.Module) -> nn.Module:
    return block.self_attn


def get_mlp(block: nn.Module) -> nn.Module:
    return block.mlp


def _get(block: nn.Module, name: str) -> nn.Module | None:
    try:
        return block.get_submodule(name)
    except AttributeError:
        return None


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """The linears of one decoder block by name relative to the block, in execution order:
    ``self_attn.q_proj, k_proj, v_proj, o_proj, mlp.gate_proj, up_proj, down_proj`` (llama-like) or
    ``self_attn.qkv_proj, o_proj, mlp.gate_up_proj, down_proj`` (phi3).

    Returns whatever module sits at those names (``nn.Linear`` in a float model; a quantized
    replacement after a method swapped it)."""
    out: dict[str, nn.Module] = {}
    for name in _BLOCK_LINEAR_NAMES:
        mod = _get(block, name)
        if mod is not None:
            out[name] = mod
    if not out:
        raise ValueError(f"no known linear layers in block {type(block).__name__}")
    return out


def attn_input_norm(block: nn.Module) -> nn.Module:
    """The norm whose output feeds the attention projections."""
    return block.input_layernorm


def mlp_input_norm(block: nn.Module) -> nn.Module:
    """The norm whose output feeds the MLP input projections (gemma2/3: pre_feedforward_layernorm)."""
    norm = getattr(block, "pre_feedforward_layernorm", None)
    return norm if norm is not None else block.post_attention_layernorm


def block_linear_groups(block: nn.Module, *, include_linear_prev: bool = False
                        ) -> list[tuple[nn.Module, list[nn.Module]]]:
    """Groups of linears that read the same input, each with the module that produces that input,
    as used by SmoothQuant and AWQ to fold per-input-channel scales into the previous op:

    * ``(input_layernorm, [q_proj, k_proj, v_proj])`` (phi3: ``[qkv_proj]``)
    * ``(post_attention_layernorm, [gate_proj, up_proj])`` (gemma2/3: ``pre_feedforward_layernorm``;
      phi3: ``[gate_up_proj]``)

    With ``include_linear_prev=True`` the AWQ linear→linear pairs are added where the scale can be
    folded into the previous linear's output rows: ``(v_proj, [o_proj])`` only when shapes match
    (no GQA, as in AWQ) and ``(up_proj, [down_proj])``. Fold into a norm with
    :func:`fold_scale_into_norm_` (it handles Gemma's ``1 + weight``)."""
    lin = block_linears(block)
    attn = [lin[n] for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                             "self_attn.qkv_proj") if n in lin]
    mlp = [lin[n] for n in ("mlp.gate_proj", "mlp.up_proj", "mlp.gate_up_proj") if n in lin]
    groups: list[tuple[nn.Module, list[nn.Module]]] = [
        (attn_input_norm(block), attn),
        (mlp_input_norm(block), mlp),
    ]
    if include_linear_prev:
        v, o = lin.get("self_attn.v_proj"), lin.get("self_attn.o_proj")
        if v is not None and o is not None and v.weight.shape == o.weight.shape:
            groups.append((v, [o]))
        up, down = lin.get("mlp.up_proj"), lin.get("mlp.down_proj")
        if up is not None and down is not None:
            groups.append((up, [down]))
    return groups


def norm_weight_offset(norm: nn.Module) -> float:
    """1.0 for norms computing ``x̂ * (1 + weight)`` (Gemma family), else 0.0."""
    return 1.0 if type(norm).__name__.startswith("Gemma") and "Norm" in type(norm).__name__ else 0.0


@torch.no_grad()
def fold_scale_into_norm_(norm: nn.Module, scale: torch.Tensor) -> None:
    """Divide a norm's effective per-channel gain (and bias, if any) by ``scale`` in place, so that
    ``norm(x) / scale`` is what the norm now outputs. Handles Gemma's ``(1 + weight)``."""
    off = norm_weight_offset(norm)
    w = norm.weight
    s = scale.to(device=w.device, dtype=torch.float32)
    new = (w.float() + off) / s - off
    w.copy_(new.to(w.dtype))
    bias = getattr(norm, "bias", None)
    if bias is not None:
        bias.copy_((bias.float() / s).to(bias.dtype))
