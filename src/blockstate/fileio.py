"""Atomic file writes: the one helper every writer of run, benchmark and export files uses.

A file is written to a temporary sibling (`.NAME.PID.tmp`) and renamed over its destination, so a
reader (or a run killed mid-write) sees the old file or the new one, never a torn one. `durable`
also flushes the data and the directory entry to disk (checkpoint pointers, metrics rewrites).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Persist a directory's entries (a rename inside it); a no-op where directories cannot be
    opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes | str | Callable[[Path], None],
                 durable: bool = False) -> Path:
    """Write `data` (bytes, UTF-8 text, or a function that writes the file at the path it is
    given) to `path` atomically; the parent directory must exist. Returns `path`."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if isinstance(data, bytes):
            temporary.write_bytes(data)
        elif isinstance(data, str):
            temporary.write_text(data, encoding="utf-8")
        else:
            data(temporary)
        if durable:
            fsync_file(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    if durable:
        fsync_dir(path.parent)
    return path


def sha256_file(path: str | Path, block_bytes: int = 1 << 22) -> str:
    """sha256 hex of a file's bytes, read in blocks (OSError when it cannot be read)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(block_bytes):
            digest.update(block)
    return digest.hexdigest()


__all__ = ["atomic_write", "fsync_dir", "fsync_file", "sha256_file"]
