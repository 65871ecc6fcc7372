"""Decode and prefill speed of a random-weight Llama of real shape, fp16 against quantized variants.

Builds the model on the device from its config alone (default: Llama-3-8B dimensions — hidden
4096, FFN 14336, 32 layers, 32 heads / 8 KV heads, vocab 128256; no download), quantizes it through
qbench's own method API, and measures with :func:`qbench.eval.speed.measure_speed`: prefill
tokens/s at 2048 tokens, decode tokens/s at batch 1 and 16, and peak memory. Variants:

* ``fp16``                      — the dense model (cuBLAS);
* ``w4_g128`` / ``w3_g128``     — RTN asymmetric, groups of 128 (Triton dequant-GEMM on CUDA);
* ``w8a8``                      — RTN W8 per-channel sym + per-token A8 (Triton int8 GEMM);
* ``bcq3``                      — BCQ 3-bit, groups of 128, greedy search (Triton LUT-GEMM);
* ``kivi2``                     — fp16 weights with a KIVI 2-bit KV cache (group 32, residual 128).

Random weights give random-token outputs, which is irrelevant for speed: the work per token is the
same as for trained weights of that shape. Every variant is rebuilt from the same seed.

Output: ``<out>/<device>/decode_speed.{csv,md,json}`` (default ``<out>`` = ``reports/kernels``),
ratios against fp16 from the same run. ``--smoke``: tiny model on CPU (reference path), checks the
script; its numbers mean nothing. ``--layers`` reduces depth to fit a time budget (the record
states it); ``--budget-s`` stops starting new variants when the time is spent.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "kernels")]

import torch  # noqa: E402

from qbench.eval.speed import device_slug, md_table, measure_speed  # noqa: E402
from qbench.methods.base import QuantContext, get_method, parse_recipe  # noqa: E402

VARIANTS = {
    "fp16": [],
    "w4_g128": [{"rtn": {"w_bits": 4, "group_size": 128}}],
    "w3_g128": [{"rtn": {"w_bits": 3, "group_size": 128}}],
    "w8a8": [{"rtn": {"w_bits": 8, "sym": True, "a_bits": 8, "a_granularity": "per_token"}}],
    "bcq3": [{"bcq": {"w_bits": 3, "group_size": 128, "method": "greedy"}}],
    "kivi2": [{"kivi": {"k_bits": 2, "v_bits": 2, "group_size": 32, "residual": 128}}],
}


def build_model(args, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=max(4096, args.prefill + 256),
                      rope_theta=500000.0, tie_word_embeddings=False)
    torch.manual_seed(args.seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def quantize(model, recipe, device):
    for i, st in enumerate(parse_recipe(recipe)):
        m = get_method(st.method)
        m.check(model, st.config, f"recipe[{i}].{st.method}")
        m.apply(model, st.config, QuantContext(device=device, progress=False))
    for mod in model.modules():  # drop dense caches the methods may have built while checking errors
        if hasattr(mod, "_w"):
            mod._w = None


def write(out: Path, rows: list, skipped: list, args, batches, name: str, t0: float) -> str:
    """Write ``decode_speed.{json,csv,md}`` for the variants measured so far; returns the markdown."""
    import pandas as pd

    base = next((r for r in rows if r["variant"] == "fp16"), None)
    keys = ["prefill_tok_s"] + [f"decode_tok_s_b{b}" for b in batches]
    keys += [f"decode_graph_tok_s_b{b}" for b in batches if any(f"decode_graph_tok_s_b{b}" in r for r in rows)]
    for r in rows:
        for k in keys:
            r[f"{k}_vs_fp16"] = r[k] / base[k] if (base and r.get(k) and base.get(k)) else None
    shape = {k: getattr(args, k) for k in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab")}
    meta = {"device": name, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "smoke": args.smoke, "shape": shape, "prefill": args.prefill, "prompt": args.prompt,
            "steps": args.steps, "batches": list(batches), "repeats": args.repeats, "torch": torch.__version__,
            "not_measured": skipped, "seconds": time.perf_counter() - t0}
    (out / "decode_speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str) + "\n")
    cols = ["variant", "backend"] + [c for k in keys for c in (k, f"{k}_vs_fp16")] + ["peak_mem_gib"]
    cols += [c for c in ("decode_graph_note", "error") if any(c in r for r in rows)]
    pd.DataFrame(rows, columns=cols).to_csv(out / "decode_speed.csv", index=False)
    title = (f"Decode speed — {name}, {meta['date']}; random-weight Llama {shape} in "
             f"{'fp32 (CPU smoke: numbers meaningless)' if args.smoke else 'fp16'}; prefill {args.prefill} "
             f"tokens, decode {args.steps} steps after a {args.prompt}-token prompt; `decode_tok_s` = eager HF "
             f"loop, `decode_graph_tok_s` = the same step replayed from a CUDA graph (StaticCache)")
    md = title + "\n\n" + md_table(rows, cols)
    if skipped:
        md += f"\nNot measured (time budget): {', '.join(skipped)}\n"
    (out / "decode_speed.md").write_text(md)
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "reports" / "kernels"))
    ap.add_argument("--budget-s", type=float, default=None)
    ap.add_argument("--no-cuda-graph", action="store_true",
                    help="skip the CUDA-graph decode measurement (eager loop only)")
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the script")
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"--variants {','.join(bad)}: allowed values are {', '.join(VARIANTS)}")
    if args.smoke:
        args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads = 128, 256, 2, 4, 2
        args.vocab, args.prefill, args.prompt, args.steps, args.repeats = 512, 64, 16, 4, 1
        args.batches = "1,2"
        device, dtype, name = "cpu", torch.float32, "cpu-smoke"
    else:
        if not torch.cuda.is_available():
            print("decode_speed: needs a CUDA device (or --smoke)", file=sys.stderr)
            return 2
        device, dtype, name = "cuda", torch.float16, torch.cuda.get_device_name()
    batches = tuple(int(b) for b in args.batches.split(","))
    out = Path(args.out) / device_slug(name)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows, skipped = [], []
    for v in variants:
        if args.budget_s and time.perf_counter() - t0 > args.budget_s:
            skipped.append(v)
            continue
        t = time.perf_counter()
        model = None
        try:
            model = build_model(args, device, dtype)
            quantize(model, VARIANTS[v], device)
            tq = time.perf_counter() - t
            res = measure_speed(model, device=device, vocab=args.vocab, prefill=args.prefill,
                                prompt=args.prompt, steps=args.steps, batches=batches, repeats=args.repeats,
                                seed=args.seed, cuda_graph=device == "cuda" and not args.no_cuda_graph,
                                progress=lambda s, v=v: print(f"[decode_speed] {v}: {s}", flush=True))
            res.update({"variant": v, "recipe": VARIANTS[v], "build_quantize_s": tq})
            print(f"[decode_speed] {v}: prefill {res['prefill_tok_s']:.0f} tok/s, " + ", ".join(
                f"decode b{b} {res[f'decode_tok_s_b{b}']:.1f} tok/s" for b in batches)
                + f", peak {res['peak_mem_gib']:.2f} GiB, backend {res['backend']}", flush=True)
        except Exception as e:  # noqa: BLE001 - one failing variant must not lose the others
            res = {"variant": v, "recipe": VARIANTS[v], "error": f"{type(e).__name__}: {e}"[:500]}
            print(f"[decode_speed] {v}: FAILED {res['error']}", flush=True)
        rows.append(res)
        write(out, rows, skipped, args, batches, name, t0)  # a killed run keeps what it measured
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    md = write(out, rows, skipped, args, batches, name, t0)
    print(md)
    print(f"[decode_speed] wrote {out}/decode_speed.{{csv,md,json}} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
