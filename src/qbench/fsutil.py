"""Atomic file-system writes shared by every step that produces a directory or a record."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a fresh sibling temp dir ``<out_dir>.tmp-XXXX``; on success it replaces ``out_dir``
    (an existing ``out_dir`` is moved aside first, then deleted), on any error it is removed — so a
    half-written directory is never seen under ``out_dir``."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        old = None
        if out.exists() or out.is_symlink():
            old = out.with_name(f"{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temps(out: Path) -> None:
    """Remove ``<out>.tmp-<pid>-*`` / ``<out>.old-*`` siblings left by a process that was killed
    (``kill -9``, power loss: no ``except`` ran). Temps of a process still alive are kept; they
    are never at ``out`` itself, so nothing reads them either way."""
    for kind in ("tmp", "old"):
        for p in out.parent.glob(f"{out.name}.{kind}-*"):
            pid = p.name[len(out.name) + len(kind) + 2:].split("-", 1)[0]
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    for p in out.parent.glob(f".{out.name}.tmp-*"):  # atomic_json's temp files
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            p.unlink(missing_ok=True)


def atomic_json(path: str | Path, obj, what: str | None = None) -> None:
    """Write strict JSON (no NaN/inf: :func:`qbench.errors.strict_json_dumps`) to a temp file in
    the same directory and rename it into place. A non-finite value raises before anything is
    written, so a previous file at ``path`` is left as it was."""
    from .errors import strict_json_dumps

    path = Path(path)
    text = strict_json_dumps(obj, what or str(path), indent=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def canonical_safetensors_header(path: str | Path) -> None:
    """Rewrite a safetensors file's JSON header with its ``__metadata__`` keys sorted, in place.

    The safetensors writer keeps the metadata in a hash map whose iteration order is randomised
    per process, so the same tensors saved with two or more metadata keys give files with
    different bytes — and a different sha256 in the checkpoint manifest — from run to run. The
    sorted header has exactly the same length (same entries, compact JSON, the writer's trailing
    padding kept), so only the header bytes change and tensor offsets stay valid."""
    path = Path(path)
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw)
        meta = header.get("__metadata__")
        if not meta or len(meta) < 2:
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        body = raw.rstrip(b" ")
        if len(new) != len(body):  # not the writer's compact JSON: leave the file as it is
            raise ValueError(f"{path}: unexpected safetensors header layout")
        f.seek(8)
        f.write(new + raw[len(body):])
