"""Writes that never leave a half-written file: the content goes to a temporary name in the
same folder, is flushed to disk, and is renamed over the destination (``os.replace`` is atomic
on POSIX), so a reader or a resumed run sees either the old file or the new one."""
from __future__ import annotations

import json
import os
from typing import Callable

from cbst_jax.failpoints import failpoint


def atomic_write(path: str, write: Callable) -> None:
    """``write(fileobj)`` fills a temporary file that then replaces ``path``."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        failpoint("atomic_write.before_rename")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path: str, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())
