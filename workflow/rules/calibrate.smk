# calib_stats: one pass over a calibration set that stores what several methods share
# (per-input-channel activation absmax / mean|x| / mean x² of every block linear), keyed by
# corpus, n, seqlen and seed. SmoothQuant (and any method with `uses_act_stats`) reads it.


rule calib_stats:
    input:
        card="resources/models/{model}/qbench_model_card.json",
        corpus="resources/data/{model}/{corpus}/corpus.json",
    output:
        stats=f"results/{{model}}/calib/{CALIB_KEY}/stats.safetensors",
        meta=f"results/{{model}}/calib/{CALIB_KEY}/stats.json",
    params:
        dtype=RUNTIME["quantize_dtype"],
    log:
        f"logs/{{model}}/calib/{CALIB_KEY}.log",
    benchmark:
        f"benchmarks/out/{{model}}/calib/{CALIB_KEY}.tsv"
    threads: threads_for("quantize")
    priority: PRIORITY["calib"]  # gates the calibrating quantizers, the longest jobs
    resources:
        **job_resources("quantize", gpu=True),
    conda:
        "../../envs/qbench.yaml"
    script:
        "../scripts/calib_stats.py"
