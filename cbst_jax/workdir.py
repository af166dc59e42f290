"""The on-disk layout of a run, in one place: every path a run writes and every path a reader of a
finished run opens is built here, and every file a run leaves behind is named here
(:meth:`RunDir.claim`). No other module builds a path inside a workdir or parses a file name.

    <--workdir>/                   RunDir: the folder the command line names
        cbst_jax_run.json          the run marker: only a folder carrying it is resumed or replaced;
                                   the layout version, the runs --fresh moved aside
        cbst_jax_run.lock          held (flock) by the run working in the folder
        results.md, summary.json   over seeds (mean ± std); over NTHU cities: the per-city table
        figures/<figure>.png       over seeds: miou_per_round, pseudo_label_stats
        seed_<s>/                  SeedDir: one seed's run
        <City>/                    Cityscapes -> NTHU over all cities: a RunDir per city (no marker, no lock)

    seed_<s>/
        config.json                the configuration that wrote the folder (cbst_jax.run_ledger)
        ledger.json                the run ledger's index
        metrics.jsonl, tensorboard/    the run's log
        checkpoints/<n>/           training progress inside the current stage (cbst_jax.checkpointing)
        models/<slug>.npz          each trained stage's weights
        predictions/<slug>.npz     each evaluated stage's kept predictions
        pseudo_labels/<slug>/      each round's pseudo-label store (cbst_jax.pseudo_label_store)
        online_states/<slug>/0/    each online round's final state, the next online round's start
        figures/pseudo_labels_<slug>.png, figures/<figure>.png (miou_per_round, pseudo_label_stats,
                                   predictions)
        results.md, eval_overlap.json, spatial_prior.npz
        rewound/<time>/            what a resume_from_stage restart moved aside, in the same layout

``<slug>`` is a stage's file name (:attr:`cbst_jax.methods.Stage.slug`: "source", "cbst_r2").

The layout has a version (:data:`LAYOUT`, in the run marker and in the ledger): a workdir of
another layout is refused with one line, never misread. The run marker, the lock and the
replacing of a run with ``--fresh`` (:func:`prepare`, :func:`remove_replaced`) live here too.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time

from cbst_jax.atomic_files import is_temporary
from cbst_jax.errors import RunError, notice
from cbst_jax.methods import SOURCE, Stage

LAYOUT = 2  # 2: every stage file named by its slug (1: predictions/source_only.npz, pseudo_labels/<m>/round_<r>/)
MARKER_FILE = "cbst_jax_run.json"  # marks a folder as ours: only such a folder is resumed or replaced
LOCK_FILE = "cbst_jax_run.lock"    # held (flock) by the run working in the folder: pid and host inside
RUN_FIGURES = ("miou_per_round", "pseudo_label_stats")
SEED_FIGURES = RUN_FIGURES + ("predictions",)
_SEED = re.compile(r"seed_(-?\d+)")


class WorkdirError(ValueError):
    """A folder that is not what a reader asked for (no run, another layout, no such seed or
    stage); one line."""


class LayoutError(WorkdirError):
    """A workdir written in another layout (:data:`LAYOUT`): refused, never misread."""


@dataclasses.dataclass(frozen=True)
class Claim:
    """What a file of a workdir is: its kind and, for a stage's files, the stage."""
    kind: str
    stage: Stage | None = None


def _stage_of(slug: str) -> Stage | None:
    """The stage whose slug is ``slug`` exactly, else None."""
    try:
        stage = Stage.parse(slug)
    except ValueError:
        return None
    return stage if stage.slug == slug else None


