"""Snakemake script: weight/activation statistics and layer-wise distance vs the fp model."""
from pathlib import Path

from qbench.workflow import job

with job(snakemake, gpu=True):  # noqa: F821 - injected by Snakemake
    from qbench import api

    smk = snakemake  # noqa: F821
    p = smk.params
    Path(smk.output.files).mkdir(parents=True, exist_ok=True)
    api.evaluate_stats(Path(smk.input.card).parent, smk.input.checkpoint, smk.output.record,
                   smk.output.files, corpus_dir=Path(smk.input.corpus).parent, n_windows=p.n_windows,
                   seqlen=p.seqlen, outlier_k=p.outlier_k, dtype=p.dtype, model_name=smk.wildcards.model,
                   recipe_name=smk.wildcards.recipe)
