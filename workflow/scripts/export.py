"""Snakemake script: export one checkpoint (compressed-tensors or GGUF) beside it."""
import json
from pathlib import Path

from qbench.workflow import job

with job(snakemake):  # noqa: F821 - injected by Snakemake
    from qbench import api

    smk = snakemake  # noqa: F821
    api.export_checkpoint(smk.input.checkpoint, Path(smk.output.manifest).parent,
                          smk.wildcards.format, **json.loads(smk.params.options))
