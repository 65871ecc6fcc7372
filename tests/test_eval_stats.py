"""Weight/activation statistics and layer-wise distance: hand computations on synthetic tensors,
identities on tiny models, and the evaluate_stats record."""
import copy
import json
import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

from qbench.eval import stats as S

torch.set_num_threads(1)


def test_sqnr_of_known_noise():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(20000, generator=g, dtype=torch.float64)
    n0 = torch.randn(20000, generator=g, dtype=torch.float64)
    for db in (10.0, 20.0, 47.5):  # noise scaled to an exact power ratio
        noise = n0 * math.sqrt(ref.pow(2).sum() / n0.pow(2).sum() / 10 ** (db / 10))
        assert S.sqnr_db(ref, ref + noise) == pytest.approx(db, abs=1e-9)
        assert S.mse(ref, ref + noise) == pytest.approx(noise.pow(2).mean().item(), rel=1e-12)
    assert S.sqnr_db(ref, ref) == math.inf
    # uniform quantization noise: SQNR = 10 log10(var(x) / (step²/12)), here x ~ U(-1, 1)
    x = torch.rand(400000, generator=g, dtype=torch.float64) * 2 - 1
    step = 2 / 2 ** 8
    q = (x / step).round() * step
    assert S.sqnr_db(x, q) == pytest.approx(10 * math.log10((1 / 3) / (step ** 2 / 12)), abs=0.05)


def test_kurtosis_and_streaming_moments():
    g = torch.Generator().manual_seed(1)
    normal = torch.randn(400000, generator=g, dtype=torch.float64)
    uniform = torch.rand(400000, generator=g, dtype=torch.float64)
    laplace = torch.distributions.Laplace(0.0, 1.0).sample((400000,)).double()
    assert S.kurtosis(normal) == pytest.approx(0.0, abs=0.05)
    assert S.kurtosis(uniform) == pytest.approx(-1.2, abs=0.02)
    assert S.kurtosis(laplace) == pytest.approx(3.0, abs=0.15)
    for x in (normal, uniform, laplace):  # exactly scipy's Fisher / population definition
        assert S.kurtosis(x) == pytest.approx(sps.kurtosis(x.numpy(), fisher=True, bias=True), abs=1e-9)
    # merging chunks of different sizes and offsets == one pass
    x = torch.cat([torch.randn(1000, generator=g) * 3 + 5, torch.rand(77, generator=g) - 40,
                   torch.randn(5000, generator=g) ** 3]).double()
    m = S.Moments()
    for chunk in (x[:1000], x[1000:1077], x[1077:3000], x[3000:]):
        m.update(chunk)
    one = S.tensor_stats(x)
    xn = x.numpy()
    assert m.n == one["numel"] == x.numel()
    assert m.mean == pytest.approx(xn.mean(), rel=1e-12)
    assert m.std == pytest.approx(xn.std(), rel=1e-10)
    assert m.kurtosis == pytest.approx(sps.kurtosis(xn), rel=1e-9)
    assert (m.min, m.max) == (xn.min(), xn.max())
    assert one["absmax"] == np.abs(xn).max()


def test_outlier_channels_planted():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(256, 128, generator=g)  # [out, in]: channel absmax ≈ 2.5–4
    w[:, [5, 40, 99]] *= 100.0  # planted outlier input channels (≈ 300 > 20 × median)
    w[:, 7] *= 8.0  # large but below 20 × median: not an outlier
    amax = S.channel_absmax(w, dim=1)
    assert amax.shape == (128,)
    assert S.outlier_channels(amax) == 3
    assert S.outlier_channels(amax, k=2.0) == 4
    med = amax.median().item()
    assert set(torch.nonzero(amax > 20 * med).flatten().tolist()) == {5, 40, 99}


