"""Defaults shared by several entry points, defined once (no heavy imports: the CLI reads them).

The config schema (``workflow/schemas/config.schema.yaml``) states the same values for its keys;
``tests/test_structure.py`` checks that they agree.
"""

#: window length of the perplexity protocol (GPTQ / qllm-infer): ``eval.ppl.seqlen``, ``--seqlen``
PPL_SEQLEN = 2048
#: evaluation / quantization dtypes by name (``eval.*.dtype``, ``--dtype``)
DTYPE_NAMES = ("float32", "bfloat16", "float16")
