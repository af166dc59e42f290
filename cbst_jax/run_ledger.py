"""The run ledger: what a workdir holds, and where a killed run resumes.

A run is a fixed sequence of stages (``cbst_jax.methods.stages``: the source model, then every
method's rounds). For each stage the ledger knows whether it is *trained* (its final train
state is checkpointed), *labelled* (its pseudo-label store is complete) and *evaluated* (its
evaluation row is recorded), and it owns everything on disk that says so:

* ``config.json``: the configuration that wrote the workdir; another configuration is refused
  (the keys that only say how a process joins a multi-host run aside);
* ``checkpoints/source``: the source model (round 0), once it is final;
* ``checkpoints/rounds``: the last two checkpoints of the run: training progress inside a stage
  (train state, data-iterator position, recent losses) and the final state of each stage, whose
  metadata lists the stages trained so far;
* ``models/<stage>.npz``: each trained stage's network as a weights file with its metadata
  (architecture, classes, normalisation: ``cbst_jax.models.save_variables``), written before
  the stage's final checkpoint, for evaluation, export and inference of any stage;
* ``pseudo_labels/<method>/round_<r>``: each stage's pseudo-label store (complete once its
  manifest is written);
* ``ledger.json``: the rows recorded per stage (pseudo-label statistics, evaluation), which the
  reports are made from; ``metrics.jsonl`` (and TensorBoard events, :attr:`log`) the append-only
  log a user reads, which the ledger never reads back.

The loop asks "is this stage trained / labelled / evaluated?", "what training progress is
there?", and tells "progress", "stage trained", "row recorded"; checkpoint numbering and the
metadata layout stay in here. Every file is written by process 0 only, and every question about
files is answered by process 0 for all processes (``sharding.agree``), so all processes take the
same branches. Paths stored on disk are relative to the workdir.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax

from cbst_jax import checkpointing, reporting
from cbst_jax import sharding as shd
from cbst_jax.atomic_files import atomic_write_bytes, atomic_write_json
from cbst_jax.errors import RunError
from cbst_jax.methods import SOURCE, Stage
from cbst_jax.pseudo_label_store import PseudoLabelStore

# Keys that say how this process joins a multi-host run, not what the run computes: they differ
# between the processes of one run (process_id) and between launches (the coordinator's port).
LAUNCH_KEYS = ("process_id", "coordinator_address")
LEDGER_FILE = "ledger.json"


@dataclasses.dataclass
class Progress:
    """A stage's training, part done: resume at ``step`` with the iterator at ``iterator``."""
    state: object
    step: int
    iterator: dict
    recent_losses: list


@dataclasses.dataclass
class Trained:
    """A trained stage's final state and what its training reported."""
    state: object
    steps: int | None
    train_loss: float | None


