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
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        old = None
        if out.exists() or out.is_symlink():
            old = out.with_name(f"{out.name}.old-{uuid.uuid4().hex[:8]}")
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


def atomic_json(path: str | Path, obj) -> None:
    """Write JSON to a temp file in the same directory and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


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
