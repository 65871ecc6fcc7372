# evaluate: one job per (recipe, evaluation); perplexity covers every configured corpus in one job
# (the model is loaded once) and writes one record per corpus.


rule eval_ppl:
    input:
        checkpoint="results/{model}/{recipe}/checkpoint",
        corpora=expand("resources/data/{{model}}/{corpus}/corpus.json", corpus=PPL_CORPORA),
    output:
        records=expand("results/{{model}}/{{recipe}}/eval/ppl-{corpus}.json", corpus=PPL_CORPORA),
    params:
        corpora=PPL_CORPORA,
        seqlen=PPL_EVAL["seqlen"],
        max_windows=PPL_EVAL["max_windows"],
        dtype=PPL_EVAL["dtype"],
        batch_size=PPL_EVAL["batch_size"],
        kv_protocol=PPL_EVAL["kv_protocol"],
    log:
        "logs/{model}/{recipe}/eval_ppl.log",
    benchmark:
        "benchmarks/out/{model}/{recipe}/eval_ppl.tsv"
    threads: threads_for("eval")
    priority: lambda wc: ppl_priority(RESOLVED["recipes"][wc.recipe])
    resources:
        **job_resources("eval", gpu=True),
    conda:
        "../../envs/qbench.yaml"
    script:
        "../scripts/eval_ppl.py"


rule eval_kv:
    input:
        checkpoint="results/{model}/{recipe}/checkpoint",
        corpus=lambda wc: f"resources/data/{wc.model}/{KV_EVAL['corpus']}/corpus.json",
    output:
        needle="results/{model}/{recipe}/eval/needle.json",
        memory="results/{model}/{recipe}/eval/kv_memory.json",
    params:
        needle=lambda wc: json.dumps(KV_EVAL["needle"], sort_keys=True),  # a function: the template has {value}
        memory=json.dumps(KV_EVAL["memory"], sort_keys=True),
        dtype=KV_EVAL["dtype"],
    log:
        "logs/{model}/{recipe}/eval_kv.log",
    benchmark:
        "benchmarks/out/{model}/{recipe}/eval_kv.tsv"
    threads: threads_for("eval")
    priority: PRIORITY["eval_kv"]
    resources:
        **job_resources("eval", gpu=True),
    conda:
        "../../envs/qbench.yaml"
    script:
        "../scripts/eval_kv.py"


rule eval_tasks:
    input:
        checkpoint="results/{model}/{recipe}/checkpoint",
        corpora=lambda wc: expand(
            "resources/data/{model}/{corpus}/corpus.json",
            model=wc.model,
            corpus=TASKS_EVAL["corpora"],
        ),
    output:
        record="results/{model}/{recipe}/eval/tasks.json",
    params:
        tasks=lambda wc: TASKS_EVAL["tasks"],
        corpora=TASKS_EVAL["corpora"],
        mmlu_subset=TASKS_EVAL["mmlu_subset"],
        cloze_n=TASKS_EVAL["cloze_n"],
        wikitext_max_docs=TASKS_EVAL["wikitext_max_docs"],
        num_fewshot=TASKS_EVAL["num_fewshot"],
        limit=TASKS_EVAL["limit"],
        batch_size=TASKS_EVAL["batch_size"],
        max_length=TASKS_EVAL["max_length"],
        dtype=TASKS_EVAL["dtype"],
    log:
        "logs/{model}/{recipe}/eval_tasks.log",
    benchmark:
        "benchmarks/out/{model}/{recipe}/eval_tasks.tsv"
    threads: threads_for("eval")
    priority: PRIORITY["eval_tasks"]
    resources:
        **job_resources("eval", gpu=True),
    conda:
        "../../envs/qbench.yaml"
    script:
        "../scripts/eval_tasks.py"


rule eval_chat:
    input:
        checkpoint="results/{model}/{recipe}/checkpoint",
    output:
        record="results/{model}/{recipe}/eval/chat.json",
    params:
        prompts=CHAT_EVAL["prompts"],
        max_new_tokens=CHAT_EVAL["max_new_tokens"],
        system=CHAT_EVAL["system"],
        dtype=CHAT_EVAL["dtype"],
    log:
        "logs/{model}/{recipe}/eval_chat.log",
    benchmark:
        "benchmarks/out/{model}/{recipe}/eval_chat.tsv"
    threads: threads_for("eval")
    priority: PRIORITY["eval_chat"]
    resources:
        **job_resources("eval", gpu=True),
    conda:
        "../../envs/qbench.yaml"
    script:
        "../scripts/eval_chat.py"


rule eval_stats:
    input:
        card="resources/models/{model}/qbench_model_card.json",
        checkpoint="results/{model}/{recipe}/checkpoint",
        corpus=lambda wc: f"resources/data/{wc.model}/{STATS_EVAL.get('corpus', PPL_CORPORA[0])}/corpus.json",
    output:
        record="results/{model}/{recipe}/eval/stats.json",
        files=directory("results/{model}/{recipe}/eval/stats"),
    params:
        n_windows=STATS_EVAL["n_windows"],
        seqlen=STATS_EVAL["seqlen"],
        outlier_k=STATS_EVAL["outlier_k"],
        dtype=STATS_EVAL["dtype"],
    log:
        "logs/{model}/{recipe}/eval_stats.log",
    benchmark:
        "benchmarks/out/{model}/{recipe}/eval_stats.tsv"
    threads: threads_for("eval")
    priority: PRIORITY["eval_stats"]
    resources:
        **job_resources("eval", gpu=True),
    conda:
        "../../envs/qbench.yaml"
    script:
        "../scripts/eval_stats.py"


rule eval_speed:
    input:
        checkpoint="results/{model}/{recipe}/checkpoint",
    output:
        record="results/{model}/{recipe}/eval/speed.json",
    params:
        prefill=SPEED_EVAL["prefill"],
        prompt=SPEED_EVAL["prompt"],
        steps=SPEED_EVAL["steps"],
        batches=SPEED_EVAL["batches"],
        repeats=SPEED_EVAL["repeats"],
        dtype=SPEED_EVAL["dtype"],
    log:
        "logs/{model}/{recipe}/eval_speed.log",
    benchmark:
        "benchmarks/out/{model}/{recipe}/eval_speed.tsv"
    threads: threads_for("eval")
    priority: PRIORITY["eval_speed"]
    resources:
        **job_resources("eval", gpu=True),
    conda:
        "../../envs/qbench.yaml"
    script:
        "../scripts/eval_speed.py"
