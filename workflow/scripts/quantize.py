"""Snakemake script: apply one recipe and write its checkpoint."""
import json
from pathlib import Path

from qbench.workflow import job

with job(snakemake, gpu=True):  # noqa: F821 - injected by Snakemake
    from qbench import api

    smk = snakemake  # noqa: F821
    recipe = json.loads(smk.params.recipe)
    calib_dirs = {Path(p).parent.name: str(Path(p).parent) for p in smk.input.calib}  # corpus → dir
    stats_dirs = api.stats_dirs_for(recipe, Path(smk.input.stats[0]).parents[1]) if smk.input.stats else {}
    api.quantize(Path(smk.input.card).parent, recipe,
                 smk.output.checkpoint, calib_dirs=calib_dirs, stats_dirs=stats_dirs,
                 dtype=smk.params.dtype,
                 recipe_name=smk.wildcards.recipe)
