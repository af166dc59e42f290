"""The error a run stops with when it cannot go on (non-finite loss, inconsistent workdir,
weights that do not fit): its message is one line, shown to the user as is."""


class RunError(RuntimeError):
    pass
