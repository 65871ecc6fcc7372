"""Per-layer weight / activation statistics and layer-wise hidden-state distance (the seed's
``analyze_stats`` and ``get_layerwise_distance`` analysis tools): the ``eval_stats`` job
(:func:`evaluate_stats`: load both models, collect, summarise, write the record, CSVs and plots).
The pieces: :mod:`.tensor_stats` (SQNR, moments, outliers), :mod:`.layer_stats` (hooks on both
models), :mod:`.stats_plots` (CSVs, figures); their names are re-exported here.

For every decoder-block linear layer (:func:`qbench.modules.target_linears`, in module order):

* **weights** — of the fp layer and of the quantized layer (its dequantized weight:
  ``dequantized_weight()`` where the module has it, else ``.weight``): mean, std, excess kurtosis
  (Fisher, population moments — ``scipy.stats.kurtosis(bias=True)``), min, max, absmax, and
  *outlier input channels*; plus SQNR (dB) and MSE of the quantized weight against the fp one.
* **activations** — the inputs of each linear on a few token windows, captured with forward
  pre-hooks on both models: the same statistics for the fp model's inputs and for the quantized
  model's inputs, ``sqnr_db`` of the input the quantized layer actually multiplies (after its own
  activation quantizer ``quant_input`` when it has one) against the fp model's input to the same
  layer (the error accumulated up to that matmul), and ``act_quant_sqnr_db`` of the layer's own
  activation quantizer alone (``quant_input(x)`` vs ``x``; None for layers without one).
  Moments are accumulated in float64 with Pébay's pairwise update (:class:`Moments`), so the
  numbers do not depend on how the tokens are batched.

Definitions (also in every record's ``definitions``):

* ``SQNR = 10·log10(Σ ref² / Σ (ref − test)²)`` dB over all elements (∞ for identical tensors; JSON
  holds null then and ``identical: true``). ``MSE = mean (ref − test)²``.
* **Outlier channel**: an input channel whose absmax (over output rows for weights, over tokens for
  activations) exceeds ``outlier_k`` × the median channel absmax of that layer (default k = 20: a
  scale-free rule, so it reads the same for weights and activations and for any model width;
  ``absmax_ratio`` = max/median is the continuous version). For activations also
  ``int8_outlier_channels``: channels with absmax ≥ 6.0, LLM.int8()'s outlier-feature threshold.
* ``*_rescaled`` SQNRs: recipes that fold exact per-channel rescalings into the weights
  (SmoothQuant, AWQ: ``W·diag(s)``, ``x·diag(s)⁻¹``) change weights and activations by more than
  the quantization error. The rescaled SQNR first fits the best diagonal gains to the fp reference
  — weights: ``diag(r)·W·diag(c)`` by alternating least squares, activations: per input channel
  ``c_j`` by least squares — and measures the error left over. For recipes without rescaling it
  is slightly optimistic (the fit absorbs per-channel gain error); ``primary_sqnr`` in the record
  says which one the summary uses.

``layerwise_distance`` compares the hidden states after every decoder block of the fp and the
quantized model on the same inputs: ``rel_l2 = ‖h_q − h_fp‖_F / ‖h_fp‖_F`` over all tokens,
``rel_l2_token_mean`` (the per-token ratio, averaged — not dominated by a few massive-activation
tokens), and ``cosine`` (mean per-token cosine similarity).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from torch import nn

from ..defaults import EVAL
from ..errors import ConfigError
from .layer_stats import (_Memo, activation_stats, layer_weight, layerwise_distance,  # noqa: F401 - re-exported
                          weight_stats)
from .stats_plots import plot_stats, write_csv
from .tensor_stats import (DEFINITIONS, INT8_THRESHOLD, OUTLIER_K, Moments, channel_absmax,  # noqa: F401
                           kurtosis, mse, outlier_channels, rescaled_weight_sqnr_db, sqnr_db, tensor_stats)

__all__ = [
    "OUTLIER_K", "INT8_THRESHOLD", "Moments", "sqnr_db", "mse", "kurtosis",
    "tensor_stats", "outlier_channels", "channel_absmax", "rescaled_weight_sqnr_db",
    "layer_weight", "weight_stats", "activation_stats", "layerwise_distance", "write_csv",
    "plot_stats", "evaluate_stats",
]


# --------------------------------------------------------------------------------------------
# outputs


def _json_safe(obj):
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _mean(vals) -> float | None:
    v = [x for x in vals if x is not None and math.isfinite(x)]
    return sum(v) / len(v) if v else None


def _summary(weights, acts, dist, primary: str) -> dict:
    s: dict = {}
    if weights:
        key = "sqnr_db_rescaled" if primary == "rescaled" else "sqnr_db"
        finite = [w for w in weights if math.isfinite(w[key])]
        s["weight_sqnr_db_mean"] = _mean(w[key] for w in weights)
        if finite:
            worst = min(finite, key=lambda w: w[key])
            s["weight_sqnr_db_min"], s["weight_sqnr_db_min_layer"] = worst[key], worst["layer"]
        s["weight_identical_layers"] = sum(1 for w in weights if w["sqnr_db"] == math.inf)
        s["weight_kurtosis_max_fp"] = max(w["fp"]["kurtosis"] for w in weights)
        s["weight_kurtosis_max_q"] = max(w["q"]["kurtosis"] for w in weights)
        s["weight_outlier_channels_fp"] = sum(w["fp"]["outlier_channels"] for w in weights)
        s["weight_outlier_channels_q"] = sum(w["q"]["outlier_channels"] for w in weights)
    if acts:
        key = "sqnr_db_rescaled" if primary == "rescaled" else "sqnr_db"
        s["act_sqnr_db_mean"] = _mean(a[key] for a in acts)
        s["act_kurtosis_max_fp"] = max(a["fp"]["kurtosis"] for a in acts)
        s["act_kurtosis_max_q"] = max(a["q"]["kurtosis"] for a in acts)
        s["act_absmax_max_fp"] = max(a["fp"]["absmax"] for a in acts)
        s["act_outlier_channels_fp"] = sum(a["fp"]["outlier_channels"] for a in acts)
        s["act_outlier_channels_q"] = sum(a["q"]["outlier_channels"] for a in acts)
        s["act_int8_outlier_channels_fp"] = sum(a["fp"]["int8_outlier_channels"] for a in acts)
    if dist:
        s["distance_last_rel_l2"] = dist[-1]["rel_l2"]
        s["distance_last_cosine"] = dist[-1]["cosine"]
        s["distance_max_rel_l2"] = max(d["rel_l2"] for d in dist)
    return s


def reference_in_recipe_basis(fp_model: nn.Module, recipe: list) -> list[str]:
    """Apply the recipe's exact change-of-basis stages to the fp reference, in order: methods of
    kind ``transform`` that provide ``transform_only(model, config)`` (e.g. ``rotate``: the same
    rotation, without its KV quantizer). A rotated model's weights, activations and hidden states
    live in another basis than the original's, so without this every SQNR would measure the
    rotation, not the quantization. Returns the names of the stages applied."""
    from ..methods.base import get_method, parse_recipe

    done = []
    for st in parse_recipe(recipe, "manifest.recipe"):
        m = get_method(st.method)
        if m.kind == "transform" and callable(getattr(m, "transform_only", None)):
            m.transform_only(fp_model, st.config)
            done.append(st.method)
    return done


def evaluate_stats(fp_path: str | Path, q_path: str | Path, out_json: str | Path | None = None,
                   out_csv_dir: str | Path | None = None, *, corpus_dir: str | Path,
                   split: str = "test", n_windows: int = EVAL["stats"]["n_windows"],
                   seqlen: int = EVAL["stats"]["seqlen"], seed: int = 0,
                   outlier_k: float = OUTLIER_K, activations: bool = True, distance: bool = True,
                   plots: bool = True, batch_size: int = 1, dtype: str = EVAL["stats"]["dtype"],
                   device: str | None = None, progress: bool = False, model_name: str | None = None,
                   recipe_name: str | None = None) -> dict:
    """Weight / activation statistics and layer-wise distance of the quantized model at ``q_path``
    against the fp model at ``fp_path``: one ``kind: "stats"`` record (per-layer lists
    ``weights``, ``activations``, ``distance``; ``metrics`` = summary scalars) plus CSVs
    (``weights.csv``, ``activations.csv``, ``distance.csv``) and PNG plots in ``out_csv_dir``.

    Token windows: ``split="test"``: the first ``n_windows`` non-overlapping ``seqlen`` windows of
    the corpus test split (the perplexity windows); ``"calib"``: ``n_windows`` calibration windows
    sampled with ``seed`` (:func:`qbench.data.tokens.sample_calibration`)."""
    from ..records import base_record, descriptor_of, load_for_eval, pick_device, write_record
    from ..data.tokens import load_tokens, sample_calibration
    from .ppl import windows

    if split not in ("test", "calib"):
        raise ConfigError(f"split={split!r}; allowed values: test, calib")
    if n_windows < 1 or seqlen < 2:
        raise ConfigError(f"n_windows={n_windows} and seqlen={seqlen} must be >= 1 and >= 2")
    if outlier_k <= 1:
        raise ConfigError(f"outlier_k={outlier_k} must be > 1 (a multiple of the median absmax)")
    device = pick_device(device)
    ids = (windows(load_tokens(corpus_dir, "test"), seqlen, n_windows) if split == "test"
           else sample_calibration(corpus_dir, n_windows, seqlen, seed))
    t0 = time.perf_counter()
    fp_model, _, _ = load_for_eval(fp_path, dtype=dtype, device=device, tokenizer=False)
    q_model, _, manifest = load_for_eval(q_path, dtype=dtype, device=device, tokenizer=False)
    transformed = reference_in_recipe_basis(fp_model, manifest.get("recipe", []))
    rescaling = [d["method"] for d in descriptor_of(manifest)["stages"] if d.get("rescales_weights")]
    primary = "rescaled" if rescaling else "plain"
    w = weight_stats(fp_model, q_model, outlier_k=outlier_k, rescaled=bool(rescaling))
    a = activation_stats(fp_model, q_model, ids, outlier_k=outlier_k, batch_size=batch_size,
                         progress=progress) if activations else []
    d = layerwise_distance(fp_model, q_model, ids, batch_size=batch_size) if distance else []
    seconds = time.perf_counter() - t0
    files: dict[str, str] = {}
    if out_csv_dir is not None:
        out_csv_dir = Path(out_csv_dir)
        for name, rows in (("weights", w), ("activations", a), ("distance", d)):
            if rows:
                files[f"{name}_csv"] = str(write_csv(rows, out_csv_dir / f"{name}.csv"))
        if plots:
            files.update(plot_stats(w, a, d, out_csv_dir, title=recipe_name or ""))
    metrics = _summary(w, a, d, primary)
    rec = base_record(
        "stats", manifest, model=model_name, recipe=recipe_name, device=device, dtype=dtype,
        metrics=_json_safe(metrics), weights=_json_safe(w), activations=_json_safe(a),
        distance=_json_safe(d), identical=metrics.get("weight_identical_layers") == len(w) and bool(w),
        primary_sqnr=primary, rescaling_methods=rescaling, reference_transforms=transformed,
        definitions=DEFINITIONS, files=files,
        seconds=seconds,
        eval={"fp_path": str(fp_path), "corpus_dir": str(corpus_dir), "split": split,
              "n_windows": int(ids.shape[0]), "seqlen": seqlen, "seed": seed if split == "calib" else None,
              "outlier_k": outlier_k, "int8_threshold": INT8_THRESHOLD, "batch_size": batch_size})
    if out_json is not None:
        write_record(out_json, rec)
    return rec
