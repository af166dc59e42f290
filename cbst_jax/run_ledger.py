"""The run ledger: what a workdir holds, what of it can be trusted, and where a killed run resumes.

A run is a fixed sequence of stages (``cbst_jax.methods.stages``: the source model, then every
method's rounds). For each stage the ledger knows whether it is *trained*, *labelled* and
*evaluated*, and it owns everything in a seed's folder that says so (where each file lies:
``cbst_jax.workdir``):

* the index ``ledger.json`` (written atomically, by process 0 only): per stage the trained
  network's weights file with its sha256, steps and final loss, the recorded rows (pseudo-label
  statistics, evaluation, health) and the sha256 of the files the stage owns besides its weights
  (kept predictions, the round's pseudo-label figure: ``outputs``); per training checkpoint its
  stage, step and digest; the history of restarts with changed settings (``resume_from_stage``);
  the workdir layout it was written in (``version``: ``cbst_jax.workdir.LAYOUT``; another is
  refused);
* each trained stage's network as a weights file with its metadata (architecture, classes,
  normalisation: ``cbst_jax.models.save_variables``), for the next round, evaluation, export and
  inference;
* the training checkpoints: progress inside the current stage (the last two: train state,
  data-iterator position, recent losses, loss-window means; ``cbst_jax.checkpointing``), each
  with the digest of the pseudo-labels it trained on (a round's checkpoint is resumed only on
  those);
* each round's pseudo-label store, complete once its manifest (with every file's sha256) is
  written;
* each online round's final online state (student, teacher, optimiser, threshold window, RNG),
  recorded with its digest in the round's ``trained`` entry: the next online round starts from
  it, and a round whose state is missing or damaged counts as not trained;
* ``config.json``: the configuration that wrote the folder (the seed's, with its seed and
  city: :func:`cbst_jax.config_lib.seed_record`); another configuration is refused (launch keys
  aside), except for the optimiser, logging and collapse-guard settings a ``resume_from_stage``
  restart may change.

``metrics.jsonl`` and TensorBoard events (:attr:`log`) are the append-only log a user reads; the
ledger never reads them back. Everything read back is verified first: a weights file or a
checkpoint whose digest does not match is skipped with a one-line notice (the stage is trained
again, or training resumes from an older checkpoint: every batch and label is a pure function
of the seed, stage and step, so the results are the same), pseudo-label files are checked
against their manifest, a round's checkpoint is used only with the pseudo-labels it trained on,
and a stage's other files (``outputs``) against their recorded sha256 (a missing or damaged one
is made again). Every file is written by process 0 only, and every question about
files is answered by process 0 for all processes (``sharding.agree``). Paths stored on disk
are relative to the seed's folder, so a workdir can be moved or copied and resumed from its new
place.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time

import jax

from cbst_jax import checkpointing, metrics_log
from cbst_jax import sharding as shd
from cbst_jax.atomic_files import atomic_write_bytes, atomic_write_json
from cbst_jax.errors import RunError, notice
from cbst_jax.failpoints import failpoint
from cbst_jax.methods import SOURCE, Stage
from cbst_jax.pseudo_label_store import PseudoLabelStore
from cbst_jax.workdir import LAYOUT, LayoutError, RunDir, SeedDir, WorkdirError

# Keys that say how this process joins a multi-host run, not what the run computes: they differ
# between the processes of one run (process_id) and between launches (the coordinator's port).
LAUNCH_KEYS = ("process_id", "coordinator_address")
# What a restart from a finished stage (``resume_from_stage``) may change: how the stages after
# it are optimised and logged, and what the collapse guard does about them (after a stop: go on
# with on_collapse=warn, or other thresholds), never what they learn from.
REWIND_KEYS = ("resume_from_stage", "self_training.lr", "self_training.lr_round_decay", "self_training.schedule",
               "self_training.optimizer", "self_training.power", "self_training.warmup_steps",
               "self_training.warmup_ratio", "self_training.epochs_per_round", "self_training.steps_per_round",
               "self_training.reg_weight", "optim.momentum", "optim.weight_decay", "optim.head_lr_mult",
               "checkpoint_every", "log_every", "input.workers", "input.eval_batch_size",
               "self_training.on_collapse", "self_training.collapse_guard.min_share",
               "self_training.collapse_guard.share_fraction", "self_training.collapse_guard.loss_rise",
               "self_training.collapse_guard.loss_windows", "self_training.collapse_guard.entropy_fraction")


@dataclasses.dataclass
class Progress:
    """A stage's training, part done: resume at ``step`` with the iterator at ``iterator``, the
    last ``log_every`` losses and the logged loss-window means so far (``loss_windows``: empty
    in checkpoints written before they were kept)."""
    state: object
    step: int
    iterator: dict
    recent_losses: list
    loss_windows: list = dataclasses.field(default_factory=list)
    tally: dict | None = None  # an online round's pseudo-label tally so far (online_pseudo_labels.Tally.state)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class RunLedger:
    """The ledger of one seed's folder ``seed_dir``, written by the configuration ``record``
    (:func:`cbst_jax.config_lib.seed_record`) for the run's stages ``stage_order``."""

    def __init__(self, seed_dir: SeedDir, record: dict, stage_order: list[Stage]):
        self.seed_dir, self.order = seed_dir, list(stage_order)
        self._doc = self._read()
        rewind_to = check_workdir_config(record, seed_dir)
        self.log = metrics_log.MetricsLog(seed_dir.metrics, seed_dir.tensorboard, enabled=jax.process_index() == 0)
        self._checkpoints = checkpointing.RunCheckpoints(seed_dir.checkpoints, max_to_keep=2)
        self._verified: dict = {}
        if rewind_to:
            try:
                self._rewind(rewind_to, record)
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        """Closes the log and the checkpoint manager (waiting for its threads); every exit path
        of a run calls it, so no background work outlives the run."""
        self.log.close()
        self._checkpoints.close()

    # ------------------------------------------------------------------ questions
    def trained(self, stage: Stage) -> bool:
        """Trained, with a weights file that matches its recorded digest (an online round: and
        its online state, which the next round starts from)."""
        return shd.agree(self._weights_ok(stage) and self._online_state_ok(stage))

    def online_state(self, stage: Stage, like):
        """The online state a trained online round ended with (``like``: a state of its structure,
        for shapes, dtypes and shardings), read from its verified folder (``trained`` checked it)."""
        states = checkpointing.RunCheckpoints(self.seed_dir.online_state(stage), max_to_keep=1)
        try:
            return states.restore(like, 0)[0]
        except checkpointing.CheckpointError as e:
            raise RunError(f"{e} (its digest matched: another configuration's state, e.g. another "
                           f"self_training.optimizer after resume_from_stage)") from None
        finally:
            states.close()

    def labelled(self, stage: Stage) -> bool:
        """Labelled, with every pseudo-label file present and matching its manifest."""
        store = self.pseudo_labels(stage)
        if not store.complete():
            return shd.agree(False)
        problem = store.verify() if jax.process_index() == 0 else None
        if problem:
            notice(f"{problem}: the pseudo-labels of stage {stage.key} are made again")
        return shd.agree(problem is None)

    def recorded(self, stage: Stage, slot: str) -> bool:
        """Whether ``stage`` has a row in ``slot`` ("eval", "pseudo_labels", "eval+mst")."""
        return shd.agree(slot in self._stage_doc(stage))

    def rows(self, kind: str) -> list[dict]:
        """The recorded rows of one kind ("eval", "pseudo_labels"), in the run's stage order."""
        docs = self._doc["stages"]
        return [row for s in self.order for slot, row in docs.get(s.key, {}).items()
                if slot not in ("trained", "outputs") and row.get("kind") == kind]

    def trained_variables(self, stage: Stage) -> dict:
        """The variables of a trained stage, read from its verified weights file."""
        from cbst_jax import models

        if not self.trained(stage):
            raise RunError(f"stage {stage.key} is not trained in {self.seed_dir.path}")
        return models.load_variables(self.seed_dir.weights(stage))

    def training_summary(self, stage: Stage) -> dict:
        """``{"steps", "train_loss"}`` of a trained stage."""
        return {k: self._stage_doc(stage)["trained"].get(k) for k in ("steps", "train_loss")}

    def loss_windows(self, stage: Stage) -> list[float] | None:
        """The logged loss-window means of a trained stage (None: a ledger written before they
        were recorded)."""
        windows = self._stage_doc(stage)["trained"].get("loss_windows")
        return None if windows is None else [float(w) for w in windows]

    def pseudo_labels(self, stage: Stage) -> PseudoLabelStore:
        return PseudoLabelStore(self.seed_dir.pseudo_labels(stage))

    def labels_digest(self, stage: Stage) -> str | None:
        """sha256 over the file digests of a round's pseudo-label manifest (None for the source
        stage): what a round's training checkpoints trained on. An online round has no store: its
        checkpoints continue the state it started from, the recorded digest of the previous
        round's online state (of the source model's weights for round 0)."""
        if stage.round is None:
            return None
        if stage.online:
            before = SOURCE if stage.round == 0 else Stage(stage.method, stage.round - 1)
            trained = self._stage_doc(before).get("trained", {})
            return trained.get("online_state_sha256") or trained.get("sha256")
        files = self.pseudo_labels(stage).manifest().files
        return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()

    def progress(self, stage: Stage, like) -> Progress | None:
        """The newest training checkpoint of ``stage`` that verifies, trained on the round's
        current pseudo-labels, and restores (``like``: a state of the stage's structure, for
        shapes, dtypes and shardings); older ones are the fallback, each skipped one is named
        with the reason."""
        for index in self._candidates(stage):
            try:
                state, meta = self._checkpoints.restore(like, index)
            except checkpointing.CheckpointError as e:
                notice(f"{e}; trying an older one")
                continue
            return Progress(state, int(meta["step"]), meta["iterator"], list(meta.get("recent_losses", [])),
                            list(meta.get("loss_windows", [])), meta.get("tally"))
        return None

    def last_trained(self) -> Stage | None:
        """The latest stage of the run order that is trained (for messages)."""
        done = [s for s in self.order if "trained" in self._stage_doc(s)]
        return done[-1] if done else None

    def how_to_go_on(self) -> str:
        """What a user can do after a stop inside a stage (e.g. a non-finite loss)."""
        last = self.last_trained()
        if last is None:
            return "no stage has finished yet: rerun with --fresh and other settings (e.g. a lower learning rate)"
        return (f"the last finished stage is {last.key} ({self.seed_dir.relative(self.seed_dir.weights(last))}); "
                f"to go on from it with other optimiser settings rerun the same command with "
                f"--config.resume_from_stage={last.key} and the changed keys (e.g. --config.self_training.lr=...)")

    # ------------------------------------------------------------------ what happened
    def save_progress(self, stage: Stage, state, step: int, iterator: dict, recent_losses: list,
                      loss_windows=(), tally: dict | None = None) -> None:
        index = max([int(i) for i in self._doc["checkpoints"]] + self._checkpoints.indices() + [0]) + 1
        meta = {"stage": stage.key, "step": int(step), "iterator": iterator, "recent_losses": list(recent_losses),
                "loss_windows": list(loss_windows)}
        if tally is not None:
            meta["tally"] = tally
        labels = self.labels_digest(stage) if jax.process_index() == 0 else None
        digest = self._checkpoints.save(index, state, meta)
        kept = set(self._checkpoints.indices())
        self._doc["checkpoints"] = {k: v for k, v in self._doc["checkpoints"].items() if int(k) in kept}
        self._doc["checkpoints"][str(index)] = {"stage": stage.key, "step": int(step), "sha256": digest,
                                                "labels": labels}
        self._write()

    def stage_trained(self, stage: Stage, variables, metadata: dict, summary, online_state=None) -> None:
        """Writes the stage's weights file (``metadata``: its weights-file metadata) and records
        it with what its training did (``summary``: a ``cbst_jax.trainer.TrainingSummary``, its
        steps, final loss and logged loss-window means, the collapse guard's signal), which makes
        the stage trained; its training checkpoints are then dropped. An online round's
        ``online_state`` (student, teacher, optimiser, window, RNG: what the next round starts
        from) is written first, into its own folder, and recorded with its digest."""
        from cbst_jax import models

        path = self.seed_dir.weights(stage)
        digest, carried = None, {}
        if online_state is not None:
            folder = self.seed_dir.online_state(stage)
            if jax.process_index() == 0 and os.path.exists(folder):
                shutil.rmtree(folder)  # a kill between this write and the ledger's left it unrecorded
            shd.barrier("online-state-clear")
            states = checkpointing.RunCheckpoints(folder, max_to_keep=1)
            try:
                carried = {"online_state": self.seed_dir.relative(folder),
                           "online_state_sha256": states.save(0, online_state, {"stage": stage.key})}
            finally:
                states.close()
            self._verified[folder] = carried["online_state_sha256"]
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            host = jax.tree.map(shd.replicated_to_host, variables)
            try:
                models.save_variables(path, host, dict(metadata, stage=stage.key))
            except OSError as e:
                raise RunError(f"writing {path} failed ({e.strerror or e}); it needs about "
                               f"{checkpointing.tree_nbytes(host) / 2**20:.0f} MiB, "
                               f"{shutil.disk_usage(os.path.dirname(path)).free / 2**20:.0f} MiB are free") from None
            digest = file_sha256(path)
            self._verified[path] = digest
        failpoint("ledger.weights_written")
        self._stage_doc(stage)["trained"] = {"weights": self.seed_dir.relative(path), "sha256": digest,
                                             "steps": summary.steps, "train_loss": summary.loss,
                                             "loss_windows": list(summary.loss_windows), **carried}
        self._write()
        shd.barrier("stage-trained")
        self._checkpoints.delete_all_but(set())
        self._doc["checkpoints"] = {}
        self._write()

    def record(self, stage: Stage, row: dict, slot: str | None = None, outputs=()) -> None:
        """Logs ``row`` (``metrics.jsonl``, then the ledger, in ``slot``, default its kind): a
        kill in between repeats the row in the log on resume, and readers of the log keep the
        last row of each key. ``outputs``: files of the stage written before the row (kept
        predictions, figures), recorded with their sha256 in the same ledger write, so a row
        never counts without them."""
        self.log.write(row)
        failpoint("ledger.row_logged")
        self._note_outputs(stage, outputs)
        self._stage_doc(stage)[slot or row["kind"]] = metrics_log.jsonable(row)
        self._write()

    def record_outputs(self, stage: Stage, outputs) -> None:
        """Records files of a stage made again (``outputs``: their paths) with their sha256."""
        self._note_outputs(stage, outputs)
        self._write()

    def output_problem(self, stage: Stage, path: str) -> str | None:
        """None if ``path``, a file the stage owns, exists and matches the sha256 recorded when
        it was written (a workdir of an earlier version that recorded none: exists); else what
        is wrong, in one line. Process 0's answer for all processes."""
        problem = None
        if jax.process_index() == 0:
            recorded = self._stage_doc(stage).get("outputs", {}).get(self.seed_dir.relative(path))
            if not os.path.isfile(path):
                problem = f"{path} is missing"
            elif recorded is not None and file_sha256(path) != recorded:
                problem = f"{path} does not match the sha256 recorded when it was written (damaged)"
        if shd.agree(problem is None):
            return None
        return problem or f"{path} is missing or damaged (process 0's answer)"

    # ------------------------------------------------------------------ internals
    def _note_outputs(self, stage: Stage, outputs) -> None:
        if jax.process_index() == 0 and outputs:
            self._stage_doc(stage).setdefault("outputs", {}).update(
                {self.seed_dir.relative(p): file_sha256(p) for p in outputs})

    def _stage_doc(self, stage: Stage) -> dict:
        return self._doc["stages"].setdefault(stage.key, {})

    def _weights_ok(self, stage: Stage) -> bool:
        trained = self._stage_doc(stage).get("trained")
        if trained is None or jax.process_index() != 0:
            return trained is not None
        path = self.seed_dir.absolute(trained["weights"])
        if self._verified.get(path) == trained["sha256"]:
            return True
        if not os.path.exists(path):
            notice(f"{path} is missing: stage {stage.key} is trained again")
            return False
        if file_sha256(path) != trained["sha256"]:
            notice(f"{path} does not match the sha256 recorded when it was written (damaged): "
                   f"stage {stage.key} is trained again")
            return False
        self._verified[path] = trained["sha256"]
        return True

    def _online_state_ok(self, stage: Stage) -> bool:
        trained = self._stage_doc(stage).get("trained") or {}
        if "online_state" not in trained or jax.process_index() != 0:
            return True
        folder = self.seed_dir.absolute(trained["online_state"])
        if self._verified.get(folder) == trained["online_state_sha256"]:
            return True
        if not os.path.isdir(folder) or checkpointing.directory_digest(folder) != trained["online_state_sha256"]:
            notice(f"{folder} is missing or does not match the digest recorded when it was written: stage "
                   f"{stage.key} is trained again")
            return False
        self._verified[folder] = trained["online_state_sha256"]
        return True

    def _candidates(self, stage: Stage) -> list[int]:
        """Recorded checkpoints of ``stage``, newest first, whose files match their digest and
        which trained on the round's current pseudo-labels (process 0's answer for all processes)."""
        good = []
        if jax.process_index() == 0:
            on_disk = set(self._checkpoints.indices())
            labels = self.labels_digest(stage)
            for key in sorted(self._doc["checkpoints"], key=int, reverse=True):
                entry, index = self._doc["checkpoints"][key], int(key)
                if entry["stage"] != stage.key:
                    continue
                if entry.get("labels") != labels:
                    notice(f"checkpoint {self._checkpoints.path(index)} was trained on other pseudo-labels than "
                           f"the round's store; trying an older one")
                elif index not in on_disk:
                    notice(f"checkpoint {self._checkpoints.path(index)} is missing; trying an older one")
                elif self._checkpoints.digest(index) != entry["sha256"]:
                    notice(f"checkpoint {self._checkpoints.path(index)} does not match the digest recorded when "
                           f"it was written (damaged); trying an older one")
                else:
                    good.append(index)
        return shd.broadcast_ints(good)

    def _read(self) -> dict:
        doc = {"version": LAYOUT, "stages": {}, "checkpoints": {}, "history": []}
        try:
            doc.update(read_ledger(self.seed_dir) or {})
        except LayoutError as e:
            raise RunError(f"{e}; start over with --fresh, or use another --workdir") from None
        except WorkdirError as e:
            raise RunError(f"{e}; it indexes the run: restore it from a copy, or start over with --fresh") from None
        return doc

    def _write(self) -> None:
        if jax.process_index() == 0:
            atomic_write_json(self.seed_dir.ledger, self._doc)

    def _rewind(self, stage_key: str, record: dict) -> None:
        """A restart from finished stage ``stage_key`` with changed settings: everything of the
        stages after it is moved into ``rewound/<time>/`` (nothing is deleted) and the new
        configuration replaces ``config.json``."""
        keys = [s.key for s in self.order]
        if stage_key not in keys:
            raise RunError(f"config.resume_from_stage={stage_key!r}: expected one of this run's stages "
                           f"({', '.join(keys)})")
        stage = self.order[keys.index(stage_key)]
        if not self.trained(stage):
            raise RunError(f"config.resume_from_stage={stage_key!r}: that stage is not trained in {self.seed_dir.path}")
        later = self.order[keys.index(stage_key) + 1:]
        self._checkpoints.close()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = self.seed_dir.rewound(stamp)
        if jax.process_index() == 0:
            os.makedirs(aside.path, exist_ok=True)
            moved = [self.seed_dir.checkpoints, self.seed_dir.config]
            moved += [self.seed_dir.weights(s) for s in later] + [self.seed_dir.pseudo_labels(s) for s in later]
            moved += [self.seed_dir.online_state(s) for s in later]
            for path in moved:
                if os.path.exists(path):
                    target = aside.absolute(self.seed_dir.relative(path))
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    shutil.move(path, target)
            atomic_write_json(aside.ledger, self._doc)
        shd.barrier("rewound")
        for s in later:
            self._doc["stages"].pop(s.key, None)
        self._doc["checkpoints"] = {}
        self._doc["history"].append({"resume_from_stage": stage_key, "at": time.strftime("%Y-%m-%d %H:%M:%S")})
        self._write()
        write_workdir_config(record, self.seed_dir)
        self._checkpoints = checkpointing.RunCheckpoints(self.seed_dir.checkpoints, max_to_keep=2)
        notice(f"restarting after stage {stage_key} with changed settings; the later stages' files are kept in "
               f"{self.seed_dir.relative(aside.path) if jax.process_index() == 0 else 'rewound'}")


