"""GGUF export (llama.cpp), written with the ``gguf`` package; lossless where the grid maps.

GGUF's legacy block types hold one fp16 scale (and, for the ``_1`` types, one fp16 minimum) per
block of 32 consecutive inputs of a row — exactly a qbench group of 32:

================  =========================  ===============================================
qbench layer       GGUF type                  value (ggml ``dequantize_row_*``)
================  =========================  ===============================================
8-bit sym g32      ``Q8_0``                   ``d · q``,   q = code − 128 ∈ [−128, 127]
4-bit sym g32      ``Q4_0``                   ``d · (q − 8)``,  q = code ∈ [0, 15]
5-bit sym g32      ``Q5_0``                   ``d · (q − 16)``, q = code ∈ [0, 31]
4-bit asym g32     ``Q4_1``                   ``d · q + m``, m = fp16(−z · s)
5-bit asym g32     ``Q5_1``                   ``d · q + m``, m = fp16(−z · s)
================  =========================  ===============================================

with ``d`` = our fp16 scale. qbench's symmetric grid is ``(code − 2^(b−1)) · s`` (constant
midpoint zero, ``s = 2·absmax/(2^b − 1)``), which is exactly ggml's ``_0`` grid (ggml picks its
``d`` differently, ``max/−8``, but any ``d`` is a valid block): those exports are lossless. The
``_1`` types store the offset ``m`` in fp16 while qbench's offset ``−z·s`` needs up to 4–5 more
mantissa bits, so asymmetric exports are exact only where ``−z·s`` is representable; elsewhere
the offset is rounded to fp16 (error ≤ half an fp16 ulp of ``|z·s|``), and the added error is
measured per layer and stated in the export manifest (``require_exact=True`` refuses instead).

Refused, with the reason: groups other than 32 and per-channel grids (no legacy type has them;
the K-quants store 6- or 8-bit sub-block scales under an fp16 super-block scale per 256 weights,
which qbench's free fp16 group scales do not match), 2/3/6-bit codes, GPTQ ``g_idx``, activation
quantization (llama.cpp quantizes activations its own way inside its dot products), KV-cache
stages and every non-uniform layer. Unquantized tensors are written as F32 (``float_type="auto"``
for float32 checkpoints, lossless) or F16; 1-D tensors (norms) are always F32, as llama.cpp wants.

Tensors are named and the Q/K rows permuted as llama.cpp's ``convert_hf_to_gguf.py`` does for
``LlamaForCausalLM`` (rotary pairs interleaved); a row permutation keeps every 32-block intact.
The tokenizer (byte-level BPE: ``tokenizer.ggml.model = gpt2``) is written from the checkpoint's
``tokenizer.json`` with gguf's ``SpecialVocab`` (merges, special ids, chat template).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..defaults import section
from ..modules.qlinear import QuantLinear
from .common import ExportError, Refusal, describe, map_layers

FMT = "gguf"
GGUF_FILE = "model.gguf"
#: (bits, symmetric) → GGUF type name, for groups of 32
TYPES = {(8, True): "Q8_0", (4, True): "Q4_0", (5, True): "Q5_0", (4, False): "Q4_1", (5, False): "Q5_1"}


def _gguf_type(name: str, mod: nn.Module) -> str:
    if type(mod) is not QuantLinear:
        raise Refusal(f"{describe(mod)} has no GGUF type")
    if mod.a_bits < 16:
        raise Refusal(f"dynamic {mod.a_bits}-bit activation quantization: GGUF stores weights only "
                      "and llama.cpp quantizes activations its own way")
    if mod.g_idx is not None:
        raise Refusal("GPTQ act-order with dynamic groups (g_idx): GGUF blocks are 32 consecutive "
                      "inputs; quantize with static_groups: true")
    if mod.group_size != 32:
        grid = "per-channel" if mod.group_size in (-1, 0) else f"group_size={mod.group_size}"
        raise Refusal(f"{grid}: GGUF's block types hold one scale per 32 consecutive inputs "
                      "(Q8_0, Q4_0/Q4_1, Q5_0/Q5_1); K-quants need 6/8-bit sub-block scales under "
                      "one fp16 scale per 256, which qbench's free fp16 group scales do not match. "
                      "Use group_size: 32")
    t = TYPES.get((mod.bits, bool(mod.sym)))
    if t is None:
        raise Refusal(f"{mod.bits}-bit {'symmetric' if mod.sym else 'asymmetric'} codes: the GGUF block "
                      "types at group 32 are 8-bit symmetric (Q8_0), 4/5-bit symmetric (Q4_0/Q5_0) "
                      "and 4/5-bit asymmetric (Q4_1/Q5_1)")
    return t


def _blocks(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, qtype: str) -> np.ndarray:
    """GGUF block bytes ``[out, n_blocks * type_size]`` from codes ``[out, in]`` (uint8, unsigned
    qbench codes), fp16 scales and integer zeros ``[out, in/32]`` (ggml's ``block_q*`` layouts)."""
    out_f, in_f = codes.shape
    nb = in_f // 32
    q = codes.to(torch.int32).reshape(out_f, nb, 32)
    d = scales.to(torch.float16).reshape(out_f, nb, 1).numpy().view(np.uint8)  # [out, nb, 2]
    parts = [d]
    if qtype == "Q8_0":
        parts.append((q - 128).to(torch.int8).numpy().view(np.uint8))
    else:
        if qtype.endswith("_1"):
            m = (-(zeros.float() * scales.float())).to(torch.float16).reshape(out_f, nb, 1)
            parts.append(m.numpy().view(np.uint8))
        if qtype.startswith("Q5"):
            hi = ((q >> 4) & 1).to(torch.int64)
            qh = (hi << torch.arange(32, dtype=torch.int64)).sum(-1).to(torch.int64)  # bit i = high bit of q[i]
            parts.append(qh.numpy().astype("<u4").reshape(out_f, nb, 1).view(np.uint8))
        lo = (q & 0x0F).to(torch.uint8)
        parts.append((lo[..., :16] | (lo[..., 16:] << 4)).numpy())
    return np.concatenate(parts, axis=-1).reshape(out_f, -1)


def _permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute`` on the rows (rotary halves → interleaved pairs)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _pre_tokenizer(tok_json: dict) -> str:
    """llama.cpp's pre-tokenizer name for the byte-level BPE tokenizers we can describe exactly."""
    pre = tok_json.get("pre_tokenizer") or {}
    seq = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [(p.get("type"), p.get("individual_digits"), p.get("use_regex", True)) for p in seq]
    if kinds == [("ByteLevel", None, True)]:
        return "gpt-2"
    if kinds == [("Digits", True, True), ("ByteLevel", None, True)]:
        return "smollm"
    raise ExportError(f"tokenizer: GGUF export supports byte-level BPE tokenizers with the GPT-2 or "
                      f"SmolLM pre-tokenizer; this one is {kinds}")


def _write_tokenizer(writer, source: Path, tok, n_vocab: int) -> None:
    import gguf

    tj_path = source / "tokenizer.json"
    if tok is None or not tj_path.exists():
        raise ExportError(f"{source}: GGUF export needs the checkpoint's tokenizer.json "
                          "(llama.cpp cannot load a model without its vocabulary)")
    tj = json.loads(tj_path.read_text())
    if (tj.get("model") or {}).get("type") != "BPE":
        raise ExportError(f"tokenizer: GGUF export supports BPE tokenizers, not {tj['model'].get('type')}")
    vocab = tok.get_vocab()
    added = {t.content: t for t in tok.added_tokens_decoder.values()}
    by_id = {i: t for t, i in vocab.items()}
    if len(by_id) > n_vocab:
        raise ExportError(f"tokenizer has {len(by_id)} tokens but the embedding only {n_vocab} rows")
    tokens, types = [], []
    for i in range(n_vocab):
        t = by_id.get(i)
        if t is None:  # convert_hf_to_gguf pads unused ids the same way
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif t in added:
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if added[t].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tj))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(source, load_merges=True, n_vocab=n_vocab).add_to_gguf(writer, quiet=True)


