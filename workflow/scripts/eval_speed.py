"""Snakemake script: prefill / decode tokens/s and peak memory of one checkpoint on the job's device."""
from pathlib import Path

from qbench.workflow import job

with job(snakemake, gpu=True):  # noqa: F821 - injected by Snakemake
    from qbench import api

    smk = snakemake  # noqa: F821
    p = smk.params
    api.evaluate_speed(smk.input.checkpoint, smk.output.record, prefill=p.prefill, prompt=p.prompt,
                       steps=p.steps, batches=p.batches, repeats=p.repeats, dtype=p.dtype,
                       model_name=smk.wildcards.model, recipe_name=smk.wildcards.recipe)
