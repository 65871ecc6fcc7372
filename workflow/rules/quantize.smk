# quantize: apply one recipe → cached checkpoint. Re-runs only when the resolved recipe, the
# model or a calibration corpus changes. The output is the whole directory (not its qbench.json):
# Snakemake removes a declared output before re-running a job, and removing only the manifest would
# leave a manifest-less checkpoint at the final path until the job's atomic swap (or for good after
# a kill -9). The job builds in a fresh sibling temp directory and renames it into place.


rule quantize:
    input:
        card="resources/models/{model}/qbench_model_card.json",
        calib=lambda wc: list(calib_corpora(wc).values()),
        stats=calib_stats_files,
    output:
        checkpoint=directory("results/{model}/{recipe}/checkpoint"),
    params:
        recipe=recipe_json,
        dtype=RUNTIME["quantize_dtype"],
    log:
        "logs/{model}/{recipe}/quantize.log",
    benchmark:
        "benchmarks/out/{model}/{recipe}/quantize.tsv"
    threads: threads_for("quantize")
    # longest first (qbench.workflow.PRIORITY): calibrating recipes (GPTQ, AWQ, SpQR, LKD, KVQuant, ...),
    # then every other checkpoint, then the evaluations
    priority: lambda wc: PRIORITY["quantize_calib" if calib_corpora(wc) else "quantize"]
    resources:
        **job_resources("quantize", gpu=True),
    conda:
        "../../envs/qbench.yaml"
    script:
        "../scripts/quantize.py"
