"""Glue between Snakemake and the library: config resolution (checked before any job) and the job
context every ``workflow/scripts/*.py`` uses (log redirection, threads, GPU slot).

Importing this module is light (no torch, no transformers): a job's ``startup`` phase is the
interpreter, Snakemake's script preamble and this module; the heavy imports are timed by
:func:`job` as their own phases (``imports``: ``import_torch``, ``import_qbench``,
``import_model_code``)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path

from .defaults import section as default_section
from .errors import ConfigError
from .fsutil import atomic_json
from .progress import PHASES, Heartbeat, job_label, process_age

PROGRESS_SECONDS = default_section("runtime")["progress_seconds"]  # a terminal line per running job this often

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


CALIBRATION_KEYS = ("calib", "nsamples", "seqlen", "seed")


def _raw_stage(st):
    """``(method, args)`` of a raw recipe stage (``{method: args}`` or ``"method"``), else None."""
    if isinstance(st, str):
        return st, {}
    if isinstance(st, dict) and len(st) == 1:
        return next(iter(st.items()))
    return None


def with_calibration(raw, defaults: dict | None):
    """The recipe with the config's run-wide ``calibration`` defaults (corpus, sequences, length,
    seed) filled into every calibrating stage that does not set them itself; other stages and
    explicit values are unchanged (malformed recipes are returned as they are, for parse_recipe
    to report)."""
    if not defaults or not isinstance(raw, list):
        return raw
    from .methods.base import CalibArgs, get_method

    out = []
    for st in raw:
        parsed = _raw_stage(st)
        if parsed is not None:
            name, args = parsed
            st = {name: args}
            try:
                method = get_method(name)
            except ConfigError:
                method = None
            if method is not None and issubclass(method.Config, CalibArgs) and isinstance(args or {}, dict):
                args = {**{k: v for k, v in defaults.items() if k in CALIBRATION_KEYS}, **(args or {})}
                st = {name: args}
        out.append(st)
    return out


def resolve_config(config: dict) -> dict:
    """Validate cross-references and resolve every recipe; raise ConfigError naming the key."""
    from .methods.base import get_method, parse_recipe

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
        stages = parse_recipe(with_calibration(raw, config.get("calibration")), key)
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
    from .report.orderings import validate_orderings

    validate_orderings(config.get("orderings"))  # structure only: unrun recipes are "not run"
    select = config.get("select") or {}
    chosen = {}
    for what, pool in (("models", config.get("models", {})), ("recipes", recipes)):
        names = select.get(what) or list(pool)
        bad = [n for n in names if n not in pool]
        if bad:
            raise ConfigError(f"select.{what}: unknown {what[:-1]} {bad[0]!r}; configured: {', '.join(pool)}")
        chosen[what] = names
    _check_tasks(config, chosen["recipes"])
    _check_seqlens(config, chosen["models"], {r: recipes[r] for r in chosen["recipes"]})
    return {"recipes": recipes, "calib_corpora": calib, "calib_stats": stats, "models": chosen["models"],
            "selected_recipes": chosen["recipes"], "exports": resolve_exports(config, recipes)}


def _check_tasks(config: dict, selected: list[str]) -> None:
    """lm-eval task names against lm-eval's task index and the offline tasks (see
    :mod:`qbench.eval.task_index`), when a selected recipe runs them: an unknown name used to fail
    after a job had run (and Snakemake had removed the previous record)."""
    section = (config.get("eval") or {}).get("tasks") or {}
    runs = section.get("recipes", [])
    if not section.get("tasks") or not (runs == "all" or any(r in selected for r in runs)):
        return
    from .eval.task_index import check_task_names

    check_task_names(list(section["tasks"]), list(section.get("corpora") or []))


def _check_seqlens(config: dict, models: list[str], recipes: dict[str, list[dict]]) -> None:
    """Token lengths against each model's maximum positions, where its ``config.json`` can be read
    without work (a ``local`` source, or the model already prepared under ``resources/models``);
    the jobs check again before loading weights (:func:`qbench.models.loading.check_seqlen`)."""
    from .methods.base import get_method, parse_recipe
    from .models.loading import check_seqlen, max_positions_of

    ev = config.get("eval") or {}
    lengths = [("eval.ppl.seqlen", (ev.get("ppl") or {}).get("seqlen")),
               ("eval.stats.seqlen", (ev.get("stats") or {}).get("seqlen"))]
    for name, stages in recipes.items():
        for i, st in enumerate(parse_recipe(stages, f"recipes.{name}")):
            for req in get_method(st.method).calib_requests(st.config):
                lengths.append((f"recipes.{name}[{i}].{st.method}.seqlen", req.seqlen))
    for m in models:
        src = ((config.get("models") or {}).get(m) or {}).get("source") or {}
        dirs = [Path("resources/models") / m]
        if src.get("kind") == "local" and src.get("path"):
            dirs.append(Path(src["path"]))
        d = next((d for d in dirs if max_positions_of(d) is not None), None)
        if d is None:
            continue
        for key, n in lengths:
            try:
                check_seqlen(d, n, key)
            except ConfigError as e:
                raise ConfigError(f"models.{m}: {e}") from None


def _first_method(stages):
    """The method name of a raw recipe's first stage, else None."""
    parsed = _raw_stage(stages[0]) if isinstance(stages, list) and stages else None
    return parsed[0] if parsed else None


