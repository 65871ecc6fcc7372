"""The terminal heartbeat of pipeline jobs (issue 13: progress a person can see)."""
import io
import time

from tqdm.auto import tqdm

from qbench.progress import Heartbeat, describe_bar, job_label, status_line


def test_status_line_names_job_and_innermost_bars():
    outer = tqdm(total=30, desc="awq", file=io.StringIO())
    inner = tqdm(total=4, desc="clip", file=io.StringIO())
    hidden = tqdm(total=9, desc="quiet", disable=True)
    try:
        outer.update(12)
        inner.update(1)
        line = status_line("quantize smollm2-135m/w4-awq-g64", time.time() - 95)
        assert line.startswith("[qbench] quantize smollm2-135m/w4-awq-g64 · 1m35s · ")
        assert "awq 12/30 (40%, eta " in line and "clip 1/4 (25%" in line
        assert line.index("awq") < line.index("clip")  # outer before inner
        assert "quiet" not in line
    finally:
        for b in (outer, inner, hidden):
            b.close()
    assert "awq" not in status_line("x", time.time())  # closed bars are gone


def test_bar_without_total():
    bar = tqdm(desc="windows", file=io.StringIO())
    bar.update(3)
    try:
        assert describe_bar(bar) == "windows 3"
    finally:
        bar.close()


def test_heartbeat_writes_periodically_and_stops():
    out = io.StringIO()
    with Heartbeat("eval_ppl m/r", out, interval=0.05):
        time.sleep(0.3)
    n = out.getvalue().count("[qbench] eval_ppl m/r")
    assert n >= 2
    time.sleep(0.15)
    assert out.getvalue().count("[qbench]") == n  # stopped with the job
    quiet = io.StringIO()
    with Heartbeat("x", quiet, interval=0):
        time.sleep(0.1)
    assert quiet.getvalue() == ""


def test_job_label():
    assert job_label("quantize", ["smollm2-135m", "w4-awq-g64"]) == "quantize smollm2-135m/w4-awq-g64"
    assert job_label("report_index", None) == "report_index"
