"""Snakemake script: lm-evaluation-harness tasks on one checkpoint (in-memory quantized model)."""
import tempfile
from pathlib import Path

from qbench.workflow import job

with job(snakemake, gpu=True):  # noqa: F821 - injected by Snakemake
    from qbench import api

    smk = snakemake  # noqa: F821
    p = smk.params
    corpora = {c: str(Path(f).parent) for c, f in zip(p.corpora, smk.input.corpora)}
    with tempfile.TemporaryDirectory(prefix="qbench-tasks-") as tasks_dir:
        options = {k: getattr(p, k) for k in ("mmlu_subset", "cloze_n", "wikitext_max_docs", "num_fewshot",
                                              "limit", "batch_size", "max_length", "dtype")}
        api.evaluate_tasks(smk.input.checkpoint, list(p.tasks), smk.output.record, corpora=corpora,
                           options={**options, "tasks_dir": tasks_dir}, model_name=smk.wildcards.model,
                           recipe_name=smk.wildcards.recipe)
