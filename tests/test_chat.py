"""Chat: deterministic greedy answers through the tokenizer's chat template."""
import json
from pathlib import Path

import pytest
import torch

from qbench.eval import chat as C

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from qbench.models.loading import load_model
    from qbench.models.tiny import make_tiny_llama

    d = make_tiny_llama(tmp_path_factory.mktemp("m") / "tiny")
    model, tok = load_model(d)
    return d, model, tok


def test_seed_prompts_verbatim():
    assert len(C.SEED_PROMPTS) == 2
    assert C.SEED_PROMPTS[0].startswith("Imagine you are participating in a race")
    assert C.SEED_PROMPTS[0].endswith("Where is the person you just overtook?")
    assert C.SEED_PROMPTS[1] == "Give me a short introduction about the knowledge distillation."
    seed = Path("/work/shared/seeds/qllm-infer-README.txt")
    if seed.exists():  # the seed's "Prompt from User" lines hold them verbatim
        lines = [ln for ln in seed.read_text(encoding="utf-8").splitlines() if "Prompt from User" in ln]
        for p in C.SEED_PROMPTS:
            assert any(p in ln for ln in lines)


def test_chat_deterministic_and_uses_template(tiny):
    _, model, tok = tiny
    seen = []
    h = model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["input_ids"][0].tolist()) if not seen else None, with_kwargs=True)
    try:
        a = C.chat(model, tok, max_new_tokens=12)
    finally:
        h.remove()
    b = C.chat(model, tok, max_new_tokens=12)
    assert [x["answer"] for x in a] == [x["answer"] for x in b]
    assert [x["token_ids"] for x in a] == [x["token_ids"] for x in b]
    assert [x["prompt"] for x in a] == list(C.SEED_PROMPTS)
    # the first forward of generate() got exactly the chat-template ids of the first prompt
    ids, text, kind = C.build_chat_prompt(tok, C.SEED_PROMPTS[0])
    assert kind == "chat_template" and seen[0] == ids
    assert text == f"<|im_start|>user\n{C.SEED_PROMPTS[0]}<|im_end|>\n<|im_start|>assistant\n"
    head = tok.encode("<|im_start|>user\n", add_special_tokens=False)
    tail = tok.encode("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    assert ids[:len(head)] == head and ids[-len(tail):] == tail
    assert head[0] == tok.convert_tokens_to_ids("<|im_start|>")
    ref = tok.apply_chat_template([{"role": "user", "content": C.SEED_PROMPTS[0]}],
                                  add_generation_prompt=True, tokenize=True)
    ref = ref["input_ids"] if not isinstance(ref, list) else ref
    assert list(ref) == ids
    for x in a:
        assert x["prompt_tokens"] == len(C.build_chat_prompt(tok, x["prompt"])[0])
        assert 1 <= x["n_tokens"] <= 12 and len(x["token_ids"]) == x["n_tokens"]
        assert x["answer"] == tok.decode(x["token_ids"], skip_special_tokens=True).strip()
        assert (x["stopped"] == "eos") == (x["token_ids"][-1] == tok.eos_token_id)
        if x["stopped"] == "max_new_tokens":
            assert x["n_tokens"] == 12


def test_greedy_equals_manual_argmax(tiny):
    """generate() with the chat prompt == a hand-written greedy loop (no cache)."""
    _, model, tok = tiny
    out = C.chat(model, tok, ["Hello, world! What is your name?"], max_new_tokens=8, system="Be brief.")[0]
    ids, text, _ = C.build_chat_prompt(tok, "Hello, world! What is your name?", system="Be brief.")
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    cur = list(ids)
    with torch.no_grad():
        for _ in range(8):
            nxt = int(model(torch.tensor([cur])).logits[0, -1].argmax())
            cur.append(nxt)
            if nxt == tok.eos_token_id:
                break
    assert out["token_ids"] == cur[len(ids):]


def test_plain_fallback_and_record(tiny, tmp_path):
    d, model, tok = tiny
    import copy

    plain = copy.deepcopy(tok)
    plain.chat_template = None
    ids, text, kind = C.build_chat_prompt(plain, "Hi")
    assert kind == "plain" and text == "User: Hi\nAssistant:"
    out = tmp_path / "chat.json"
    rec = C.evaluate_chat(d, out, ["Hi", "What is perplexity?"], max_new_tokens=5, dtype="float32",
                          model_name="tiny", recipe_name="fp")
    on_disk = json.loads(out.read_text())
    assert on_disk["kind"] == "chat" and on_disk["recipe"] == "fp"
    assert [x["prompt"] for x in on_disk["answers"]] == ["Hi", "What is perplexity?"]
    assert on_disk["eval"]["max_new_tokens"] == 5 and on_disk["eval"]["template"] == "chat_template"
    assert rec["answers"][0]["answer"] == C.chat(model, tok, ["Hi"], max_new_tokens=5)[0]["answer"]
    with pytest.raises(ValueError, match="max_new_tokens"):
        C.chat(model, tok, ["Hi"], max_new_tokens=0)
