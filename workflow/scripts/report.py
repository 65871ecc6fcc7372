"""Snakemake script: aggregate every record of one model into tables, figures and a README."""
import json
from pathlib import Path

from qbench.workflow import job

with job(snakemake, model_code=False):  # noqa: F821 - injected by Snakemake (builds no model)
    from qbench import api

    smk = snakemake  # noqa: F821
    recipes = list(smk.params.recipes)
    # the folder of the GPU kernel runs, from the input files (none yet: the report says so)
    metas = [Path(p) for p in smk.input.kernels if p.endswith("meta.json")]
    kernels_dir = metas[0].parent.parent if metas else None
    api.build_report(smk.input.records, f"reports/{smk.wildcards.model}", model=smk.wildcards.model,
                     recipe_order=recipes, card=smk.input.card,
                     manifests={r: str(Path(d) / "qbench.json") for r, d in zip(recipes, smk.input.checkpoints)},
                     outputs={k: v for k, v in smk.output.items()}, kernels_dir=kernels_dir,
                     orderings=json.loads(smk.params.orderings))

    pub = json.loads(smk.params.published)
    api.write_vs_published(smk.output.records_csv, smk.output.readme, smk.output.published_md,
                           smk.output.published_csv, model=smk.wildcards.model,
                           expected=(list(smk.input.published) or [None])[0], published_model=pub.get("model"),
                           tolerance=pub.get("tolerance"), source=pub.get("source", ""))
