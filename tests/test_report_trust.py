"""Noise shown as noise and the papers' orderings (issue 16 items 6 and 8): task accuracies carry
lm-eval's standard error, differences inside 2σ are not ranked, and the declared orderings are
checked against the records."""
import json
import math

import pandas as pd
import pytest
import yaml

from qbench.errors import ConfigError
from qbench.report.build import build_report
from qbench.report.noise import noise_front, noise_lines, significant, task_average
from qbench.report.orderings import check_orderings, orderings_table, validate_orderings
from qbench.report.tables import memory_table, tasks_table

RTN = {"rtn": {"w_bits": 4, "group_size": 64}}


def _tasks_df(rows):
    """rows: recipe → (family, bits, cloze acc, cloze σ, mmlu acc, mmlu σ)."""
    out = []
    for recipe, (fam, bits, c, cs, m, ms) in rows.items():
        out.append({"kind": "tasks", "recipe": recipe, "family": fam, "method": recipe,
                    "effective_bits": bits, "qbench_cloze_wiki/acc,none": c,
                    "qbench_cloze_wiki/acc_stderr,none": cs, "qbench_mmlu/acc,none": m,
                    "qbench_mmlu/acc_stderr,none": ms, "qbench_mmlu_anatomy/acc,none": 0.0})
    return pd.DataFrame(out)


def test_significance_and_average_sigma():
    assert significant(0.40, 0.02, 0.30, 0.02)  # 0.10 > 2·0.0283
    assert not significant(0.40, 0.05, 0.30, 0.05)  # 0.10 < 2·0.0707
    assert not significant(0.9, float("nan"), 0.1, 0.01)  # no σ: never ranked
    df = _tasks_df({"fp": ("baseline", 16, 0.38, 0.03, 0.25, 0.04)})
    avg = task_average(df)
    assert avg.loc["fp", "avg acc"] == pytest.approx((0.38 + 0.25) / 2)
    assert avg.loc["fp", "avg acc σ"] == pytest.approx(math.sqrt(0.03**2 + 0.04**2) / 2)


def test_noise_front_does_not_rank_inside_2_sigma():
    # sizes 16 > 4 > 3 > 2; the 4-bit recipe is 0.06 "better" than fp but inside 2σ (σ 0.035 each):
    # a tie, so the smaller one stays and fp (larger, not significantly better) leaves the front
    x, q, s = [16, 4, 3, 2], [0.286, 0.348, 0.234, 0.10], [0.035, 0.035, 0.031, 0.01]
    assert noise_front(x, q, s) == [False, True, True, True]
    # fp significantly better than every smaller recipe: it is on the front
    assert noise_front([16, 4], [0.50, 0.30], [0.01, 0.01]) == [True, True]
    # a smaller recipe within noise of a larger one dominates it
    assert noise_front([8, 4], [0.40, 0.39], [0.02, 0.02]) == [False, True]


def test_tasks_table_shows_stderr_and_noise_verdict(tmp_path):
    df = _tasks_df({"fp": ("baseline", 16, 0.38, 0.03, 0.25, 0.04),
                    "w4": ("weight-only", 4.5, 0.36, 0.03, 0.27, 0.04),
                    "w3": ("weight-only", 3.5, 0.10, 0.02, 0.24, 0.04)})
    t = tasks_table(df).set_index("recipe")
    assert t.loc["fp", "qbench_cloze_wiki/acc"] == "0.380 ± 0.030"
    assert "qbench_mmlu_anatomy/acc" not in t.columns  # per-subject rows are summarised by the group
    assert t.loc["w4", "vs fp (2σ)"] == "within noise" and t.loc["w3", "vs fp (2σ)"] == "worse"
    text = "\n".join(noise_lines(df, "fp", ["fp", "w4", "w3"]))
    assert "qbench_cloze_wiki (fp 0.380 ± 0.030): significantly worse: w3 (-0.280)" in text
    assert "within noise: w4." in text


