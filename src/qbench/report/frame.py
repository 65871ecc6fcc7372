"""Records → one pandas table (one row per record): the report's data. Every row's labels come
from the stage descriptors the record carries (:mod:`qbench.descriptor`); memory columns from the
checkpoint manifests and the model card."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..descriptor import Descriptor, describe_stages
from ..methods.base import stage_descriptors

__all__ = ["load_records", "describe_record", "weight_bytes", "fp16_kv_bytes"]


def describe_record(rec: dict) -> dict:
    """A record's row labels (family, method, W, A, KV, group, declared columns and knobs) from
    the stage descriptors it carries; records written before descriptors existed are described
    from their resolved recipe through the method registry."""
    stages = (rec.get("descriptor") or {}).get("stages")
    if stages is None:
        stages = stage_descriptors(rec.get("recipe_resolved", []), "record.recipe_resolved")
    out = describe_stages([(d["method"], Descriptor.from_dict(d)) for d in stages])
    out["extra_columns"] = ",".join(dict.fromkeys(k for d in stages for k in d.get("columns") or {}))
    return out


def _outlier_per_layer(rec: dict) -> str | None:
    """Outlier-dimension fractions per layer, from a quantize stage's per-layer statistics
    (``per_layer.<layer>.mean_outlier_frac``, reported by outlier-decomposing methods)."""
    for st in rec.get("quantize_stages") or []:
        per = st.get("per_layer") if isinstance(st, dict) else None
        if isinstance(per, dict) and per and all(isinstance(v, dict) and "mean_outlier_frac" in v
                                                 for v in per.values()):
            return json.dumps({k: v["mean_outlier_frac"] for k, v in per.items()})
    return None


def weight_bytes(manifest: dict, num_parameters: int) -> float:
    """Bytes the model's weights take as stored: the quantized linear layers at the checkpoint's
    effective bits (codes, scales, zeros, indices, outliers), every other parameter in 16 bits."""
    quantized = sum(m["meta"]["in_features"] * m["meta"]["out_features"]
                    for m in manifest.get("modules", {}).values()
                    if "in_features" in (m.get("meta") or {}))
    bits = float(manifest.get("effective_bits", 16.0))
    return (quantized * bits + (num_parameters - quantized) * 16.0) / 8.0


def fp16_kv_bytes(card: dict, context_length: int) -> int:
    """Bytes of an fp16 K+V cache holding ``context_length`` tokens (every layer, every KV head)."""
    return 2 * card["num_layers"] * card["num_kv_heads"] * card["head_dim"] * context_length * 2


def _manifest_for(record_path: Path, recipe: str | None, manifests: dict | None) -> Path | None:
    if manifests and recipe in manifests:
        return Path(manifests[recipe])
    guess = Path(record_path).parent.parent / "checkpoint" / "qbench.json"  # results/m/r/eval/x.json
    return guess if guess.exists() else None


def load_records(paths, *, manifests: dict | None = None, card: str | Path | dict | None = None
                 ) -> pd.DataFrame:
    """Records → one row each. With the model ``card`` (path or dict), rows get ``weight_MiB``
    (from each recipe's checkpoint manifest: ``manifests`` recipe → path, else found beside the
    record)."""
    if card is not None and not isinstance(card, dict):
        card = json.loads(Path(card).read_text())
    rows, manifest_cache = [], {}
    for p in paths:
        rec = json.loads(Path(p).read_text())
        row = {
            "kind": rec["kind"], "model": rec.get("model"), "recipe": rec.get("recipe"),
            "corpus": rec.get("corpus"), "effective_bits": rec.get("effective_bits"),
            "quantize_seconds": rec.get("quantize_seconds"), "record": str(p),
            "git_commit": rec.get("provenance", {}).get("git_commit"),
            # what a bit-identical rerun needs the same (bf16 CPU matmuls depend on the thread count)
            "eval_dtype": rec.get("eval_dtype"), "device": rec.get("provenance", {}).get("device"),
            "torch_threads": rec.get("provenance", {}).get("torch_threads"),
            "recipe_hash": rec.get("recipe_hash"),
            "outlier_frac": _outlier_per_layer(rec),
            **describe_record(rec),
        }
        mpath = _manifest_for(Path(p), rec.get("recipe"), manifests) if card else None
        if mpath is not None:
            if mpath not in manifest_cache:
                manifest_cache[mpath] = json.loads(mpath.read_text())
            row["weight_MiB"] = weight_bytes(manifest_cache[mpath], card["num_parameters"]) / 2**20
        metrics = rec.get("metrics") or {}
        for k, v in metrics.items():
            if isinstance(v, (int, float, str)) or v is None:
                row[k] = v
        by_protocol = metrics.get("by_kv_protocol")
        if isinstance(by_protocol, dict) and by_protocol:  # KV perplexity: did one forward score both?
            row["kv_protocols_coincide"] = any(isinstance(v, dict) and bool(v.get("same_as"))
                                               for v in by_protocol.values())
        if rec["kind"] == "kv_memory":
            for r in metrics.get("records", []):
                row[f"kv_ratio@{r['context_length']}"] = r["ratio_vs_fp16"]
                row[f"kv_bytes@{r['context_length']}"] = r["measured_bytes"]
        if rec["kind"] == "chat":
            row["answers"] = json.dumps([a.get("answer", "") for a in rec.get("answers", [])])
            row["prompts"] = json.dumps([a.get("prompt", "") for a in rec.get("answers", [])])
        if rec["kind"] == "stats":
            row["distance"] = json.dumps([d.get("rel_l2") for d in rec.get("distance", [])])
        if rec["kind"] == "needle":
            row["needle_grid"] = json.dumps({"grid": metrics.get("grid"), "context_lengths":
                                             metrics.get("context_lengths"), "depths": metrics.get("depths")})
        rows.append(row)
    return pd.DataFrame(rows)
