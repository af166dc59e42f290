"""Run state on disk: an orbax ``CheckpointManager`` holding the train state (params, frozen BN
statistics, optimiser state, step, RNG) and a JSON ``meta`` item (round, phase, data-iterator
state, pseudo-label manifest, ...).

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a run
killed while saving leaves the previous checkpoint intact; the half-written folder is ignored
and cleaned up on the next start. Paths are made absolute (orbax refuses relative ones).
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


def abstract_like(state):
    """Shapes, dtypes and shardings of ``state`` (take it before the state is donated)."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


class RunCheckpoints:
    """Numbered checkpoints of one run; ``save`` is synchronous (a returned save is on disk)."""

    def __init__(self, directory: str, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=False,
                                               cleanup_tmp_directories=True)
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest(self) -> int | None:
        return self._mngr.latest_step()

    def save(self, index: int, state, meta: dict) -> None:
        self._mngr.save(index, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)), force=True)
        self._mngr.wait_until_finished()

    def restore_meta(self, index: int | None = None) -> dict | None:
        index = self.latest() if index is None else index
        if index is None:
            return None
        return self._mngr.restore(index, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, like_state, index: int | None = None):
        """Restores (state, meta); ``like_state`` gives structure, shapes, dtypes and shardings.
        A checkpoint of another architecture fails with a one-line error naming the mismatch."""
        index = self.latest() if index is None else index
        abstract = jax.tree.map(
            lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else ocp.utils.to_shape_dtype_struct(x), like_state)
        try:
            out = self._mngr.restore(index, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"checkpoint {self.directory}/{index} does not match this model's "
                             f"state (another architecture or class count?): {first[:300]}") from None
        return out["state"], out["meta"]
