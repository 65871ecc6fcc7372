# aggregate + report: every record → one table → markdown/CSV tables, figures and a README.
# Outputs are declared with report() so `snakemake --report report.html` embeds them.


rule report:
    input:
        records=all_records,
    output:
        ppl_md=report(
            "reports/{model}/tables/perplexity.md",
            category="{model}",
            subcategory="Perplexity",
            caption="../../reports/captions/perplexity.rst",
        ),
        ppl_csv="reports/{model}/tables/perplexity.csv",
        records_csv="reports/{model}/tables/records.csv",
        ppl_png=report(
            "reports/{model}/figures/ppl_vs_bits.png",
            category="{model}",
            subcategory="Perplexity",
            caption="../../reports/captions/ppl_vs_bits.rst",
        ),
        kv_md=report(
            "reports/{model}/tables/kv_cache.md",
            category="{model}",
            subcategory="KV cache",
            caption="../../reports/captions/kv_cache.rst",
        ),
        needle_png=report(
            "reports/{model}/figures/needle.png",
            category="{model}",
            subcategory="KV cache",
            caption="../../reports/captions/needle.rst",
        ),
        alpha_png=report(
            "reports/{model}/figures/alpha_sweep.png",
            category="{model}",
            subcategory="Weight-activation",
            caption="../../reports/captions/alpha_sweep.rst",
        ),
        outliers_png=report(
            "reports/{model}/figures/outliers.png",
            category="{model}",
            subcategory="Weight-activation",
            caption="../../reports/captions/outliers.rst",
        ),
        distance_png=report(
            "reports/{model}/figures/distance.png",
            category="{model}",
            subcategory="Statistics",
            caption="../../reports/captions/distance.rst",
        ),
        readme="reports/{model}/README.md",
    params:
        recipes=RECIPES,
    log:
        "logs/{model}/report.log",
    conda:
        "../../envs/qbench.yaml"
    script:
        "../scripts/report.py"
