"""Quantized checkpoints: safetensors (packed integers + scales) plus a manifest, written atomically.

Directory layout::

    checkpoint/
      config.json, generation_config.json, tokenizer files   (the base model's, unchanged)
      model.safetensors                                     (every tensor, quantized modules packed)
      qbench.json                                           (manifest, written last)

The directory is assembled in a fresh sibling temporary directory and renamed into place, and the
manifest records the sha256 of ``model.safetensors``: a directory without a manifest, or whose
tensors do not match it, is rejected with :class:`CheckpointError` and never loaded. No pickle.

The manifest protects its own content too: ``checksums`` holds the sha256 of every other field
(recipe, descriptor, module metadata, effective bits, dtype, files, inputs, stats, ...), each over
its canonical JSON, and :func:`read_manifest` recomputes them; an edited field is one error naming
it (an edited recipe or bit count would otherwise flow into records and the report unnoticed).
Non-finite tensors are refused at save time, naming the tensor.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from .defaults import DTYPE_NAMES
from .errors import QbenchError, check_finite, strict_json_dumps
from .fsutil import atomic_dir, canonical_safetensors_header
from .methods.base import get_method, parse_recipe, stage_descriptors
from .modules import MODULE_TYPES, effective_bits, quantized_layout, set_module
from .provenance import provenance, sha256_file

MANIFEST = "qbench.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 2  # 2: the manifest carries ``checksums`` of its own fields
#: manifest fields not covered by ``checksums`` (the checksums themselves)
UNCHECKED = ("checksums",)
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


class CheckpointError(QbenchError, RuntimeError):
    """A checkpoint that is incomplete, corrupted, edited or of an unknown format."""


def _field_digest(value) -> str:
    """sha256 of a manifest field's canonical JSON (sorted keys, no whitespace)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def manifest_checksums(manifest: dict) -> dict[str, str]:
    """``{field: sha256}`` over every manifest field but :data:`UNCHECKED`."""
    plain = json.loads(json.dumps(manifest, default=str))  # exactly what the file holds
    return {k: _field_digest(v) for k, v in sorted(plain.items()) if k not in UNCHECKED}


def verify_manifest_checksums(manifest: dict, where: str) -> None:
    """Raise :class:`CheckpointError` naming the first field whose content differs from its
    checksum (or a field added or removed since the checkpoint was written)."""
    stored = manifest.get("checksums")
    if not isinstance(stored, dict):
        raise CheckpointError(f"{where}: manifest has no checksums (written by an older qbench or "
                              "edited); delete the checkpoint and re-run the quantize step")
    now = manifest_checksums(manifest)
    for field in sorted(set(stored) | set(now)):
        if field not in now:
            raise CheckpointError(f"{where}: manifest field {field!r} was removed after the checkpoint "
                                  "was written; delete the checkpoint and re-run the quantize step")
        if stored.get(field) != now[field]:
            what = "was added" if field not in stored else "does not match its checksum (edited)"
            raise CheckpointError(f"{where}: manifest field {field!r} {what}; delete the checkpoint "
                                  "and re-run the quantize step")


def is_checkpoint(path: str | Path) -> bool:
    """True for a qbench checkpoint directory (as opposed to a plain HF model directory)."""
    return (Path(path) / MANIFEST).exists()


def refuse_manifestless_checkpoint(path: str | Path) -> None:
    """Raise :class:`CheckpointError` when ``path`` has no manifest but looks like (part of) a
    checkpoint: it is named ``checkpoint`` (the workflow's checkpoint paths), or it holds tensors
    qbench wrote (safetensors metadata ``producer: qbench``, e.g. what a killed re-quantize left
    behind). Loading such a directory as a plain HF model would drop the packed weights and
    initialise the quantized linears at random."""
    path = Path(path)
    if is_checkpoint(path):
        return
    reason = None
    if path.name == "checkpoint" or path.name.startswith(("checkpoint.tmp-", "checkpoint.old-")):
        reason = "it is a checkpoint path"
    elif (path / WEIGHTS).is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(path / WEIGHTS), "pt") as f:
                if (f.metadata() or {}).get("producer") == "qbench":
                    reason = f"its {WEIGHTS} was written by qbench quantize"
        except Exception as e:  # unreadable header: certainly not loadable as a model
            reason = f"its {WEIGHTS} cannot be read ({e})"
    if reason:
        raise CheckpointError(f"{path}: incomplete checkpoint (no {MANIFEST}; {reason}); a checkpoint is "
                              "only loaded through its manifest: delete it and re-run the quantize step")


def save_checkpoint(model: nn.Module, tokenizer, out_dir: str | Path, *, recipe: list[dict],
                    inputs: dict | None = None, stats: dict | None = None, device: str = "cpu") -> dict:
    out_dir = Path(out_dir)
    # a NaN/inf weight or scale would be stored and evaluated as if it were a result
    for name, t in model.state_dict().items():
        check_finite(t, f"tensor {name} of the quantized model")
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
        manifest = json.loads(strict_json_dumps(manifest, f"{out_dir / MANIFEST}"))
        manifest["checksums"] = manifest_checksums(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, allow_nan=False))
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
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{mpath}: corrupted manifest ({e})") from e
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{mpath}: corrupted manifest (not a JSON object)")
    if manifest.get("format") != "qbench-checkpoint" or manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{mpath}: unknown checkpoint format {manifest.get('format')!r} "
                              f"v{manifest.get('format_version')!r} (this qbench reads v{FORMAT_VERSION}); "
                              "delete it and re-run the quantize step")
    verify_manifest_checksums(manifest, str(mpath))
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
                    attach_runtime: bool = True, tokenizer: bool = True):
    """Load ``(model, tokenizer, manifest)``; verifies hashes before reading any tensor.
    ``tokenizer=False``: the tokenizer is None (not loaded: ~0.8 s a job that scores token ids
    does not need)."""
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
        if hasattr(cls, "upgrade_meta"):  # metas written before a later option existed
            meta = cls.upgrade_meta(meta)
        try:
            set_module(model, name, cls(**meta, dtype=DTYPES[manifest.get("dtype", "float32")]))
        except (TypeError, ValueError, AttributeError) as e:  # checksummed, so only a qbench mismatch
            raise CheckpointError(f"{path}: module {name} ({spec['class']}) cannot be rebuilt from its "
                                  f"manifest metadata ({e}); re-run the quantize step") from e
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
    tok = AutoTokenizer.from_pretrained(path) if tokenizer and (path / "tokenizer_config.json").exists() else None
    return model, tok, manifest
