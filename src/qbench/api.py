"""The entry points that both the CLI and the Snakemake scripts call: one road to the library.

Every ``workflow/scripts/*.py`` calls a function of this module (nothing else); the heavy ones
import their implementation when called, so a job pays only for what it runs. Records and
checkpoint loading live one layer below, in :mod:`qbench.records` (used by :mod:`qbench.eval` too).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .calib.spec import CalibSet
from .checkpoint import DTYPES, save_checkpoint
from .defaults import EVAL, RUNTIME
from .fsutil import atomic_json
from .errors import ConfigError, check_finite
from .methods.base import QuantContext, get_method, parse_recipe
from .progress import PHASES, timed
from .provenance import hash_obj
from .records import base_record, load_for_eval, pick_device, set_threads, write_record  # noqa: F401


_PPL = EVAL["ppl"]  # config eval.ppl: defaults written once, in the schema (qbench.defaults)


def _calibration_provider(calib_dirs: dict[str, str], tokens_cache: dict):
    from .data.tokens import calibration_hash, sample_calibration

    def calibration(corpus: str, n: int, seqlen: int, seed: int) -> torch.Tensor:
        if corpus not in calib_dirs:
            raise ConfigError(f"calib={corpus!r}: this corpus is not available to this step; "
                              f"allowed values are {', '.join(sorted(calib_dirs)) or 'none'}")
        spec = CalibSet(corpus, n, seqlen, seed)
        if spec not in tokens_cache:
            tokens_cache[spec] = sample_calibration(calib_dirs[corpus], n, seqlen, seed)
            tokens_cache.setdefault("_hashes", {})[spec.key] = calibration_hash(calib_dirs[corpus], n, seqlen, seed)
        return tokens_cache[spec]

    return calibration


def _calib_stats_provider(stats_dirs: dict[str, str], calibration, model_ref: dict):
    def calib_stats(corpus: str, n: int, seqlen: int, seed: int):
        key = CalibSet(corpus, n, seqlen, seed).key
        if key in stats_dirs:
            from .calib.stats import load_stats

            return load_stats(Path(stats_dirs[key]) / "stats.safetensors")
        from .calib.stats import collect_act_stats

        return collect_act_stats(model_ref["model"], calibration(corpus, n, seqlen, seed),
                                 device=model_ref["device"], progress=model_ref["progress"])

    return calib_stats


def read_text_file(path: str | Path) -> str:
    """A UTF-8 text file's content; a missing, binary or unreadable file is one ConfigError naming it."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a UTF-8 text file (invalid byte at offset {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{p}: {e.strerror or e}") from None


def check_recipe(model, recipe: list | None, key: str = "recipe"):
    """Parse and check a recipe against a model's shapes (cheap; raises ConfigError)."""
    stages = parse_recipe(recipe, key)
    for i, st in enumerate(stages):
        get_method(st.method).check(model, st.config, f"{key}[{i}].{st.method}")
    return stages


def quantize_home(recipe: list | None, device: str) -> str:
    """Where the model lives while ``recipe`` is applied on ``device``. When every stage is
    block-by-block (:attr:`Method.blockwise`: GPTQ, AWQ, SpQR), the model stays in CPU memory and
    the runner moves one decoder block at a time to the GPU and back: peak GPU memory is one
    block, its calibration activations and the layer statistics, not the model (an 8B model in
    fp16 is 16 GB; one of its blocks 0.44 GB). Any other stage works on the whole model, which
    then sits on ``device`` — once: no stage makes a second float copy of the model."""
    stages = parse_recipe(recipe or [], "recipe")
    if device != "cpu" and stages and all(get_method(s.method).blockwise for s in stages):
        return "cpu"
    return device


