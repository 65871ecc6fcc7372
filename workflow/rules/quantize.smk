# quantize: apply one recipe → cached checkpoint. Re-runs only when the resolved recipe, the
# model or a calibration corpus changes.


rule quantize:
    input:
        card="resources/models/{model}/qbench_model_card.json",
        calib=lambda wc: list(calib_corpora(wc).values()),
        stats=calib_stats_files,
    output:
        manifest="results/{model}/{recipe}/checkpoint/qbench.json",
    params:
        recipe=recipe_json,
        dtype=RUNTIME.get("quantize_dtype", "float32"),
    log:
        "logs/{model}/{recipe}/quantize.log",
    benchmark:
        "benchmarks/out/{model}/{recipe}/quantize.tsv"
    threads: threads_for("quantize")
    resources:
        **job_resources("quantize", gpu=True),
    conda:
        "../../envs/qbench.yaml"
    script:
        "../scripts/quantize.py"
