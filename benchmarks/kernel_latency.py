"""Kernel latency: qbench's Triton kernels against torch fp16 (cuBLAS) and torch's int4 tinygemm.

Reproduces the seed's kernel table (m = 1, (n, k) from (512, 2048) to (12288, 49152)) and adds
m ∈ {1, 4, 16, 64, 256} on Llama-3-8B shapes (4096×4096, 14336×4096, 4096×14336) plus m = 2048 on
4096×14336 (the W8A8 prefill target). ``y[m, n] = x[m, k] · W[n, k]ᵀ``; weights are random (speed
does not depend on values), activations fp16 (tinygemm: bf16, which it requires).

Columns (each the GPU time of one call replayed from a captured CUDA graph,
``triton.testing.do_bench_cudagraph``, so that the host's per-launch cost — which dominates small
eager calls of Triton kernels — is left out, as in the seed's kernel-time table; a column that
cannot be captured falls back to eager ``do_bench`` medians and is noted):

* ``fp16``       — ``F.linear`` on a dense fp16 weight (cuBLAS);
* ``tinygemm``   — ``torch.ops.aten._weight_int4pack_mm``, W4 g128 (where the build has it);
* ``w4_g128`` / ``w3_g128`` — ``qbench_kernels.dequant_gemm`` on qbench's packed format
  (asymmetric, fp16 scales, uint8 zeros);
* ``bcq3_lut`` / ``bcq4_lut`` — ``qbench_kernels.lut_gemm``, BCQ with groups of 128 and no offset;
* ``w8a8``       — a full W8A8 linear: per-token activation quantization + ``int8_gemm`` on packed
  8-bit per-channel weights.

For each cell: milliseconds, speed-up over fp16, and achieved bandwidth (weight + activation +
output bytes / time) as a share of the device's copy bandwidth (measured here: a 1 GiB
device-to-device copy, read + write). Every kernel's output is checked once per shape against a
dense fp16 product of the same (dequantized) weight (``max_rel_err``).

Output: ``<out>/<device>/kernel_latency.{csv,md,png}`` and ``meta.json`` (device, date, versions,
copy bandwidth). Default ``<out>`` is ``reports/kernels`` — the report shows the latest GPU run.
``--budget-s`` stops starting new shapes when the time is spent (target shapes first); cells not
measured are left empty and listed.

``--smoke`` (no GPU needed): tiny shapes through Triton's interpreter on CPU, wall-clock medians —
it checks the script end to end, its timings mean nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "kernels")]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import qbench_kernels as qk  # noqa: E402
from qbench.eval.speed import device_slug  # noqa: E402

SEED_SHAPES = [(512, 2048), (1024, 4096), (2048, 8192), (4096, 16384), (7168, 28672), (8192, 32768),
               (12288, 49152)]
LLAMA_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]
LLAMA_M = [1, 4, 16, 64, 256]
COLUMNS = ["fp16", "tinygemm", "w4_g128", "w3_g128", "bcq3_lut", "bcq4_lut", "w8a8"]
GROUP = 128


def plan(smoke: bool) -> list[tuple[str, int, int, int]]:
    """(table, m, n, k), the issue's targets first so a time budget cuts the least useful rows."""
    if smoke:
        return [("seed", 1, 40, 256), ("llama", 19, 24, 256)]
    first = [("seed", 1, 8192, 32768), ("seed", 1, 12288, 49152), ("llama", 2048, 4096, 14336)]
    first += [("llama", m, n, k) for m in (1, 16) for n, k in LLAMA_SHAPES]
    rest = [("seed", 1, n, k) for n, k in SEED_SHAPES] + [("llama", m, n, k) for n, k in LLAMA_SHAPES
                                                         for m in LLAMA_M]
    return first + [r for r in rest if r not in first]


