"""GGUF export: transformers' GGUF loader reads back our weights exactly for the grids that map
(Q8_0, Q4_0, Q5_0); the asymmetric _1 types differ only by the fp16 rounding of the offset, which
the manifest states; other grids and recipes are refused naming the stage."""
import json

import pytest
import torch

from qbench.api import quantize
from qbench.checkpoint import load_checkpoint
from qbench.export import ExportError, export_checkpoint
from qbench.export.gguf import GGUF_FILE


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from qbench.models.tiny import make_tiny_llama

    d = tmp_path_factory.mktemp("gguf")
    make_tiny_llama(d / "model", seed=2)
    return d


def checkpoint(tiny, recipe, name):
    out = tiny / f"ck-{name}"
    if not out.exists():
        quantize(tiny / "model", recipe, out, progress=False, log=lambda s: None, recipe_name=name)
    return out


def hf_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, gguf_file=GGUF_FILE, dtype=torch.float32).eval()


def our_weights(ck):
    m, _, _ = load_checkpoint(ck)
    out = {}
    for n, mod in m.named_modules():
        if hasattr(mod, "dequantized_weight"):
            out[n + ".weight"] = mod.dequantized_weight().float()
        elif isinstance(mod, (torch.nn.Linear, torch.nn.Embedding, torch.nn.Module)) and \
                isinstance(getattr(mod, "weight", None), torch.nn.Parameter):
            out[n + ".weight"] = mod.weight.detach().float()
    return m, out


@pytest.mark.parametrize("bits,sym,qtype", [(8, True, "Q8_0"), (4, True, "Q4_0"), (5, True, "Q5_0"), (None, None, None)])
def test_transformers_gguf_loader_reads_our_weights_exactly(tiny, bits, sym, qtype):
    recipe = [] if bits is None else [{"rtn": {"w_bits": bits, "group_size": 32, "sym": sym}}]
    name = f"w{bits}-{'s' if sym else 'a'}" if bits else "fp"
    ck = checkpoint(tiny, recipe, name)
    rec = export_checkpoint(ck, tiny / f"gg-{name}", "gguf", log=lambda s: None)
    v = rec["verification"]
    assert v["exact"] and v["max_abs_weight_error"] == 0.0 and v["max_abs_float_error"] == 0.0
    assert rec["gguf"]["types"] == ({qtype: 14} if qtype else {})
    m, ours = our_weights(ck)
    hf = hf_gguf(tiny / f"gg-{name}")
    sd = hf.state_dict()
    assert len(ours) >= 2 * 7 + 2 * 2 + 2  # 14 linears, 4 block norms, embedding, final norm
    for k, w in ours.items():
        assert torch.equal(sd[k].float(), w), k  # bit for bit, incl. un-permuted q/k rows
    ids = torch.arange(96).reshape(2, 48) % m.config.vocab_size
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, m(ids).logits)


def test_asymmetric_q4_1_states_the_fp16_offset_error(tiny):
    ck = checkpoint(tiny, [{"rtn": {"w_bits": 4, "group_size": 32, "sym": False}}], "w4-a")
    rec = export_checkpoint(ck, tiny / "gg-w4-a", "gguf", log=lambda s: None)
    v = rec["verification"]
    assert rec["gguf"]["types"] == {"Q4_1": 14} and not v["exact"] and v["inexact_layers"] > 0
    m, _, _ = load_checkpoint(ck)
    sd = hf_gguf(tiny / "gg-w4-a").state_dict()
    worst = 0.0
    for n, mod in m.named_modules():
        if not hasattr(mod, "dequantized_weight"):
            continue
        ours = mod.dequantized_weight().float()
        offset = (mod.zero_points() * mod.scales.float()).repeat_interleave(32, dim=1)  # z·s per input
        err = (sd[n + ".weight"].float() - ours).abs()
        # only the fp16 rounding of the offset: at most half an fp16 ulp of |z·s| (2^-11 relative)
        assert (err <= offset.abs() * 2.0 ** -11 + 1e-12).all(), n
        worst = max(worst, float(err.max()))
    assert worst == pytest.approx(v["max_abs_weight_error"]) and worst > 0
    with pytest.raises(ExportError, match="require_exact"):
        export_checkpoint(ck, tiny / "gg-w4-a-strict", "gguf", require_exact=True, log=lambda s: None)
    assert not (tiny / "gg-w4-a-strict").exists()


def test_gguf_metadata_tokenizer_and_f16(tiny):
    import gguf

    ck = checkpoint(tiny, [{"rtn": {"w_bits": 8, "group_size": 32, "sym": True}}], "w8-s")
    rec = export_checkpoint(ck, tiny / "gg-f16", "gguf", float_type="f16", log=lambda s: None)
    assert rec["gguf"]["float_type"] == "f16" and rec["verification"]["max_abs_float_error"] > 0
    r = gguf.GGUFReader(str(tiny / "gg-f16" / GGUF_FILE))
    f = {k: v for k, v in r.fields.items()}
    assert f["general.architecture"].contents() == "llama"
    assert f["tokenizer.ggml.model"].contents() == "gpt2" and f["tokenizer.ggml.pre"].contents() == "gpt-2"
    n_vocab = json.loads((ck / "config.json").read_text())["vocab_size"]
    assert len(f["tokenizer.ggml.tokens"].data) == n_vocab == f["llama.vocab_size"].contents() and len(f["tokenizer.ggml.merges"].data) > 0
    assert f["tokenizer.ggml.bos_token_id"].contents() == 1 and "im_start" in f["tokenizer.chat_template"].contents()
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["token_embd.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.1.ffn_down.weight"] == "Q8_0" and "output.weight" not in types  # tied
    json.loads((tiny / "gg-f16" / "qbench-export.json").read_text())


@pytest.mark.parametrize("recipe,match", [
    ([{"rtn": {"w_bits": 4, "group_size": 64, "sym": True}}], r"recipes\.bad\[0\]\.rtn: gguf export refused: .*group_size=64"),
    ([{"rtn": {"w_bits": 4, "group_size": -1, "sym": True}}], r"per-channel"),
    ([{"rtn": {"w_bits": 3, "group_size": 32, "sym": True}}], r"3-bit symmetric codes"),
    ([{"rtn": {"w_bits": 8, "group_size": 32, "sym": True, "a_bits": 8}}], r"activation quantization"),
    ([{"rtn": {"w_bits": 4, "group_size": 32, "sym": True}}, {"kvquant": {"bits": 4, "calib": "wiki"}}],
     r"recipes\.bad\[1\]\.kvquant: gguf export refused: .*KV cache"),
])
def test_gguf_refusals_name_the_stage(tiny, tmp_path, recipe, match):
    from qbench.checkpoint import save_checkpoint
    from qbench.methods.base import QuantContext, get_method, parse_recipe, resolve_recipe
    from qbench.models.loading import load_model

    model, tok = load_model(tiny / "model")
    for st in parse_recipe(recipe):
        if get_method(st.method).kind != "kv":  # the stage check refuses before any tensor is read
            get_method(st.method).apply(model, st.config, QuantContext(progress=False))
    save_checkpoint(model, tok, tmp_path / "ck", recipe=resolve_recipe(recipe), stats={"recipe_name": "bad"})
    with pytest.raises(ExportError, match=match):
        export_checkpoint(tmp_path / "ck", tmp_path / "out", "gguf", log=lambda s: None)
    assert not (tmp_path / "out").exists()