def test_orderings_verdicts_and_validation():
    rows = [("fp", c, p) for c, p in (("wiki", 20.0), ("news", 26.0))]
    rows += [("gptq3", "wiki", 40.0), ("gptq3", "news", 60.0), ("rtn3", "wiki", 60.0), ("rtn3", "news", 55.0),
             ("kv4", "wiki", 20.3), ("kv4", "news", 26.2), ("bcq3", "wiki", 1e6), ("bcq3", "news", 200.0)]
    df = pd.DataFrame([{"kind": "ppl", "recipe": r, "corpus": c, "ppl": p} for r, c, p in rows])
    orderings = [{"claim": "gptq<rtn", "a": "gptq3", "relation": "<", "b": "rtn3"},
                 {"claim": "kv4~fp", "a": "kv4", "relation": "~", "b": "fp"},
                 {"claim": "kv4~fp tight", "a": "kv4", "relation": "~", "b": "fp", "tol": 0.005},
                 {"claim": "bcq>>rtn", "a": "bcq3", "relation": ">>", "b": "rtn3", "factor": 2},
                 {"claim": "awq<=gptq", "a": "awq4", "relation": "<=", "b": "gptq3"}]
    v = {r["claim"]: r["verdict"] for r in check_orderings(df, orderings)}
    assert v == {"gptq<rtn": "partly", "kv4~fp": "holds", "kv4~fp tight": "does not hold",
                 "bcq>>rtn": "holds", "awq<=gptq": "not run"}
    t = orderings_table(df, orderings).set_index("claim")  # user text escaped for markdown/HTML
    assert t.loc["awq&lt;=gptq", "measured ppl (a vs b)"] == "not run: awq4"
    assert "news: 60 vs 55 (1.09×) ✗" in t.loc["gptq&lt;rtn", "measured ppl (a vs b)"]
    with pytest.raises(ConfigError, match=r"orderings\[0\].relation='<<': allowed values are"):
        validate_orderings([{"claim": "x", "a": "a", "relation": "<<", "b": "b"}])
    with pytest.raises(ConfigError, match=r"orderings\[0\].b: missing"):
        validate_orderings([{"claim": "x", "a": "a", "relation": "<"}])


def test_default_config_orderings_are_valid_and_name_its_recipes():
    from pathlib import Path

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())
    orderings = validate_orderings(cfg["orderings"], cfg["recipes"])
    assert len(orderings) >= 9


def test_report_has_orderings_noise_and_task_pareto(tmp_path):
    recs = []
    for recipe, stages, bits, ppl, acc in (("fp", [], 16.0, 20.0, 0.38), ("w4", [RTN], 4.5, 24.0, 0.40),
                                           ("w3", [{"rtn": {"w_bits": 3, "group_size": 64}}], 3.5, 60.0, 0.10)):
        base = {"model": "m", "recipe": recipe, "recipe_resolved": stages, "effective_bits": bits,
                "provenance": {"git_commit": "a" * 40, "torch_threads": 1, "device": "cpu"},
                "eval_dtype": "bfloat16"}
        p = tmp_path / f"{recipe}-ppl.json"
        p.write_text(json.dumps({**base, "kind": "ppl", "corpus": "wiki", "metrics": {"ppl": ppl}}))
        q = tmp_path / f"{recipe}-tasks.json"
        q.write_text(json.dumps({**base, "kind": "tasks", "metrics": {
            "qbench_cloze_wiki/acc,none": acc, "qbench_cloze_wiki/acc_stderr,none": 0.03}}))
        recs += [p, q]
    orderings = [{"claim": "w4 beats w3", "source": "test", "a": "w4", "relation": "<", "b": "w3"},
                 {"claim": "gptq", "a": "w3-gptq", "relation": "<", "b": "w3"}]
    build_report(recs, tmp_path / "out", model="m", recipe_order=["fp", "w4", "w3"], orderings=orderings)
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "## Orderings the papers establish" in readme and "1 holds, 1 not run" in readme
    assert "0.380 ± 0.030" in readme and "within noise: w4." in readme
    assert "comes from qbench commit `aaaaaaaaaaaa` (clean tree)" in readme
    card = {"num_parameters": 1000, "num_layers": 1, "num_kv_heads": 1, "head_dim": 4}
    df = pd.concat([pd.read_csv(tmp_path / "out" / "tables" / "records.csv")])
    df["weight_MiB"] = df["effective_bits"]  # memory_table needs a weight column; sizes follow bits
    mt = memory_table(df, card).set_index("recipe")
    # w4 is 0.02 above fp (inside 2σ = 0.085): a tie, so fp is not on the task front; w3 is smaller
    assert mt["pareto (tasks, 2σ)"].to_dict() == {"fp": False, "w4": True, "w3": True}


# ------------------------------------------------------------------------------------- figures

def _ppl_rows(n_methods: int = 14, per_method: int = 3):
    """Many recipes crowding 2-8 bits, one collapsed (clipped) point, KV recipes piled at 16 bits."""
    rows = [{"kind": "ppl", "recipe": "fp", "corpus": c, "family": "baseline", "method": "fp (baseline)",
             "effective_bits": 16.0, "ppl": p, "W": 16} for c, p in (("wiki", 20.0), ("news", 26.0))]
    fams = ("weight-only", "weight-activation", "KV cache")
    for m in range(n_methods):
        fam = fams[m % 3]
        for k in range(per_method):
            bits = 16.0 if fam == "KV cache" else 3.0 + k + 0.1 * m
            for c, base in (("wiki", 20.0), ("news", 26.0)):
                ppl = base * (1.05 + 0.3 * (per_method - k) + 0.02 * m)
                rows.append({"kind": "ppl", "recipe": f"m{m}-r{k}", "corpus": c, "family": fam,
                             "method": f"method{m}", "effective_bits": bits, "ppl": ppl, "W": int(bits)})
    rows += [{"kind": "ppl", "recipe": "collapsed", "corpus": c, "family": "weight-only", "method": "method0",
              "effective_bits": 2.25, "ppl": 2e6, "W": 2} for c in ("wiki", "news")]
    return pd.DataFrame(rows)


