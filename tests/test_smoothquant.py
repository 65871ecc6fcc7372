"""SmoothQuant: exact smoothing (norm folds, GQA-aware v→o, up→down), benefit for W8A8, composition."""
import pytest
import torch

from qbench.calib.stats import collect_act_stats
from qbench.checkpoint import load_checkpoint, save_checkpoint
from qbench.eval.ppl import perplexity
from qbench.methods.base import QuantContext, get_method, parse_recipe, resolve_recipe

from helpers import markov_tokens, tiny_llama

TOKS = markov_tokens(4096, seed=0)
X = markov_tokens(128, seed=5).view(2, 64)


def calibration(corpus, n, seqlen, seed):
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, TOKS.numel() - seqlen, (n,), generator=g)
    return torch.stack([TOKS[s:s + seqlen] for s in start.tolist()])


def run_recipe(model, recipe, ctx=None):
    ctx = ctx or QuantContext(calibration=calibration, progress=False, log=lambda s: None)
    out = []
    for i, st in enumerate(parse_recipe(recipe)):
        m = get_method(st.method)
        m.check(model, st.config, f"recipe[{i}]")
        out.append(m.apply(model, st.config, ctx))
    return model, out


@torch.no_grad()
def plant_outliers(m, factor=30.0, channels=(3, 17, 40)):
    """Scale a few channels of each norm by ``factor`` and the reading weights' columns by 1/factor:
    the model computes the same function, but its q/k/v and gate/up inputs get outlier channels."""
    c = list(channels)
    for blk in m.model.layers:
        for norm, lins in ((blk.input_layernorm, [blk.self_attn.q_proj, blk.self_attn.k_proj, blk.self_attn.v_proj]),
                           (blk.post_attention_layernorm, [blk.mlp.gate_proj, blk.mlp.up_proj])):
            norm.weight[c] *= factor
            for lin in lins:
                lin.weight[:, c] /= factor
    return m


SQ = {"alpha": 0.55, "nsamples": 8, "seqlen": 64}


@torch.no_grad()
def test_smoothing_alone_keeps_the_fp_model_gqa_folds_included():
    ref = tiny_llama()(X).logits
    m, (st,) = run_recipe(tiny_llama(), [{"smoothquant": {**SQ, "fold_vo": True, "fold_up_down": True}}])
    assert st["groups"] == {"norm_qkv": 2, "norm_mlp": 2, "v_o": 2, "up_down": 2}
    assert st["scale_max"] / st["scale_min"] > 2  # non-trivial scales
    base = tiny_llama()
    for name in ("model.layers.0.input_layernorm.weight", "model.layers.1.self_attn.v_proj.weight",
                 "model.layers.1.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        assert not torch.allclose(m.get_parameter(name), base.get_parameter(name))
    assert torch.allclose(m(X).logits, ref, atol=1e-4, rtol=0)


@torch.no_grad()
def test_smoothing_equalises_the_smoothed_inputs():
    m = plant_outliers(tiny_llama())
    before = collect_act_stats(m, calibration("wiki", 8, 64, 0), progress=False)
    run_recipe(m, [{"smoothquant": {**SQ, "alpha": 1.0}}])
    after = collect_act_stats(m, calibration("wiki", 8, 64, 0), progress=False)
    q = "model.layers.0.self_attn.q_proj"
    # alpha=1: every channel's activation max becomes max|W_j|^0 = 1 (up to the clamp)
    assert before[q]["absmax"].max() / before[q]["absmax"].median() > 10
    assert torch.allclose(after[q]["absmax"], torch.ones(64), rtol=1e-4)


@torch.no_grad()
def test_sq_then_w8a8_beats_w8a8_alone_with_planted_outliers_and_ppl_stays_within_2pct():
    w8a8 = {"rtn": {"w_bits": 8, "sym": True, "a_bits": 8, "a_granularity": "per_token"}}
    fp = plant_outliers(tiny_llama())
    ref = fp(X).logits
    rtn, _ = run_recipe(plant_outliers(tiny_llama()), [w8a8])
    sq, _ = run_recipe(plant_outliers(tiny_llama()), [{"smoothquant": SQ}, w8a8])
    e_rtn = (rtn(X).logits - ref).pow(2).mean().item()
    e_sq = (sq(X).logits - ref).pow(2).mean().item()
    assert e_sq < 0.5 * e_rtn
    # one layer in isolation: the q_proj output
    xin = {}
    for mm in (fp, rtn, sq):
        h = mm.model.layers[0].self_attn.q_proj.register_forward_hook(
            lambda mod, a, o, mm=mm: xin.__setitem__(id(mm), o))
        mm(X)
        h.remove()
    assert (xin[id(sq)] - xin[id(fp)]).pow(2).mean() < 0.5 * (xin[id(rtn)] - xin[id(fp)]).pow(2).mean()
    base = perplexity(tiny_llama(), TOKS, 256, progress=False)["ppl"]
    q, _ = run_recipe(tiny_llama(), [{"smoothquant": SQ}, w8a8])
    assert abs(perplexity(q, TOKS, 256, progress=False)["ppl"] / base - 1) < 0.02


@torch.no_grad()
def test_second_stage_recollects_stats_and_round_trips(tmp_path):
    shared = {}

    def calib_stats(corpus, n, seqlen, seed):  # stats of the *original* model, like the DAG rule
        if "s" not in shared:
            shared["s"] = collect_act_stats(tiny_llama(), calibration(corpus, n, seqlen, seed), progress=False)
        return shared["s"]

    logs = []
    ctx = QuantContext(calibration=calibration, calib_stats=calib_stats, progress=False, log=logs.append)
    ref = tiny_llama()(X).logits
    recipe = [{"smoothquant": SQ}, {"smoothquant": {**SQ, "alpha": 0.8, "fold_up_down": True}},
              {"rtn": {"w_bits": 8, "sym": True, "a_bits": 8}}]
    m, _ = run_recipe(tiny_llama(), recipe[:1], ctx)
    assert logs == []  # first stage: the shared statistics are this model's
    m, _ = run_recipe(m, recipe[1:2], ctx)
    assert len(logs) == 1 and "changed" in logs[0]  # second: re-collected on the smoothed model
    assert torch.allclose(m(X).logits, ref, atol=1e-4, rtol=0)
    m, _ = run_recipe(m, recipe[2:], ctx)
    out = m(X).logits
    save_checkpoint(m, None, tmp_path / "ck", recipe=resolve_recipe(recipe))
    m2, _, _ = load_checkpoint(tmp_path / "ck")
    assert torch.equal(m2(X).logits, out)


def test_config_errors():
    from qbench.methods.base import ConfigError
    with pytest.raises(ConfigError, match="alpha"):
        parse_recipe([{"smoothquant": {"alpha": 1.5}}])
    with pytest.raises(ConfigError, match="unknown argument"):
        parse_recipe([{"smoothquant": {"beta": 0.5}}])
