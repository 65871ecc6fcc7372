"""Progress a person can see while a pipeline runs.

A Snakemake job sends its stdout/stderr (and the library's tqdm bars) to the rule's log file, so
the terminal would only show Snakemake's "N of M steps done" between rule blocks. A job therefore
also runs a :class:`Heartbeat`: a daemon thread that, every ``interval`` seconds, writes one line
to the terminal (the process's stderr as it was before the redirection) naming the job, its
elapsed time and the innermost live progress bar, e.g.::

    [qbench] quantize w4-awq-g64 · 2m40s · awq 12/30 (40%, eta 4m00s)

Any tqdm bar the library or lm-eval opens is read (``tqdm._instances``), so no call site has to
report anything. Lines start only after the first interval: short jobs print nothing.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import TextIO

#: seconds this process spent in named overhead phases (``load``: reading a model or checkpoint,
#: ``save``: writing one); the job wrapper writes them beside the job's log for
#: ``benchmarks/pipeline_overhead.py``
PHASES: dict[str, float] = {}


@contextlib.contextmanager
def timed(name: str):
    """Add the time spent in the block to ``PHASES[name]``."""
    t = time.perf_counter()
    try:
        yield
    finally:
        PHASES[name] = PHASES.get(name, 0.0) + time.perf_counter() - t


def process_age() -> float | None:
    """Seconds since this process started (Linux ``/proc``), None where unknown."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return time.time() - (btime + start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _fmt(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def live_bars() -> list:
    """The enabled tqdm bars of this process, outermost first (by creation order)."""
    try:
        from tqdm.std import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency of transformers
        return []
    bars = [b for b in list(getattr(tqdm, "_instances", [])) if not getattr(b, "disable", True)]
    return sorted(bars, key=lambda b: getattr(b, "start_t", 0.0))


def describe_bar(bar) -> str:
    """``desc n/total (pct, eta)`` of one bar; ``desc n`` when its total is unknown."""
    desc = (getattr(bar, "desc", "") or "").rstrip(": ") or "step"
    n, total = getattr(bar, "n", 0), getattr(bar, "total", None)
    if not total:
        return f"{desc} {n}"
    text = f"{desc} {n}/{total} ({100.0 * n / total:.0f}%"
    elapsed = time.time() - getattr(bar, "start_t", time.time())
    if 0 < n < total and elapsed > 0:
        text += f", eta {_fmt(elapsed * (total - n) / n)}"
    return text + ")"


def status_line(label: str, started: float) -> str:
    """The heartbeat line: job label, elapsed time and every live bar (outer → inner)."""
    parts = [f"[qbench] {label}", _fmt(time.time() - started)]
    parts += [describe_bar(b) for b in live_bars()]
    return " · ".join(parts)


class Heartbeat:
    """Context manager: one :func:`status_line` on ``stream`` every ``interval`` seconds (0 = off)."""

    def __init__(self, label: str, stream: TextIO, interval: float = 20.0):
        self.label, self.stream, self.interval = label, stream, float(interval)
        self._stop = threading.Event()
        self._thread = None
        self.started = time.time()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.stream.write(status_line(self.label, self.started) + "\n")
                self.stream.flush()
            except Exception:  # a closed terminal must never fail the job
                return

    def __enter__(self):
        self.started = time.time()
        if self.interval > 0 and self.stream is not None:
            self._thread = threading.Thread(target=self._run, name="qbench-heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)


def job_label(rule: str, wildcards) -> str:
    """``rule value/value`` from a Snakemake job's rule name and wildcard values (e.g.
    ``quantize smollm2-135m/w4-awq-g64``)."""
    values = [str(v) for v in (wildcards or [])]
    return f"{rule} {'/'.join(values)}".strip()