def read_ledger(seed_dir: SeedDir) -> dict | None:
    """The ledger's index in ``seed_dir`` (None: none written yet); WorkdirError (one line) when it
    cannot be read or was written in another workdir layout."""
    if not os.path.exists(seed_dir.ledger):
        return None
    try:
        with open(seed_dir.ledger) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise WorkdirError(f"{seed_dir.ledger} cannot be read ({e})") from None
    version = doc.get("version") if isinstance(doc, dict) else None
    if version != LAYOUT:
        raise LayoutError(f"{seed_dir.ledger}: written by an older cbst_jax (workdir layout {version}; this "
                           f"version reads layout {LAYOUT})")
    return doc


def stage_weights_problem(seed_dir: SeedDir, stage: Stage) -> str | None:
    """None if the seed's ledger records ``stage`` as trained and its weights file matches the
    recorded sha256; else what is wrong, in one line (for readers outside a run: evaluation,
    export)."""
    path = seed_dir.weights(stage)
    try:
        trained = (read_ledger(seed_dir) or {})["stages"].get(stage.key, {}).get("trained")
    except (WorkdirError, KeyError) as e:
        return str(e) if isinstance(e, WorkdirError) else f"{seed_dir.ledger} cannot be read ({e})"
    if trained is None:
        return f"stage {stage.key} is not recorded as trained in {seed_dir.path}"
    if not os.path.isfile(path):
        return f"{path} is missing"
    if file_sha256(path) != trained["sha256"]:
        return f"{path} does not match the sha256 recorded when it was written (damaged)"
    return None