def group_recipes(recipes: dict, base_path) -> dict:
    """``recipes`` in the default config file's order, each recipe an overlay (``--configfile``)
    adds placed after the last recipe whose first stage uses the same method (the baseline and
    unknown methods: at the end, in the overlay's order).

    Snakemake merges a ``--configfile``'s keys before those of the Snakefile's ``configfile:``, so
    with ``select.recipes`` empty (the full study) the tables would otherwise list the overlay's
    recipes first and the default's after them."""
    base = []
    if base_path and Path(base_path).is_file():
        from .yamlio import load_yaml_file

        base = list(((load_yaml_file(base_path) or {}).get("recipes") or {}))
    if not base:
        return recipes
    method = {r: _first_method(stages) for r, stages in recipes.items()}
    order = [r for r in base if r in recipes]
    for r in recipes:
        if r in order:
            continue
        same = [i for i, o in enumerate(order) if method[r] is not None and method[o] == method[r]]
        order.insert(same[-1] + 1 if same else len(order), r)
    return {r: recipes[r] for r in order}


#: Snakemake priorities (higher runs first among ready jobs): the longest jobs first, so that a
#: 2-core run does not end with one long job alone on the machine. Calibrating quantizers (AWQ,
#: GPTQ, SpQR, LKD, KVQuant, ...) and what they wait for (corpora, calibration statistics) gate the
#: longest chains; every other checkpoint comes before the
#: evaluations, because an evaluation's length depends on its recipe (below) and the long ones
#: must not wait behind a late quantize job; then the evaluations, longest kinds first.
PRIORITY = {"calib": 10, "quantize_calib": 10, "quantize": 6, "eval_tasks": 5, "eval_kv": 5, "eval_stats": 1,
            "eval_speed": 1, "eval_chat": 0}


def ppl_priority(stages: list[dict]) -> int:
    """Priority of a recipe's perplexity job (0..3): a KV-cache stage scores every window under
    two protocols (×2 the forwards), fake-quantized activations add their quantizers to every
    forward — on the default run 7–9 s of CPU per corpus for weight-only recipes, 15–16 s with
    W8A8 activations, 16 s for KIVI-2 and 35 s for W4A4 + KV4."""
    from .methods.base import get_method

    kv = acts = False
    for st in stages or []:
        for name, args in st.items():
            kind, args = get_method(name).kind, args or {}
            kv = kv or kind == "kv"
            if kind in ("weight_act", "activation"):  # unless the stage leaves activations alone
                if "a_bits" in args:
                    acts = acts or args["a_bits"] < 16
                elif "a_format" in args:
                    acts = acts or args["a_format"] not in (None, "none")
                else:  # LLM.int8(): the outlier decomposition of every activation
                    acts = True
    return 2 * kv + acts


def check_config_files(*paths) -> None:
    """Parse every config file strictly (:mod:`qbench.yamlio`): duplicate keys and malformed YAML
    are one error naming the file and line. Snakemake's own loader keeps the last of duplicate keys
    silently, so the Snakefile calls this on the default config and every ``--configfile``."""
    from .yamlio import load_yaml_file

    for p in paths:
        if p and Path(p).is_file():
            load_yaml_file(p)


def schema_error_line(err) -> str:
    """One line for a jsonschema ``ValidationError``: the config key and what is allowed (never the
    schema itself, which Snakemake prints in full)."""
    from jsonschema.exceptions import best_match

    e = best_match([err]) or err
    key = ".".join(str(k) for k in e.absolute_path) or "<top level>"
    schema = e.schema if isinstance(e.schema, dict) else {}
    if e.validator == "enum":
        return f"config key {key}: {e.instance!r} is not one of {list(e.validator_value)}"
    if e.validator == "additionalProperties":
        allowed = sorted(schema.get("properties") or {})
        extra = sorted(set(e.instance) - set(allowed)) if isinstance(e.instance, dict) else []
        where = f"{key}." if e.absolute_path else ""
        return (f"config key {where}{extra[0] if extra else '?'}: unknown key; allowed keys"
                f"{' at ' + key if e.absolute_path else ''}: {', '.join(allowed)}")
    if e.validator == "type":
        return f"config key {key}: expected {e.validator_value}, got {type(e.instance).__name__} {_short(e.instance)}"
    if e.validator == "required":
        return f"config key {key}: {e.message}"
    if e.validator in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        return f"config key {key}={e.instance!r}: {e.validator} is {e.validator_value}"
    return f"config key {key}: {_short(e.message, 200)}"


