"""Shared calibration statistics: collection, storage, reuse vs re-collection."""
import json

import pytest
import torch

from qbench.calib.stats import (StatsError, collect_act_stats, get_act_stats, load_stats,
                                load_stats_meta, model_fingerprint, save_stats, stats_meta)
from qbench.calib.spec import CalibSet
from qbench.methods.base import QuantContext
from qbench.modules import target_linears

from helpers import markov_tokens, tiny_llama

IDS = markov_tokens(3 * 40, seed=1).view(3, 40)


Cfg = CalibSet("wiki", 3, 40, 0)


@torch.no_grad()
def test_stats_match_a_direct_reference_and_do_not_depend_on_batch_size():
    m = tiny_llama()
    xs = {}
    hooks = [mod.register_forward_pre_hook(lambda mod, a, n=n: xs.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
             for n, mod in target_linears(m).items()]
    m(IDS)  # all three sequences at once
    for h in hooks:
        h.remove()
    st1 = collect_act_stats(m, IDS, progress=False, batch_size=1)
    st3 = collect_act_stats(m, IDS, progress=False, batch_size=3)
    assert set(st1) == set(target_linears(m)) and len(st1) == 14
    for name, parts in xs.items():
        x = torch.cat(parts).double()
        assert int(st1[name]["count"]) == 120
        assert torch.equal(st1[name]["absmax"], x.abs().amax(0).float())
        assert torch.allclose(st1[name]["mean_abs"].double(), x.abs().mean(0), rtol=1e-5)
        assert torch.allclose(st1[name]["mean_sq"].double(), (x * x).mean(0), rtol=1e-5)
        for k in ("absmax", "mean_abs", "mean_sq"):
            assert torch.allclose(st1[name][k], st3[name][k], rtol=1e-5, atol=1e-7)
    assert st1.meta["n"] == 3 and st1.meta["seqlen"] == 40
    assert st1.meta["model_fingerprint"] == model_fingerprint(m)


def test_save_load_round_trip_sidecar_and_corruption(tmp_path):
    m = tiny_llama()
    st = collect_act_stats(m, IDS, progress=False)
    p = tmp_path / "calib" / "stats.safetensors"
    side = save_stats(st, p, stats_meta(IDS, seed=7, corpus="wiki"))
    meta = json.loads(p.with_suffix(".json").read_text())
    assert meta == side and meta["seed"] == 7 and meta["n"] == 3 and meta["seqlen"] == 40
    assert len(meta["calib_hash"]) == 64 and meta["model_fingerprint"] == model_fingerprint(m)
    back = load_stats(p)
    assert back.meta == load_stats_meta(p)
    assert set(back) == set(st)
    for layer in st:
        for k in st[layer]:
            assert torch.equal(back[layer][k], st[layer][k])
    from safetensors import safe_open
    with safe_open(str(p), "pt") as f:
        assert "model.layers.0.self_attn.q_proj|absmax" in f.keys()
    p.write_bytes(p.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(StatsError, match="sha256"):
        load_stats(p)
    p.with_suffix(".json").unlink()
    with pytest.raises(StatsError, match="sidecar"):
        load_stats(p)


def test_get_act_stats_reuses_shared_stats_only_for_the_same_model(tmp_path):
    m = tiny_llama()
    p = tmp_path / "stats.safetensors"
    save_stats(collect_act_stats(m, IDS, progress=False), p, stats_meta(IDS, seed=0, corpus="wiki"))
    calls, logs = [], []

    def calibration(corpus, n, seqlen, seed):
        calls.append((corpus, n, seqlen, seed))
        return IDS

    ctx = QuantContext(calibration=calibration, calib_stats=lambda c, n, s, seed: load_stats(p),
                       progress=False, log=logs.append)
    got = get_act_stats(m, ctx, Cfg)
    assert calls == [] and got.meta["seed"] == 0  # shared statistics used as they are
    with torch.no_grad():  # an earlier stage changed the model: statistics are re-collected
        m.model.layers[0].input_layernorm.weight.mul_(2.0)
    got2 = get_act_stats(m, ctx, Cfg)
    assert calls == [("wiki", 3, 40, 0)] and "changed" in logs[0]
    q = "model.layers.0.self_attn.q_proj"
    assert torch.allclose(got2[q]["absmax"], 2 * got[q]["absmax"], rtol=1e-5)
    # no provider at all: computed from the calibration set
    got3 = get_act_stats(m, QuantContext(calibration=calibration, progress=False), Cfg)
    assert torch.equal(got3[q]["absmax"], got2[q]["absmax"])
