"""What a run says to its user: the error it stops with when it cannot go on (non-finite loss,
inconsistent workdir, weights that do not fit), whose message is one line shown as is, and the
one-line notes about something it repaired."""
from __future__ import annotations

import sys


class RunError(RuntimeError):
    pass


def notice(message: str) -> None:
    """A one-line note to the user (process 0 only) about something the run repaired."""
    import jax

    if jax.process_index() == 0:
        print(f"note: {message}", file=sys.stderr, flush=True)
