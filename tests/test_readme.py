"""The README is true where a claim is mechanical:

* every repository path it names (in code, code blocks and links) exists — run outputs
  (``results/``, ``resources/``, ``runs/``, ``logs/``, ...) and placeholders (``{model}``,
  ``<device>``) excepted;
* every ``qbench`` command it shows exists and its options parse; every
  ``snakemake --configfile X`` names a file that exists;
* every figure it quotes from the committed report is written as a link to the report table it comes
  from, ``[20.53](reports/smollm2-135m/tables/perplexity.csv#fp:ppl_wiki)`` (row key : column;
  ``_`` stands for a space; ``#rows`` = the number of rows), and equals that cell of the
  committed table (read now, so the check follows a regenerated report) at the precision quoted.
"""
import csv
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from qbench.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
#: what a run writes (in its output directory), not files of the repository
RUN_OUTPUTS = ("results/", "resources/", "runs/", "logs/", ".snakemake", "benchmarks/out/", "report.html",
               ".venv/")
PLACEHOLDER = re.compile(r"[{}<>…]|\.\.\.|OUT|DIR|PATH|REPORT|CHECKPOINT")
FIGURE = re.compile(r"\[\**(?P<text>-?[0-9][0-9.,]*)\**\]\((?P<file>reports/[^)#\s]+)#(?P<ref>[^)\s]+)\)")


def _tracked_tops() -> set[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return {f.split("/")[0] for f in out.split()}


def _code_spans() -> list[str]:
    blocks = re.findall(r"```[a-z]*\n(.*?)```", README, re.S)
    prose = re.sub(r"```[a-z]*\n.*?```", "", README, flags=re.S)
    return blocks + re.findall(r"`([^`\n]+)`", prose)


def _named_paths() -> set[str]:
    tops = _tracked_tops()
    words = {w for span in _code_spans() for w in re.split(r"[\s=,;()\[\]|'\"]+", span)}
    words |= set(re.findall(r"\]\(([^)#\s]+)", README))  # link targets
    paths = set()
    for w in words:
        w = w.rstrip(".:")
        if not w or w.startswith(RUN_OUTPUTS) or PLACEHOLDER.search(w) or "://" in w:
            continue
        if w.split("/")[0] in tops and (w != w.split("/")[0] or w in {"Snakefile", "config.yaml", "pyproject.toml"}
                                        or "/" in w):
            paths.add(w)
        elif re.fullmatch(r"test_\w+\.py", w):
            paths.add(f"tests/{w}")
    return paths


def test_every_path_the_readme_names_exists():
    paths = _named_paths()
    assert {"kernels/", "docs/DEVELOPING.md", "tools/setup.sh", "configs/llama31-8b.yaml"} <= paths  # it finds them
    missing = sorted(p for p in paths if not (list(ROOT.glob(p)) if "*" in p else (ROOT / p).exists()))
    assert missing == []


def _qbench_commands() -> list[list[str]]:
    """Every ``qbench ...`` command line in the README's code (bracketed optional parts and
    comments dropped; ``a|b`` alternatives of a subcommand expanded)."""
    out = []
    for span in _code_spans():
        for line in span.splitlines():
            m = re.search(r"(?:^|\s|/)qbench ([a-z].*)", line)
            if not m or line.lstrip().startswith("#"):
                continue
            cmd = re.sub(r"\s#.*$", "", m.group(1))
            cmd = re.sub(r"\[[^\]]*\]", "", cmd).strip()
            words = shlex.split(cmd)
            if len(words) >= 2 and "|" in words[1] and words[0] == "eval":
                out += [["eval", alt, *words[2:]] for alt in words[1].split("|")]
            else:
                out.append(words)
    return out


def test_every_qbench_command_exists_and_parses():
    cmds = _qbench_commands()
    parser = build_parser()
    subs = next(a for a in parser._actions if a.dest == "cmd").choices
    evals = next(a for a in subs["eval"]._actions if a.dest == "what").choices
    seen = set()
    for words in cmds:
        assert words[0] in subs, words
        seen.add(words[0])
        if words[0] == "eval" and len(words) > 1:
            assert words[1] in evals, words
            seen.add(f"eval {words[1]}")
        if len(words) > 2 or (len(words) == 2 and words[0] != "eval"):  # a full command line: it parses
            parser.parse_args(words)
    # the README names every step's command
    assert {"calib-stats", "quantize", "eval kv", "eval tasks", "eval chat", "eval stats", "eval speed",
            "eval ppl", "report"} <= seen


def test_every_configfile_the_readme_names_exists():
    files = set(re.findall(r"--configfile\s+([^\s`]+)", README))
    assert files
    assert sorted(f for f in files if not PLACEHOLDER.search(f) and not (ROOT / f).exists()) == []


def _table(path: Path) -> tuple[list[str], list[list[str]]]:
    text = path.read_text()
    if path.suffix == ".csv":
        rows = list(csv.reader(text.splitlines()))
        return rows[0], rows[1:]
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    return rows[0], [r for r in rows[2:] if r != rows[0]]


def _norm(s: str) -> str:
    return re.sub(r"[\s_]+", " ", s.strip().strip("`*")).lower()


def _cell(path: Path, ref: str) -> float:
    head, rows = _table(path)
    if ref == "rows":
        return len(rows)
    key, col = ref.split(":", 1)
    cols = [_norm(h) for h in head]
    assert _norm(col) in cols, f"{path.name}: no column {col!r} (columns: {head})"
    match = [r for r in rows if _norm(r[0]) == _norm(key)]
    assert len(match) == 1, f"{path.name}: {len(match)} rows named {key!r}"
    return float(match[0][cols.index(_norm(col))].strip("*` "))


def test_figures_quoted_from_the_report_are_the_committed_reports():
    figures = list(FIGURE.finditer(README))
    assert len(figures) >= 20
    wrong = []
    for m in figures:
        text = m["text"].replace(",", "")
        decimals = len(text.split(".")[1]) if "." in text else 0
        got = _cell(ROOT / m["file"], m["ref"])
        if round(got, decimals) != pytest.approx(float(text), abs=10 ** -(decimals + 3)):
            wrong.append(f"{m['file']}#{m['ref']}: README {text}, report {got:.{decimals + 2}f}")
    assert wrong == []
