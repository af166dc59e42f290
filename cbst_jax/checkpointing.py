"""Training progress on disk: numbered orbax checkpoints of the train state (params, frozen BN
statistics, optimiser state, step, RNG) with a JSON ``meta`` item (stage, step, data-iterator
position, recent losses), and the digest that lets a reader verify one before trusting it.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a run
killed while saving leaves the previous checkpoints intact; a half-written folder is ignored
and removed (here, synchronously) when the folder is next opened. A save that fails (a full disk) removes its temporary folder
and raises :class:`CheckpointError` saying how much space the state needs. A restore that
fails (damaged files) raises :class:`CheckpointError` with one line instead of orbax's and
TensorStore's tracebacks. Orbax needs absolute paths: the directory is made absolute here and
stored nowhere.
"""
from __future__ import annotations

import hashlib
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from cbst_jax.failpoints import failpoint_during

TMP_MARKER = ".orbax-checkpoint-tmp"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message is one line."""


def abstract_like(state):
    """Shapes, dtypes and shardings of ``state`` (take it before the state is donated)."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def tree_nbytes(tree) -> int:
    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(tree)))


def directory_digest(path: str) -> str:
    """sha256 over every file under ``path`` (relative names and contents, in sorted order)."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, path).encode() + b"\0")
            with open(full, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


class RunCheckpoints:
    """Numbered checkpoints in one folder; ``save`` is synchronous (a returned save is on disk)."""

    def __init__(self, directory: str, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)
        if os.path.isdir(self.directory):  # before the manager: no write of this run is under way
            self._remove_partial()
        # orbax's own clean-up of temporary folders runs in a thread that close() does not join:
        # a run that stops right after opening its checkpoints would leave it running into the
        # interpreter's shutdown (a traceback after the run's one-line error).
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=False,
                                               cleanup_tmp_directories=False)
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def close(self) -> None:
        """Waits for the manager's outstanding work and closes it."""
        self._mngr.close()

    def indices(self) -> list[int]:
        """The checkpoints on disk, newest first."""
        return sorted(self._mngr.all_steps(), reverse=True)

    def path(self, index: int) -> str:
        return os.path.join(self.directory, str(index))

    def digest(self, index: int) -> str:
        return directory_digest(self.path(index))

    def save(self, index: int, state, meta: dict) -> str:
        """Writes checkpoint ``index``; returns its digest. Refused before anything is written
        when the disk has less free space than the state needs (orbax's failure inside a write
        leaves threads that keep reporting it)."""
        needed, free = int(1.1 * tree_nbytes(state)) + 2**20, shutil.disk_usage(self.directory).free
        if free < needed:
            raise CheckpointError(f"not enough space for checkpoint {self.path(index)}: it needs about "
                                  f"{needed / 2**20:.0f} MiB, {free / 2**20:.0f} MiB are free; the earlier "
                                  f"checkpoints are intact")
        failpoint_during("checkpoint.save")
        try:
            self._mngr.save(index, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                          meta=ocp.args.JsonSave(meta)), force=True)
            self._mngr.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - orbax/TensorStore raise many types; all mean "not written"
            self._remove_partial()
            free = shutil.disk_usage(self.directory).free
            raise CheckpointError(f"writing checkpoint {self.path(index)} failed ({_first_line(e)}); it needs about "
                                  f"{tree_nbytes(state) / 2**20:.0f} MiB, {free / 2**20:.0f} MiB are free; the "
                                  f"earlier checkpoints are intact") from None
        return self.digest(index)

    def restore(self, like_state, index: int):
        """(state, meta) of checkpoint ``index``; ``like_state`` gives structure, shapes, dtypes
        and shardings."""
        abstract = jax.tree.map(
            lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else ocp.utils.to_shape_dtype_struct(x), like_state)
        try:
            out = self._mngr.restore(index, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - a damaged or foreign checkpoint, whatever orbax raises
            raise CheckpointError(f"checkpoint {self.path(index)} cannot be read into this run's state "
                                  f"({_first_line(e)})") from None
        return out["state"], out["meta"]

    def delete_all_but(self, keep: set) -> None:
        for index in self.indices():
            if index not in keep:
                self._mngr.delete(index)

    def _remove_partial(self) -> None:
        for name in os.listdir(self.directory):
            if TMP_MARKER in name:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0][:300] if text else type(e).__name__)