class Timer:
    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.eager: list[str] = []  # what could not be timed from a CUDA graph

    def __call__(self, fn) -> float:
        """Median milliseconds of warmed-up runs."""
        if self.smoke:
            fn()
            ts = []
            for _ in range(1):
                t = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t) * 1e3)
            return statistics.median(ts)
        import triton

        fn()  # compile + autotune outside the timed region (and outside the graph capture)
        torch.cuda.synchronize()
        try:
            return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))
        except Exception as e:  # noqa: BLE001 - not capturable: time it eagerly and say so
            torch.cuda.synchronize()
            self.eager.append(f"{getattr(fn, '__name__', 'fn')}: {type(e).__name__}")
            return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_bandwidth(dev: str, smoke: bool) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    n = (1 << 20) if smoke else (1 << 30)
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    ms = Timer(smoke)(lambda: b.copy_(a))
    return 2 * n / (ms / 1e3)


def tinygemm(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor):
    """A tinygemm W4 g128 closure on the same codes (bf16 activations), or the reason it cannot run."""
    op = getattr(torch.ops.aten, "_weight_int4pack_mm", None)
    conv = getattr(torch.ops.aten, "_convert_weight_to_int4pack", None)
    if op is None or conv is None or not x.is_cuda:
        return None, "no CUDA _weight_int4pack_mm here"
    try:
        n, k = codes.shape
        c = codes.to(torch.int32)
        packed = conv((c[:, ::2] << 4 | c[:, 1::2]).to(torch.uint8), 8)
        # tinygemm dequantizes (q - 8) * scale + zero_bf16 : zero = (8 - z) * scale reproduces ours
        s = scales.t().to(torch.bfloat16)
        zb = ((8 - zeros.float()) * scales.float()).t().to(torch.bfloat16)
        sz = torch.stack([s, zb], dim=2).contiguous()               # [k/g, n, 2]
        xb = x.to(torch.bfloat16)
        fn = lambda: op(xb, packed, GROUP, sz)  # noqa: E731
        fn()
        return fn, ""
    except Exception as e:  # noqa: BLE001 - op signatures changed across torch versions
        return None, f"tinygemm unavailable: {type(e).__name__}: {str(e).splitlines()[0][:120]}"


