"""Export qbench checkpoints to formats other runtimes load: compressed-tensors (transformers,
vLLM) and GGUF (llama.cpp).

``export_checkpoint(checkpoint, out, format)`` is the one entry point (the CLI's
``qbench export`` and the workflow's ``export`` rule call it). An export is exact or it is
refused: the stored integer grid of every quantized layer is mapped onto the target format's
grid, the target's own reader is used to decode what was written, and the result is compared
with the checkpoint's dequantized weights; the comparison lands in the export manifest
(``qbench-export.json``, written last).
"""

from __future__ import annotations

from .common import EXPORT_MANIFEST, FORMATS, ExportError
from .run import export_checkpoint

__all__ = ["export_checkpoint", "ExportError", "FORMATS", "EXPORT_MANIFEST"]
