"""Snakemake script: reports/README.md over every model's report."""
from qbench.workflow import job

with job(snakemake, model_code=False):  # noqa: F821 - injected by Snakemake (builds no model)
    from qbench import api

    smk = snakemake  # noqa: F821
    api.build_index(dict(zip(smk.params.models, smk.input.readmes)), smk.output[0])