def test_ppl_vs_bits_colours_markers_clipping_and_no_overlaps(tmp_path):
    from matplotlib.colors import to_hex

    from qbench.report.plots import FAMILY_COLORS, PPL_CLIP, plot_ppl_vs_bits, text_overlaps

    df = _ppl_rows()
    fig = plot_ppl_vs_bits(df, tmp_path / "p.png", title="m", return_fig=True)
    try:
        assert text_overlaps(fig) == []
        ax = fig.axes[0]
        lo, hi = ax.get_ylim()
        assert hi <= PPL_CLIP * 20.0 * 1.1 and lo >= 20.0 * 0.85  # cropped to the informative range
        texts = [t.get_text() for t in ax.texts]
        assert "collapsed (2e+06)" in texts  # the clipped point is labelled with its value
        # a colour per family, a distinct (marker, fill) per method
        legend = fig.legends[0]
        labels = [t.get_text() for t in legend.get_texts()]
        assert len(labels) == 15 and len(set(labels)) == 15
        assert labels[0] == "fp (baseline)"  # the family is not repeated
        for h, lab in zip(legend.legend_handles, labels):
            fam = lab[lab.rindex("(") + 1:-1]
            assert to_hex(h.get_edgecolor()[0]) == to_hex(FAMILY_COLORS[fam])
        styles = {(h.get_paths()[0].vertices.tobytes(), to_hex(h.get_facecolor()[0]))
                  for h in legend.legend_handles}
        assert len(styles) == 15
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_needle_grid_has_no_overlapping_text(tmp_path):
    from qbench.report.plots import plot_needle, text_overlaps

    grid = {"grid": [[1, 0, 1], [1, 1, 0], [0, 1, 1], [1, 1, 1]], "context_lengths": [512, 1024, 2048, 4096],
            "depths": [0.0, 0.5, 1.0]}
    df = pd.DataFrame([{"kind": "needle", "recipe": f"w4a4kv4-qrazor-g{i}-long-name", "accuracy": 0.75,
                        "needle_grid": json.dumps(grid)} for i in range(10)])
    fig = plot_needle(df, tmp_path / "n.png", return_fig=True)
    try:
        assert len([a for a in fig.axes if a.axison]) == 11  # 10 panels + the colour bar
        assert text_overlaps(fig) == []
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_mixed_front_from_descriptors(tmp_path):
    from qbench.report.plots import plot_mixed_front, text_overlaps

    uniform = _ppl_rows(n_methods=3)
    assert plot_mixed_front(uniform, tmp_path / "f.png") is False  # no per-layer-width recipe
    mixed = pd.DataFrame([{"kind": "ppl", "recipe": f"mp-{b}", "corpus": c, "family": "weight-only",
                           "method": "mixed_precision", "W": f"≤{b}", "effective_bits": b + 0.25,
                           "ppl": 20.0 * (1 + 4.5 - b)} for b in (2.5, 3.0, 3.5, 4.0) for c in ("wiki", "news")])
    df = pd.concat([uniform, mixed], ignore_index=True)
    fig = plot_mixed_front(df, tmp_path / "f.png", return_fig=True)
    try:
        lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
        assert lines["mixed_precision (per-layer widths)"].get_linestyle() == "-"
        assert lines["method0 (uniform widths)"].get_linestyle() == "--"
        assert "fp (baseline) (uniform widths)" not in lines  # 16 bits: outside 2.2-4.6
        assert text_overlaps(fig) == []
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_baseline_bias_sentence_from_the_card():
    from qbench.report.origin import baseline_lines

    assert baseline_lines({"num_layers": 2}) == []
    card = {"source_grid": {"tensor_types": {"Q4_1": 210, "F32": 61, "Q8_0": 1}, "format": "Q4_1", "bits": 4,
                            "block": 32, "weights_measured": 35389440, "block_stride": 3, "on_source_grid": 1.0,
                            "integer_grid": {"w4-g32-asym": {"sqnr_db": 21.69, "exact_fraction": 0.0027},
                                    "w4-g32-sym": {"sqnr_db": 20.13, "exact_fraction": 0.0006}}}}
    text = "\n".join(baseline_lines(card))
    assert "tensors are 210 Q4_1, 61 F32, 1 Q8_0" in text and "100.00% lie exactly on the Q4_1 grid" in text
    assert "w4-g32-asym: 21.7 dB SQNR, 0.27% of weights exact" in text