def test_rescaled_weight_sqnr():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 64, generator=g, dtype=torch.float64)
    r = torch.rand(48, generator=g, dtype=torch.float64) + 0.5
    c = torch.rand(64, generator=g, dtype=torch.float64) * 4 + 0.25
    scaled = r[:, None] * w * c[None, :]
    assert S.sqnr_db(w, scaled) < 10  # plain SQNR sees the rescaling as error
    assert S.rescaled_weight_sqnr_db(w, scaled) > 100  # exact diagonal rescaling: no error left
    noise = torch.randn(48, 64, generator=g, dtype=torch.float64) * 1e-2 * scaled.std()
    expect = S.sqnr_db(scaled, scaled + noise)
    assert S.rescaled_weight_sqnr_db(w, scaled + noise) == pytest.approx(expect, abs=0.2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from qbench.models.loading import load_model
    from qbench.models.tiny import make_tiny_llama

    d = make_tiny_llama(tmp_path_factory.mktemp("m") / "tiny")
    model, tok = load_model(d)
    return d, model, tok


def _ids(n=2, t=48, vocab=500, seed=0):
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def test_layerwise_distance_identity_and_perturbed_block(tiny):
    _, model, _ = tiny
    ids = _ids()
    same = S.layerwise_distance(model, copy.deepcopy(model), ids)
    assert len(same) == 2
    for d in same:
        assert d["rel_l2"] == 0.0 and d["rel_l2_token_mean"] == 0.0
        assert d["cosine"] == pytest.approx(1.0, abs=1e-12) and d["tokens"] == ids.numel()
    pert = copy.deepcopy(model)
    with torch.no_grad():
        w = pert.model.layers[1].mlp.down_proj.weight
        w.add_(0.5 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
    dist = S.layerwise_distance(model, pert, ids)
    assert dist[0]["rel_l2"] == 0.0 and dist[0]["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert dist[1]["rel_l2"] > 1e-3 and dist[1]["cosine"] < 1 - 1e-7
    # hand computation of block 1's numbers
    hs = {}
    for name, m in (("fp", model), ("q", pert)):
        h = m.model.layers[1].register_forward_hook(
            lambda mod, a, o, name=name: hs.__setitem__(name, (o[0] if isinstance(o, tuple) else o).double()))
        with torch.no_grad():
            m(input_ids=ids, use_cache=False)
        h.remove()
    a, b = hs["fp"].reshape(-1, hs["fp"].shape[-1]), hs["q"].reshape(-1, hs["q"].shape[-1])
    assert dist[1]["rel_l2"] == pytest.approx(((b - a).norm() / a.norm()).item(), rel=1e-6)
    assert dist[1]["cosine"] == pytest.approx(torch.nn.functional.cosine_similarity(a, b).mean().item(),
                                              rel=1e-6)
    # a larger perturbation → a larger distance
    pert2 = copy.deepcopy(model)
    with torch.no_grad():
        w = pert2.model.layers[1].mlp.down_proj.weight
        w.add_(2.0 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
    assert S.layerwise_distance(model, pert2, ids)[1]["rel_l2"] > dist[1]["rel_l2"]


def test_weight_and_activation_stats_on_rtn(tiny):
    from qbench.methods.base import build_config, get_method
    from qbench.methods.base import QuantContext
    from qbench.modules import target_linears

    _, model, tok = tiny
    q = copy.deepcopy(model)
    m = get_method("rtn")
    cfg = build_config(m.Config, {"w_bits": 4, "group_size": 32, "sym": False, "a_bits": 8,
                                  "a_granularity": "per_token"}, "rtn")
    m.apply(q, cfg, QuantContext(tokenizer=tok, device="cpu", calibration=None, calib_stats=None,
                                 progress=False, log=lambda *_: None))
    ws = S.weight_stats(model, q, rescaled=True)
    fp_layers = target_linears(model)
    assert [w["layer"] for w in ws] == list(fp_layers)
    ql = target_linears(q, include_quantized=True)
    for w in ws:
        wf, wq = fp_layers[w["layer"]].weight.detach(), ql[w["layer"]].dequantized_weight()
        assert w["sqnr_db"] == pytest.approx(S.sqnr_db(wf, wq), abs=1e-9)
        assert 10 < w["sqnr_db"] < 40 and w["sqnr_db_rescaled"] >= w["sqnr_db"] - 1e-9
        assert w["fp"]["kurtosis"] == pytest.approx(sps.kurtosis(wf.double().flatten().numpy()), abs=1e-9)
        assert w["q"]["std"] == pytest.approx(wq.double().std(unbiased=False).item(), rel=1e-9)
    ident = S.weight_stats(model, model)
    assert all(w["sqnr_db"] == math.inf and w["mse"] == 0.0 for w in ident)

    ids = _ids(seed=1)
    acts = S.activation_stats(model, q, ids, batch_size=1)
    assert len(acts) == len(ws)
    # the fp input of the first layer, captured by hand
    name0 = acts[0]["layer"]
    cap = []
    h = fp_layers[name0].register_forward_pre_hook(lambda mod, a: cap.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    h.remove()
    x = torch.cat(cap).double()
    assert acts[0]["fp"]["kurtosis"] == pytest.approx(sps.kurtosis(x.flatten().numpy()), rel=1e-6)
    assert acts[0]["fp"]["absmax"] == pytest.approx(x.abs().max().item(), rel=1e-7)
    assert acts[0]["tokens"] == ids.numel()
    # first layer: same input in both models → its error is the 8-bit activation quantizer's only
    xq = ql[name0].quant_input(x.float()).double()
    assert acts[0]["a_bits"] == 8
    assert acts[0]["act_quant_sqnr_db"] == pytest.approx(S.sqnr_db(x, xq), abs=1e-6)
    assert acts[0]["sqnr_db"] == pytest.approx(acts[0]["act_quant_sqnr_db"], abs=1e-6)
    # error accumulates: the last block's inputs are worse than the first's
    assert acts[-1]["sqnr_db"] < acts[0]["sqnr_db"]
    same = S.activation_stats(model, copy.deepcopy(model), ids)
    assert all(a["sqnr_db"] == math.inf and a["act_quant_sqnr_db"] is None for a in same)
    # batching does not change the statistics
    acts2 = S.activation_stats(model, q, ids, batch_size=2)
    for a, b in zip(acts, acts2):
        assert a["fp"]["kurtosis"] == pytest.approx(b["fp"]["kurtosis"], rel=1e-6)
        assert a["sqnr_db"] == pytest.approx(b["sqnr_db"], abs=1e-3)


def test_shared_inputs_are_computed_once_and_never_confused(tiny, monkeypatch):
    """Sharing per-input results (q/k/v, gate/up) gives exactly what computing every layer on its
    own gives; a freed input whose address another layer's input reuses is not mistaken for it
    (main before issue 12 keyed by data_ptr and mixed layers up, run to run)."""
    _, model, _ = tiny
    q = copy.deepcopy(model)
    from qbench.methods.base import QuantContext, get_method, parse_recipe

    (st,) = parse_recipe([{"rtn": {"w_bits": 3, "group_size": -1, "a_bits": 8}}])
    get_method("rtn").apply(q, st.config, QuantContext(progress=False))
    ids = _ids(2, 48, seed=7)
    shared = S.activation_stats(model, q, ids)
    calls = []
    real_get = S._Memo.get

    def no_sharing(self, tensors, tag, compute):
        calls.append(tag)
        return compute()

    monkeypatch.setattr(S._Memo, "get", no_sharing)
    alone = S.activation_stats(model, q, ids)
    monkeypatch.setattr(S._Memo, "get", real_get)
    assert json.dumps(shared, default=str) == json.dumps(alone, default=str)
    assert len(calls) > 0


def test_exact_rescaling_is_not_counted_as_error(tiny):
    """A SmoothQuant-style exact folding (norm / s, weight columns · s): plain SQNRs see the
    rescaling, the rescaled SQNRs do not, and the outputs (distance) are unchanged."""
    _, model, _ = tiny
    sm = copy.deepcopy(model)
    blk = sm.model.layers[0]
    s = torch.rand(64, generator=torch.Generator().manual_seed(4)) * 3 + 0.3
    with torch.no_grad():
        blk.input_layernorm.weight.div_(s)
        for lin in (blk.self_attn.q_proj, blk.self_attn.k_proj, blk.self_attn.v_proj):
            lin.weight.mul_(s[None, :])
    ws = {w["layer"]: w for w in S.weight_stats(model, sm, rescaled=True)}
    acts = {a["layer"]: a for a in S.activation_stats(model, sm, _ids(seed=2))}
    q = "model.layers.0.self_attn.q_proj"
    assert ws[q]["sqnr_db"] < 10 and ws[q]["sqnr_db_rescaled"] > 80
    assert acts[q]["sqnr_db"] < 10 and acts[q]["sqnr_db_rescaled"] > 80
    o = "model.layers.0.self_attn.o_proj"  # untouched layer, same input as fp up to rounding
    assert ws[o]["sqnr_db"] == math.inf and acts[o]["sqnr_db"] > 80
    assert max(d["rel_l2"] for d in S.layerwise_distance(model, sm, _ids(seed=2))) < 1e-4


def test_evaluate_stats_record(tiny, tmp_path):
    from qbench import api

    d, _, _ = tiny
    ck = tmp_path / "ck"
    api.quantize(d, [{"rtn": {"w_bits": 3, "group_size": -1, "sym": False}}], ck, progress=False,
                 log=lambda *_: None)
    cdir = tmp_path / "corpus"
    cdir.mkdir()
    np.save(cdir / "test.npy", _ids(1, 400, seed=5).flatten().numpy().astype(np.int32))
    out = tmp_path / "stats.json"
    rec = S.evaluate_stats(d, ck, out, tmp_path / "stats", corpus_dir=cdir, n_windows=3, seqlen=64,
                           recipe_name="w3")
    on_disk = json.loads(out.read_text())
    assert on_disk["kind"] == "stats" and on_disk["recipe"] == "w3" and on_disk["primary_sqnr"] == "plain"
    assert on_disk["eval"]["n_windows"] == 3 and on_disk["eval"]["seqlen"] == 64
    assert len(on_disk["weights"]) == 14 and len(on_disk["activations"]) == 14 and len(on_disk["distance"]) == 2
    mt = on_disk["metrics"]
    assert mt["weight_sqnr_db_mean"] == pytest.approx(np.mean([w["sqnr_db"] for w in rec["weights"]]))
    assert 0 < mt["distance_last_rel_l2"] < 1
    for f in ("weights.csv", "activations.csv", "distance.csv", "stats_kurtosis_absmax.png",
              "stats_sqnr.png", "stats_distance.png"):
        assert (tmp_path / "stats" / f).stat().st_size > 0
    head = (tmp_path / "stats" / "weights.csv").read_text().splitlines()[0].split(",")
    assert {"layer", "sqnr_db", "fp_kurtosis", "q_kurtosis", "fp_outlier_channels"} <= set(head)
    # fp against itself: identical, infinite SQNR stored as null, zero distance
    same = S.evaluate_stats(d, d, None, None, corpus_dir=cdir, n_windows=1, seqlen=64, activations=False)
    assert same["identical"] and same["weights"][0]["sqnr_db"] is None
    assert same["metrics"]["distance_last_rel_l2"] == 0.0
    with pytest.raises(ValueError, match="split"):
        S.evaluate_stats(d, d, None, corpus_dir=cdir, split="train")
