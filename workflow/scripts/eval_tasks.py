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
        api.evaluate_tasks(smk.input.checkpoint, list(p.tasks), smk.output.record, corpora=corpora,
                       tasks_dir=tasks_dir, mmlu_subset=p.mmlu_subset, cloze_n=p.cloze_n,
                       wikitext_max_docs=p.wikitext_max_docs, num_fewshot=p.num_fewshot, limit=p.limit,
                       batch_size=p.batch_size, max_length=p.max_length, dtype=p.dtype, model_name=smk.wildcards.model,
                       recipe_name=smk.wildcards.recipe)
