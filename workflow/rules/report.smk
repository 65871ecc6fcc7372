# aggregate + report: every record → one table → markdown/CSV tables, figures and a README per
# model, and reports/README.md over all models. Outputs are declared with report() so
# `snakemake --report report.html` embeds every table and figure, with captions and categories.
import glob

KERNELS_DIR = f"{workflow.basedir}/reports/kernels"


rule report:
    input:
        records=all_records,
        card="resources/models/{model}/qbench_model_card.json",
        checkpoints=lambda wc: expand("results/{model}/{recipe}/checkpoint", model=wc.model, recipe=RECIPES),
        # the latest GPU kernel measurement shown in the report (files present when the DAG is built;
        # the repository's reports/kernels, whatever the run's output directory)
        kernels=glob.glob(f"{KERNELS_DIR}/*/meta.json") + glob.glob(f"{KERNELS_DIR}/*/*.md"),
        published=lambda wc: [published_for(wc.model)["file"]] if published_for(wc.model) else [],
    output:
        ppl_md=report_item("reports/{model}/tables/perplexity.md", "Perplexity", "perplexity"),
        ppl_csv="reports/{model}/tables/perplexity.csv",
        records_csv="reports/{model}/tables/records.csv",
        ppl_png=report_item("reports/{model}/figures/ppl_vs_bits.png", "Perplexity", "ppl_vs_bits"),
        memory_md=report_item("reports/{model}/tables/memory.md", "Pareto", "memory"),
        memory_csv="reports/{model}/tables/memory.csv",
        pareto_png=report_item("reports/{model}/figures/pareto.png", "Pareto", "pareto"),
        front_png=report_item("reports/{model}/figures/mixed_front.png", "Pareto", "mixed_front"),
        kv_md=report_item("reports/{model}/tables/kv_cache.md", "KV cache", "kv_cache"),
        kv_protocol_md=report_item("reports/{model}/tables/kv_protocol.md", "KV cache", "kv_protocol"),
        kv_protocol_csv="reports/{model}/tables/kv_protocol.csv",
        razor_chain_md=report_item("reports/{model}/tables/razor_chain.md", "Weight-only", "razor_chain"),
        needle_png=report_item("reports/{model}/figures/needle.png", "KV cache", "needle"),
        tasks_md=report_item("reports/{model}/tables/tasks.md", "Tasks", "tasks"),
        chat_md=report_item("reports/{model}/tables/chat.md", "Chat", "chat"),
        stats_md=report_item("reports/{model}/tables/stats.md", "Statistics", "stats"),
        distance_png=report_item("reports/{model}/figures/distance.png", "Statistics", "distance"),
        alpha_md=report_item("reports/{model}/tables/alpha_sweep.md", "Weight-activation", "alpha_table"),
        alpha_png=report_item("reports/{model}/figures/alpha_sweep.png", "Weight-activation", "alpha_sweep"),
        outliers_png=report_item("reports/{model}/figures/outliers.png", "Weight-activation", "outliers"),
        speed_md=report_item("reports/{model}/tables/speed.md", "Speed", "speed"),
        speed_csv="reports/{model}/tables/speed.csv",
        speed_png=report_item("reports/{model}/figures/quality_vs_speed.png", "Speed", "quality_vs_speed"),
        published_md=report_item("reports/{model}/tables/vs_published.md", "vs published", "vs_published"),
        published_csv="reports/{model}/tables/vs_published.csv",
        readme="reports/{model}/README.md",
    params:
        recipes=RECIPES,
        orderings=json.dumps(config.get("orderings") or [], sort_keys=True),
        published=lambda wc: json.dumps({k: v for k, v in published_for(wc.model).items() if k != "file"},
                                        sort_keys=True),
    log:
        "logs/{model}/report.log",
    resources:
        **job_resources("report"),
    conda:
        "../../envs/qbench.yaml"
    script:
        "../scripts/report.py"


rule report_index:
    input:
        readmes=expand("reports/{model}/README.md", model=MODELS),
    output:
        "reports/README.md",
    params:
        models=MODELS,
    log:
        "logs/report_index.log",
    resources:
        **job_resources("report"),
    conda:
        "../../envs/qbench.yaml"
    script:
        "../scripts/report_index.py"