def quantize(model_dir: str | Path, recipe: list | None, out_dir: str | Path, *,
             calib_dirs: dict[str, str] | None = None, stats_dirs: dict[str, str] | None = None,
             dtype: str = RUNTIME["quantize_dtype"], device: str | None = None, progress: bool = True,
             recipe_name: str | None = None, log=print) -> dict:
    """Apply ``recipe`` to the model in ``model_dir`` and write a checkpoint to ``out_dir``."""
    from .models.adapters import check_supported
    from .models.loading import check_seqlen, load_model, model_type_of

    device = pick_device(device)
    key = f"recipes.{recipe_name}" if recipe_name else "recipe"
    check_supported(model_type_of(model_dir))  # before reading any weight
    for i, st in enumerate(parse_recipe(recipe, key)):  # calibration lengths the model can take
        for req in get_method(st.method).calib_requests(st.config):
            check_seqlen(model_dir, req.seqlen, f"{key}[{i}].{st.method}.seqlen")
    t_load = time.perf_counter()
    model, tok = load_model(model_dir, dtype=dtype, device=quantize_home(recipe, device))
    for name, t in model.state_dict().items():  # an inf weight gives inf scales or hidden fallbacks
        check_finite(t, f"{model_dir}: weight {name}")
    stages = check_recipe(model, recipe, key)
    tokens_cache: dict = {}
    calibration = _calibration_provider(calib_dirs or {}, tokens_cache)
    ref = {"model": model, "device": device, "progress": progress}
    ctx = QuantContext(tokenizer=tok, device=device, calibration=calibration,
                       calib_stats=_calib_stats_provider(stats_dirs or {}, calibration, ref),
                       progress=progress, log=log)
    stage_stats = []
    t0 = time.perf_counter()
    for i, st in enumerate(stages):
        t = time.perf_counter()
        log(f"[qbench] stage {i}: {st.method} {json.dumps(st.config.to_dict(), default=str)}")
        s = get_method(st.method).apply(model, st.config, ctx) or {}
        stage_stats.append({"method": st.method, "seconds": time.perf_counter() - t, **s})
    quant_seconds = time.perf_counter() - t0
    resolved = [s.to_dict() for s in stages]
    card_path = Path(model_dir) / "qbench_model_card.json"
    card = json.loads(card_path.read_text()) if card_path.exists() else {}
    inputs = {
        "model_dir": str(model_dir),
        "model_source_hash": card.get("source_hash"),
        "recipe_hash": hash_obj(resolved),
        "calibration": tokens_cache.get("_hashes", {}),
    }
    PHASES["load"] = PHASES.get("load", 0.0) + t0 - t_load
    with timed("save"):
        return save_checkpoint(model, tok, out_dir, recipe=resolved, inputs=inputs,
                               stats={"stages": stage_stats, "quantize_seconds": quant_seconds,
                                      "load_seconds": t0 - t_load, "recipe_name": recipe_name},
                               device=device)


def calib_stats(model_dir: str | Path, corpus_dir: str | Path, out_file: str | Path, *, n: int,
                seqlen: int, seed: int, dtype: str = RUNTIME["quantize_dtype"], device: str | None = None,
                progress: bool = True) -> dict:
    """Collect and store the shared activation statistics of one calibration set."""
    from .calib.stats import collect_act_stats, save_stats
    from .data.tokens import calibration_hash, sample_calibration
    from .models.loading import check_seqlen, load_model

    check_seqlen(model_dir, seqlen, "calibration seqlen")
    device = pick_device(device)
    model, _ = load_model(model_dir, dtype=dtype, device=device)
    ids = sample_calibration(corpus_dir, n, seqlen, seed)
    stats = collect_act_stats(model, ids, device=device, progress=progress)
    return save_stats(stats, out_file, meta={"corpus": Path(corpus_dir).name, "n": n, "seqlen": seqlen,
                                             "seed": seed, "calibration_hash":
                                             calibration_hash(corpus_dir, n, seqlen, seed)})


