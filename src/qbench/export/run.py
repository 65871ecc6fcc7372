"""The export job: checks, loads, hands the model to the format's exporter, writes the export
manifest last. Kept apart from :mod:`.common` (what the format modules share), so the format
modules and their dispatcher do not import each other."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..checkpoint import MANIFEST, load_checkpoint, read_manifest
from ..fsutil import atomic_dir
from ..provenance import provenance, sha256_file
from .common import EXPORT_FORMAT_VERSION, EXPORT_MANIFEST, FORMATS, ExportError, check_stages

__all__ = ["export_checkpoint"]


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, fmt: str, *, log=print,
                      **options) -> dict:
    """Export a qbench checkpoint to ``out_dir`` in format ``fmt``; returns the export manifest.

    Nothing is written when the checkpoint cannot be represented exactly (see the format modules
    for what "exactly" means there); the directory appears only complete, manifest last."""
    if fmt not in FORMATS:
        raise ExportError(f"format={fmt!r}: allowed values are {', '.join(FORMATS)}")
    checkpoint = Path(checkpoint)
    manifest = read_manifest(checkpoint)
    check_stages(manifest, fmt)
    model, tok, _ = load_checkpoint(checkpoint, dtype="float32", attach_runtime=False)
    if fmt == "compressed-tensors":
        from .compressed_tensors import export_compressed_tensors as exporter
    else:
        from .gguf import export_gguf as exporter
    t0 = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        info = exporter(model, tok, manifest, tmp, source=checkpoint, log=log, **options)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        record = {
            "format": "qbench-export",
            "format_version": EXPORT_FORMAT_VERSION,
            "target": fmt,
            "source": {
                "checkpoint": str(checkpoint),
                "manifest_sha256": sha256_file(checkpoint / MANIFEST),
                "files": manifest.get("files", {}),
                "recipe": manifest.get("recipe", []),
                "recipe_name": (manifest.get("stats") or {}).get("recipe_name"),
                "effective_bits": manifest.get("effective_bits"),
            },
            **info,
            "files": files,
            "export_seconds": time.perf_counter() - t0,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "provenance": provenance("cpu"),
        }
        (tmp / EXPORT_MANIFEST).write_text(json.dumps(record, indent=2, default=str))
    return record
