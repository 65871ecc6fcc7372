"""Adding a method touches no file of qbench: a toy weight method and a toy KV-cache method, written
into a temporary package, quantize a model, round-trip through a checkpoint, get a correct report
row (family, W/A/KV bits, group, a declared column) and a working cache — the walk-through of
``docs/DEVELOPING.md``."""
import importlib
import sys
import textwrap

import pandas as pd
import pytest
import torch

TOY = '''
"""A toy plugin: int8 per-row weights (ToyInt8) and an int8 per-token KV cache (ToyKV8)."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache

from qbench.descriptor import Descriptor
from qbench.methods.base import KVMethod, Method, MethodConfig, opt, register
from qbench.modules import set_module, target_linears
from qbench.modules.kv_base import QuantLayer, is_served, mark_served, n_cache_layers
from qbench.modules.registry import register_module_type


def q8(x, dim):
    """Symmetric int8 codes and fp16 scales along ``dim``."""
    scale = (x.float().abs().amax(dim, keepdim=True) / 127).half().float().clamp_min(1e-8)
    return torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8), scale.half()


@register_module_type
class ToyInt8Linear(nn.Module):
    def __init__(self, in_features, out_features, dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features, 1, dtype=torch.float16))

    def meta(self):
        return {"in_features": self.in_features, "out_features": self.out_features}

    def storage_bits(self):
        return self.codes.numel() * 8 + self.scale.numel() * 16

    def forward(self, x):
        return F.linear(x, (self.codes.float() * self.scale.float()).to(x.dtype))


@register
class ToyInt8(Method):
    name = "toy_int8"

    @dataclass
    class Config(MethodConfig):
        skip: list = opt(None, "regexes of layers to keep")

    def describe(self, cfg):
        return Descriptor(family="weight-only", w_bits=8, group=-1, grid="uniform-sym",
                          storage="ToyInt8Linear")

    def apply(self, model, cfg, ctx):
        layers = target_linears(model, cfg.skip or [])
        for name, lin in layers.items():
            m = ToyInt8Linear(lin.in_features, lin.out_features).to(lin.weight.device)
            m.codes, m.scale = q8(lin.weight.data, 1)
            set_module(model, name, m)
        return {"layers": len(layers)}


class ToyKVLayer(QuantLayer):
    _tensors = {"k_codes": 0, "k_scale": 0, "v_codes": 0, "v_scale": 0}

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        for n, x in (("k", key_states), ("v", value_states)):
            c, s = q8(x, -1)
            old_c, old_s = getattr(self, n + "_codes"), getattr(self, n + "_scale")
            setattr(self, n + "_codes", c if old_c is None else torch.cat([old_c, c], 2))
            setattr(self, n + "_scale", s if old_s is None else torch.cat([old_s, s], 2))
        k = (self.k_codes.float() * self.k_scale.float()).to(self.dtype)
        v = (self.v_codes.float() * self.v_scale.float()).to(self.dtype)
        mark_served(k)
        return k, v


class ToyKVCache(Cache):
    def __init__(self, config):
        super().__init__(layers=[ToyKVLayer() for _ in range(n_cache_layers(config))])


@register
class ToyKV8(KVMethod):
    name = "toy_kv8"

    @dataclass
    class Config(MethodConfig):
        note: str = opt("per-token", "the toy's declared report column", choices=("per-token",))

    def describe(self, cfg):
        return Descriptor(family="KV cache", kv_bits=8, grid="uniform-sym", storage="ToyKVCache",
                          columns={"KVgran": cfg.note})

    def apply(self, model, cfg, ctx):
        self.attach(model, cfg)
        return {}

    def make_cache(self, model, cfg, prefill_with_quant=None):
        return ToyKVCache(model.config)

    def kv_fake_quant(self, model, cfg):
        def fq(k, v, layer_idx):
            if is_served(k):
                return k, v
            return tuple((c.float() * s.float()).to(x.dtype) for x in (k, v) for c, s in [q8(x, -1)])
        return fq

    def kv_decode_view(self, model, cfg):
        fq = self.kv_fake_quant(model, cfg)

        def view(k, v, layer_idx):  # quantized on arrival: query i reads tokens 0..i quantized
            i = torch.arange(k.shape[-2]) + 1
            return (*fq(k, v, layer_idx), i, i)
        return view

    def expected_nbytes(self, cfg, n_tokens, *, n_layers, n_kv_heads, head_dim, batch=1, fp_bytes=2,
                        cache=None):
        return 2 * n_layers * batch * n_kv_heads * n_tokens * (head_dim + 2)
'''


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("plugin")
    (d / "toy_qbench_plugin.py").write_text(textwrap.dedent(TOY))
    sys.path.insert(0, str(d))
    try:
        yield importlib.import_module("toy_qbench_plugin")
    finally:
        from qbench.methods import base
        from qbench.modules.registry import MODULE_TYPES

        sys.path.remove(str(d))
        sys.modules.pop("toy_qbench_plugin", None)
        for name in ("toy_int8", "toy_kv8"):
            base._REGISTRY.pop(name, None)
        MODULE_TYPES.pop("ToyInt8Linear", None)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from qbench.models.tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("m") / "tiny", hidden=64, layers=2, seed=0)


