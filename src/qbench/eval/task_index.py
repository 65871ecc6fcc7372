"""Task names checked at config-resolution time, before any job: lm-eval's task index and the
offline (``qbench_*``) tasks.

lm-eval's own index (``lm_eval.tasks.TaskManager()``) imports lm-eval and parses every task YAML:
measured 2.0 s import + 14.8 s indexing on the shared 2-core development machine (load ~4-6), too
slow for every ``snakemake`` start. So names are first looked up in a cheap scan of the
``task:``/``group:``/``tag:`` lines of the installed package's task YAMLs (no lm-eval import;
0.25 s warm, 1.6 s with a cold file cache, 13k names); only a name the scan does not find (tasks
built by ``include:`` or Python classes) falls back to the full TaskManager index, so a valid name
is never refused and an unknown one costs the full index once, at resolution time instead of
after a job has run.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
from functools import lru_cache

from ..errors import ConfigError
from .task_data import LOCAL_PREFIX, _slug, expand_tasks

__all__ = ["check_task_names", "lm_eval_task_names"]

_NAME_LINE = re.compile(r"^(?:task|group|tag)\s*:\s*(.+?)\s*$", re.M)


@lru_cache(maxsize=1)
def _scanned_names() -> frozenset[str]:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    names: set[str] = set()
    for loc in spec.submodule_search_locations:
        for dirpath, _dirs, files in os.walk(os.path.join(loc, "tasks")):
            for f in files:
                if not f.endswith((".yaml", ".yml")):
                    continue
                with open(os.path.join(dirpath, f), encoding="utf-8", errors="replace") as fh:
                    text = fh.read()
                for value in _NAME_LINE.findall(text):
                    for v in value.strip("[]").split(","):
                        v = v.strip().strip("'\"")
                        if v and not v.startswith(("!", "{", "$")):
                            names.add(v)
    return frozenset(names)


@lru_cache(maxsize=1)
def _task_manager_names() -> frozenset[str]:
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager().all_tasks)


def lm_eval_task_names(names: list[str]) -> list[str]:
    """The names among ``names`` that lm-eval does not know (cheap scan, then the full index)."""
    missing = [n for n in names if n not in _scanned_names()]
    if missing and importlib.util.find_spec("lm_eval") is not None:
        known = _task_manager_names()
        missing = [n for n in missing if n not in known]
    return missing


def check_task_names(tasks: list[str], corpora: list[str], key: str = "eval.tasks.tasks",
                     include_path: bool = False) -> list[str]:
    """Expand ``tasks`` (groups, ``{corpus}``) and check every name: offline tasks against their
    patterns and the configured ``corpora``, the rest against lm-eval's index. Returns the names;
    raises :class:`ConfigError` naming the first unknown one with close matches."""
    names = expand_tasks(tasks, corpora)
    slugs = {_slug(c): c for c in corpora}
    others = []
    for n in names:
        if not n.startswith(LOCAL_PREFIX):
            others.append(n)
            continue
        m = re.fullmatch(rf"{LOCAL_PREFIX}(cloze|wikitext)_(.+)", n)
        if m and m.group(2) not in slugs:
            raise ConfigError(f"{key}: task {n!r} names corpus {m.group(2)!r}, which is not in "
                              f"eval.tasks.corpora ({', '.join(corpora) or 'none'})")
        if not m and n != f"{LOCAL_PREFIX}mmlu" and not include_path:
            raise ConfigError(f"{key}: unknown offline task {n!r}; offline tasks: {LOCAL_PREFIX}mmlu, "
                              f"{LOCAL_PREFIX}cloze_<corpus>, {LOCAL_PREFIX}wikitext_<corpus>")
    if others and not include_path:
        if importlib.util.find_spec("lm_eval") is None:
            raise ConfigError(f"{key}: lm-eval is not installed, needed for task {others[0]!r}")
        missing = lm_eval_task_names(others)
        if missing:
            close = difflib.get_close_matches(missing[0], sorted(_scanned_names() | _task_manager_names()), n=3)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise ConfigError(f"{key}: unknown lm-eval task {missing[0]!r} (not in lm-eval's task index "
                              f"or the offline tasks){hint}")
    return names
