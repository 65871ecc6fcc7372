"""Quantized checkpoints: safetensors (packed integers + scales) plus a manifest, written atomically.

Directory layout::

    checkpoint/
      config.json, generation_config.json, tokenizer files   (the base model's, unchanged)
      model.safetensors                                     (every tensor, quantized modules packed)
      qbench.json                                           (manifest, written last)

The directory is assembled in a sibling temporary directory and renamed into place, and the
manifest records the sha256 of ``model.safetensors``: a directory without a manifest, or whose
tensors do not match it, is rejected with :class:`CheckpointError` and never loaded. No pickle.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from .defaults import DTYPE_NAMES
from .fsutil import atomic_dir, canonical_safetensors_header
from .methods.base import get_method, parse_recipe, stage_descriptors
from .modules import MODULE_TYPES, effective_bits, quantized_layout, set_module
from .provenance import provenance, sha256_file

MANIFEST = "qbench.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete, corrupted or of an unknown format."""


def is_checkpoint(path: str | Path) -> bool:
    """True for a qbench checkpoint directory (as opposed to a plain HF model directory)."""
    return (Path(path) / MANIFEST).exists()


def save_checkpoint(model: nn.Module, tokenizer, out_dir: str | Path, *, recipe: list[dict],
                    inputs: dict | None = None, stats: dict | None = None, device: str = "cpu") -> dict:
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt", "producer": "qbench"})
        canonical_safetensors_header(tmp / WEIGHTS)  # same tensors → same bytes → same sha256
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        manifest = {
            "format": "qbench-checkpoint",
            "format_version": FORMAT_VERSION,
            "recipe": recipe,
            # what each stage produces (qbench.descriptor): the report reads this, not method names
            "descriptor": {"stages": stage_descriptors(recipe, "recipe")},
            "modules": quantized_layout(model),
            "effective_bits": effective_bits(model),
            "dtype": str(dtype).removeprefix("torch."),
            "files": {WEIGHTS: sha256_file(tmp / WEIGHTS)},
            "inputs": inputs or {},
            "stats": stats or {},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "provenance": provenance(device),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def read_manifest(path: str | Path, verify: bool = True) -> dict:
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not mpath.exists():
        raise CheckpointError(f"{path}: incomplete checkpoint (no {MANIFEST}); delete it and re-run "
                              "the quantize step")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mpath}: corrupted manifest ({e})") from e
    if manifest.get("format") != "qbench-checkpoint" or manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{mpath}: unknown checkpoint format {manifest.get('format')!r} "
                              f"v{manifest.get('format_version')!r} (this qbench reads v{FORMAT_VERSION})")
    if verify:
        for fname, digest in manifest.get("files", {}).items():
            f = path / fname
            if not f.exists():
                raise CheckpointError(f"{path}: incomplete checkpoint, {fname} is missing")
            if sha256_file(f) != digest:
                raise CheckpointError(f"{path}: corrupted checkpoint, {fname} does not match the "
                                      "sha256 in its manifest; delete it and re-run the quantize step")
    return manifest


def load_checkpoint(path: str | Path, *, dtype: str = "float32", device: str = "cpu",
                    attach_runtime: bool = True):
    """Load ``(model, tokenizer, manifest)``; verifies hashes before reading any tensor."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    path = Path(path)
    manifest = read_manifest(path)
    # parsing the recipe loads the method registry (and plugins), whose modules register the
    # module types the manifest names
    stages = parse_recipe(manifest["recipe"], "checkpoint.recipe")
    config = AutoConfig.from_pretrained(path)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[manifest.get("dtype", "float32")])
    for name, spec in manifest["modules"].items():
        cls = MODULE_TYPES.get(spec["class"])
        if cls is None:
            raise CheckpointError(f"{path}: module {name} has unknown type {spec['class']!r}")
        meta = dict(spec["meta"])
        set_module(model, name, cls(**meta, dtype=DTYPES[manifest.get("dtype", "float32")]))
    # Tied tensors (e.g. lm_head ↔ embed_tokens) are stored once; a missing key is fine when it
    # shares storage with one that was loaded.
    model.tie_weights()
    by_ptr: dict[int, list[str]] = {}
    for k, t in model.state_dict(keep_vars=True).items():
        by_ptr.setdefault(t.data_ptr(), []).append(k)
    missing, unexpected = load_model(model, str(path / WEIGHTS), strict=False)
    missing_set = set(missing)
    missing = [k for k in missing
               if all(a in missing_set for ks in by_ptr.values() if k in ks for a in ks)]
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not match the model (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")
    model.tie_weights()
    model = model.to(device=device, dtype=DTYPES[dtype]).eval()
    if attach_runtime:
        for st in stages:
            m = get_method(st.method)
            if m.runtime:
                m.attach(model, st.config)
    tok = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
    return model, tok, manifest
