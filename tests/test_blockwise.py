"""Block-by-block runner: exactness against the model's own forward, one block's inputs alive at a
time, quantized-output propagation, early stop."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from qbench.calib.blockwise import BlockInputs, run_blockwise

torch.set_num_threads(1)


def tiny_llama(attn="sdpa", layers=3, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=256)
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def last_block_output(model, ids):
    got = {}
    h = model.model.layers[-1].register_forward_hook(lambda m, i, o: got.__setitem__("o", o))
    model(input_ids=ids, use_cache=False)
    h.remove()
    return got["o"][0] if isinstance(got["o"], tuple) else got["o"]


@pytest.mark.parametrize("attn,batch_size", [("sdpa", 1), ("eager", 2)])
def test_identity_matches_model_forward(attn, batch_size):
    model = tiny_llama(attn)
    ids = torch.randint(0, 128, (5, 24), generator=torch.Generator().manual_seed(0))
    ref = last_block_output(model, ids)
    calls = []
    prev: list[weakref.ref] = []

    def identity(i, block, inputs: BlockInputs):
        # Only one BlockInputs (and one activation buffer) alive at a time.
        gc.collect()
        assert all(r() is None for r in prev)
        prev.append(weakref.ref(inputs))
        calls.append((i, inputs.hidden.data_ptr(), tuple(inputs.hidden.shape)))
        assert set(inputs.kwargs) >= {"position_embeddings", "attention_mask", "position_ids"}
        cos, sin = inputs.kwargs["position_embeddings"]
        assert cos.shape[-2] == 24
        if attn == "eager":  # the 4-D mask follows the chunk's batch size
            assert inputs.kwargs_for(2)["attention_mask"].shape[0] == 2
            assert inputs.kwargs_for(1)["attention_mask"].shape[0] == 1
        out = inputs.run(block)
        assert out.shape == inputs.hidden.shape and out.data_ptr() != inputs.hidden.data_ptr()

    final = run_blockwise(model, ids, identity, progress=False, batch_size=batch_size)
    torch.testing.assert_close(final, ref, atol=1e-5, rtol=0)
    assert [c[0] for c in calls] == [0, 1, 2]
    assert len({c[1] for c in calls}) == 1  # one buffer, overwritten in place
    assert calls[0][2] == (5, 24, 64)


def test_later_blocks_see_processed_outputs():
    model = tiny_llama()
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(1))
    ref_model = tiny_llama()
    seen = []

    def perturb(i, block, inputs):
        # What block i receives must be the outputs of the *modified* blocks before it.
        seen.append(inputs.hidden.clone())
        with torch.no_grad():
            block.mlp.down_proj.weight.mul_(0.5)

    final = run_blockwise(model, ids, perturb, progress=False)
    with torch.no_grad():
        for b in ref_model.model.layers:
            b.mlp.down_proj.weight.mul_(0.5)
    torch.testing.assert_close(final, last_block_output(ref_model, ids), atol=1e-5, rtol=0)
    # Input of block 1 = output of the halved block 0.
    got = {}
    h = ref_model.model.layers[1].register_forward_pre_hook(lambda m, a: got.__setitem__("x", a[0]))
    with torch.no_grad():
        ref_model(input_ids=ids, use_cache=False)
    h.remove()
    torch.testing.assert_close(seen[1], got["x"], atol=1e-5, rtol=0)


def test_run_stop_after_and_hooks():
    model = tiny_llama(layers=1)
    ids = torch.randint(0, 128, (4, 8), generator=torch.Generator().manual_seed(2))
    counts = {"q": 0, "down": 0}

    def cb(i, block, inputs):
        hq = block.self_attn.q_proj.register_forward_hook(lambda *a: counts.__setitem__("q", counts["q"] + 1))
        hd = block.mlp.down_proj.register_forward_hook(lambda *a: counts.__setitem__("down", counts["down"] + 1))
        assert inputs.run(block, keep_outputs=False, stop_after=[block.self_attn.q_proj]) is None
        assert counts == {"q": 2, "down": 0}  # 2 chunks of 2; the MLP never ran
        inputs.run(block, keep_outputs=False)
        assert counts == {"q": 4, "down": 2}
        hq.remove()
        hd.remove()
        with pytest.raises(ValueError):
            inputs.run(block, stop_after=[block.self_attn.q_proj])

    run_blockwise(model, ids, cb, progress=False, batch_size=2)


def test_offload_and_model_left_unchanged():
    model = tiny_llama(layers=2)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(3))
    ref = last_block_output(model, ids)
    devs = []
    final = run_blockwise(model, ids, lambda i, b, inp: devs.append(inp.hidden.device.type),
                          progress=False, offload_inputs=True)
    torch.testing.assert_close(final, ref, atol=1e-5, rtol=0)
    assert devs == ["cpu", "cpu"]
    with pytest.raises(ValueError):
        run_blockwise(model, ids[0], lambda *a: None, progress=False)
    # The model still runs normally afterwards (hooks removed).
    assert isinstance(model.model.layers[0], nn.Module)
    torch.testing.assert_close(last_block_output(model, ids), ref)


def test_kwargs_for_uncaptured_chunk_sizes():
    model = tiny_llama("eager", layers=1)
    ids = torch.randint(0, 128, (4, 8), generator=torch.Generator().manual_seed(4))
    ref = last_block_output(model, ids)

    def cb(i, block, inputs):
        assert sorted(inputs.kwargs_by_batch) == [4]
        kw3 = inputs.kwargs_for(3)  # sliced from the batch-4 mask
        assert kw3["attention_mask"].shape[0] == 3
        out = block(inputs.chunk(0, 3), **kw3)
        torch.testing.assert_close(out, ref[:3], atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="batch_size=5"):
            inputs.kwargs_for(5)

    run_blockwise(model, ids, cb, progress=False, batch_size=4)
