"""File-name lists shipped with the package (copies of the reference repositories' lists; sources
and checks in README.md here). Name one in a reader's ``list_file`` as ``"builtin:<name>"``, e.g.
``open_dataset("cityscapes", root, "train", list_file="builtin:cityscapes_train_ClsConfSet")``."""
from __future__ import annotations

import os

PREFIX = "builtin:"
SUFFIX = ".lst"
_DIR = os.path.dirname(os.path.abspath(__file__))


def names() -> list[str]:
    """The names of the shipped lists."""
    return sorted(f[: -len(SUFFIX)] for f in os.listdir(_DIR) if f.endswith(SUFFIX))


def find(name: str) -> str | None:
    """The file of the shipped list ``name`` (with or without the ``builtin:`` prefix), or None."""
    name = name[len(PREFIX):] if name.startswith(PREFIX) else name
    return os.path.join(_DIR, name + SUFFIX) if name in names() else None
