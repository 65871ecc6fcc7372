"""Snakemake script: build one corpus's calibration/evaluation splits, tokenized for one model."""
import json
from pathlib import Path

from qbench.workflow import job

with job(snakemake, model_code=False):  # noqa: F821 - injected by Snakemake (builds no model)
    from qbench import api

    smk = snakemake  # noqa: F821
    api.build_corpus(smk.wildcards.corpus, json.loads(smk.params.source), Path(smk.output.meta).parent,
                 tokenizer_dir=Path(smk.input.card).parent, eval_fraction=smk.params.eval_fraction,
                 seed=smk.params.seed)