def _config_value(cfg, key, default=None):
    v = getattr(cfg, key, None)
    if v is None:
        v = (getattr(cfg, "rope_parameters", None) or {}).get(key, default)
    return v


_DEFAULT = section("export.*")  # config export[]: float_type, require_exact (defaults in the schema)


def export_gguf(model: nn.Module, tok, manifest: dict, out: Path, *, source: Path,
                float_type: str = _DEFAULT["float_type"], require_exact: bool = _DEFAULT["require_exact"],
                log=print) -> dict:
    import gguf

    cfg = model.config
    if list(getattr(cfg, "architectures", None) or []) != ["LlamaForCausalLM"]:
        raise ExportError(f"architecture {getattr(cfg, 'architectures', None)}: GGUF export supports "
                          "LlamaForCausalLM (llama.cpp's 'llama')")
    rope_type = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type != "default":
        raise ExportError(f"rope scaling {rope_type!r}: GGUF export writes plain RoPE only")
    if float_type not in ("auto", "f32", "f16"):
        raise ExportError(f"float_type={float_type!r}: allowed values are auto, f32, f16")
    plan = map_layers(model, manifest, FMT, _gguf_type)
    ckpt_dtype = manifest.get("dtype", "float32")
    ftype = float_type if float_type != "auto" else ("f32" if ckpt_dtype == "float32" else "f16")
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    n_layers = cfg.num_hidden_layers
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)

    writer = gguf.GGUFWriter(str(out / GGUF_FILE), "llama")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(f"qbench {(manifest.get('stats') or {}).get('recipe_name') or 'export'}")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(float(_config_value(cfg, "rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    counts: dict[str, int] = {}
    for t in plan.values():
        counts[t] = counts.get(t, 0) + 1
    main_type = max(counts, key=counts.get) if counts else ftype.upper()
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{main_type}", gguf.LlamaFileType.ALL_F32)
                         if main_type != "F32" else gguf.LlamaFileType.ALL_F32)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_tokenizer(writer, Path(source), tok, cfg.vocab_size)

    layers, expected = {}, {}
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for hf_name, t in model.state_dict().items():
        mod_name, _, leaf = hf_name.rpartition(".")
        if tied and hf_name == "lm_head.weight":
            continue
        if mod_name in plan:
            if leaf != "qweight" and leaf != "bias":
                continue  # scales / zeros travel inside the blocks
            mod = model.get_submodule(mod_name)
            name = tmap.get_name(mod_name + "." + ("weight" if leaf == "qweight" else "bias"),
                                 try_suffixes=(".weight", ".bias"))
        else:
            name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"tensor {hf_name}: no llama GGUF name (unsupported model layout)")
        perm = n_head if ".attn_q." in name else n_kv if ".attn_k." in name else None
        if mod_name in plan and leaf == "qweight":
            codes, scales, zeros = mod.codes(), mod.scales, mod.zero_points()
            dense = mod.dequantized_weight().float()
            if perm:
                codes, scales, zeros, dense = (_permute_qk(x, perm) for x in (codes, scales, zeros, dense))
            qtype = gguf.GGMLQuantizationType[plan[mod_name]]
            writer.add_tensor(name, _blocks(codes, scales, zeros, plan[mod_name]), raw_dtype=qtype)
            expected[name] = dense
            layers[mod_name] = {"gguf_name": name, "type": plan[mod_name]}
            continue
        x = t.detach().float()
        if perm:
            x = _permute_qk(x, perm)
        if x.dim() == 1 or ftype == "f32":
            writer.add_tensor(name, x.numpy().astype(np.float32))
        else:
            writer.add_tensor(name, x.numpy().astype(np.float16))
        expected[name] = x
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()

    # Read the file back with gguf's reader and dequantizer (what transformers' GGUF loader uses).
    reader = gguf.GGUFReader(str(out / GGUF_FILE))
    worst_q, worst_rel, float_err, inexact = 0.0, 0.0, 0.0, []
    seen = set()
    for rt in reader.tensors:
        seen.add(rt.name)
        got = torch.from_numpy(np.array(gguf.quants.dequantize(rt.data, rt.tensor_type))).float()
        want = expected[rt.name]
        got = got.reshape(want.shape)
        d = float((got - want).abs().max()) if want.numel() else 0.0
        if rt.tensor_type.name in TYPES.values():
            worst_q = max(worst_q, d)
            worst_rel = max(worst_rel, d / max(float(want.abs().max()), 1e-30))
            if d:
                inexact.append(rt.name)
        else:
            float_err = max(float_err, d)
    if seen != set(expected):
        raise RuntimeError(f"GGUF read back {len(seen)} tensors, wrote {len(expected)}")
    if inexact and require_exact:
        raise ExportError(f"{len(inexact)} asymmetric layer(s) (e.g. {inexact[0]}) need their offset "
                          f"−z·s rounded to fp16 (max |Δw| {worst_q:.3g}); refused (require_exact)")
    log(f"[qbench] gguf: {len(plan)} quantized layers {counts}, float tensors {ftype}, "
        f"max |Δw| quantized {worst_q:g}, float {float_err:g}")
    return {
        "layers": layers,
        "gguf": {"file": GGUF_FILE, "architecture": "llama", "types": counts, "float_type": ftype,
                 "tokenizer_pre": _pre_tokenizer(json.loads((Path(source) / "tokenizer.json").read_text()))},
        "verification": {
            "reader": f"gguf {_version('gguf')} GGUFReader + quants.dequantize",
            "max_abs_weight_error": worst_q,
            "max_rel_weight_error": worst_rel,
            "exact": not inexact,
            "inexact_layers": len(inexact),
            "note": ("asymmetric _1 types round the offset −z·s to fp16" if inexact else
                     "every quantized tensor decodes to the checkpoint's weights bit for bit"),
            "max_abs_float_error": float_err,
        },
        "versions": {"gguf": _version("gguf")},
    }


def _version(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg)
