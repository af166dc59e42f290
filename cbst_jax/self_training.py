"""The self-training round loop of CBST (Zou et al., ECCV 2018), as the paper's algorithm:

    round 0: a source-only model (trained here on the source, or imported weights)
    for each method (ST, ST-SP, CBST, CBST-SP, CRST variants: cbst_jax.methods), from that model:
        for round r = 0 .. R-1:
            p_r = min(p0 + r·Δp, p_max)                          self-paced portion
            offline methods:
                label the target: λ at p_r, ŷ = argmax q·p/λ where ≥ 1 (cbst_jax.pseudo_labelling)
                retrain on the round's source subset + pseudo-labelled target (cbst_jax.trainer)
            online methods (docs/online.md), continuing the previous round's online state:
                train online: each step's EMA teacher labels its target batch (fixed τ, or λ_c at
                p_r over a window of recent batches), ClassMix, one jitted step (cbst_jax.online_step)
            evaluate on the target evaluation split (cbst_jax.evaluation)
            record the round (cbst_jax.run_ledger, cbst_jax.run_report)
            judge its health from training-side signals only (cbst_jax.collapse_guard):
            warn, or stop after the recorded round (self_training.on_collapse)

:func:`run` is one seed's run; :func:`run_experiment` runs every seed (and, for Cityscapes ->
NTHU over all cities, every city) and writes the tables over seeds and cities.

A round's pseudo-labels always come from the model that finished the stage before it (the
source model or round r-1: at hand, or read from its verified weights file), made before any
optimiser state of the round exists; a round's training checkpoints are resumed only with the
pseudo-labels they trained on.

Resume: the run ledger knows which stages are trained, labelled and evaluated (each trained
stage's network is a verified weights file, its other files verified against their recorded
sha256), and holds the training progress inside a stage. Killed anywhere, the same command
skips what is done, remakes what a finished stage lost, and resumes the rest; since every
batch, augmentation and pseudo-label is a pure function of (seed, stage, step), it reaches the
same final metrics bit for bit (on CPU). Evaluation never feeds back
into training: every round is reported, and no round is picked by looking at the evaluation
split unless ``config.select_by_eval`` asks for it (the report then says so).
"""
from __future__ import annotations

import sys
import time

import jax

from cbst_jax import collapse_guard, config_lib, experiment, run_report, settings
from cbst_jax import labels as labels_lib
from cbst_jax.errors import notice
from cbst_jax.evaluation import evaluate
from cbst_jax.methods import SOURCE, Stage, stages
from cbst_jax.pseudo_labelling import label_target
from cbst_jax.run_ledger import RunLedger
from cbst_jax.trainer import Trainer, TrainingSummary, mixed_iterator, online_iterator, variables_of
from cbst_jax.workdir import RunDir, SeedDir


def run_experiment(config, run_dir: RunDir, seeds, on_started=None) -> None:
    """Every seed of ``config`` in ``run_dir`` (:func:`run`), then the mean ± std over seeds;
    Cityscapes -> NTHU with ``target.city`` "all" or "" runs each city in turn the same way in its
    own folder and writes the per-city table with the mean over cities. ``on_started()`` is
    called once the first seed's source model exists."""
    if jax.process_index() == 0:
        print(config_lib.source_model_origin(config), flush=True)
    report = settings.reporting(config, settings.methods(config))
    started = [on_started]
    cities = config_lib.nthu_cities(config)
    if cities is None:
        run_seeds(config, report, run_dir, seeds, None, started)
        return
    t0, rows_by_city = time.time(), {}
    for city in cities:
        rows_by_city[city] = run_seeds(config, report, run_dir.city(city), seeds, city, started)
    if jax.process_index() == 0:
        run_report.write_city_table(report, run_dir, seeds, rows_by_city, time.time() - t0)


