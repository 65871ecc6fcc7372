"""A warm interpreter that runs the pipeline's jobs in forked children (``runtime.job_server``).

Every pipeline job is a fresh Python process, and before it does any work it imports torch,
qbench and transformers' modeling code (with ``torch._dynamo``, sympy and scipy that it pulls
in): ~6 s of CPU per job on this project's 2-core machine, ~400 s over the default run's 63 jobs,
a fifth of all its job CPU. Those imports are the same in every job, so a local run starts one
**job server** (``onstart`` in the Snakefile) that imports them once and then, for each job,
``fork()``s a child that inherits the imported modules and runs the job's script:

* the job's process (Snakemake's ``python .snakemake/scripts/tmp….py``) reaches
  :func:`qbench.workflow.job` before any heavy import and calls :func:`delegate`: it connects to
  the server's Unix socket and sends its argv, working directory and environment with its stdin,
  stdout and stderr (``SCM_RIGHTS``), then waits;
* the server forks; the child takes over those three descriptors, the directory and the
  environment and runs the same script file (``runpy``), whose ``job()`` now runs the body in
  this process (:data:`IN_CHILD`); its exit status goes back to the waiting process, which exits
  with it. SIGINT/SIGTERM/SIGHUP sent to the waiting process are forwarded to the child.

Same code, same inputs, same thread count: the records are what an in-process job writes (the
job's ``.timing.json`` says ``job_server: true``; its ``cpu`` is the child's own, without the
imports it inherited). Whenever the server cannot be reached (not started, already gone, a SLURM
job, a job of another machine) the job runs in its own process as before; a job that fails in
the child fails as it would have in its own process. The server exits when Snakemake stops it
(``onsuccess``/``onerror``), when the Snakemake process that started it is gone, or after
``IDLE_SECONDS`` without jobs.

Run by hand: ``python -m qbench.jobserver SOCKET`` (``--idle`` seconds, ``--parent`` PID).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .fsutil import pid_alive

#: the environment variable naming the server's socket (set for the jobs by :func:`start`)
ENV = "QBENCH_JOB_SERVER"
#: True in a job running in a forked child of the server (its ``job()`` must not delegate again)
IN_CHILD = False
#: in a server child: the job process's age when it sent the job (interpreter start + Snakemake's
#: preamble: the job's ``startup`` phase, which the child itself did not go through)
CLIENT_STARTUP: float | None = None
IDLE_SECONDS = 900
#: set in a child's environment (and so in anything it starts): never delegate from there
_CHILD_ENV = "QBENCH_JOB_SERVER_CHILD"
_HEADER = struct.Struct("!Q")
_FORWARD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def preload() -> None:
    """What every model-building job imports (:func:`qbench.workflow._timed_imports`)."""
    import torch  # noqa: F401
    import transformers.modeling_utils  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401 - the default model's code (lazy otherwise)
    from transformers import AutoTokenizer  # noqa: F401

    from . import api  # noqa: F401
    from .methods.base import available_methods

    available_methods()


# ----------------------------------------------------------------------------- the job's side
def _read_line(conn: socket.socket, buf: bytearray) -> dict | None:
    while b"\n" not in buf:
        chunk = conn.recv(4096)
        if not chunk:
            return None
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return json.loads(line)


def delegate() -> int | None:
    """Run this job (this process's script) in a child of the job server; its exit status, or
    None when no server takes it (then the caller runs the job itself)."""
    path = os.environ.get(ENV)
    if not path or IN_CHILD or os.environ.get(_CHILD_ENV) or os.environ.get("SLURM_JOB_ID"):
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(10)
        conn.connect(path)
        from .progress import process_age

        req = json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ),
                          "startup": process_age()}).encode()
        socket.send_fds(conn, [_HEADER.pack(len(req))], [0, 1, 2])
        conn.sendall(req)
        buf = bytearray()
        started = _read_line(conn, buf)
    except (OSError, ValueError):
        conn.close()
        return None
    if not started or "pid" not in started:  # the server refused or died before forking
        conn.close()
        return None
    pid = started["pid"]

    def forward(signum, frame):
        _kill(pid, signum)

    for s in _FORWARD:
        signal.signal(s, forward)
    conn.settimeout(None)
    done = None
    while done is None:
        try:
            done = _read_line(conn, buf)
            break
        except InterruptedError:  # a forwarded signal: keep waiting for the child's status
            continue
    conn.close()
    if not done or "status" not in done:
        print(f"qbench: the job server ({path}) ended while it ran this job (child {pid})", file=sys.stderr)
        return 1
    code = int(done["status"])
    return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell reports it


# ----------------------------------------------------------------------------- the server
def _recv_request(conn: socket.socket) -> tuple[dict, list[int]]:
    head, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
    if len(head) != _HEADER.size or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise ValueError("malformed request")
    (n,) = _HEADER.unpack(head)
    data = bytearray()
    while len(data) < n:
        chunk = conn.recv(min(1 << 16, n - len(data)))
        if not chunk:
            raise ValueError("truncated request")
        data += chunk
    return json.loads(data), fds


def _run_child(req: dict, fds: list[int]) -> None:
    """In the forked child: become the job's process and run its script; never returns."""
    global IN_CHILD, CLIENT_STARTUP
    code = 1
    try:
        for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):  # as in a fresh interpreter
            signal.signal(s, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        os.environ[_CHILD_ENV] = "1"
        sys.argv = list(req["argv"])
        IN_CHILD, CLIENT_STARTUP = True, req.get("startup")
        import runpy

        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
    finally:
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except Exception:
                pass
        os._exit(code)


def serve(path: str, idle: float = IDLE_SECONDS, parent: int | None = None, timing: str | None = None) -> None:
    """Preload, listen on ``path`` and fork a child per job until stopped (SIGTERM), idle for
    ``idle`` seconds, or ``parent`` is gone. A child whose job process went away (killed: its
    connection closed) is killed too, as it would have died with its own process."""
    import selectors

    from .memory import tune_malloc

    tune_malloc()  # inherited by every child, as an in-process job sets it first thing
    t0 = time.perf_counter()
    preload()
    if timing:  # the one-off cost the served jobs no longer pay (benchmarks/pipeline_overhead.py)
        from .fsutil import atomic_json

        cpu = os.times()
        atomic_json(timing, {"job": "job_server", "preload": time.perf_counter() - t0, "cpu": cpu.user + cpu.system})
    sys.stdout.flush()
    sys.stderr.flush()
    stop = []
    signal.signal(signal.SIGTERM, lambda s, f: stop.append(s))
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = f"{path}.{os.getpid()}"
    srv.bind(tmp)
    os.rename(tmp, path)  # the socket appears only when it accepts jobs
    srv.listen(64)
    sel = selectors.DefaultSelector()
    sel.register(srv, selectors.EVENT_READ)
    running: dict[int, socket.socket] = {}
    last = time.monotonic()
    try:
        while not stop:
            for key, _ in sel.select(timeout=0.1):  # finished children are reported within this
                if key.fileobj is srv:
                    _accept(srv, sel, running)
                else:  # a job process's connection: readable only when it closed (the process died)
                    pid = key.data
                    try:
                        gone = key.fileobj.recv(1) == b""
                    except OSError:
                        gone = True
                    if gone:
                        sel.unregister(key.fileobj)
                        _kill(pid, signal.SIGKILL)
                last = time.monotonic()
            while running:  # report finished children
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                conn = running.pop(pid, None)
                if conn is not None:
                    try:
                        sel.unregister(conn)
                    except (KeyError, ValueError):
                        pass
                    try:
                        conn.sendall(json.dumps({"status": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
                    except OSError:
                        pass
                    conn.close()
                last = time.monotonic()
            if not running and (time.monotonic() - last > idle
                                or (parent is not None and not pid_alive(parent))):
                break
    finally:
        srv.close()
        try:
            os.unlink(path)
            os.rmdir(os.path.dirname(path))  # start()'s private directory (only if empty)
        except OSError:
            pass
        for pid in running:  # stopped while jobs ran (Snakemake gave up): they end with it
            _kill(pid, signal.SIGTERM)


def _accept(srv: socket.socket, sel, running: dict) -> None:
    """Take one job: read its request, fork its child, tell the job process the child's pid."""
    import selectors

    conn, _ = srv.accept()
    try:
        conn.settimeout(10)
        req, fds = _recv_request(conn)
    except (OSError, ValueError):
        conn.close()
        return
    pid = os.fork()
    if pid == 0:
        srv.close()
        for other in running.values():
            other.close()
        conn.close()
        _run_child(req, fds)
    for fd in fds:
        os.close(fd)
    try:
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    except OSError:
        pass
    running[pid] = conn
    sel.register(conn, selectors.EVENT_READ, pid)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass




# ----------------------------------------------------------------------------- Snakefile hooks
_server: dict = {}


def wanted(enabled: bool, local_exec: bool, gpus: int) -> bool:
    """Whether a run starts a server: ``runtime.job_server`` on, jobs executed on this machine,
    and no job that may use a GPU (``runtime.gpus`` 0, or no NVIDIA GPU here): a CUDA driver
    touched in the server before ``fork()`` (transformers' imports may query the devices) does not
    work in its children, so GPU runs keep one fresh process per job."""
    if not (enabled and local_exec):
        return False
    if gpus == 0:
        return True
    from .gpu import physical_gpus

    return not physical_gpus()


def start(log_file: str | Path, timeout: float = 120.0) -> str | None:
    """Start a server for this (Snakemake) process and export its socket to the jobs
    (:data:`ENV`); waits until it accepts jobs. Returns the socket path, or None (the jobs then
    run in their own processes) when it did not come up within ``timeout`` seconds."""
    d = tempfile.mkdtemp(prefix="qbench-jobs-")  # a short path: Unix socket paths are limited
    path = os.path.join(d, "sock")
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        # in Snakemake's process group (no new session): a signal to the group (Ctrl-C, a kill of
        # the whole run) reaches the server and the jobs it runs, as it reaches in-process jobs
        proc = subprocess.Popen([sys.executable, "-m", "qbench.jobserver", path, "--parent", str(os.getpid()),
                                 "--timing", str(log_file.with_suffix(".timing.json"))],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    t0 = time.monotonic()
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() - t0 > timeout:
            if proc.poll() is None:
                proc.terminate()
            print(f"[qbench] job server did not start (see {log_file}); jobs run in their own processes",
                  file=sys.stderr)
            return None
        time.sleep(0.1)
    _server.update(proc=proc, dir=d, path=path)
    os.environ[ENV] = path
    return path


def stop() -> None:
    """Stop the server :func:`start` started (if any) and stop exporting its socket."""
    os.environ.pop(ENV, None)
    proc = _server.pop("proc", None)
    if proc is None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    p = _server.pop("path", None)
    if p and os.path.exists(p):
        os.unlink(p)
    try:
        os.rmdir(_server.pop("dir"))
    except OSError:
        pass


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m qbench.jobserver", description=__doc__.split("\n\n")[0])
    ap.add_argument("socket")
    ap.add_argument("--idle", type=float, default=IDLE_SECONDS, help="exit after this many seconds without jobs")
    ap.add_argument("--parent", type=int, default=None, help="exit when this process is gone")
    ap.add_argument("--timing", default=None, help="write the preload's wall and CPU seconds here (JSON)")
    a = ap.parse_args(argv)
    serve(a.socket, a.idle, a.parent, a.timing)


if __name__ == "__main__":
    # run as ``python -m``: this file is ``__main__``; the jobs' ``job()`` reads the flags of the
    # imported ``qbench.jobserver``, so serve from that module
    from qbench.jobserver import main as _main

    _main()