@dataclasses.dataclass(frozen=True)
class SeedDir:
    """One seed's run (see the module docstring)."""
    path: str

    def _at(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    # ------------------------------------------------------------------ the seed's own files
    @property
    def config(self) -> str:
        return self._at("config.json")

    @property
    def ledger(self) -> str:
        return self._at("ledger.json")

    @property
    def metrics(self) -> str:
        return self._at("metrics.jsonl")

    @property
    def tensorboard(self) -> str:
        return self._at("tensorboard")

    @property
    def checkpoints(self) -> str:
        return self._at("checkpoints")

    @property
    def results(self) -> str:
        return self._at("results.md")

    @property
    def eval_overlap(self) -> str:
        return self._at("eval_overlap.json")

    @property
    def spatial_prior(self) -> str:
        return self._at("spatial_prior.npz")

    def figure(self, name: str) -> str:
        """``figures/<name>.png``, ``name`` one of :data:`SEED_FIGURES`."""
        return self._at("figures", f"{name}.png")

    def rewound(self, stamp: str) -> "SeedDir":
        """Where a restart from a finished stage moves the later stages' files (``rewound/<stamp>/``)."""
        return SeedDir(self._at("rewound", stamp))

    # ------------------------------------------------------------------ a stage's files
    def weights(self, stage: Stage) -> str:
        return self._at("models", f"{stage.slug}.npz")

    def predictions(self, stage: Stage) -> str:
        return self._at("predictions", f"{stage.slug}.npz")

    def pseudo_labels(self, stage: Stage) -> str:
        """The folder of a round's pseudo-label store."""
        return self._at("pseudo_labels", stage.slug)

    def online_state(self, stage: Stage) -> str:
        """The folder of an online round's final state (a one-checkpoint ``cbst_jax.checkpointing`` folder)."""
        return self._at("online_states", stage.slug)

    def pseudo_label_figure(self, stage: Stage) -> str:
        return self._at("figures", f"pseudo_labels_{stage.slug}.png")

    def relative(self, path: str) -> str:
        """``path`` as the ledger records it: relative to the seed's folder (which can move)."""
        return os.path.relpath(path, self.path)

    def absolute(self, relative: str) -> str:
        return self._at(relative)

    # ------------------------------------------------------------------ reading a finished run
    def is_run(self) -> bool:
        """Whether the folder holds a seed's run (its configuration)."""
        return os.path.isfile(self.config)

    def weights_stages(self) -> list[Stage]:
        """The stages with a weights file in ``models/``, the source first."""
        folder = os.path.dirname(self.weights(SOURCE))
        found = []
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
            stage = _stage_of(name[:-len(".npz")]) if name.endswith(".npz") else None
            if stage is not None:
                found.append(stage)
        return sorted(found, key=lambda s: (s != SOURCE, s.key))

    def read_config(self):
        """The configuration the folder was written by (its ``config.json``)."""
        import ml_collections

        try:
            with open(self.config) as f:
                return ml_collections.ConfigDict(json.load(f))
        except (OSError, ValueError) as exc:
            raise WorkdirError(f"{self.config}: unreadable run configuration ({type(exc).__name__}: {exc})") from None

    # ------------------------------------------------------------------ what a file is
    def claim(self, relative: str) -> Claim | None:
        """What the file at ``relative`` (to the seed's folder) is, or None when the layout has no
        such file. A pseudo-label store's files are the ones its manifest lists."""
        parts = relative.split(os.sep)
        name = parts[-1]
        if is_temporary(name):
            return Claim("temporary")  # a stopped run's, removed when the next one starts
        own = {"config.json": "config", "ledger.json": "ledger", "metrics.jsonl": "log", "results.md": "results",
               "eval_overlap.json": "eval_overlap", "spatial_prior.npz": "spatial_prior"}
        if len(parts) == 1:
            return Claim(own[name]) if name in own else None
        top, rest = parts[0], parts[1:]
        if top == "tensorboard":
            return Claim("tensorboard")
        if top == "checkpoints":
            from cbst_jax.checkpointing import TMP_MARKER

            if TMP_MARKER in rest[0]:
                return Claim("temporary")  # a checkpoint a stopped run was writing, removed on resume
            return Claim("checkpoint") if len(rest) > 1 and rest[0].isdigit() else None
        if top == "rewound" and len(rest) > 1:
            return self.rewound(rest[0]).claim(os.path.join(*rest[1:]))
        if top in ("models", "predictions") and len(rest) == 1 and name.endswith(".npz"):
            stage = _stage_of(name[:-len(".npz")])
            return Claim("weights" if top == "models" else "predictions", stage) if stage else None
        if top == "online_states" and len(rest) > 2:
            from cbst_jax.checkpointing import TMP_MARKER

            stage = _stage_of(rest[0])
            if stage is None or not stage.online:
                return None
            return Claim("temporary" if TMP_MARKER in rest[1] else "online_state", stage)
        if top == "pseudo_labels" and len(rest) == 2:
            from cbst_jax.pseudo_label_store import PseudoLabelStore

            stage = _stage_of(rest[0])
            if stage is not None and PseudoLabelStore(self.pseudo_labels(stage)).holds(name):
                return Claim("pseudo_labels", stage)
            return None
        if top == "figures" and len(rest) == 1 and name.endswith(".png"):
            figure = name[:-len(".png")]
            if figure in SEED_FIGURES:
                return Claim("figure")
            stage = _stage_of(figure[len("pseudo_labels_"):]) if figure.startswith("pseudo_labels_") else None
            return Claim("pseudo_label_figure", stage) if stage else None
        return None


@dataclasses.dataclass(frozen=True)
class RunDir:
    """The folder a run's command line names, or one city's folder inside it (see the module
    docstring)."""
    path: str

    def _at(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    @property
    def marker(self) -> str:
        return self._at(MARKER_FILE)

    @property
    def lock(self) -> str:
        return self._at(LOCK_FILE)

    @property
    def results(self) -> str:
        return self._at("results.md")

    @property
    def summary(self) -> str:
        return self._at("summary.json")

    def figure(self, name: str) -> str:
        """``figures/<name>.png``, ``name`` one of :data:`RUN_FIGURES`."""
        return self._at("figures", f"{name}.png")

    def seed(self, seed: int) -> SeedDir:
        return SeedDir(self._at(f"seed_{seed}"))

    def city(self, city: str) -> "RunDir":
        """Cityscapes -> NTHU over all cities: the folder of one city's seeds."""
        return RunDir(self._at(city))

    def seeds(self) -> list[int]:
        """The seeds with a run in the folder (a ``seed_<s>/`` holding its configuration)."""
        names = os.listdir(self.path) if os.path.isdir(self.path) else []
        found = [int(m[1]) for m in map(_SEED.fullmatch, names) if m]
        return sorted(s for s in found if self.seed(s).is_run())

    def find_seed(self, seed: int | None = None) -> SeedDir:
        """The seed's run a reader means by this folder: the folder itself when it is a seed's,
        else its ``seed_<seed>/`` (``seed`` None: its only one); WorkdirError otherwise."""
        path = os.path.abspath(self.path)
        if not os.path.isdir(path):
            raise WorkdirError(f"--workdir {path}: no such folder")
        if SeedDir(path).is_run():
            return SeedDir(path)
        here = RunDir(path)
        seeds = here.seeds()
        if seed is not None:
            if seed not in seeds:
                raise WorkdirError(f"--workdir {path}: no run of seed {seed} (seeds there: "
                                   f"{', '.join(map(str, seeds)) or 'none'})")
            return here.seed(seed)
        if len(seeds) == 1:
            return here.seed(seeds[0])
        if seeds:
            raise WorkdirError(f"--workdir {path} holds seeds {', '.join(map(str, seeds))}: pass --seed")
        runs = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and here.city(d).seeds())
        if runs:  # e.g. Cityscapes -> NTHU over all cities: one run per city
            raise WorkdirError(f"--workdir {path} holds one run per sub-folder ({', '.join(runs)}): pass "
                               f"--workdir {os.path.join(path, runs[0])} (or another)")
        raise WorkdirError(f"--workdir {path}: not a run's folder (no {os.path.basename(SeedDir(path).config)}, "
                           f"no seed_<s>/ with one)")

    def claim(self, relative: str, cities: bool = True) -> Claim | None:
        """What the file at ``relative`` (to this folder) is, or None when the layout has no such
        file; ``cities``: whether city folders may hold it (the top folder only)."""
        from cbst_jax.data.nthu import CITIES

        parts = relative.split(os.sep)
        name = parts[-1]
        if is_temporary(name):
            return Claim("temporary")  # a stopped run's, removed when the next one starts
        if len(parts) == 1:
            own = {"results.md": "results", "summary.json": "summary"}
            if cities:
                own.update({MARKER_FILE: "marker", LOCK_FILE: "lock"})
            return Claim(own[name]) if name in own else None
        top, rest = parts[0], os.path.join(*parts[1:])
        if top == "figures" and len(parts) == 2 and name.endswith(".png") and name[:-len(".png")] in RUN_FIGURES:
            return Claim("figure")
        m = _SEED.fullmatch(top)
        if m:
            return self.seed(int(m[1])).claim(rest)
        if cities and top in CITIES:
            return self.city(top).claim(rest, cities=False)
        return None


# ---------------------------------------------------------------------- the marker and the lock
class WorkdirLock:
    """An exclusive lock (``flock``) on ``<folder>/cbst_jax_run.lock``, which holds the locking
    process's pid and host; the kernel releases it when the process ends, SIGKILL included.
    Taken by process 0 only (the processes of a multi-host run share one workdir). The file is
    written in place, never renamed: the lock belongs to its inode."""

    def __init__(self, folder: str):
        import fcntl
        import socket

        fd = os.open(RunDir(folder).lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode(errors="replace").strip() or "a process that wrote no pid yet"
            os.close(fd)
            raise RunError(f"--workdir={folder} is in use by another run ({holder}); wait for it to end, "
                           f"or pass another --workdir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_marker(marker: str) -> dict:
    try:
        with open(marker) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def prepare(workdir: str, fresh: bool) -> tuple[RunDir, WorkdirLock | None, list[str]]:
    """The workdir, made ready and locked: a new or empty folder gets our run marker; an existing
    run of ours (of this layout) is resumed, or with ``fresh`` moved aside to
    ``<workdir>.replaced-<time>`` (recorded in the new marker, deleted once the new run has its
    source model: see :func:`remove_replaced`); anything else is refused, and so is a folder
    another run holds. Temporary files a killed run left are removed once the lock is held.
    Returns (the folder, its lock (process 0) or None, the moved-aside folders still to delete)."""
    import jax

    from cbst_jax import sharding as shd
    from cbst_jax.atomic_files import atomic_write_json, remove_stale_temporaries

    run = RunDir(workdir)
    exists = os.path.isdir(workdir)
    ours = os.path.isfile(run.marker)
    if os.path.exists(workdir) and not exists:
        raise RunError(f"--workdir={workdir}: a file, expected a folder")
    if exists and not ours and set(os.listdir(workdir)) - {LOCK_FILE}:
        raise RunError(f"--workdir={workdir}: the folder is not empty and holds no cbst_jax run (no {MARKER_FILE}); "
                       f"pass a new or empty folder" + (" (--fresh removes only a cbst_jax run)" if fresh else ""))
    layout = _read_marker(run.marker).get("layout", 1) if ours else LAYOUT
    if layout != LAYOUT and not fresh:
        raise RunError(f"--workdir={workdir} holds a run of an older cbst_jax (workdir layout {layout}; this version "
                       f"reads layout {LAYOUT}) that it cannot resume; pass --fresh to start over (the old run is "
                       f"moved aside, then deleted) or another --workdir")
    lock, replaced = None, []
    if jax.process_index() == 0:
        if ours:
            lock = WorkdirLock(workdir)  # a run of ours is resumed or replaced only when no other holds it
            replaced = list(_read_marker(run.marker).get("replaces", []))
        if fresh and ours:
            aside = base = f"{workdir}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
            n = 1
            while os.path.exists(aside):  # two --fresh within one second
                n += 1
                aside = f"{base}-{n}"
            os.rename(workdir, aside)
            replaced.append(os.path.basename(aside))
            lock.release()
            lock = None
        os.makedirs(workdir, exist_ok=True)
        if lock is None:
            lock = WorkdirLock(workdir)
        if not os.path.isfile(run.marker):
            from cbst_jax import __version__

            atomic_write_json(run.marker, {"created_by": f"cbst_jax {__version__}", "layout": LAYOUT,
                                           "created": time.strftime("%Y-%m-%d %H:%M:%S"), "replaces": replaced})
        stale = remove_stale_temporaries(workdir)
        if stale:
            notice(f"removed {len(stale)} temporary file(s) a stopped run left (e.g. "
                   f"{os.path.relpath(stale[0], workdir)})")
    shd.barrier("workdir")
    return run, lock, [os.path.join(os.path.dirname(workdir), name) for name in replaced]


def remove_replaced(run: RunDir, replaced: list[str]) -> None:
    """Deletes the runs ``--fresh`` moved aside for this one (``replaced``), now that it has its
    source model, and clears them from its marker; process 0 only. A folder that no longer
    carries our marker is left alone, one another run holds is kept for a later start."""
    import jax

    from cbst_jax.atomic_files import atomic_write_json

    if jax.process_index() != 0 or not replaced:
        return
    kept = []
    for path in replaced:
        if not os.path.isfile(RunDir(path).marker):
            continue
        try:
            aside_lock = WorkdirLock(path)
        except RunError:
            notice(f"{path}, the run --fresh replaced, is in use by another run; it is deleted at a later start")
            kept.append(os.path.basename(path))
            continue
        shutil.rmtree(path)
        aside_lock.release()
    atomic_write_json(run.marker, dict(_read_marker(run.marker), replaces=kept))
