"""Records and checkpoint loading: the layer below :mod:`qbench.api` and :mod:`qbench.eval`.

Every evaluation loads its model with :func:`load_for_eval` (a qbench checkpoint, verified and
with its run-time stages re-attached, or a plain HF model directory) and writes one JSON record
built by :func:`base_record` with :func:`write_record`. The record carries the provenance and the
recipe's *descriptor* (what its stages produce, see :mod:`qbench.descriptor`), from the
checkpoint manifest; the report reads records only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import is_checkpoint, load_checkpoint, refuse_manifestless_checkpoint
from .fsutil import atomic_json
from .methods.base import stage_descriptors
from .provenance import hash_obj, provenance

__all__ = ["pick_device", "set_threads", "load_for_eval", "base_record", "write_record", "read_record",
           "descriptor_of", "PLAIN_MANIFEST"]

#: what a plain (unquantized) HF model directory stands for
PLAIN_MANIFEST = {"recipe": [], "modules": {}, "effective_bits": 16.0, "inputs": {}}


def pick_device(device: str | None = None) -> str:
    """``auto`` → the GPU this job was given (CUDA_VISIBLE_DEVICES) or the CPU."""
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(int(threads))


def load_for_eval(path: str | Path, *, dtype: str = "float32", device: str = "cpu",
                  tokenizer: bool = True):
    """Load a qbench checkpoint or a plain HF model directory: ``(model, tokenizer, manifest)``;
    the manifest gains ``backend``: which kernels the packed modules run on this device. A
    checkpoint is only ever loaded through its manifest: a directory that looks like one but has
    none is refused (:func:`qbench.checkpoint.refuse_manifestless_checkpoint`). ``tokenizer=False``:
    a qbench checkpoint's tokenizer is not loaded (None), for evaluations on token ids."""
    from .modules.backend import model_backend
    from .progress import timed

    path = Path(path)
    if not path.is_dir():
        from .errors import ConfigError

        raise ConfigError(f"{path}: no such model or checkpoint directory")
    refuse_manifestless_checkpoint(path)
    with timed("load"):
        if is_checkpoint(path):
            model, tok, manifest = load_checkpoint(path, dtype=dtype, device=device, tokenizer=tokenizer)
        else:
            from .models.loading import load_model

            model, tok = load_model(path, dtype=dtype, device=device)
            manifest = {**PLAIN_MANIFEST, "descriptor": {"stages": []}, "inputs": {"model_dir": str(path)}}
    return model, tok, {**manifest, "backend": model_backend(model)}


def descriptor_of(manifest: dict) -> dict:
    """``{"stages": [{"method", family, w_bits, ...}, ...]}`` of a checkpoint: stored in its
    manifest, or (checkpoints written before descriptors existed) described from its recipe."""
    d = manifest.get("descriptor")
    if d is not None:
        return d
    return {"stages": stage_descriptors(manifest.get("recipe", []), "checkpoint.recipe")}


def base_record(kind: str, manifest: dict, *, model: str | None, recipe: str | None, device: str,
                dtype: str, execution: str | None = None, **extra) -> dict:
    """The fields every record has: what was evaluated (recipe, its hash and descriptor, bits,
    calibration), how (execution path, dtype) and where (provenance). ``model`` / ``recipe`` left
    None are the manifest's: the recipe name the checkpoint was quantized under and the name of the
    model directory it came from (the pipeline's ``{model}`` / ``{recipe}``), so a record made by a
    command names what the pipeline's record of the same checkpoint names."""
    stats = manifest.get("stats", {})
    if recipe is None:
        recipe = stats.get("recipe_name")
    if model is None and manifest.get("inputs", {}).get("model_dir"):
        model = Path(manifest["inputs"]["model_dir"]).name
    return {
        "kind": kind,
        "model": model,
        "recipe": recipe,
        "recipe_resolved": manifest.get("recipe", []),
        "recipe_hash": manifest.get("inputs", {}).get("recipe_hash") or hash_obj(manifest.get("recipe", [])),
        "descriptor": descriptor_of(manifest),
        "effective_bits": manifest.get("effective_bits", 16.0),
        "quantize_seconds": stats.get("quantize_seconds"),
        "quantize_stages": stats.get("stages", []),
        "calibration": manifest.get("inputs", {}).get("calibration", {}),
        "execution": execution or _execution(manifest),
        "backend": manifest.get("backend"),
        "eval_dtype": dtype,
        "provenance": provenance(device),
        **extra,
    }


def _execution(manifest: dict) -> str:
    if not manifest.get("modules"):
        return "fp (no quantized modules)"
    backend = manifest.get("backend") or "reference"
    if backend == "reference":
        return "packed checkpoint: dequantize + dense matmul (reference path)"
    return f"packed checkpoint: Triton kernels ({backend})"


def write_record(path: str | Path, record: dict) -> None:
    """Write a record atomically as strict JSON: a NaN/inf anywhere is a NonFiniteError naming its
    key, and the previous record at ``path`` (if any) is left untouched."""
    atomic_json(path, record, what=f"record {path}")


def read_record(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
