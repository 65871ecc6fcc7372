"""The chunked perplexity loss (qbench.eval.ppl.nll_sum) is cross_entropy(sum) of the fp32 logits
bit for bit, at any chunk size, batch size and with non-finite logits."""
import pytest
import torch

from qbench.eval.ppl import nll_sum


@pytest.mark.parametrize("batch,rows", [(1, 1), (1, 7), (1, 32), (2, 32), (3, 1000)])
def test_nll_sum_equals_cross_entropy_bit_for_bit(batch, rows):
    g = torch.Generator().manual_seed(batch * 100 + rows)
    v = 3001
    logits = (torch.randn(batch, 97, v, generator=g) * 4).bfloat16()
    tgt = torch.randint(0, v, (batch, 97), generator=g)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, v), tgt[:, 1:].reshape(-1),
                                            reduction="sum")
    got = nll_sum(logits[:, :-1], tgt[:, 1:], rows=rows)
    assert got.dtype == torch.float32 and torch.equal(got, ref)
    f32 = logits.float() * 1.37
    assert torch.equal(nll_sum(f32, tgt, rows=rows),
                       torch.nn.functional.cross_entropy(f32.reshape(-1, v), tgt.reshape(-1), reduction="sum"))


def test_nll_sum_propagates_non_finite_logits():
    logits = torch.randn(1, 10, 50)
    logits[0, 4, 3] = float("nan")
    assert torch.isnan(nll_sum(logits, torch.zeros(1, 10, dtype=torch.long), rows=3))