def run_seeds(config, report: settings.Reporting, run_dir: RunDir, seeds, city: str | None, started: list):
    """Every seed on one target (``city``: the NTHU city, over all cities), then the mean ± std over
    seeds in ``run_dir``; ``started``: holds the ``on_started`` callback until a seed takes it.
    Returns the evaluation rows of every seed."""
    rows, pl_rows = [], []
    t0 = time.time()
    for s in seeds:
        seed_rows, seed_pl_rows = run(config, run_dir.seed(s), s, city, on_started=started.pop() if started else None)
        rows += seed_rows
        pl_rows += seed_pl_rows
    if jax.process_index() == 0:
        run_report.write_aggregate(report, run_dir, seeds, rows, pl_rows, time.time() - t0)
    return rows


def run(config, seed_dir: SeedDir, seed: int, city: str | None = None, on_started=None) -> tuple[list, list]:
    """One seed: the source model, then every method's rounds; resumes from ``seed_dir``.
    Returns the seed's evaluation rows and pseudo-label rows. ``on_started()`` is called once
    the source model exists."""
    methods = settings.methods(config)
    ledger = RunLedger(seed_dir, config_lib.seed_record(config, seed, city),
                       stages(methods, config.self_training.rounds))
    try:
        exp = experiment.build(config, seed_dir, seed, city, methods)
        return self_train(exp, ledger, on_started)
    finally:
        ledger.close()


def self_train(exp, ledger: RunLedger, on_started=None) -> tuple[list, list]:
    """The algorithm above on the set-up ``exp``, recorded in ``ledger``."""
    loop = RoundLoop(exp, ledger)
    source = loop.source_model()                                     # round 0
    if on_started is not None:
        on_started()
    for method in exp.methods:
        if not method.self_trains:
            continue
        variables, online = source, None                             # each method from the source model
        for r in range(exp.round_phase.rounds):
            stage = Stage(method.name, r)
            portion = exp.labelling.portion_at(r)                    # p_r
            if ledger.trained(stage):                                # finished before a restart
                variables, online = loop.complete(stage, method), None
                loop.guard(stage)
                continue
            if method.online:                                        # the teacher labels every batch, at p_r
                state, summary = loop.train_online(stage, method, online, variables)
                online, store = state, None
            else:
                if variables is None:
                    variables = ledger.trained_variables(previous_stage(stage))
                store = loop.label(stage, method, variables, portion)  # pseudo-labels at p_r, by the previous model
                state, summary = loop.retrain(stage, method, variables, store)  # then its optimiser state
            variables = variables_of(state)
            ledger.stage_trained(stage, variables, exp.weights_metadata, summary, online_state=online)
            loop.health(stage)                                       # training-side signals, before evaluation
            loop.evaluate_and_record(stage, method, variables, store, portion=portion, steps=summary.steps,
                                     train_loss=summary.loss)
            loop.guard(stage)                                        # on_collapse=stop: after the recorded round
    return loop.report()


def previous_stage(stage: Stage) -> Stage:
    """The stage whose model a round starts from and labels with: the source model for round 0."""
    return SOURCE if stage.round == 0 else Stage(stage.method, stage.round - 1)


