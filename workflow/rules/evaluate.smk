# evaluate: one job per (recipe, evaluation); perplexity covers every configured corpus in one job
# (the model is loaded once) and writes one record per corpus.


rule eval_ppl:
    input:
        manifest="results/{model}/{recipe}/checkpoint/qbench.json",
        corpora=expand("resources/data/{{model}}/{corpus}/corpus.json", corpus=PPL_CORPORA),
    output:
        records=expand("results/{{model}}/{{recipe}}/eval/ppl-{corpus}.json", corpus=PPL_CORPORA),
    params:
        corpora=PPL_CORPORA,
        seqlen=config["eval"]["ppl"]["seqlen"],
        max_windows=config["eval"]["ppl"].get("max_windows"),
        dtype=config["eval"]["ppl"].get("dtype", "float32"),
        batch_size=config["eval"]["ppl"].get("batch_size", 1),
    log:
        "logs/{model}/{recipe}/eval_ppl.log",
    benchmark:
        "benchmarks/out/{model}/{recipe}/eval_ppl.tsv"
    threads: threads_for("eval")
    resources:
        gpu=1,
        mem_mb=RUNTIME.get("mem_mb", {}).get("eval", 4000),
    conda:
        "../../envs/qbench.yaml"
    script:
        "../scripts/eval_ppl.py"


rule eval_kv:
    input:
        manifest="results/{model}/{recipe}/checkpoint/qbench.json",
        corpus=lambda wc: f"resources/data/{wc.model}/{config['eval']['kv']['corpus']}/corpus.json",
    output:
        needle="results/{model}/{recipe}/eval/needle.json",
        memory="results/{model}/{recipe}/eval/kv_memory.json",
    params:
        needle=json.dumps(config["eval"]["kv"].get("needle", {}), sort_keys=True),
        memory=json.dumps(config["eval"]["kv"].get("memory", {}), sort_keys=True),
        dtype=config["eval"]["kv"].get("dtype", "float32"),
    log:
        "logs/{model}/{recipe}/eval_kv.log",
    benchmark:
        "benchmarks/out/{model}/{recipe}/eval_kv.tsv"
    threads: threads_for("eval")
    resources:
        gpu=1,
        mem_mb=RUNTIME.get("mem_mb", {}).get("eval", 4000),
    conda:
        "../../envs/qbench.yaml"
    script:
        "../scripts/eval_kv.py"
