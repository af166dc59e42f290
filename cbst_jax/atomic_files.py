"""Writes that never leave a half-written file: the content goes to a temporary name in the
same folder (``<name>.tmp<pid>``), is flushed to disk, and is renamed over the destination
(``os.replace`` is atomic on POSIX), so a reader or a resumed run sees either the old file or
the new one. A process killed between the write and the rename leaves its temporary file
behind; :func:`remove_stale_temporaries` removes those when the next run starts."""
from __future__ import annotations

import json
import os
import re
from typing import Callable

from cbst_jax.failpoints import failpoint

_TEMPORARY = re.compile(r"\.tmp\d+$")  # the names atomic_write gives its temporary files


def atomic_write(path: str, write: Callable) -> None:
    """``write(fileobj)`` fills a temporary file that then replaces ``path``."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        failpoint("atomic_write.before_rename")
        failpoint(f"atomic_write.before_rename@{os.path.join(*path.split(os.sep)[-2:])}")  # e.g. @predictions/x.npz
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path: str, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def is_temporary(name: str) -> bool:
    """Whether a file name is one :func:`atomic_write` gives its temporary files."""
    return bool(_TEMPORARY.search(name))


def remove_stale_temporaries(root: str) -> list[str]:
    """Removes every file under ``root`` named as :func:`atomic_write` names its temporary files,
    left there by a process killed between a write and its rename; returns their paths. Only
    while no writer can be live (a run holding the workdir's lock, before it writes)."""
    removed = []
    for folder, _, files in os.walk(root):
        for name in files:
            if is_temporary(name):
                path = os.path.join(folder, name)
                os.remove(path)
                removed.append(path)
    return sorted(removed)
