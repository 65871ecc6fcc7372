# corpora: calibration/evaluation splits (never overlapping), tokenized once per model.


rule corpus:
    input:
        card="resources/models/{model}/qbench_model_card.json",
    output:
        meta="resources/data/{model}/{corpus}/corpus.json",
    params:
        source=lambda wc: json.dumps(config["corpora"][wc.corpus]["source"], sort_keys=True),
        eval_fraction=lambda wc: corpus_settings(wc.corpus)["eval_fraction"],
        seed=lambda wc: corpus_settings(wc.corpus)["seed"],
    log:
        "logs/{model}/corpus-{corpus}.log",
    threads: 1
    priority: PRIORITY["calib"]  # gates the calibrating quantizers, the longest jobs
    resources:
        **job_resources("prepare"),
    conda:
        "../../envs/qbench.yaml"
    script:
        "../scripts/corpus.py"
