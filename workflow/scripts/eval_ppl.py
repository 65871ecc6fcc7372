"""Snakemake script: perplexity of one checkpoint on every configured corpus (one record each)."""
from pathlib import Path

from qbench.workflow import job

with job(snakemake, gpu=True):  # noqa: F821 - injected by Snakemake
    from qbench import api

    smk = snakemake  # noqa: F821
    corpora = {c: str(Path(p).parent) for c, p in zip(smk.params.corpora, smk.input.corpora)}
    outputs = dict(zip(smk.params.corpora, smk.output.records))
    api.evaluate_ppl(smk.input.checkpoint, corpora, outputs, seqlen=smk.params.seqlen,
                     max_windows=smk.params.max_windows, dtype=smk.params.dtype,
                     batch_size=smk.params.batch_size, model_name=smk.wildcards.model,
                     recipe_name=smk.wildcards.recipe, kv_protocol=list(smk.params.kv_protocol))