def test_toy_methods_get_report_rows_and_a_working_cache(toy, model_dir, tmp_path):
    from qbench import api
    from qbench.eval.kv_memory import kv_memory
    from qbench.eval.ppl import perplexity
    from qbench.methods.base import available_methods, describe_recipe
    from qbench.modules.kv_binding import cache_for_model, kv_binding
    from qbench.records import base_record, load_for_eval, write_record

    assert {"toy_int8", "toy_kv8"} <= set(available_methods())
    recipes = {"fp": [], "toy-w8": [{"toy_int8": {}}], "toy-w8kv8": [{"toy_int8": {}}, {"toy_kv8": {}}]}
    ids = torch.randint(0, 200, (1, 600), generator=torch.Generator().manual_seed(0)).flatten()
    records = []
    for name, recipe in recipes.items():
        ck = tmp_path / name
        manifest = api.quantize(model_dir, recipe, ck, progress=False, log=lambda *_: None, recipe_name=name)
        assert [d["method"] for d in manifest["descriptor"]["stages"]] == [next(iter(s)) for s in recipe]
        model, tok, manifest = load_for_eval(ck)
        res = perplexity(model, ids, 64, 4, 1, False)
        rec = base_record("ppl", manifest, model="tiny", recipe=name, device="cpu", dtype="float32",
                          corpus="toy", metrics=res)
        write_record(tmp_path / f"{name}.json", rec)
        records.append(tmp_path / f"{name}.json")
        if name == "toy-w8kv8":
            kv_model = model
    # the report row: every column from the toy's descriptors
    paths = api.build_report(records, tmp_path / "report", model="tiny", recipe_order=list(recipes))
    t = pd.read_csv(paths["ppl_csv"]).set_index("recipe")
    assert t.loc["toy-w8", ["family", "method", "W", "A", "group"]].tolist() == \
        ["weight-only", "toy_int8", 8, 16, "channel"]
    assert t.loc["toy-w8kv8", ["family", "method", "W", "KV", "KVgran"]].tolist() == \
        ["KV cache", "toy_int8 → toy_kv8", 8, 8.0, "per-token"]
    assert t.loc["toy-w8", "bits/weight"] == pytest.approx(8 + 16 / 64, rel=0.02)  # codes + per-row scale
    assert describe_recipe(recipes["toy-w8kv8"])["KVgran"] == "per-token"
    # quantization shows in perplexity, close to fp (int8)
    assert t.loc["fp", "ppl toy"] != t.loc["toy-w8", "ppl toy"]
    assert abs(t.loc["toy-w8kv8", "ppl toy"] / t.loc["fp", "ppl toy"] - 1) < 0.05
    # the loaded checkpoint got the toy cache back through its binding, and it works
    assert kv_binding(kv_model).method == "toy_kv8"
    cache = cache_for_model(kv_model)
    assert type(cache).__name__ == "ToyKVCache"
    out = kv_model.generate(ids[:40].unsqueeze(0), max_new_tokens=5, do_sample=False, cache=cache)
    assert out.shape[1] == 45 and cache.get_seq_length() == 44
    assert cache.layers[0].k_codes.dtype == torch.int8
    # the cache hands attention exactly what the perplexity hook simulates
    with torch.no_grad():
        hooked = kv_model(ids[:50].unsqueeze(0), use_cache=False).logits
        cached = kv_model(ids[:50].unsqueeze(0), cache=cache_for_model(kv_model), use_cache=True).logits
    torch.testing.assert_close(hooked, cached, rtol=1e-5, atol=1e-5)
    # the memory evaluation measures the toy cache and checks it against the toy's formula
    mem = kv_memory(kv_model, ids, context_lengths=(100, 300))
    assert mem["kv_method"] == "toy_kv8"
    for r in mem["records"]:
        assert r["measured_bytes"] == r["expected_bytes"]
        assert r["ratio_vs_fp16"] == pytest.approx((16 + 2) / 32)  # head_dim 16: 16 int8 + fp16 scale


def test_a_method_that_does_not_describe_itself_is_refused():
    from qbench.methods.base import KVMethod, Method, register

    class NoDescribe(Method):
        name = "no_describe"

        def apply(self, model, cfg, ctx):
            return {}

    with pytest.raises(TypeError, match="must implement describe"):
        register(NoDescribe)

    class NoCache(KVMethod):
        name = "no_cache"

        def apply(self, model, cfg, ctx):
            return {}

        def describe(self, cfg):
            return None

    with pytest.raises(TypeError, match="make_cache, kv_fake_quant, kv_decode_view, expected_nbytes"):
        register(NoCache)
