"""Snakemake script: aggregate every record of one model into tables, figures and a README."""
from qbench.workflow import job

with job(snakemake):  # noqa: F821 - injected by Snakemake
    from qbench.report.tables import build_report

    smk = snakemake  # noqa: F821
    recipes = list(smk.params.recipes)
    build_report(smk.input.records, f"reports/{smk.wildcards.model}", model=smk.wildcards.model,
                 recipe_order=recipes, card=smk.input.card,
                 manifests=dict(zip(recipes, smk.input.manifests)),
                 outputs={k: v for k, v in smk.output.items()}, kernels_dir=smk.params.kernels_dir)
