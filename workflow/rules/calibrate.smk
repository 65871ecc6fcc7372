# calib_stats: one pass over a calibration set that stores what several methods share
# (per-input-channel activation absmax / mean|x| / mean x² of every block linear), keyed by
# corpus, n, seqlen and seed. SmoothQuant (and any method with `uses_act_stats`) reads it.


rule calib_stats:
    input:
        card="resources/models/{model}/qbench_model_card.json",
        corpus="resources/data/{model}/{corpus}/corpus.json",
    output:
        stats="results/{model}/calib/{corpus}-{n}x{seqlen}-s{seed}/stats.safetensors",
        meta="results/{model}/calib/{corpus}-{n}x{seqlen}-s{seed}/stats.json",
    params:
        dtype=RUNTIME.get("quantize_dtype", "float32"),
    log:
        "logs/{model}/calib/{corpus}-{n}x{seqlen}-s{seed}.log",
    benchmark:
        "benchmarks/out/{model}/calib/{corpus}-{n}x{seqlen}-s{seed}.tsv"
    threads: threads_for("quantize")
    resources:
        **job_resources("quantize", gpu=True),
    conda:
        "../../envs/qbench.yaml"
    script:
        "../scripts/calib_stats.py"