class RoundLoop:
    """The steps of :func:`self_train`, sharing the run's set-up, ledger and trainer."""

    def __init__(self, exp, ledger: RunLedger):
        self.exp, self.ledger = exp, ledger
        self.trainer = Trainer(exp, ledger)
        self.initial = self.trainer.source_state()  # round 0 before any training (or model.init itself)
        self.t_start = time.time()

    def report(self) -> tuple[list[dict], list[dict]]:
        """Writes the seed's report (process 0) from the recorded rows; returns its evaluation
        and pseudo-label rows."""
        ledger = self.ledger
        rows, pl_rows = ledger.rows("eval"), ledger.rows("pseudo_labels")
        if jax.process_index() == 0:
            run_report.write_seed_report(self.exp, rows, pl_rows, ledger.rows("health"))
        return rows, pl_rows

    def health(self, stage: Stage) -> dict:
        """The round's health row: recorded once, from the recorded pseudo-label rows and the
        stage's loss windows only (``collapse_guard.verdict``); a fired check is one warning
        line on stderr, also in the row (metrics.jsonl)."""
        ledger = self.ledger
        if not ledger.recorded(stage, "health"):
            health = collapse_guard.verdict(ledger.rows("pseudo_labels"), stage.method, stage.round,
                                            ledger.loss_windows(stage), self.exp.guard.settings)
            names = labels_lib.class_names(self.exp.num_classes)
            warning = collapse_guard.warning_line(stage.key, health, names)
            if warning and jax.process_index() == 0:
                print(warning, file=sys.stderr, flush=True)
            ledger.record(stage, collapse_guard.health_row(self.exp.seed, health, warning), slot="health")
        return next(r for r in ledger.rows("health") if (r["method"], r["round"]) == (stage.method, stage.round))

    def guard(self, stage: Stage) -> None:
        """With ``self_training.on_collapse=stop``, a round whose checks fired ends the run once
        it is recorded: the seed's report is written, then one line (CollapseStop: exit 2)."""
        fired = self.health(stage)["fired"]
        if fired and self.exp.guard.on_collapse == "stop":
            self.report()
            raise collapse_guard.CollapseStop(collapse_guard.stop_message(stage.key, previous_stage(stage).key,
                                                                          fired, self.exp.seed_dir.results))

    def source_model(self):
        """Round 0: trained on the source here (resuming its progress), or the imported
        weights; evaluated (what it lacks); returns its variables."""
        exp, ledger = self.exp, self.ledger
        if not ledger.trained(SOURCE):
            if exp.source_phase.trains:
                state, summary = self.trainer.resume(self.trainer.source_phase(),
                                                     mixed_iterator(exp.data, exp.source_phase), lambda: self.initial)
            else:
                state, summary = self.initial, TrainingSummary(exp.source_phase.steps, None, ())
            ledger.stage_trained(SOURCE, variables_of(state), exp.weights_metadata, summary)
        source = ledger.trained_variables(SOURCE)
        self.evaluate_and_record(SOURCE, None, source)
        return source

    def complete(self, stage: Stage, method):
        """A stage trained before a restart: its rows and files, made now where the stop came
        before them or where they were lost; returns its variables when read, else None (read
        later if needed)."""
        if not self.lacks(stage):
            return None
        variables = self.ledger.trained_variables(stage)
        self.evaluate_and_record(stage, method, variables, portion=self.exp.labelling.portion_at(stage.round),
                                 **self.ledger.training_summary(stage))
        return variables

    def label(self, stage: Stage, method, previous, portion: float):
        """The round's pseudo-labels (complete from before a restart, or made now with
        ``previous``, the variables of the model that finished the stage before; None: read from
        its weights file), recorded."""
        ledger = self.ledger
        store = ledger.pseudo_labels(stage)
        if ledger.labelled(stage):
            manifest = store.manifest()
        else:
            if previous is None:
                previous = ledger.trained_variables(previous_stage(stage))
            manifest = label_target(self.exp, previous, method, stage, portion, store)
        if not ledger.recorded(stage, "pseudo_labels"):
            ledger.record(stage, run_report.pseudo_label_row(self.exp.seed, manifest))
        return store

    def retrain(self, stage: Stage, method, previous, store):
        """The round's training on its source subset + pseudo-labelled target: from the round's
        newest checkpoint trained on its current pseudo-labels, else from ``previous`` (the
        variables of the stage before) with a fresh optimiser; returns ``(state, TrainingSummary)``."""
        exp, phase = self.exp, self.exp.round_phase
        manifest = store.manifest()
        mine = manifest.mine_classes if phase.mine_rare else ()
        soft = store.read_soft if manifest.soft_label_stride else None
        it = mixed_iterator(exp.data, phase, stage.round, target_labels=store.read, mine_classes=mine,
                            target_soft_labels=soft)
        training = self.trainer.round_phase(stage, method, phase.steps(it.sampler.batches_per_epoch()))
        return self.trainer.resume(training, it, lambda: self.trainer.round_state(previous, stage))

    def train_online(self, stage: Stage, method, carried, source):
        """An online round: ``steps_per_round`` online steps (``Trainer.online_phase``) from its
        newest checkpoint, else from the state the previous round ended with (``carried`` when at
        hand, else read from the ledger), else, for round 0, from the source model's variables
        ``source`` as student and teacher. Records the round's pseudo-label row (from the steps'
        counts) before the round counts as trained; returns ``(state, TrainingSummary)``."""
        exp, ledger, trainer = self.exp, self.ledger, self.trainer
        phase = trainer.online_phase(stage, method)

        def start():
            if carried is not None:
                return carried
            if stage.round == 0:
                return trainer.online_state(source if source is not None else ledger.trained_variables(SOURCE),
                                            method, stage)
            return ledger.online_state(previous_stage(stage), phase.like())

        state, summary = trainer.resume(phase, online_iterator(exp, stage), start)
        if not ledger.recorded(stage, "pseudo_labels"):
            portion = exp.labelling.portion_at(stage.round) if method.online == "class_balanced" else None
            ledger.record(stage, summary.tally.row(exp.seed, method.name, stage.round, portion))
        return state, summary

    def eval_slots(self, stage: Stage) -> list[str]:
        """The evaluation rows a stage gets: "eval", and "eval+mst" for ``evaluate.mst_methods``."""
        return ["eval"] + (["eval+mst"] if stage.method in self.exp.evaluation.mst_methods else [])

    def owned(self, stage: Stage) -> dict:
        """The files a stage owns besides its weights, by kind: its kept predictions and, for a
        round, its pseudo-label figure."""
        files = {"predictions": self.exp.seed_dir.predictions(stage)}
        if stage.round is not None and not stage.online:
            files["figure"] = self.exp.seed_dir.pseudo_label_figure(stage)
        return files

    def lacks(self, stage: Stage) -> bool:
        """Whether a trained stage lacks a row, or a file it owns is missing or damaged."""
        return (not all(self.ledger.recorded(stage, slot) for slot in self.eval_slots(stage))
                or any(self.ledger.output_problem(stage, path) for path in self.owned(stage).values()))

    def row(self, stage: Stage, cm, extra: dict) -> dict:
        """The stage's evaluation row, with the run's wall time so far."""
        data = self.exp.data
        return run_report.eval_row(stage, cm, seed=self.exp.seed, table_classes=data.table_classes,
                                    subset_classes=data.subset_classes,
                                    extra=dict(extra, wall_s=time.time() - self.t_start))

    def evaluate_and_record(self, stage: Stage, method, variables, store=None, **extra):
        """What a trained stage still lacks: its evaluation rows and the files it owns (kept
        predictions; for a round, the pseudo-label figure from its verified store, ``store``
        when at hand, else labelled again from the stage before if damaged). Files are written
        before the row that makes the stage count as done; a finished stage's missing or
        damaged file is made again, with a one-line note."""
        ledger, exp = self.ledger, self.exp
        recorded = ledger.recorded(stage, "eval")
        redo = set(self.owned(stage)) if not recorded else set()
        for kind, path in self.owned(stage).items() if recorded else ():
            problem = ledger.output_problem(stage, path)
            if problem:
                notice(f"{problem}: made again for stage {stage.key}")
                redo.add(kind)
        written, cm = [], None
        if "predictions" in redo:
            cm, preds = evaluate(exp, variables, desc=f"{stage.key} eval")
            written.append(run_report.save_predictions(exp, stage, preds))
        if "figure" in redo:
            if store is None:
                store = self.label(stage, method, None, exp.labelling.portion_at(stage.round))
            written.append(run_report.pseudo_label_figure(exp, stage, store))
        if not recorded:
            ledger.record(stage, self.row(stage, cm, extra), outputs=written)
        elif written:
            ledger.record_outputs(stage, written)
        if "eval+mst" in self.eval_slots(stage) and not ledger.recorded(stage, "eval+mst"):
            cm, _ = evaluate(exp, variables, keep=0, desc=f"{stage.key} eval MST", predictor=exp.mst_predictor)
            ledger.record(stage, self.row(Stage(f"{stage.method}+mst", stage.round), cm, extra), slot="eval+mst")