def evaluate_ppl(path: str | Path, corpora: dict[str, str], outputs: dict[str, str] | None = None, *,
                 seqlen: int = _PPL["seqlen"], max_windows: int | None = _PPL["max_windows"],
                 dtype: str = _PPL["dtype"], device: str | None = None, batch_size: int = _PPL["batch_size"],
                 progress: bool = True,
                 model_name: str | None = None, recipe_name: str | None = None,
                 kv_protocol: list[str] | str | None = _PPL["kv_protocol"]) -> dict[str, dict]:
    """Perplexity of a checkpoint/model on each corpus dir (its ``test.npy``); one record each.

    ``kv_protocol``: the KV-cache protocols to score a recipe with a KV-cache stage under
    (:mod:`qbench.methods.kv_protocol`; default ``eval.ppl.kv_protocol``'s: both,
    ``prefill_quant`` first). The record's ``ppl`` is the first protocol's, ``metrics.kv_protocol``
    names it and ``metrics.by_kv_protocol`` holds every protocol's result (``ppl@<protocol>`` flat
    too); a recipe without a KV stage gets ``kv_protocol: null``."""
    from .data.tokens import load_tokens
    from .methods.kv_protocol import check_kv_protocols, use_kv_protocol
    from .models.loading import check_seqlen

    check_seqlen(path, seqlen, "eval.ppl.seqlen")
    protocols = check_kv_protocols(kv_protocol)
    device = pick_device(device)
    model, _, manifest = load_for_eval(path, dtype=dtype, device=device, tokenizer=False)
    has_kv = use_kv_protocol(model, protocols[0]) is not None
    records = {}
    for name, cdir in corpora.items():
        cjson = Path(cdir) / "corpus.json"
        corpus_meta = json.loads(cjson.read_text()) if cjson.exists() else {}
        # A corpus protocol may cap the windows (GPTQ's C4 evaluation scores 256 windows).
        cap = corpus_meta.get("eval_max_windows")
        windows_cap = min(x for x in (max_windows, cap) if x) if (max_windows or cap) else None
        tokens = load_tokens(cdir, "test")
        res = _ppl_under_protocols(model, tokens, protocols, seqlen, windows_cap, batch_size, progress,
                                   f"ppl {recipe_name or ''} {name}".strip())
        rec = base_record("ppl", manifest, model=model_name, recipe=recipe_name, device=device,
                          dtype=dtype, corpus=name, metrics=res,
                          corpus_hash=(corpus_meta.get("files") or {}).get("test.npy"),
                          eval={"seqlen": seqlen, "max_windows": max_windows, "batch_size": batch_size,
                                "kv_protocol": protocols if has_kv else None})
        records[name] = rec
        if outputs and name in outputs:
            atomic_json(outputs[name], rec)
    return records


def _ppl_under_protocols(model, tokens, protocols: list[str], seqlen: int, max_windows: int | None,
                         batch_size: int, progress: bool, desc: str) -> dict:
    """The perplexity metrics of one token stream: a model with a KV-cache stage is scored under
    every protocol (``ppl`` the first one's, ``kv_protocol`` its name, ``by_kv_protocol`` and
    ``ppl@<protocol>`` every one; protocols reading the same K/V share one forward, marked
    ``same_as``), any other model once (``kv_protocol: None``). The model is left in the first
    protocol."""
    from .eval.ppl import perplexity
    from .methods.kv_protocol import decode_equals_prefill, use_kv_protocol

    has_kv = use_kv_protocol(model, protocols[0]) is not None
    same = has_kv and decode_equals_prefill(model)
    by = {}
    for proto in (protocols if has_kv else [None]):
        if by and same:  # both protocols read the same K/V: one forward pass scores both
            by[proto] = {**next(iter(by.values())), "same_as": protocols[0]}
            continue
        if proto is not None:
            use_kv_protocol(model, proto)
        label = desc + (f" [{proto}]" if len(protocols) > 1 and proto else "")
        by[proto] = perplexity(model, tokens, seqlen, max_windows, batch_size, progress, desc=label)
    first = next(iter(by))
    res = {**by[first], "kv_protocol": first}
    if has_kv:
        res["by_kv_protocol"] = by
        res.update({f"ppl@{p}": r["ppl"] for p, r in by.items()})
        use_kv_protocol(model, protocols[0])
    return res


