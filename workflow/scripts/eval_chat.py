"""Snakemake script: the chat prompts through one checkpoint (greedy, fixed max tokens)."""
from pathlib import Path

from qbench.workflow import job

with job(snakemake, gpu=True):  # noqa: F821 - injected by Snakemake
    from qbench import api

    smk = snakemake  # noqa: F821
    p = smk.params
    api.evaluate_chat(smk.input.checkpoint, smk.output.record, prompts=p.prompts,
                  max_new_tokens=p.max_new_tokens, system=p.system, dtype=p.dtype,
                  model_name=smk.wildcards.model, recipe_name=smk.wildcards.recipe)
