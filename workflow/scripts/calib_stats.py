"""Snakemake script: shared activation statistics of one calibration set."""
from pathlib import Path

from qbench.workflow import job

with job(snakemake, gpu=True):  # noqa: F821 - injected by Snakemake
    from qbench import api

    smk = snakemake  # noqa: F821
    w = smk.wildcards
    api.calib_stats(Path(smk.input.card).parent, Path(smk.input.corpus).parent, smk.output.stats,
                    n=int(w.n), seqlen=int(w.seqlen), seed=int(w.seed), dtype=smk.params.dtype)