def evaluate_ppl_text(path: str | Path, text_file: str | Path, *, seqlen: int = _PPL["seqlen"],
                      max_windows: int | None = _PPL["max_windows"], dtype: str = _PPL["dtype"],
                      device: str | None = None, batch_size: int = _PPL["batch_size"],
                      progress: bool = True, model_name: str | None = None,
                      recipe_name: str | None = None,
                      kv_protocol: list[str] | str | None = _PPL["kv_protocol"]) -> dict:
    """Perplexity of a checkpoint/model on a raw text file (tokenized with the model's tokenizer);
    ``kv_protocol`` and the KV fields of the record as :func:`evaluate_ppl`."""
    from .methods.kv_protocol import check_kv_protocols, use_kv_protocol
    from .models.loading import check_seqlen

    check_seqlen(path, seqlen, "--seqlen")
    protocols = check_kv_protocols(kv_protocol)
    text = read_text_file(text_file)
    device = pick_device(device)
    model, tok, manifest = load_for_eval(path, dtype=dtype, device=device)
    if tok is None:
        raise ConfigError(f"{path} has no tokenizer; cannot tokenize {text_file}")
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    has_kv = use_kv_protocol(model, protocols[0]) is not None
    res = _ppl_under_protocols(model, ids, protocols, seqlen, max_windows, batch_size, progress, "ppl")
    return base_record("ppl", manifest, model=model_name, recipe=recipe_name, device=device, dtype=dtype,
                       corpus=str(text_file), metrics=res,
                       eval={"seqlen": seqlen, "max_windows": max_windows, "batch_size": batch_size,
                             "kv_protocol": protocols if has_kv else None})


def evaluate_kv(path: str | Path, corpus_dir: str | Path, *, needle_json: str | Path | None = None,
                memory_json: str | Path | None = None, needle: dict | None = None,
                memory: dict | None = None, dtype: str = EVAL["kv"]["dtype"], device: str | None = None,
                progress: bool = True, model_name: str | None = None,
                recipe_name: str | None = None) -> dict:
    """Needle-in-a-haystack retrieval and KV-cache bytes of one checkpoint (haystack and prefill
    tokens from the corpus's evaluation split); one record each. ``needle`` / ``memory``: the
    config's ``eval.kv.needle`` / ``eval.kv.memory`` keys, over their defaults."""
    from .data.tokens import load_tokens
    from .eval.kv_memory import kv_memory
    from .eval.needle import run_needle

    needle = {**EVAL["kv"]["needle"], **(needle or {})}
    memory = {**EVAL["kv"]["memory"], **(memory or {})}
    device = pick_device(device)
    model, tok, manifest = load_for_eval(path, dtype=dtype, device=device)
    tokens = load_tokens(corpus_dir, "test")
    out = {}
    common = dict(model=model_name, recipe=recipe_name, device=device, dtype=dtype,
                  corpus=Path(corpus_dir).name,
                  execution="generation through the recipe's KV cache (packed low-bit tensors)")
    if needle_json:
        res = run_needle(model, tok, tokens[:65536].tolist(), progress=progress, **needle)
        out["needle"] = base_record("needle", manifest, metrics=res, eval=needle, **common)
        atomic_json(needle_json, out["needle"])
    if memory_json:
        res = kv_memory(model, tokens, progress=progress, **memory)
        out["memory"] = base_record("kv_memory", manifest, metrics=res, eval=memory, **common)
        atomic_json(memory_json, out["memory"])
    return out


def stats_dirs_for(recipe: list | None, stats_root: str | Path) -> dict[str, str]:
    """Directories of the shared activation statistics a recipe's first stage reads (the
    ``calib_stats`` rule's outputs under ``stats_root``), keyed by calibration key."""
    stages = parse_recipe(recipe)
    if not stages or not get_method(stages[0].method).uses_act_stats:
        return {}
    spec = stages[0].config.calib_set()
    return {spec.key: str(Path(stats_root) / spec.key)}


