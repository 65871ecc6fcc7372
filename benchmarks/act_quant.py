"""Activation fake-quantization speed: the fast paths vs the plain references, from one run.

What a weight-activation recipe adds to an fp forward on CPU is the dynamic quantization of every
linear input. This benchmark times, on activations of the default model's shapes (tokens x 576
and tokens x 1536, bf16), each fast path against the plain reference kept beside it, and checks
that both give the same bits:

* QRazor SDR (``sdr_fake_quant`` vs ``sdr_fake_quant_reference``: int64 base integers, razoring
  with a bit-length loop) -- the int8 asymmetric per-token base of ``w4a4-qrazor-g16`` and the
  16-bit per-tensor base of ``w4a4-qrazor-g16-b16``;
* uniform per-token RTN (``fake_quantize_activation``, in place, vs its reference) at 6 bits;
* QuaRot's online Hadamard on queries/keys after RoPE (a strided view), vs the previous
  ``[..., k, p] @ H_p`` matmul (which broadcast ``H_p`` into one copy per row);
* LLM.int8()'s int8 matmul + float64 epilogue (``torch._int_mm``, row-blocked epilogue) vs the
  fp32-chunk matmul and the outer-product epilogue.

With ``--model`` it also times whole forwards of real checkpoints (one window) with the fast
paths and with the references patched in (the old code path), checks the logits are identical,
and prints the ratio:

    python benchmarks/act_quant.py --threads 2 \\
        --model results/smollm2-135m/w4a4-qrazor-g16/checkpoint \\
        --corpus resources/data/smollm2-135m/wiki
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch


def old_online_hadamard(x: torch.Tensor) -> torch.Tensor:
    """``qbench.quant.hadamard.online_hadamard`` before the fix (the baseline)."""
    from qbench.quant.hadamard import _kfactor, hadamard_factors, sylvester
    n = x.shape[-1]
    k, p = hadamard_factors(n)
    A = _kfactor(k).to(device=x.device, dtype=x.dtype)
    B = sylvester(p).to(device=x.device, dtype=x.dtype)
    Y = torch.matmul(x.reshape(*x.shape[:-1], k, p), B)
    if k > 1:
        Y = torch.matmul(A.T, Y)
    return (Y * (1.0 / n ** 0.5)).reshape(x.shape)


def best(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def compare(name: str, new, old, repeats: int) -> tuple[float, float]:
    same = torch.equal(new(), old())
    tn, to = [], []
    for _ in range(repeats):  # interleaved, so both see the same machine load
        tn.append(best(new, 1))
        to.append(best(old, 1))
    tn, to = min(tn), min(to)
    print(f"{name:50s} old {to * 1e3:9.2f} ms   new {tn * 1e3:8.2f} ms   "
          f"ratio {to / tn:6.1f}x   identical: {same}")
    if not same:
        raise SystemExit(f"{name}: the fast path differs from the reference")
    return to, tn


@contextlib.contextmanager
def reference_paths():
    """Patch the plain references in where the model calls the fast paths (the old code path)."""
    import qbench.methods.rotate as rotate
    import qbench.modules.qlinear as qlinear
    import qbench.modules.sdr_linear as sdr_linear
    from qbench.modules.int8_linear import Int8Linear
    from qbench.quant.sdr import sdr_fake_quant_reference
    from qbench.quant.uniform import fake_quantize_activation_reference
    saved = (sdr_linear.sdr_fake_quant, qlinear.fake_quantize_activation, rotate.online_hadamard,
             Int8Linear._int8_matmul, Int8Linear._epilogue)
    sdr_linear.sdr_fake_quant = sdr_fake_quant_reference
    qlinear.fake_quantize_activation = fake_quantize_activation_reference
    rotate.online_hadamard = old_online_hadamard
    Int8Linear._int8_matmul = Int8Linear._int8_matmul_float
    Int8Linear._epilogue = Int8Linear._epilogue_reference
    try:
        yield
    finally:
        (sdr_linear.sdr_fake_quant, qlinear.fake_quantize_activation, rotate.online_hadamard,
         Int8Linear._int8_matmul, Int8Linear._epilogue) = saved


def kernels(tokens: int, repeats: int) -> None:
    from qbench.modules.int8_linear import Int8Linear
    from qbench.quant.hadamard import online_hadamard
    from qbench.quant.sdr import sdr_fake_quant, sdr_fake_quant_reference
    from qbench.quant.uniform import fake_quantize_activation, fake_quantize_activation_reference

    g = torch.Generator().manual_seed(0)
    for d in (576, 1536):
        x = (torch.randn(1, tokens, d, generator=g) * torch.rand(1, tokens, 1, generator=g) * 4).bfloat16()
        compare(f"QRazor A4 g16, int8 asym per-token [{tokens}x{d}]",
                lambda: sdr_fake_quant(x, 4, 16, 8, "per_token", sym=False),
                lambda: sdr_fake_quant_reference(x, 4, 16, 8, "per_token", sym=False), repeats)
        compare(f"QRazor A4 g16, int16 sym per-tensor [{tokens}x{d}]",
                lambda: sdr_fake_quant(x, 4, 16, 16, "per_tensor", sym=True),
                lambda: sdr_fake_quant_reference(x, 4, 16, 16, "per_tensor", sym=True), repeats)
        compare(f"RTN A6 per-token [{tokens}x{d}]",
                lambda: fake_quantize_activation(x, 6, "per_token", True),
                lambda: fake_quantize_activation_reference(x, 6, "per_token", True), repeats)
    q = torch.randn(1, tokens, 9, 64, generator=g).bfloat16().transpose(1, 2)  # q after RoPE
    compare(f"online Hadamard, queries [9x{tokens}x64] strided",
            lambda: online_hadamard(q), lambda: old_online_hadamard(q), repeats)
    h = torch.randn(1, tokens, 1536, generator=g).bfloat16()
    compare(f"online Hadamard, down_proj input [{tokens}x1536]",
            lambda: online_hadamard(h), lambda: old_online_hadamard(h), repeats)
    torch.manual_seed(0)
    m = Int8Linear.from_linear(torch.nn.Linear(576, 1536), threshold=6.0).to(torch.bfloat16)
    xq = (torch.randn(tokens, 576, generator=g) * 40).round().clamp(-127, 127)
    sx = torch.rand(tokens, generator=g) * 0.05 + 1e-4
    compare(f"LLM.int8 matmul + epilogue [{tokens}x576]x[576x1536]",
            lambda: m._epilogue(m._int8_matmul(xq), sx),
            lambda: m._epilogue_reference(m._int8_matmul_float(xq), sx), repeats)


def model_forward(path: str, corpus: str, seqlen: int, repeats: int) -> None:
    from qbench.api import load_for_eval
    from qbench.data.corpora import load_tokens
    from qbench.eval.ppl import windows

    model, _, _ = load_for_eval(path, dtype="bfloat16", device="cpu")
    win = windows(load_tokens(corpus, "test"), seqlen, 1)

    def fwd():
        with torch.inference_mode():
            return model(input_ids=win, use_cache=False).logits

    def old():
        with reference_paths():
            return fwd()

    compare(f"forward of {path.rstrip('/').split('/')[-2] if '/' in path else path} "
            f"[{seqlen} tokens]", fwd, old, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048, help="activation rows (the ppl seqlen)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", action="append", default=[],
                    help="a qbench checkpoint whose forward to time (repeatable)")
    ap.add_argument("--corpus", default="resources/data/smollm2-135m/wiki")
    ap.add_argument("--model-repeats", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} thread(s); best of {a.repeats}, old/new interleaved")
    kernels(a.tokens, a.repeats)
    for path in a.model:
        model_forward(path, a.corpus, a.tokens, a.model_repeats)


if __name__ == "__main__":
    main()
