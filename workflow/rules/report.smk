# aggregate + report: every record → one table → markdown/CSV tables, figures and a README.
# Outputs are declared with report() so `snakemake --report report.html` embeds them.


rule report:
    input:
        records=lambda wc: expand(
            "results/{model}/{recipe}/eval/ppl-{corpus}.json",
            model=wc.model,
            recipe=RECIPES,
            corpus=PPL_CORPORA,
        ),
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
        readme="reports/{model}/README.md",
    params:
        recipes=RECIPES,
    log:
        "logs/{model}/report.log",
    conda:
        "../../envs/qbench.yaml"
    script:
        "../scripts/report.py"
