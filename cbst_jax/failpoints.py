"""Named kill points for fault-injection tests (the "failpoints" of databases such as etcd or
TiKV): a run started with ``CBST_JAX_FAILPOINT=<name>[:<n>]`` kills itself with SIGKILL the
n-th time (default 1st) it reaches ``failpoint(<name>)``, so a test can stop a run at an exact
place (while a checkpoint is written, between a pseudo-label file's write and its rename, ...)
and check that the same command resumes it to bit-identical results. Without the variable a
failpoint is one dictionary lookup. The points are listed in docs/reliability.md.
"""
from __future__ import annotations

import os
import signal
import threading

ENV = "CBST_JAX_FAILPOINT"


def _armed(name: str) -> bool:
    spec = os.environ.get(ENV, "")
    if not spec or spec.partition(":")[0] != name:
        return False
    target = int(spec.partition(":")[2] or 1)
    count = int(os.environ.get(f"{ENV}_SEEN", "0")) + 1
    os.environ[f"{ENV}_SEEN"] = str(count)
    return count == target


def failpoint(name: str) -> None:
    """Kills this process here if the run was started with this failpoint armed."""
    if _armed(name):
        os.kill(os.getpid(), signal.SIGKILL)


def failpoint_during(name: str, delay_s: float = 0.002) -> None:
    """Kills this process ``delay_s`` after this point, while the work that follows (e.g. a
    checkpoint write) is under way, if this failpoint is armed."""
    if _armed(name):
        threading.Timer(delay_s, os.kill, (os.getpid(), signal.SIGKILL)).start()