def run_shape(m, n, k, dev, timer):
    """``{column: (ms, bytes moved)}``, ``{column: max_rel_err}``, ``{column: note}`` for one shape.

    A column that fails (e.g. a kernel that does not compile on this device) is noted and skipped.
    """
    g = torch.Generator(device=dev).manual_seed(m * 7 + n + k)
    x = torch.randn(m, k, device=dev, generator=g).half()
    act = x if x.is_cuda else x.float()  # the CPU interpreter path works in fp32
    cells, errs, notes = {}, {}, {}
    G = k // GROUP

    def rel(y, ref):
        return float((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6))

    def column(name, setup):
        """``setup()`` → (closure, weight bytes, reference output or None)."""
        try:
            fn, wbytes, ref = setup()
            if ref is not None:
                errs[name] = rel(fn(), ref)
            cells[name] = (timer(fn), wbytes)
        except Exception as e:  # noqa: BLE001 - keep measuring the other columns
            notes[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            print(f"[kernel_latency]   {name} failed: {notes[name]}", flush=True)
        if x.is_cuda:
            torch.cuda.empty_cache()

    def fp16():
        w16 = (torch.randn(n, k, device=dev, generator=g) * 0.02).to(act.dtype)
        return (lambda: F.linear(act, w16)), n * k * 2, None

    column("fp16", fp16)

    def uniform(bits, tiny=False):
        def setup():
            codes = torch.randint(0, 2**bits, (n, k), device=dev, generator=g, dtype=torch.int32)
            qw = _pack(codes, bits)
            scales = (torch.rand(n, G, device=dev, generator=g) * 0.01 + 0.001).half()
            zeros = torch.randint(0, 2**bits, (n, G), device=dev, generator=g).to(torch.uint8)
            ref = act.float() @ qk.dequantize_reference(qw, scales, zeros, bits, k).t()
            if tiny:
                fn, why = tinygemm(x, codes, scales, zeros)
                if fn is None:
                    raise RuntimeError(why)
                return fn, n * k // 2 + G * n * 4, ref
            return (lambda: qk.dequant_gemm(act, qw, scales, zeros, bits)), \
                qw.numel() * 4 + scales.numel() * 2 + zeros.numel(), ref
        return setup

    column("tinygemm", uniform(4, tiny=True))
    column("w4_g128", uniform(4))
    column("w3_g128", uniform(3))

    def bcq(q):
        def setup():
            qp = torch.randint(-2**31, 2**31 - 1, (q, n, -(-k // 32)), device=dev, generator=g,
                               dtype=torch.int32)
            alphas = (torch.rand(q, n, G, device=dev, generator=g) * 0.01).half()
            ref = act.float() @ qk.bcq_dequantize_reference(qp, alphas, None, k).t()
            return (lambda: qk.lut_gemm(act, qp, alphas)), qp.numel() * 4 + alphas.numel() * 2, ref
        return setup

    column("bcq3_lut", bcq(3))
    column("bcq4_lut", bcq(4))

    def w8a8():
        codes = torch.randint(0, 256, (n, k), device=dev, generator=g, dtype=torch.int32)
        qw8 = _pack(codes, 8)
        sw = (torch.rand(n, device=dev, generator=g) * 0.001).half()

        def fn():  # the whole W8A8 linear: per-token activation quantization + int8 GEMM
            a, sx, _ = qk.quantize_act_int8(act)
            return qk.int8_gemm(a, qw8, sx, sw, out_dtype=act.dtype, packed=True)

        a, sx, _ = qk.quantize_act_int8_reference(act)
        return fn, n * k + n * 2, qk.int8_gemm_reference(a, (codes - 128).to(torch.int8), sx, sw)

    column("w8a8", w8a8)
    io_bytes = m * k * 2 + m * n * 2
    return {c: (ms, wb + io_bytes) for c, (ms, wb) in cells.items()}, errs, notes


def _pack(codes, bits):
    from qbench.quant.packing import pack

    return pack(codes, bits)


def markdown(rows, meta) -> str:
    cols = [c for c in COLUMNS if any(r.get(f"{c}_ms") is not None for r in rows)]
    head = "| table | m | n | k | " + " | ".join(cols) + " |"
    lines = [f"Kernel latency, ms (speed-up over fp16; share of copy bandwidth) — {meta['device']}, "
             f"{meta['date']}, copy bandwidth {meta['copy_bandwidth_gbs']:.0f} GB/s"
             + (" — SMOKE RUN (interpreter), timings meaningless" if meta["smoke"] else ""), "",
             head, "|" + "---|" * (4 + len(cols))]
    for r in rows:
        cells = []
        for c in cols:
            ms = r.get(f"{c}_ms")
            cells.append("-" if ms is None else
                         f"{ms:.4f} (x{r[f'{c}_speedup']:.2f}; {100 * r[f'{c}_bw_share']:.0f}%)")
        lines.append(f"| {r['table']} | {r['m']} | {r['n']} | {r['k']} | " + " | ".join(cells) + " |")
    if meta.get("notes"):
        lines += [""] + [f"* {k}: {v}" for k, v in meta["notes"].items()]
    if meta.get("not_measured"):
        lines += ["", "Not measured (time budget): " + ", ".join(meta["not_measured"])]
    return "\n".join(lines) + "\n"


def plot(rows, path: Path, meta) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, table in zip(axes, ("seed", "llama")):
        sub = [r for r in rows if r["table"] == table]
        labels = [f"{r['m']}×{r['n']}×{r['k']}" for r in sub]
        for c in COLUMNS[1:]:
            ys = [r.get(f"{c}_speedup") for r in sub]
            if any(y is not None for y in ys):
                ax.plot(range(len(sub)), [y if y is not None else float("nan") for y in ys], "o-", label=c)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks(range(len(sub)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("speed-up over torch fp16")
        ax.set_title(f"{table} shapes (m×n×k)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Kernel latency — {meta['device']} ({meta['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "reports" / "kernels"),
                    help="parent folder; results go to <out>/<device>/ (default: reports/kernels)")
    ap.add_argument("--budget-s", type=float, default=None, help="stop starting new shapes after this")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in the CPU interpreter (checks the script)")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("kernel_latency: needs a CUDA device (or --smoke for an interpreter check)", file=sys.stderr)
        return 2
    dev = "cpu" if args.smoke else "cuda"
    name = "cpu-interpreter" if args.smoke else torch.cuda.get_device_name()
    out = Path(args.out) / device_slug(name)
    out.mkdir(parents=True, exist_ok=True)
    timer = Timer(args.smoke)
    t0 = time.perf_counter()
    bw = copy_bandwidth(dev, args.smoke)
    print(f"[kernel_latency] {name}: copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    rows, notes, skipped = [], {}, []
    todo = plan(args.smoke)
    for i, (table, m, n, k) in enumerate(todo):
        if args.budget_s and time.perf_counter() - t0 > args.budget_s:
            skipped.append(f"{table} m={m} {n}x{k}")
            continue
        cells, errs, nts = run_shape(m, n, k, dev, timer)
        notes.update({f"{c} (m={m} {n}x{k})": v for c, v in nts.items()})
        if timer.eager:
            notes[f"timed eagerly (m={m} {n}x{k})"] = "; ".join(timer.eager)
            timer.eager.clear()
        if "fp16" not in cells:
            continue
        base = cells["fp16"][0]
        row = {"table": table, "m": m, "n": n, "k": k}
        for c in COLUMNS:
            if c in cells:
                ms, nbytes = cells[c]
                row.update({f"{c}_ms": ms, f"{c}_speedup": base / ms, f"{c}_gbs": nbytes / (ms / 1e3) / 1e9,
                            f"{c}_bw_share": nbytes / (ms / 1e3) / bw, f"{c}_max_rel_err": errs.get(c)})
        rows.append(row)
        print(f"[kernel_latency] {i + 1}/{len(todo)} m={m} n={n} k={k}: " + ", ".join(
            f"{c} {cells[c][0]:.4f} ms (x{base / cells[c][0]:.2f})" for c in COLUMNS if c in cells), flush=True)
        write(out, rows, name, args.smoke, bw, notes, skipped, t0)
    meta = write(out, rows, name, args.smoke, bw, notes, skipped, t0, final=True)
    print(markdown(rows, meta))
    print(f"[kernel_latency] wrote {out}/kernel_latency.{{csv,md,png}} in {meta['seconds']:.0f} s")
    return 0


def write(out: Path, rows: list, name: str, smoke: bool, bw: float, notes: dict, skipped: list, t0: float,
          final: bool = False) -> dict:
    """CSV + markdown + meta of the rows so far (after every shape: a killed run keeps them); plot at the end."""
    import csv

    import triton

    rows = sorted(rows, key=lambda r: (r["table"] != "seed", r["n"] * r["k"] if r["table"] == "seed" else 0,
                                       (r["n"], r["k"]), r["m"]))
    meta = {"device": name, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "smoke": smoke, "copy_bandwidth_gbs": bw / 1e9, "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda, "timing":
            "wall-clock, one run (interpreter)" if smoke else
            "triton.testing.do_bench_cudagraph median (rep 100 ms): GPU time without host launch cost",
            "notes": notes,
            "not_measured": skipped, "complete": final, "seconds": time.perf_counter() - t0}
    with open(out / "kernel_latency.csv", "w", newline="") as f:
        keys = ["table", "m", "n", "k"] + [f"{c}_{s}" for c in COLUMNS
                                           for s in ("ms", "speedup", "gbs", "bw_share", "max_rel_err")]
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    (out / "kernel_latency.md").write_text(markdown(rows, meta))
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if final and rows:
        plot(rows, out / "kernel_latency.png", meta)
    return meta


if __name__ == "__main__":
    sys.exit(main())
