"""lm-eval bridge: offline local tasks scored on our in-memory model agree with a direct
log-likelihood computation; MMLU subset writer; cloze and rolling-perplexity tasks."""
import dataclasses
import json
import math
import os

import pytest
import torch

from qbench.eval import tasks as T

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # shared 2-core machine: one thread is faster than two contended ones

MC_ROWS = [
    {"question": "The sky on a clear day is", "choices": ["blue", "green", "made of cheese", "loud"], "answer": 0},
    {"question": "Two plus two equals", "choices": ["three", "four", "five"], "answer": 1},
    {"question": "A woodchuck would chuck", "choices": ["wood", "sea shells", "the lazy dog", "numbers"], "answer": 0},
    {"question": "Quantization maps values to a", "choices": ["larger set", "smaller set"], "answer": 1},
    {"question": "The quick brown fox jumps over the", "choices": ["lazy dog", "moon", "fence", "river"], "answer": 0},
    {"question": "Perplexity is lower when a model is", "choices": ["better", "worse", "larger"], "answer": 0},
    {"question": "KIVI quantizes keys per", "choices": ["token", "channel", "layer", "head"], "answer": 1},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from qbench.models.loading import load_model
    from qbench.models.tiny import make_tiny_llama

    d = make_tiny_llama(tmp_path_factory.mktemp("m") / "tiny")
    model, tok = load_model(d)
    return d, model, tok


@torch.no_grad()
def direct_ll(model, tok, context: str, continuation: str):
    """Sum log p(continuation | context) and whether greedy decoding reproduces it (lm-eval's
    causal split: encode(context + continuation), the context's tokens are its own encoding)."""
    whole = tok.encode(context + continuation, add_special_tokens=False)
    ctx = tok.encode(context, add_special_tokens=False)
    cont = whole[len(ctx):]
    logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    pos = torch.arange(len(ctx) - 1, len(whole) - 1)
    ll = logp[pos, torch.tensor(cont)].sum().item()
    greedy = bool((logp[pos].argmax(-1) == torch.tensor(cont)).all())
    return ll, greedy


@torch.no_grad()
def direct_rolling_ll(model, tok, text: str) -> float:
    """log p(text) scored from the prefix token (BOS, else EOS), one window (short text)."""
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    ids = [prefix] + tok.encode(text, add_special_tokens=False)
    logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum().item()


def _mc_direct(model, tok, rows, prompt):
    lls, acc, acc_norm = [], [], []
    for r in rows:
        ctx = prompt(r)
        ll = [direct_ll(model, tok, ctx, " " + c)[0] for c in r["choices"]]
        lls.append(ll)
        acc.append(float(max(range(len(ll)), key=lambda i: (ll[i], -i)) == r["answer"]))
        normed = [v / len(c) for v, c in zip(ll, r["choices"])]
        acc_norm.append(float(max(range(len(ll)), key=lambda i: (normed[i], -i)) == r["answer"]))
    return lls, acc, acc_norm


def test_local_multiple_choice_matches_direct_loglikelihood(tiny, tmp_path):
    _, model, tok = tiny
    T.write_multiple_choice_task(tmp_path, "qbench_toy_mc", MC_ROWS)
    res = T.run_lm_eval(model, tok, ["qbench_toy_mc"], include_path=tmp_path, log_samples=True,
                        verbosity="ERROR")
    assert res["config"]["offline"] is True
    lls, acc, acc_norm = _mc_direct(model, tok, MC_ROWS, lambda r: f"{r['question']}\nAnswer:")
    samples = sorted(res["samples"]["qbench_toy_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(MC_ROWS)
    for s, ll in zip(samples, lls):
        assert s["loglikelihoods"] == pytest.approx(ll, abs=1e-4)
    m = res["tasks"]["qbench_toy_mc"]
    assert m["acc"] == pytest.approx(sum(acc) / len(acc), abs=1e-12)
    assert m["acc_norm"] == pytest.approx(sum(acc_norm) / len(acc_norm), abs=1e-12)
    assert 0 < m["acc_stderr"] < 1


def test_quantized_model_is_what_gets_scored(tiny, tmp_path):
    """evaluate_tasks on an RTN checkpoint: lm-eval's numbers are those of the quantized model."""
    from qbench import api

    d, fp_model, tok = tiny
    ck = tmp_path / "ck"
    api.quantize(d, [{"rtn": {"w_bits": 2, "group_size": -1, "sym": False}}], ck, progress=False,
                 log=lambda *_: None)
    q_model, _, _ = api.load_for_eval(ck)
    T.write_multiple_choice_task(tmp_path / "extra", "qbench_toy_mc", MC_ROWS)
    out = tmp_path / "rec.json"
    opts = T.TaskOptions(include_path=tmp_path / "extra", log_samples=True, cache_dir=tmp_path / "cache",
                         dtype="float32")
    rec = T.evaluate_tasks(ck, ["qbench_toy_mc"], out, options=opts, recipe_name="w2")
    assert json.loads(out.read_text())["kind"] == "tasks"
    assert rec["recipe"] == "w2" and rec["recipe_resolved"][0]["rtn"]["w_bits"] == 2
    prompt = lambda r: f"{r['question']}\nAnswer:"  # noqa: E731
    q_lls, q_acc, _ = _mc_direct(q_model, tok, MC_ROWS, prompt)
    fp_lls, _, _ = _mc_direct(fp_model, tok, MC_ROWS, prompt)
    got = [s["loglikelihoods"] for s in sorted(rec["samples"]["qbench_toy_mc"], key=lambda s: s["doc_id"])]
    for g, q, f in zip(got, q_lls, fp_lls):
        assert g == pytest.approx(q, abs=1e-4)
        assert max(abs(a - b) for a, b in zip(g, f)) > 1e-3  # and not the fp model's
    assert rec["metrics"]["qbench_toy_mc/acc"] == pytest.approx(sum(q_acc) / len(q_acc), abs=1e-12)
    assert rec["eval"]["cache"] and list((tmp_path / "cache").glob("lm_eval-*"))
    # cached re-run gives identical numbers
    rec2 = T.evaluate_tasks(ck, ["qbench_toy_mc"], None, options=dataclasses.replace(opts, log_samples=False))
    assert rec2["tasks"]["qbench_toy_mc"]["acc"] == rec["tasks"]["qbench_toy_mc"]["acc"]


def _toy_corpus(tmp_path, model, tok):
    """A corpus whose single-sentence paragraphs end in the model's own greedy word for half of
    them (so the cloze accuracy is neither 0 nor 1), and a random word for the others."""
    stems = [
        "Round to nearest quantization chooses a scale and a zero point for each output channel "
        "or for each group of input channels and then rounds the values of the",
        "During generation the keys and values of every previous token are stored in a cache that "
        "for long contexts is larger than the model itself and so it is quantized to save the",
        "Perplexity is the exponential of the average negative log likelihood of the next token "
        "and it is measured on non overlapping windows of a held out text such as the",
        "Activations have outliers because a few channels are much larger than the others and "
        "SmoothQuant moves part of that difficulty from the activations to the",
        "The quick brown fox jumps over the lazy dog while she sells sea shells by the sea shore "
        "and a woodchuck would chuck wood if a woodchuck could chuck some",
        "My name is Tiny Llama and I am a very small language model that knows nothing at all "
        "about the world but I can still predict the next token of the",
    ]
    paras, n_greedy = [], 0
    for i, s in enumerate(stems):
        word = None
        if i % 2 == 0:  # the model's greedy next token, if it is a word
            with torch.no_grad():
                ids = tok.encode(s, add_special_tokens=False)
                nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            w = tok.decode([nxt])
            if w.startswith(" ") and w[1:].isalpha() and len(w) > 2 \
                    and tok.encode(s + w, add_special_tokens=False) == ids + [nxt]:
                word, n_greedy = w[1:], n_greedy + 1
        paras.append(f"{s} {word or 'zebra'}.")
    cdir = tmp_path / "toy"
    cdir.mkdir()
    (cdir / "test.txt").write_text("\n\n".join(paras), encoding="utf-8")
    (cdir / "corpus.json").write_text(json.dumps({"joiner": {"test": "\n\n"}, "n_docs": {"test": len(paras)}}))
    return cdir, paras, n_greedy


def test_cloze_and_rolling_perplexity_match_direct(tiny, tmp_path):
    _, model, tok = tiny
    cdir, paras, n_greedy = _toy_corpus(tmp_path, model, tok)
    assert n_greedy >= 1
    inc = T.write_offline_tasks(tmp_path / "tasks", corpora={"toy": cdir}, cloze_n=50, mmlu=False)
    info = json.loads((inc / "offline_tasks.json").read_text())["tasks"]
    assert info["qbench_cloze_toy"]["items"] == len(paras)  # one sentence end per paragraph
    assert info["qbench_wikitext_toy"]["documents"] == len(paras)
    res = T.run_lm_eval(model, tok, ["qbench_cloze_toy", "qbench_wikitext_toy"], include_path=inc,
                        log_samples=True, verbosity="ERROR")
    items = [json.loads(x) for x in open(inc / "qbench_cloze_toy" / "qbench_cloze_toy.jsonl")]
    for it, p in zip(items, paras):
        assert p.startswith(it["context"]) and p == it["context"] + it["target"] + "."
    direct = [direct_ll(model, tok, it["context"], it["target"]) for it in items]
    acc = sum(g for _, g in direct) / len(direct)
    assert 0 < acc < 1
    m = res["tasks"]["qbench_cloze_toy"]
    assert m["acc"] == pytest.approx(acc, abs=1e-12)
    assert m["perplexity"] == pytest.approx(math.exp(-sum(ll for ll, _ in direct) / len(direct)), rel=1e-5)
    # rolling loglikelihood → lm-eval word perplexity (document-level, per whitespace word)
    lls = [direct_rolling_ll(model, tok, p) for p in paras]
    words = sum(len(p.split()) for p in paras)
    nbytes = sum(len(p.encode()) for p in paras)
    w = res["tasks"]["qbench_wikitext_toy"]
    assert w["word_perplexity"] == pytest.approx(math.exp(-sum(lls) / words), rel=1e-5)
    assert w["byte_perplexity"] == pytest.approx(math.exp(-sum(lls) / nbytes), rel=1e-5)
    assert w["bits_per_byte"] == pytest.approx(-sum(lls) / nbytes / math.log(2), rel=1e-5)


def test_mmlu_subset_writer(tmp_path):
    rows, info = T.read_mmlu()
    assert info["rows_read"] == 14044 and info["dropped_header_rows"] == 2 and info["rows"] == 14042
    assert not any(r["question"] == "question" for r in rows)
    a = T.write_mmlu_tasks(tmp_path / "a", per_subject=3, seed=0)
    b = T.write_mmlu_tasks(tmp_path / "b", per_subject=3, seed=0)
    c = T.write_mmlu_tasks(tmp_path / "c", per_subject=3, seed=1)
    fa = (tmp_path / "a/qbench_mmlu/mmlu_subset.jsonl").read_bytes()
    assert fa == (tmp_path / "b/qbench_mmlu/mmlu_subset.jsonl").read_bytes()
    assert a["subset_sha256"] == b["subset_sha256"] != c["subset_sha256"]
    sub = [json.loads(x) for x in fa.decode().splitlines()]
    assert a["subjects"] == T.MMLU_SUBJECT_COUNT == 57 and len(sub) == 57 * 3
    per = {}
    for r in sub:
        per[r["subject"]] = per.get(r["subject"], 0) + 1
        assert len(r["choices"]) == 4 and all(ch.strip() for ch in r["choices"])
        assert r["answer"] in (0, 1, 2, 3) and "ABCD"[r["answer"]] in "ABCD"
        assert r["question"] != "question" and r["choices"][0] != "answer_a"
    assert set(per.values()) == {3}
    # the subset questions are real rows of the file, and dev shots are disjoint from them
    by_id = {r["id"]: r for r in rows}
    assert all(by_id[r["id"]] == r for r in sub)
    ids = {r["id"] for r in sub}
    dev = [json.loads(x) for x in open(tmp_path / "a/qbench_mmlu/data/anatomy.dev.jsonl")]
    assert len(dev) == 5 and not ids & {r["id"] for r in dev}
    # full set
    test_full, dev_full = T.mmlu_subset(rows, None)
    assert sum(map(len, test_full.values())) == 14042 and not any(dev_full.values())


def test_mmlu_task_runs_and_matches_direct(tiny, tmp_path):
    """qbench_mmlu (1 question per subject) through lm-eval == our own scoring of the same
    prompts (lm-eval's MMLU format)."""
    _, model, tok = tiny
    inc = T.write_offline_tasks(tmp_path, mmlu_subset=1, seed=3)
    res = T.run_lm_eval(model, tok, ["qbench_mmlu"], include_path=inc, verbosity="ERROR")
    sub = [json.loads(x) for x in open(inc / "qbench_mmlu" / "mmlu_subset.jsonl")]
    assert len(sub) == 57

    def prompt(r):
        return (f"The following are multiple choice questions (with answers) about {r['subject']}.\n\n"
                f"{r['question'].strip()}\nA. {r['choices'][0]}\nB. {r['choices'][1]}\n"
                f"C. {r['choices'][2]}\nD. {r['choices'][3]}\nAnswer:")

    acc = []
    for r in sub:
        ll = [direct_ll(model, tok, prompt(r), " " + x)[0] for x in "ABCD"]
        acc.append(float(max(range(4), key=lambda i: (ll[i], -i)) == r["answer"]))
    assert res["tasks"]["qbench_mmlu"]["acc"] == pytest.approx(sum(acc) / len(acc), abs=1e-12)
    assert res["n_shot"]["qbench_mmlu_anatomy"] == 0


def test_groups_and_errors(tmp_path):
    assert T.expand_tasks(["csqa", "boolq", "mmlu"]) == [
        "boolq", "arc_challenge", "arc_easy", "hellaswag", "piqa", "winogrande", "mmlu"]
    assert T.expand_tasks(["offline"], ["wiki", "news"]) == [
        "qbench_mmlu", "qbench_cloze_wiki", "qbench_cloze_news", "qbench_wikitext_wiki",
        "qbench_wikitext_news"]
    avg = T.csqa_average({"boolq": {"acc": 0.5}, "piqa": {"acc": 0.7, "acc_norm": 0.9}})
    assert avg["value"] == pytest.approx(0.6) and not avg["complete"] and avg["tasks"] == ["boolq", "piqa"]
    assert T.primary_metric("gsm8k") == "exact_match,strict-match"
    with pytest.raises(ValueError, match="corpus 'nope'"):
        T.evaluate_tasks(tmp_path, ["qbench_cloze_nope"], corpora={"wiki": tmp_path})
