"""Needle in a haystack: exact-match scoring on strings, prompt construction (length, depth, chat
template), a real grid run on a tiny model through the quantized cache, and the heat-map."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qbench.eval.needle import (
    ANSWER_PREFIX, DEFAULT_HAYSTACK, NEEDLES, build_prompt, needle_found, plot_needle_heatmap, run_needle,
)


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256), no chat template."""

    eos_token_id = None

    def encode(self, text, add_special_tokens=False):
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens=True):
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


class ChatByteTokenizer(ByteTokenizer):
    chat_template = "<chatml>"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        s = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return s + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def test_exact_match_scoring_on_strings():
    # the seed's reported continuations
    assert needle_found('47x291.', "47x291")
    assert needle_found(" 8a3605. The", "8a3605")
    assert not needle_found("47x. The", "47x291")
    assert not needle_found("1294k.", "1294k8")
    assert not needle_found("5940. The", "590p37")
    assert not needle_found("594p37.", "590p37")
    assert not needle_found("47x29.", "47x291")
    assert not needle_found("68v43.", "68v423")
    # whole word only, case-sensitive, anywhere in the answer
    assert not needle_found("47x2910", "47x291")
    assert not needle_found("a47x291", "47x291")
    assert needle_found("The number is 47x291, I think", "47x291")
    assert not needle_found("47X291", "47x291")
    assert not needle_found("anything", "")


def test_prompt_length_depth_and_template():
    tok = ByteTokenizer()
    hay = tok.encode(DEFAULT_HAYSTACK)
    for depth in (0.0, 0.5, 1.0):
        p = build_prompt(tok, hay, 600, depth, "47x291")
        assert abs(len(p["ids"]) - 600) <= 2
        assert "The special magic number is 47x291." in p["text"]
        assert p["text"].endswith(ANSWER_PREFIX)
        frac = p["needle_token"] / len(p["ids"])
        assert abs(frac - depth * 0.8) < 0.2  # haystack ≈ 80-90% of the prompt, the rest is Q/A
    mid = build_prompt(tok, hay, 600, 0.5, "47x291")["text"]
    i = mid.index("The special magic number")
    assert mid[i - 2:i] == ". "  # snapped to a sentence boundary
    chat = build_prompt(ChatByteTokenizer(), hay, 400, 0.3, "8a3605")
    assert chat["text"].startswith("<|im_start|>user\n")
    assert chat["text"].endswith("<|im_start|>assistant\n" + ANSWER_PREFIX)
    assert abs(len(chat["ids"]) - 400) <= 2


def test_grid_on_tiny_model_with_kivi_cache(tmp_path):
    from qbench.methods.base import QuantContext, get_method, parse_recipe

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2)).eval()
    st, = parse_recipe([{"kivi": {"k_bits": 2, "v_bits": 2, "group_size": 32, "residual": 32}}])
    get_method("kivi").apply(model, st.config, QuantContext(progress=False))
    res = run_needle(model, ByteTokenizer(), "Some filler text. " * 20, context_lengths=(128, 256),
                     depths=(0.0, 0.5, 1.0), needles=NEEDLES[:2], max_new_tokens=4)
    assert len(res["grid"]) == 2 and all(len(r) == 3 for r in res["grid"])
    assert all(0.0 <= a <= 1.0 for r in res["grid"] for a in r)
    assert 0.0 <= res["accuracy"] <= 1.0 and res["n_total"] == 12
    assert res["kv_method"] == "kivi" and res["prefill_with_quant"] is True
    assert res["kv_cache"] == "KIVICache"
    assert all(r["correct"] == needle_found(r["answer"], r["needle"]) for r in res["records"])
    assert {r["prompt_tokens"] for r in res["records"]} <= set(range(120, 260))
    png = plot_needle_heatmap(res, tmp_path / "needle.png")
    assert png.exists() and png.stat().st_size > 1000


def test_grid_with_a_cache_factory_and_bad_depth():
    from transformers import DynamicCache

    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1)).eval()
    made = []

    def factory(m):
        made.append(DynamicCache(config=m.config))
        return made[-1]

    res = run_needle(model, ByteTokenizer(), None, context_lengths=(100,), depths=(0.25,),
                     needles=("47x291",), max_new_tokens=3, cache_factory=factory)
    assert len(made) == 1 and made[0].get_seq_length() >= 100
    assert res["kv_method"] == "fp16" and res["grid"][0][0] in (0.0, 1.0)
    with pytest.raises(ValueError, match="depth"):
        run_needle(model, ByteTokenizer(), None, context_lengths=(100,), depths=(1.5,))
