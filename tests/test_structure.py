"""The drawn structure holds: no import cycles, method modules independent of each other, nothing
outside the method modules knows a method's name, every module importable on its own, and the
report's row labels come from the methods' descriptors and equal the committed report's."""
import ast
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PKG = SRC / "qbench"


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _type_checking(node) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(name: str) -> set[str]:
    """qbench modules ``name`` imports anywhere (module level or inside functions)."""
    tree = ast.parse(MODULES[name].read_text())
    pkg = name if _is_package(name) else name.rpartition(".")[0]
    skip = {id(n) for t in ast.walk(tree) if _type_checking(t) for n in ast.walk(t)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "qbench"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "qbench":
                continue
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
            out |= set(subs) if subs and len(subs) == len(node.names) else {target, *subs}
    return {m for m in out if m in MODULES and m != name}


GRAPH = {m: imports_of(m) for m in MODULES}


def _cycles(graph) -> list[list[str]]:
    out, state, stack = [], {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                out.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return out


def test_no_import_cycles_anywhere():
    """Module-level and function-level imports alike: knowledge flows one way."""
    assert _cycles(GRAPH) == []


def test_cycle_detector_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_layers_only_import_downwards():
    below = {  # a module of these packages never imports one of the listed ones
        "qbench.quant": ("qbench.modules", "qbench.methods", "qbench.eval", "qbench.api", "qbench.report",
                         "qbench.records", "qbench.checkpoint"),
        "qbench.modules": ("qbench.methods", "qbench.eval", "qbench.api", "qbench.report", "qbench.records",
                           "qbench.checkpoint"),
        "qbench.methods": ("qbench.eval", "qbench.api", "qbench.report", "qbench.records", "qbench.checkpoint"),
        "qbench.checkpoint": ("qbench.eval", "qbench.api", "qbench.report", "qbench.records"),
        "qbench.records": ("qbench.eval", "qbench.api", "qbench.report"),
        "qbench.eval": ("qbench.api", "qbench.report", "qbench.cli"),
        "qbench.report": ("qbench.api", "qbench.eval", "qbench.cli"),
    }
    bad = [(m, t) for m, deps in GRAPH.items() for layer, banned in below.items()
           if m == layer or m.startswith(layer + ".") for t in deps if t.startswith(banned)]
    assert bad == []


def _method_modules() -> list[str]:
    return [m for m in MODULES if m.startswith("qbench.methods.") and m.rpartition(".")[2] not in ("base", "common")]


def test_method_modules_import_no_other_method_module():
    shared = {"qbench.methods", "qbench.methods.base", "qbench.methods.common"}
    bad = {m: sorted(d for d in GRAPH[m] if d.startswith("qbench.methods") and d not in shared)
           for m in _method_modules()}
    assert {m: d for m, d in bad.items() if d} == {}


def _string_constants(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def test_no_code_outside_the_method_modules_names_a_method():
    """No dispatch on method names: outside ``qbench/methods/<method>.py`` no string literal in
    the library (docstrings aside) or the workflow is a registered method's name."""
    from qbench.methods.base import available_methods

    names = set(available_methods())
    own = {MODULES[m] for m in _method_modules()}
    files = [p for p in MODULES.values() if p not in own] + sorted((ROOT / "workflow").rglob("*.py"))
    hits = {str(p.relative_to(ROOT)): sorted(names & set(_string_constants(p))) for p in files}
    assert {k: v for k, v in hits.items() if v} == {}


def test_report_contains_no_method_names():
    from qbench.methods.base import available_methods

    for p in (PKG / "report").glob("*.py"):
        text = p.read_text()
        assert [n for n in available_methods() if n in text] == [], p


def test_every_module_imports_alone_in_a_fresh_interpreter():
    """Each module imported first thing in its own interpreter (an import cycle or an upward
    import shows up as an ImportError here). One interpreter per package keeps it cheap: the
    first import of each module in it is checked, in an order where every module comes first
    at least once (``sys.modules`` is cleared of qbench between imports)."""
    code = (
        "import importlib, sys\n"
        "bad = []\n"
        "for name in sys.argv[1:]:\n"
        "    for m in [m for m in sys.modules if m == 'qbench' or m.startswith('qbench.')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as e:\n"
        "        bad.append(f'{name}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    p = subprocess.run([sys.executable, "-c", code, *MODULES], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]


# ----------------------------------------------------------------------------- report rows
GOLDEN = json.loads((ROOT / "tests/data/describe_golden.json").read_text())
HEAD = ("family", "method", "W", "A", "KV", "QS", "group")


@pytest.mark.parametrize("key", sorted(GOLDEN))
def test_descriptor_rows_equal_the_rows_before_descriptors(key):
    """``describe_golden.json``: every configured recipe's row labels as the report computed them
    from method names before the refactor (issue 12); descriptors give the same labels."""
    from qbench.methods.base import describe_recipe, resolve_recipe

    assert describe_recipe(resolve_recipe(GOLDEN[key]["recipe"])) == GOLDEN[key]["describe"]


def _cell(v):
    """A table cell as pandas writes it (a column with gaps turns 4 into 4.0)."""
    s = "" if v is None else str(v)
    try:
        return float(s)
    except ValueError:
        return s


def test_committed_report_rows_come_from_descriptors():
    """The committed report's perplexity table: its label columns are what the descriptors say."""
    from qbench.methods.base import describe_recipe

    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    recipes = cfg["recipes"]
    rows = list(csv.DictReader((ROOT / "reports/smollm2-135m/tables/perplexity.csv").open()))
    assert {r["recipe"] for r in rows} == set(cfg["select"]["recipes"])  # the committed default run
    for row in rows:
        d = describe_recipe(recipes[row["recipe"]])
        cols = [c for c in HEAD if c in row]  # a column no selected recipe fills is not written
        got = {c: _cell(d.get(c)) for c in cols}
        assert got == {c: _cell(row[c]) for c in cols}, row["recipe"]


def _schema_defaults(node, path=""):
    """Every ``default`` the config schema states, by dotted key (``corpora.*``, ``export.*``)."""
    out = {}
    if "$ref" in node:
        return out
    for key, sub in (node.get("properties") or {}).items():
        if "default" in sub:
            out[f"{path}{key}"] = sub["default"]
        out.update(_schema_defaults(sub, f"{path}{key}."))
    for child in ("additionalProperties", "items"):
        if isinstance(node.get(child), dict):
            out.update(_schema_defaults(node[child], f"{path}*."))
    return out


def test_defaults_live_once_and_the_schema_agrees():
    """Every default is written once, in the config schema; every Python entry point of a step (the
    functions the workflow scripts and the commands call) defaults to the schema's value for its
    key; the rules read no default of their own."""
    import dataclasses
    import inspect
    import re

    from qbench import api, defaults
    from qbench.data.corpora import build_corpus
    from qbench.eval import chat, kv_memory, needle, speed, stats, tasks
    from qbench.eval.ppl import perplexity
    from qbench.export.gguf import export_gguf
    from qbench.report.published import DEFAULT_TOLERANCE

    def param(f, name):
        v = inspect.signature(f).parameters[name].default
        return list(v) if isinstance(v, tuple) else v

    task_fields = {f.name: f.default for f in dataclasses.fields(tasks.TaskOptions)}
    python = {  # schema key -> [(entry point, its parameter)]
        "eval.ppl.seqlen": [(perplexity, "seqlen"), (api.evaluate_ppl, "seqlen"), (api.evaluate_ppl_text, "seqlen")],
        "eval.ppl.max_windows": [(api.evaluate_ppl, "max_windows"), (api.evaluate_ppl_text, "max_windows")],
        "eval.ppl.dtype": [(api.evaluate_ppl, "dtype"), (api.evaluate_ppl_text, "dtype")],
        "eval.ppl.batch_size": [(api.evaluate_ppl, "batch_size"), (api.evaluate_ppl_text, "batch_size")],
        "eval.ppl.kv_protocol": [(api.evaluate_ppl, "kv_protocol"), (api.evaluate_ppl_text, "kv_protocol")],
        "eval.kv.dtype": [(api.evaluate_kv, "dtype")],
        **{f"eval.kv.needle.{k}": [(needle.run_needle, k)] for k in
           ("context_lengths", "depths", "needles", "needle_template", "max_new_tokens", "prefill_with_quant")},
        "eval.kv.memory.context_lengths": [(kv_memory.kv_memory, "context_lengths")],
        **{f"eval.chat.{k}": [(chat.evaluate_chat, k)] for k in ("prompts", "max_new_tokens", "system", "dtype")},
        "eval.chat.max_new_tokens": [(chat.evaluate_chat, "max_new_tokens"), (chat.chat, "max_new_tokens")],
        **{f"eval.stats.{k}": [(stats.evaluate_stats, k)] for k in ("n_windows", "seqlen", "outlier_k", "dtype")},
        **{f"eval.speed.{k}": [(speed.evaluate_speed, k)] for k in
           ("prefill", "prompt", "steps", "batches", "repeats", "dtype")},
        "runtime.quantize_dtype": [(api.quantize, "dtype"), (api.calib_stats, "dtype")],
        "corpora.*.eval_fraction": [(build_corpus, "eval_fraction")],
        "corpora.*.seed": [(build_corpus, "seed")],
        "export.*.float_type": [(export_gguf, "float_type")],
        "export.*.require_exact": [(export_gguf, "require_exact")],
    }
    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    stated = _schema_defaults(schema)
    for key, uses in python.items():
        for f, name in uses:
            assert param(f, name) == stated[key], (key, f.__qualname__, name)
    for key in ("mmlu_subset", "cloze_n", "wikitext_max_docs", "num_fewshot", "limit", "batch_size",
                "max_length", "dtype"):
        assert task_fields[key] == stated[f"eval.tasks.{key}"], key
    from qbench.workflow import PROGRESS_SECONDS

    assert PROGRESS_SECONDS == stated["runtime.progress_seconds"]
    assert {"ppl": DEFAULT_TOLERANCE["ppl"], "acc": DEFAULT_TOLERANCE["acc"]} == \
        {k: stated[f"published.tolerance.{k}"] for k in ("ppl", "acc")}
    # every evaluation default the schema states has a Python reader checked above (or is a
    # rule-only key: runtime resources, the published file, the gpus, the job server)
    rule_only = {k for k in stated if re.match(r"runtime\.(threads|mem_mb|minutes|gpus|job_server)|published\.file|\w+$"
                                              r"|eval\.\w+\.(recipes|tasks|corpora)$", k)}
    checked = set(python) | {f"eval.tasks.{k}" for k in task_fields} | {
        "published.tolerance.ppl", "published.tolerance.acc", "runtime.progress_seconds"}
    assert set(stated) - checked - rule_only == set()
    assert defaults.PPL_SEQLEN == stated["eval.ppl.seqlen"] and defaults.EVAL["speed"]["batches"] == [1, 16]
    assert tuple(schema["properties"]["eval"]["properties"]["ppl"]["properties"]["dtype"]["enum"]) == \
        defaults.DTYPE_NAMES
    # the rules take every default from qbench.defaults.settings, none of their own
    for smk in (ROOT / "workflow/rules").glob("*.smk"):
        text = smk.read_text()
        # (the stats corpus defaults to the first perplexity corpus: derived, not a literal)
        assert not re.search(r"""\.get\(["'][a-z_]+["'], (?!PPL_CORPORA\[0\]\))""", text), smk.name
    literal = [p for p in MODULES.values() if p.name != "defaults.py" and "2048)" in p.read_text()
               and "seqlen" in p.read_text() and "= 2048" in p.read_text()]
    assert literal == []


def test_config_errors_are_one_type():
    from qbench import errors
    from qbench.methods import base

    assert base.ConfigError is errors.ConfigError and issubclass(errors.ConfigError, ValueError)
    assert str(errors.config_error("a.b", 3, (1, 2))) == "a.b=3: allowed values are 1, 2"