def calib_stats_for(model_dir: str | Path, corpus_dir: str | Path, out_file: str | Path, spec: CalibSet,
                    **kw) -> dict:
    """:func:`calib_stats` of one :class:`CalibSet` (the ``calib_stats`` rule)."""
    return calib_stats(model_dir, corpus_dir, out_file, n=spec.n, seqlen=spec.seqlen, seed=spec.seed, **kw)


# ----------------------------------------------------------------------------- the other jobs
def evaluate_chat(*args, **kwargs) -> dict:
    """Chat answers of one checkpoint (:func:`qbench.eval.chat.evaluate_chat`)."""
    from .eval.chat import evaluate_chat as run

    return run(*args, **kwargs)


def evaluate_tasks(path: str | Path, tasks: list[str], out_json: str | Path | None = None, *,
                   corpora: dict | None = None, options=None, model_name: str | None = None,
                   recipe_name: str | None = None) -> dict:
    """lm-eval tasks on one checkpoint (:func:`qbench.eval.tasks.evaluate_tasks`); ``options`` a
    :class:`~qbench.eval.tasks.TaskOptions` or a dict of its fields (e.g. a config ``eval.tasks``
    section: keys that are not options are ignored)."""
    from .eval.tasks import TaskOptions, evaluate_tasks as run

    if isinstance(options, dict):
        options = TaskOptions.from_config(options)
    return run(path, tasks, out_json, corpora=corpora, options=options, model_name=model_name,
               recipe_name=recipe_name)


def evaluate_stats(*args, **kwargs) -> dict:
    """Weight/activation statistics of one checkpoint (:func:`qbench.eval.stats.evaluate_stats`)."""
    from .eval.stats import evaluate_stats as run

    return run(*args, **kwargs)


def evaluate_speed(*args, **kwargs) -> dict:
    """Prefill/decode throughput and memory of one checkpoint (:func:`qbench.eval.speed.evaluate_speed`)."""
    from .eval.speed import evaluate_speed as run

    return run(*args, **kwargs)


def prepare_model(*args, **kwargs):
    """Materialize a configured model (:func:`qbench.models.loading.prepare_model`)."""
    from .models.loading import prepare_model as run

    return run(*args, **kwargs)


def build_corpus(*args, **kwargs):
    """Calibration/evaluation splits of one corpus (:func:`qbench.data.corpora.build_corpus`)."""
    from .data.corpora import build_corpus as run

    return run(*args, **kwargs)


def export_checkpoint(*args, **kwargs) -> dict:
    """Export a checkpoint for another runtime (:func:`qbench.export.export_checkpoint`)."""
    from .export import export_checkpoint as run

    return run(*args, **kwargs)


def build_report(*args, **kwargs):
    """One model's report (:func:`qbench.report.build.build_report`)."""
    from .report.build import build_report as run

    return run(*args, **kwargs)


def write_vs_published(*args, **kwargs):
    """The report's "vs published" section (:func:`qbench.report.published.write_vs_published`)."""
    from .report.published import write_vs_published as run

    return run(*args, **kwargs)


def build_index(*args, **kwargs):
    """``reports/README.md`` over every model (:func:`qbench.report.build.build_index`)."""
    from .report.build import build_index as run

    return run(*args, **kwargs)


__all__ = ["quantize", "calib_stats", "calib_stats_for", "stats_dirs_for", "evaluate_ppl", "evaluate_ppl_text",
           "evaluate_kv", "evaluate_chat", "evaluate_tasks", "evaluate_stats", "evaluate_speed", "prepare_model", "build_corpus",
           "export_checkpoint", "write_vs_published",
           "build_report", "build_index", "load_for_eval", "base_record", "check_recipe", "pick_device", "quantize_home",
           "set_threads", "write_record", "DTYPES"]
