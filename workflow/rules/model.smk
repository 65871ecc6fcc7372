# model: fetch/convert each configured model once into a plain HF safetensors directory.


rule prepare_model:
    output:
        card="resources/models/{model}/qbench_model_card.json",
    params:
        source=lambda wc: json.dumps(config["models"][wc.model]["source"], sort_keys=True),
    log:
        "logs/{model}/prepare_model.log",
    benchmark:
        "benchmarks/out/{model}/prepare_model.tsv"
    threads: threads_for("prepare")
    resources:
        **job_resources("prepare"),
    conda:
        "../../envs/qbench.yaml"
    script:
        "../scripts/prepare_model.py"
