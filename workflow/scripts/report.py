"""Snakemake script: aggregate every record of one model into tables, figures and a README."""
from qbench.workflow import job

with job(snakemake):  # noqa: F821 - injected by Snakemake
    from qbench.report.tables import build_report

    smk = snakemake  # noqa: F821
    build_report(smk.input.records, f"reports/{smk.wildcards.model}", model=smk.wildcards.model,
                 recipe_order=list(smk.params.recipes), outputs=dict(smk.output.items()))
