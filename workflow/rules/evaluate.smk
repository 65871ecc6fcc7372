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
        **job_resources("eval", gpu=True),
    conda:
        "../../envs/qbench.yaml"
    script:
        "../scripts/eval_ppl.py"


rule eval_kv:
    input:
        checkpoint="results/{model}/{recipe}/checkpoint",
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
            corpus=TASKS_EVAL.get("corpora", []),
        ),
    output:
        record="results/{model}/{recipe}/eval/tasks.json",
    params:
        tasks=lambda wc: TASKS_EVAL.get("tasks", []),
        corpora=TASKS_EVAL.get("corpora", []),
        mmlu_subset=TASKS_EVAL.get("mmlu_subset", 10),
        cloze_n=TASKS_EVAL.get("cloze_n", 200),
        wikitext_max_docs=TASKS_EVAL.get("wikitext_max_docs"),
        num_fewshot=TASKS_EVAL.get("num_fewshot"),
        limit=TASKS_EVAL.get("limit"),
        batch_size=TASKS_EVAL.get("batch_size", 1),
        max_length=TASKS_EVAL.get("max_length"),
        dtype=TASKS_EVAL.get("dtype", "float32"),
    log:
        "logs/{model}/{recipe}/eval_tasks.log",
    benchmark:
        "benchmarks/out/{model}/{recipe}/eval_tasks.tsv"
    threads: threads_for("eval")
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
        prompts=CHAT_EVAL.get("prompts"),
        max_new_tokens=CHAT_EVAL.get("max_new_tokens", 128),
        system=CHAT_EVAL.get("system"),
        dtype=CHAT_EVAL.get("dtype", "float32"),
    log:
        "logs/{model}/{recipe}/eval_chat.log",
    benchmark:
        "benchmarks/out/{model}/{recipe}/eval_chat.tsv"
    threads: threads_for("eval")
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
        n_windows=STATS_EVAL.get("n_windows", 4),
        seqlen=STATS_EVAL.get("seqlen", 256),
        outlier_k=STATS_EVAL.get("outlier_k", 20),
        dtype=STATS_EVAL.get("dtype", "float32"),
    log:
        "logs/{model}/{recipe}/eval_stats.log",
    benchmark:
        "benchmarks/out/{model}/{recipe}/eval_stats.tsv"
    threads: threads_for("eval")
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
        prefill=SPEED_EVAL.get("prefill", 2048),
        prompt=SPEED_EVAL.get("prompt", 128),
        steps=SPEED_EVAL.get("steps", 32),
        batches=SPEED_EVAL.get("batches", [1, 16]),
        repeats=SPEED_EVAL.get("repeats", 3),
        dtype=SPEED_EVAL.get("dtype", "bfloat16"),
    log:
        "logs/{model}/{recipe}/eval_speed.log",
    benchmark:
        "benchmarks/out/{model}/{recipe}/eval_speed.tsv"
    threads: threads_for("eval")
    resources:
        **job_resources("eval", gpu=True),
    conda:
        "../../envs/qbench.yaml"
    script:
        "../scripts/eval_speed.py"
