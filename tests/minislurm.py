"""A real single-node SLURM cluster in a temporary directory, for tests and by hand.

Uses Debian's packages (``munge``, ``slurmctld``, ``slurmd``, ``slurm-client``; SLURM 22.05 on
Debian 12) and needs root (slurmd runs jobs as their user). No systemd, no cgroups:
``proctrack/linuxproc``, ``task/none``, accounting off (``sacct`` does not work: status comes from
``squeue``; ``MinJobAge=7200`` keeps finished jobs listed for the checks). Two partitions hold
the one node: ``cpu`` (the default) and ``gpu``. With ``gpus > 0`` the node has a count-only GPU gres: ``gres.conf`` points at character
devices made with ``mknod`` (copies of /dev/null: SLURM insists on device files, and then exports
``CUDA_VISIBLE_DEVICES`` / ``SLURM_JOB_GPUS`` to each GPU job exactly as on a GPU node); where
``mknod`` is not allowed, at empty files (the count still works, the variables are not set).

Every daemon is started in the foreground (``-D`` / ``--foreground``) as a child of this process
and stopped by its pid. By hand::

    python tests/minislurm.py up /tmp/slurm      # prints the `export` line to use; Ctrl-C stops it
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("munge", "slurmctld", "slurmd", "slurm-client")
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "sinfo", "scontrol")


def missing_binaries() -> list[str]:
    return [b for b in DAEMONS if not shutil.which(b, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")]


def ensure_packages(log: Path | None = None) -> str | None:
    """Install the Debian packages when missing (root + apt-get). Returns None when the binaries
    are there, else the reason they are not (for a skip message)."""
    if not missing_binaries():
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return (f"SLURM binaries missing ({', '.join(missing_binaries())}) and cannot install "
                f"{' '.join(PACKAGES)}: needs root and apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    out = open(log, "ab") if log else subprocess.DEVNULL
    try:
        cmd = ["apt-get", "install", "-y", "-q", *PACKAGES]
        if subprocess.run(cmd, stdout=out, stderr=out, env=env).returncode != 0:
            subprocess.run(["apt-get", "update"], stdout=out, stderr=out, env=env)
            subprocess.run(cmd, stdout=out, stderr=out, env=env)
    finally:
        if log:
            out.close()
    if missing_binaries():
        return f"apt-get could not install {' '.join(PACKAGES)} (see {log or 'apt-get output'})"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbin(name: str) -> str:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or name


class Cluster:
    """One node (this machine) named after the short hostname, at 127.0.0.1."""

    def __init__(self, root: Path, cpus: int = 2, mem_mb: int = 4000, gpus: int = 2):
        self.root, self.cpus, self.mem_mb, self.gpus = Path(root), cpus, mem_mb, gpus
        self.node = socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.root / "slurm.conf"
        self.bin = self.root / "bin"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf),
                    "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}"}

    def write_config(self) -> None:
        r = self.root
        for sub in ("state", "spool", "log", "dev"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        key = r / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        gres_node, gres_conf = "", ""
        if self.gpus:
            for i in range(self.gpus):
                dev = r / "dev" / f"gpu{i}"
                if not dev.exists():
                    try:
                        os.mknod(dev, 0o666 | 0o020000, os.makedev(1, 3))  # a char device like /dev/null
                    except OSError:
                        dev.touch()
            gres_node = f" Gres=gpu:{self.gpus}"
            gres_conf = f"NodeName={self.node} Name=gpu File={r}/dev/gpu[0-{self.gpus - 1}]\n"
        self.conf.write_text(f"""\
ClusterName=qbench
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge.sock
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
{"GresTypes=gpu" if self.gpus else ""}
MinJobAge=7200
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.mem_mb}{gres_node} State=UNKNOWN
PartitionName=cpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=ALL Default=NO MaxTime=INFINITE State=UP
""")
        (r / "gres.conf").write_text(gres_conf)
        # The executor plugin runs each job's command through `srun` with every SLURM_* variable
        # but the job's identity removed, SLURM_CONF included; a real cluster's clients find
        # /etc/slurm/slurm.conf, this one's config lives here: the shim puts SLURM_CONF back.
        self.bin.mkdir(exist_ok=True)
        shim = self.bin / "srun"
        shim.write_text(f'#!/bin/sh\nSLURM_CONF={self.conf} exec {shutil.which("srun") or "srun"} "$@"\n')
        shim.chmod(0o755)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=log, env=self.env, start_new_session=True)
        log.close()

    def start(self, timeout: float = 60) -> "Cluster":
        self.write_config()
        r = self.root
        try:
            self._spawn("munged", [_sbin("munged"), "--foreground", "--force", f"--socket={r}/munge.sock",
                                   f"--key-file={r}/munge.key", f"--log-file={r}/log/munged.log",
                                   f"--pid-file={r}/munged.pid", f"--seed-file={r}/munged.seed"])
            self._wait(lambda: (r / "munge.sock").exists(), timeout, "munged")
            self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._wait(lambda: self.run("scontrol", "ping").returncode == 0, timeout, "slurmctld")
            self._spawn("slurmd", [_sbin("slurmd"), "-D", "-f", str(self.conf), "-N", self.node])
            self._wait(lambda: "idle" in self.run("sinfo", "-h", "-o", "%T").stdout, timeout, "slurmd")
        except Exception:
            self.stop()
            raise
        return self

    def _wait(self, ok, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.procs.get(what)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}: {self.logs()}")
            if ok():
                return
            time.sleep(0.3)
        raise RuntimeError(f"{what} not ready after {timeout:.0f}s: {self.logs()}")

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            parts.append(f"--- {f.name}\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    def run(self, *cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), capture_output=True, text=True, env=self.env, timeout=60)

    def jobs(self) -> list[dict]:
        """Every job slurmctld still knows (finished ones stay MinJobAge = 7200 s), as key=value
        dicts from ``scontrol show job --oneliner``."""
        out = self.run("scontrol", "show", "job", "--oneliner").stdout
        jobs = []
        for line in out.splitlines():
            if not line.strip() or line.startswith("No jobs"):
                continue
            fields = {}
            for tok in line.split():
                if "=" in tok:
                    k, v = tok.split("=", 1)
                    fields[k] = v
            jobs.append(fields)
        return jobs

    def stop(self) -> None:
        """Cancel this cluster's jobs (their slurmstepd would outlive slurmd), then stop the daemons
        this object started, by pid (slurmd, slurmctld, munged)."""
        if self.procs.get("slurmctld") is not None and self.procs["slurmctld"].poll() is None:
            try:
                self.run("scancel", "--full", "--user", str(os.getuid()))
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and self.run("squeue", "-h", "-t", "R,CG,PD").stdout.strip():
                    time.sleep(0.5)
            except (OSError, subprocess.SubprocessError):
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":  # pragma: no cover - manual use
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "up":
        sys.exit("usage: python tests/minislurm.py up DIR")
    why = ensure_packages()
    if why:
        sys.exit(why)
    def _stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    with Cluster(Path(sys.argv[2])) as c:
        print(f"export SLURM_CONF={c.conf} PATH={c.bin}:$PATH   # Ctrl-C (or SIGTERM) stops the daemons",
              flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