def _short(obj, n: int = 60) -> str:
    s = obj if isinstance(obj, str) else repr(obj)
    return s if len(s) <= n else s[: n - 3] + "..."


def validate_config(config: dict, schema: str | Path) -> None:
    """``snakemake.utils.validate`` (checks and fills defaults), with its error as one line
    (:func:`schema_error_line`) instead of the failing sub-schema dump."""
    from jsonschema.exceptions import ValidationError
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    try:
        validate(config, str(schema))
    except WorkflowError as e:
        # Snakemake formats the ValidationError into its message; it is the implicit context
        cause = next((c for c in (e.__cause__, e.__context__) if isinstance(c, ValidationError)), None)
        if cause is None:
            raise
        raise ConfigError(schema_error_line(cause)) from None


def or_exit(fn, *args, **kwargs):
    """Call ``fn``; a user error (:func:`qbench.errors.user_error_line`) prints one line,
    ``qbench: error: ...``, and exits with status 1 (used by the Snakefile while it loads the config,
    where Snakemake would add its own location lines and a traceback)."""
    from .errors import user_error_line

    try:
        return fn(*args, **kwargs)
    except Exception as e:
        line = user_error_line(e)
        if line is None:
            raise
        print(f"qbench: error: {line}", file=sys.stderr)
        sys.exit(1)


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
        d = {**default_section("export.*"), **e}
        opts = {"float_type": d["float_type"], "require_exact": bool(d["require_exact"])} \
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


def process_cpu() -> float:
    """CPU seconds (user + system) of this process and its waited-for children so far: the job's
    cost independent of how loaded the machine is (wall time is not)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _timed_imports(model_code: bool):
    """Import what job bodies use, each part timed into ``PHASES``: ``import_torch``;
    ``import_qbench`` (``qbench.api``, and through it transformers' base package);
    ``import_model_code`` (``transformers.modeling_utils``: what building any model imports —
    with ``torch._dynamo``, sympy and scipy it pulls in —, otherwise paid inside the first model
    load); ``imports`` is their sum. Returns the torch module."""
    t0 = time.perf_counter()
    import torch

    t1 = time.perf_counter()
    from . import api  # noqa: F401 - the library every job body uses

    t2 = time.perf_counter()
    if model_code:
        import transformers.modeling_utils  # noqa: F401
    t3 = time.perf_counter()
    PHASES.update(import_torch=t1 - t0, import_qbench=t2 - t1, import_model_code=t3 - t2, imports=t3 - t0)
    return torch


@contextlib.contextmanager
def job(smk, gpu: bool = False, model_code: bool = True):
    """Run a script's body with stdout/stderr and logging sent to the rule's log file, the thread
    count applied, and (for GPU rules) a GPU slot claimed before CUDA is initialised.

    A user error (:func:`qbench.errors.user_error_line`: a bad value, a missing or unreadable
    file, a non-finite value, a refused checkpoint, a full disk) ends the job with one line,
    ``qbench: error in rule <rule>: ...``, on the terminal and in the log, and exit status 1;
    any other exception keeps its traceback (in the log).

    ``model_code=False``: a rule that builds no model (corpora, reports) does not import
    transformers' modeling code up front."""
    from . import jobserver
    from .errors import user_error_line
    from .memory import tune_malloc

    if not jobserver.IN_CHILD:  # a running job server (runtime.job_server) runs the job in a warm child
        code = jobserver.delegate()
        if code is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    tune_malloc()  # before anything sizeable is allocated: freed memory is reused, not page-faulted back
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
        # interpreter start, Snakemake's preamble, importing this module (in a job server's child:
        # the waiting job process's, which went through them)
        startup = jobserver.CLIENT_STARTUP if jobserver.IN_CHILD else process_age()
        torch = _timed_imports(model_code)
        torch.set_num_threads(max(1, int(smk.threads)))
        runtime = (getattr(smk, "config", None) or {}).get("runtime") or {}
        label = job_label(getattr(smk, "rule", "job"), getattr(smk, "wildcards", None))
        t_body = time.perf_counter()
        with Heartbeat(label, old[1], runtime.get("progress_seconds", PROGRESS_SECONDS)):
            yield
        if log_path:  # phases of this job, for benchmarks/pipeline_overhead.py
            atomic_json(log_path.with_suffix(".timing.json"),
                        {"job": label, "job_server": jobserver.IN_CHILD, "startup": startup, **PHASES,
                         "body": time.perf_counter() - t_body, "cpu": process_cpu()})
    except Exception as e:
        line = user_error_line(e)
        if line is None:
            raise
        line = f"qbench: error in rule {getattr(smk, 'rule', '?')}: {line}"
        if stream:
            print(line, file=sys.stderr)  # the log; the terminal gets it below
    finally:
        if slot:
            slot.release()
        if stream:
            sys.stdout, sys.stderr = old
            stream.close()
    if line:
        print(line, file=sys.stderr)
        sys.exit(1)
