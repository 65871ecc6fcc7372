"""Snakemake script: shared activation statistics of one calibration set."""
from pathlib import Path

from qbench.workflow import job

with job(snakemake, gpu=True):  # noqa: F821 - injected by Snakemake
    from qbench import api

    smk = snakemake  # noqa: F821
    from qbench.calib.spec import CalibSet

    api.calib_stats_for(Path(smk.input.card).parent, Path(smk.input.corpus).parent, smk.output.stats,
                        CalibSet.from_wildcards(smk.wildcards), dtype=smk.params.dtype)
