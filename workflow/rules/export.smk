# export (opt-in, the config's `export` list): a recipe's checkpoint in a format another runtime
# loads, written beside the checkpoint with its export manifest. Exact or refused (the job fails
# naming the recipe stage that blocks it; nothing is left behind).


rule export:
    input:
        checkpoint="results/{model}/{recipe}/checkpoint",
    output:
        manifest="results/{model}/{recipe}/export/{format}/qbench-export.json",
    params:
        options=export_options,
    log:
        "logs/{model}/{recipe}/export-{format}.log",
    resources:
        **job_resources("prepare"),
    conda:
        "../../envs/qbench.yaml"
    script:
        "../scripts/export.py"
