"""Mixed-precision front vs uniform recipes: perplexity against stored bits per weight.

Reads the perplexity records of one model (``results/<model>/*/eval/ppl-<corpus>.json``), keeps
weight-only recipes (no activation or KV quantization) between ``--min-bits`` and ``--max-bits``,
groups them by their method chain (``mixed_precision``, ``rtn``, ``gptq``, ``hqq``, …) and plots one
line per group; prints the table it plots. Usage::

    python benchmarks/mixed_front.py --results results/smollm2-135m --corpus wiki \\
        --out benchmarks/out/mixed_front.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def weight_only(recipe: list[dict]) -> bool:
    for st in recipe:
        (_, args), = st.items()
        if args.get("a_bits", 16) < 16 or args.get("a_format", "none") != "none":
            return False
        if any(k in args and args[k] < 16 for k in ("kv_bits", "k_bits", "v_bits")):
            return False
    return bool(recipe)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", required=True)
    ap.add_argument("--corpus", default="wiki")
    ap.add_argument("--min-bits", type=float, default=2.2)
    ap.add_argument("--max-bits", type=float, default=4.6)
    ap.add_argument("--out", default="benchmarks/out/mixed_front.png")
    a = ap.parse_args()
    rows = []
    for f in sorted(Path(a.results).glob(f"*/eval/ppl-{a.corpus}.json")):
        r = json.loads(f.read_text())
        recipe = r.get("recipe_resolved") or []
        bits = r.get("effective_bits", 16.0)
        if not weight_only(recipe) or not a.min_bits <= bits <= a.max_bits:
            continue
        chain = " → ".join(next(iter(st)) for st in recipe)
        rows.append((chain, bits, r["metrics"]["ppl"], r["recipe"]))
    rows.sort()
    print(f"| method | recipe | bits/weight | ppl {a.corpus} |\n| --- | --- | ---: | ---: |")
    for chain, bits, ppl, name in rows:
        print(f"| {chain} | {name} | {bits:.3f} | {ppl:.2f} |")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for chain in sorted({r[0] for r in rows}):
        pts = sorted((b, p, n) for c, b, p, n in rows if c == chain)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if len(pts) > 1 else "o", label=chain,
                lw=2.2 if chain == "mixed_precision" else 1.2)
    ax.set_yscale("log")
    ax.set_xlabel("stored bits per weight (codes + scales + zeros)")
    ax.set_ylabel(f"perplexity ({a.corpus})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(a.out, dpi=120)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
