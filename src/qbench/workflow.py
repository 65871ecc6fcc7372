"""Glue between Snakemake and the library: config resolution (checked before any job) and the job
context every ``workflow/scripts/*.py`` uses (log redirection, threads, GPU slot)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path

from .errors import ConfigError
from .methods.base import get_method, parse_recipe
from .fsutil import atomic_json
from .progress import PHASES, Heartbeat, job_label, process_age

PROGRESS_SECONDS = 20  # runtime.progress_seconds: a terminal line per running job this often

MODEL_SOURCES = ("gguf-package", "local", "hf")
CORPUS_SOURCES = ("wiki", "news", "local", "hf")


def _check_source(kind_allowed, src: dict, key: str) -> None:
    kind = src.get("kind")
    if kind not in kind_allowed:
        raise ConfigError(f"{key}.kind={kind!r}: allowed values are {', '.join(kind_allowed)}")
    if kind == "local":
        path = src.get("path")
        if not path or not Path(path).exists():
            raise ConfigError(f"{key}.path={path!r}: no such file or directory")


def resolve_config(config: dict) -> dict:
    """Validate cross-references and resolve every recipe; raise ConfigError naming the key."""
    for name, m in config.get("models", {}).items():
        _check_source(MODEL_SOURCES, m.get("source", {}), f"models.{name}.source")
    corpora = config.get("corpora", {})
    for name, c in corpora.items():
        _check_source(CORPUS_SOURCES, c.get("source", {}), f"corpora.{name}.source")
    for c in config.get("eval", {}).get("ppl", {}).get("corpora", []):
        if c not in corpora:
            raise ConfigError(f"eval.ppl.corpora: unknown corpus {c!r}; configured corpora: "
                              f"{', '.join(corpora) or 'none'}")
    recipes, calib, stats = {}, {}, {}
    for name, raw in (config.get("recipes") or {}).items():
        key = f"recipes.{name}"
        stages = parse_recipe(raw, key)
        recipes[name] = [s.to_dict() for s in stages]
        needs = []
        for i, st in enumerate(stages):
            for req in get_method(st.method).calib_requests(st.config):
                if req.corpus not in corpora:
                    raise ConfigError(f"{key}[{i}].{st.method}.calib={req.corpus!r}: unknown corpus; "
                                      f"configured corpora: {', '.join(corpora) or 'none'}")
                if req.corpus not in needs:
                    needs.append(req.corpus)
        calib[name] = needs
        # Shared activation statistics only describe the unmodified model, so only a first stage
        # can use the precomputed ones (later stages re-collect on the model as it is then).
        if stages and get_method(stages[0].method).uses_act_stats:
            stats[name] = [stages[0].config.calib_set().key]
        else:
            stats[name] = []
    select = config.get("select") or {}
    chosen = {}
    for what, pool in (("models", config.get("models", {})), ("recipes", recipes)):
        names = select.get(what) or list(pool)
        bad = [n for n in names if n not in pool]
        if bad:
            raise ConfigError(f"select.{what}: unknown {what[:-1]} {bad[0]!r}; configured: {', '.join(pool)}")
        chosen[what] = names
    return {"recipes": recipes, "calib_corpora": calib, "calib_stats": stats, "models": chosen["models"],
            "selected_recipes": chosen["recipes"], "exports": resolve_exports(config, recipes)}


def resolve_exports(config: dict, recipes: dict) -> list[dict]:
    """The config's ``export`` list, checked: known recipe and format, and no recipe stage the
    format cannot express (KV-cache / run-time stages; layer-level refusals come from the job)."""
    from .export.common import FORMATS, ExportError, check_stages

    out = []
    for i, e in enumerate(config.get("export") or []):
        key = f"export[{i}]"
        if e.get("recipe") not in recipes:
            raise ConfigError(f"{key}.recipe={e.get('recipe')!r}: unknown recipe; configured: {', '.join(recipes)}")
        if e.get("format") not in FORMATS:
            raise ConfigError(f"{key}.format={e.get('format')!r}: allowed values are {', '.join(FORMATS)}")
        try:
            check_stages({"recipe": recipes[e["recipe"]], "stats": {"recipe_name": e["recipe"]}}, e["format"])
        except ExportError as err:
            raise ConfigError(f"{key}: {err}") from None
        opts = {"float_type": e.get("float_type", "auto"), "require_exact": bool(e.get("require_exact", False))} \
            if e["format"] == "gguf" else {}
        out.append({"recipe": e["recipe"], "format": e["format"], "options": opts})
    return out


def prepare_output_dir(config: dict) -> str:
    """The directory this run writes into (config ``output_dir``, default ``runs/default``), to
    hand to Snakemake's ``workdir:``; relative ``local`` source paths in the config are made
    absolute first (they are relative to where snakemake was started, or to ``--directory``,
    into which Snakemake changes before reading the Snakefile).

    Cluster jobs re-read the Snakefile, starting in the submitting process's *initial* directory
    (sbatch -D) and, one level down (srun), in the run directory: a relative ``output_dir`` would
    nest. So the first process pins both directories in the environment (``QBENCH_START_DIR``,
    ``QBENCH_RUN_DIR``, see :func:`pin_run_dir`), which jobs inherit and follow."""
    start = Path(os.environ.get("QBENCH_START_DIR") or Path.cwd())
    for section in ("models", "corpora"):
        for entry in (config.get(section) or {}).values():
            src = (entry or {}).get("source") or {}
            if src.get("kind") == "local" and src.get("path") and not Path(src["path"]).is_absolute():
                src["path"] = str(start / src["path"])
    os.environ.setdefault("QBENCH_START_DIR", str(start))
    return os.environ.get("QBENCH_RUN_DIR") or str(start / (config.get("output_dir") or "runs/default"))


def pin_run_dir() -> None:
    """Called right after ``workdir:``: the current directory is the run directory (``output_dir``
    or, when given, ``--directory``); jobs started from here inherit it."""
    os.environ.setdefault("QBENCH_RUN_DIR", os.getcwd())


@contextlib.contextmanager
def job(smk, gpu: bool = False):
    """Run a script's body with stdout/stderr and logging sent to the rule's log file, the thread
    count applied, and (for GPU rules) a GPU slot claimed before CUDA is initialised.

    A user error (:func:`qbench.errors.user_error_line`: a bad value, a missing or unreadable
    file, a non-finite value, a refused checkpoint, a full disk) ends the job with one line,
    ``qbench: error in rule <rule>: ...``, on the terminal and in the log, and exit status 1;
    any other exception keeps its traceback (in the log)."""
    from .errors import user_error_line

    log_path = Path(str(smk.log[0])) if smk.log else None
    stream = open(log_path, "a", buffering=1) if log_path else None
    old = sys.stdout, sys.stderr
    if stream:
        sys.stdout = sys.stderr = stream
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True)
    slot, line = None, None
    try:
        if gpu and int(smk.resources.get("gpu", 0) or 0) > 0:  # absent: runtime.gpus is 0
            from .gpu import acquire_gpu

            slot = acquire_gpu()
            print(f"[qbench] device slot: {slot.describe()}")
        elif gpu:  # runtime.gpus: 0 — a GPU rule run on the CPU on purpose
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
            print("[qbench] device slot: cpu (runtime.gpus: 0)")
        startup = process_age()  # interpreter start, Snakemake's preamble, importing this module
        t_imports = time.perf_counter()
        import torch

        from . import api  # noqa: F401 - the library every job body uses, timed as an import

        PHASES["imports"] = time.perf_counter() - t_imports
        torch.set_num_threads(max(1, int(smk.threads)))
        runtime = (getattr(smk, "config", None) or {}).get("runtime") or {}
        label = job_label(getattr(smk, "rule", "job"), getattr(smk, "wildcards", None))
        t_body = time.perf_counter()
        with Heartbeat(label, old[1], runtime.get("progress_seconds", PROGRESS_SECONDS)):
            yield
        if log_path:  # phases of this job, for benchmarks/pipeline_overhead.py
            atomic_json(log_path.with_suffix(".timing.json"),
                        {"job": label, "startup": startup, **PHASES,
                         "body": time.perf_counter() - t_body})
    except Exception as e:
        line = user_error_line(e)
        if line is None:
            raise
        line = f"qbench: error in rule {getattr(smk, 'rule', '?')}: {line}"
        print(line, file=sys.stderr)
    finally:
        if slot:
            slot.release()
        if stream:
            sys.stdout, sys.stderr = old
            stream.close()
    if line:
        print(line, file=sys.stderr)
        sys.exit(1)