def find_trained_stage(workdir: str, stage: Stage, seed: int | None = None) -> SeedDir:
    """The seed's folder under ``workdir`` (``RunDir.find_seed``) in which ``stage`` is trained,
    its weights file verified against the ledger; WorkdirError (one line) otherwise, naming the
    stages that are trained."""
    run = RunDir(workdir).find_seed(seed)
    path = run.weights(stage)
    if not os.path.isfile(path):
        trained = ", ".join(s.key for s in run.weights_stages())
        raise WorkdirError(f"{run.path}: stage {stage.key} is not trained (no {run.relative(path)}); trained "
                           f"stages: {trained or 'none yet'}")
    problem = stage_weights_problem(run, stage)
    if problem:
        raise WorkdirError(problem)
    return run


def recorded_eval(seed_dir: SeedDir, stage: Stage) -> dict | None:
    """The evaluation row the seed's ledger records for ``stage``, if any."""
    try:
        return (read_ledger(seed_dir) or {}).get("stages", {}).get(stage.key, {}).get("eval")
    except (WorkdirError, AttributeError):
        return None


def _comparable(config_dict: dict) -> dict:
    return {k: v for k, v in config_dict.items() if k not in LAUNCH_KEYS}


def write_workdir_config(record: dict, seed_dir: SeedDir) -> None:
    if jax.process_index() == 0:
        os.makedirs(seed_dir.path, exist_ok=True)
        atomic_write_bytes(seed_dir.config, json.dumps(_comparable(record), sort_keys=True, indent=1).encode())