class RunLedger:
    def __init__(self, workdir: str, config):
        self.workdir = workdir
        check_workdir_config(config, workdir)
        self.log = reporting.MetricsLog(workdir, enabled=jax.process_index() == 0)
        self._source = checkpointing.RunCheckpoints(os.path.join(workdir, "checkpoints", "source"), max_to_keep=1)
        self._rounds = checkpointing.RunCheckpoints(os.path.join(workdir, "checkpoints", "rounds"), max_to_keep=2)
        latest = self._rounds.restore_meta()
        self._latest = latest
        self._done = set(latest.get("done", [])) if latest else set()
        self._rows = self._read_rows()

    # ------------------------------------------------------------------ questions
    def trained(self, stage: Stage) -> bool:
        if stage == SOURCE:
            return shd.agree(self._source.latest() is not None)
        return shd.agree(stage.key in self._done)

    def labelled(self, stage: Stage) -> bool:
        return shd.agree(self.pseudo_labels(stage).complete())

    def recorded(self, stage: Stage, kind: str) -> bool:
        return shd.agree(kind in self._rows.get(stage.key, {}))

    def rows(self, kind: str) -> list[dict]:
        """The recorded rows of one kind ("eval", "pseudo_labels"), in the run's stage order."""
        return [rows[kind] for rows in self._rows.values() if kind in rows]

    def stage_weights(self, stage: Stage) -> str:
        """The weights file of a trained stage (``models/source.npz``, ``models/cbst_r2.npz``)."""
        name = "source" if stage == SOURCE else f"{stage.method}_r{stage.round}"
        return os.path.join(self.workdir, "models", f"{name}.npz")

    def pseudo_labels(self, stage: Stage) -> PseudoLabelStore:
        return PseudoLabelStore(os.path.join(self.workdir, "pseudo_labels", stage.method, f"round_{stage.round}"))

    def progress(self, stage: Stage, like) -> Progress | None:
        """The training progress of ``stage`` if the newest checkpoint holds some (``like``: a
        state of the stage's structure, for shapes, dtypes and shardings)."""
        meta = self._latest
        if meta is None or meta.get("stage") != stage.key or meta.get("phase") != "train":
            return None
        state, meta = self._rounds.restore(like)
        return Progress(state, int(meta["step"]), meta["iterator"], list(meta.get("recent_losses", [])))

    def source_state(self, like):
        state, _ = self._source.restore(like)
        return state

    def trained_state(self, stage: Stage, like) -> Trained:
        """The final state of the newest trained stage ``stage`` (older ones are not kept)."""
        meta = self._rounds.restore_meta()
        if meta is None or meta.get("stage") != stage.key or meta.get("phase") != "done":
            raise RunError(f"{self._rounds.directory}: the final checkpoint of stage {stage.key} is not the "
                           f"newest one; it is needed to go on (use --fresh to start over)")
        state, meta = self._rounds.restore(like)
        return Trained(state, meta.get("steps"), meta.get("train_loss"))

    def last_checkpoint(self) -> str:
        """The newest checkpoint on disk, for messages."""
        index = self._rounds.latest()
        if index is not None:
            return os.path.join(self._rounds.directory, str(index))
        index = self._source.latest()
        return "none yet" if index is None else os.path.join(self._source.directory, str(index))

    # ------------------------------------------------------------------ what happened
    def save_progress(self, stage: Stage, state, step: int, iterator: dict, recent_losses: list) -> None:
        self._save_round(state, {"stage": stage.key, "phase": "train", "step": int(step), "iterator": iterator,
                                 "recent_losses": list(recent_losses), "done": sorted(self._done)})

    def stage_trained(self, stage: Stage, state, metadata: dict, steps: int | None = None,
                      train_loss: float | None = None) -> None:
        """The stage's weights file (``metadata``: its weights-file metadata), then its final
        checkpoint, which makes the stage trained."""
        if jax.process_index() == 0:
            from cbst_jax import models

            variables = {"params": state.params, "batch_stats": state.batch_stats}
            os.makedirs(os.path.dirname(self.stage_weights(stage)), exist_ok=True)
            models.save_variables(self.stage_weights(stage), jax.tree.map(shd.replicated_to_host, variables),
                                  dict(metadata, stage=stage.key))
        if stage == SOURCE:
            self._source.save(0, state, {"stage": stage.key, "phase": "done"})
            return
        self._done.add(stage.key)
        self._save_round(state, {"stage": stage.key, "phase": "done", "done": sorted(self._done), "steps": steps,
                                 "train_loss": train_loss})

    def record(self, stage: Stage, row: dict) -> None:
        """Logs ``row`` (``metrics.jsonl``, then the ledger): a kill in between repeats the row
        in the log on resume, and readers of the log keep the last row of each key."""
        self.log.write(row)
        self._rows.setdefault(stage.key, {})[row["kind"]] = reporting.jsonable(row)
        if jax.process_index() == 0:
            atomic_write_json(os.path.join(self.workdir, LEDGER_FILE), {"stages": self._rows})

    # ------------------------------------------------------------------ internals
    def _save_round(self, state, meta: dict) -> None:
        self._rounds.save((self._rounds.latest() or 0) + 1, state, meta)
        self._latest = meta

    def _read_rows(self) -> dict:
        path = os.path.join(self.workdir, LEDGER_FILE)
        if not os.path.exists(path):
            return {}
        with open(path) as f:
            return json.load(f)["stages"]


def _launch_free(config_dict: dict) -> dict:
    return {k: v for k, v in config_dict.items() if k not in LAUNCH_KEYS}


def check_workdir_config(config, workdir: str) -> None:
    """Refuses to resume a workdir written by a different configuration (launch keys aside);
    records the configuration of a new one."""
    path = os.path.join(workdir, "config.json")
    mine = _launch_free(json.loads(config.to_json(sort_keys=True)))
    if os.path.exists(path):
        with open(path) as f:
            old = _launch_free(json.load(f))
        if old != mine:
            diff = [k for k, v in _flat(mine).items() if _flat(old).get(k) != v]
            raise RunError(f"{workdir} holds a run with another configuration (differs in {', '.join(diff[:4])}); "
                           f"use another --workdir or --fresh")
    elif jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        atomic_write_bytes(path, json.dumps(mine, sort_keys=True, indent=1).encode())


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
