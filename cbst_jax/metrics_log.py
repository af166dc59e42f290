"""The run's log: ``metrics.jsonl``, append-only JSON lines a user reads (one row per stage and
kind; a resumed run that repeats a phase appends the same key again, and readers keep the last
row of each key), and TensorBoard scalars. Only process 0 writes. Also how a row's numbers become
JSON values (:func:`jsonable`)."""
from __future__ import annotations

import json
import os

import numpy as np


class MetricsLog:
    """Append-only JSON lines at ``path`` + optional TensorBoard events in the folder
    ``tensorboard`` (its events file is opened on the first scalars written)."""

    def __init__(self, path: str, tensorboard: str | None, enabled: bool = True):
        self.path, self.tensorboard = path, tensorboard
        self.enabled = enabled
        self._tensorboard = enabled and tensorboard is not None
        self._tb = None

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(jsonable(row)) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def scalars(self, tag_prefix: str, step: int, values: dict) -> None:
        if self._tensorboard and self._tb is None:
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(self.tensorboard)
            except ImportError:  # the lent GPU image has no tensorboardX: jsonl only
                self._tensorboard = False
        if self._tb is not None:
            for k, v in values.items():
                if np.isscalar(v) and np.isfinite(v):
                    self._tb.add_scalar(f"{tag_prefix}/{k}", float(v), step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def jsonable(x):
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x
