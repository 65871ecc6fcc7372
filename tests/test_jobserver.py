"""The job server (runtime.job_server, qbench.jobserver): a job script run through it behaves as
the same script in its own process — output, log, exit status, user-error line, traceback — and
dies with its job process; without a server the job runs in its own process."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

SCRIPT = """
import os, sys, time
from types import SimpleNamespace
from qbench.workflow import job
smk = SimpleNamespace(log=[os.path.abspath("job.log")], rule="eval_ppl", threads=1, resources={})
with job(smk):
    import torch
    print("body", os.environ["MARK"], os.getcwd() == os.environ["WANT_CWD"], torch.get_num_threads())
    open("pid", "w").write(str(os.getpid()))
    sys.__stdout__.write("on the job's stdout\\n")
    what = os.environ.get("WHAT")
    if what == "user":
        from qbench.errors import ConfigError
        raise ConfigError("eval.ppl.seqlen=1: must be at least 2")
    if what == "bug":
        raise RuntimeError("a bug")
    if what == "exit3":
        sys.exit(3)
    if what == "sleep":
        time.sleep(60)
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from qbench import jobserver

    d = tmp_path_factory.mktemp("jobserver")
    path = jobserver.start(d / "server.log")
    assert path and os.environ[jobserver.ENV] == path
    yield path
    jobserver.stop()
    assert jobserver.ENV not in os.environ and not os.path.exists(path)


def run_job(tmp_path, what="", wait=True):
    (tmp_path / "job.py").write_text(SCRIPT)
    env = {**os.environ, "MARK": "m-1", "WANT_CWD": str(tmp_path), "WHAT": what}
    p = subprocess.Popen([sys.executable, "job.py"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    if not wait:
        return p
    out, err = p.communicate(timeout=120)
    return p.returncode, out, err


def test_a_served_job_is_the_same_job(server, tmp_path):
    rc, out, err = run_job(tmp_path)
    assert rc == 0, err
    assert out.strip() == "on the job's stdout"  # the body's prints went to the log, as in-process
    assert "body m-1 True 1" in (tmp_path / "job.log").read_text()
    timing = json.loads((tmp_path / "job.timing.json").read_text())
    assert timing["job_server"] is True and timing["imports"] < 0.5 and timing["startup"] > 0
    assert int((tmp_path / "pid").read_text()) != os.getpid()


@pytest.mark.parametrize("what,code,line", [
    ("user", 1, "qbench: error in rule eval_ppl: eval.ppl.seqlen=1: must be at least 2"),
    ("bug", 1, "RuntimeError: a bug"),
    ("exit3", 3, None),
])
def test_failures_keep_their_exit_status_and_message(server, tmp_path, what, code, line):
    rc, _, err = run_job(tmp_path, what)
    assert rc == code
    if line:
        assert err.strip().splitlines()[-1] == line


def test_the_job_dies_with_its_process(server, tmp_path):
    for sig in (signal.SIGKILL, signal.SIGTERM):
        (tmp_path / "pid").unlink(missing_ok=True)
        p = run_job(tmp_path, "sleep", wait=False)
        t0 = time.monotonic()
        while not (tmp_path / "pid").exists():
            assert time.monotonic() - t0 < 60 and p.poll() is None
            time.sleep(0.05)
        child = int((tmp_path / "pid").read_text())
        os.kill(p.pid, sig)
        p.communicate(timeout=30)
        t0 = time.monotonic()
        while os.path.exists(f"/proc/{child}") and open(f"/proc/{child}/stat").read().split(")")[1].split()[0] != "Z":
            assert time.monotonic() - t0 < 10, f"child {child} outlived its job process ({sig!r})"
            time.sleep(0.05)


def test_without_a_server_the_job_runs_in_its_own_process(tmp_path, monkeypatch):
    from qbench import jobserver

    monkeypatch.setenv(jobserver.ENV, str(tmp_path / "no-such-socket"))
    assert jobserver.delegate() is None
    rc, _, err = run_job(tmp_path)
    assert rc == 0, err
    assert json.loads((tmp_path / "job.timing.json").read_text())["job_server"] is False


def test_a_server_only_for_local_cpu_runs(monkeypatch):
    from qbench import gpu, jobserver

    assert jobserver.wanted(True, True, 0) and not jobserver.wanted(False, True, 0)
    assert not jobserver.wanted(True, False, 0)  # cluster executor
    monkeypatch.setattr(gpu, "physical_gpus", lambda: [])
    assert jobserver.wanted(True, True, 1)
    monkeypatch.setattr(gpu, "physical_gpus", lambda: [gpu.Gpu("0", "GPU-aaaa", "H100")])
    assert not jobserver.wanted(True, True, 1)