def check_workdir_config(record: dict, seed_dir: SeedDir) -> str | None:
    """Refuses to resume a seed's folder written by a different configuration (launch keys
    aside); records the configuration ``record`` of a new one. Returns the stage to restart from
    when ``resume_from_stage`` changes only the settings such a restart may change."""
    mine = _comparable(record)
    if not os.path.exists(seed_dir.config):
        write_workdir_config(record, seed_dir)
        return None
    with open(seed_dir.config) as f:
        old = _comparable(json.load(f))
    if old == mine:
        return None
    workdir = seed_dir.path
    diff = [k for k in sorted(set(_flat(mine)) | set(_flat(old))) if _flat(mine).get(k) != _flat(old).get(k)]
    if record.get("resume_from_stage"):
        fixed = [k for k in diff if k not in REWIND_KEYS]
        if fixed:
            raise RunError(f"{workdir}: resume_from_stage may change only optimiser, logging and collapse-guard "
                           f"settings ({', '.join(REWIND_KEYS[1:])}), not {', '.join(fixed[:4])}")
        return record["resume_from_stage"]
    raise RunError(f"{workdir} holds a run with another configuration (differs in {', '.join(diff[:4])}); "
                   f"use another --workdir, --fresh, or --config.resume_from_stage=<stage> to change "
                   f"optimiser, logging or collapse-guard settings after a finished stage")


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
