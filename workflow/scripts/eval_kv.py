"""Snakemake script: needle-in-a-haystack and KV-cache memory of one checkpoint."""
import json
from pathlib import Path

from qbench.workflow import job

with job(snakemake, gpu=True):  # noqa: F821 - injected by Snakemake
    from qbench import api

    smk = snakemake  # noqa: F821
    api.evaluate_kv(smk.input.checkpoint, Path(smk.input.corpus).parent,
                    needle_json=smk.output.needle, memory_json=smk.output.memory,
                    needle=json.loads(smk.params.needle), memory=json.loads(smk.params.memory),
                    dtype=smk.params.dtype, model_name=smk.wildcards.model,
                    recipe_name=smk.wildcards.recipe)
