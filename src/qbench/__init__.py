"""qbench: a reproducible benchmark of LLM quantization methods."""

__version__ = "0.1.0"
