"""The self-training round loop of CBST (Zou et al., ECCV 2018), as the paper's algorithm:

    round 0: a source-only model (trained here on the source, or imported weights)
    for each method (ST, ST-SP, CBST, CBST-SP, CRST variants: cbst_jax.methods), from that model:
        for round r = 0 .. R-1:
            p_r = min(p0 + r·Δp, p_max)                          self-paced portion
            label the target: λ at p_r, ŷ = argmax q·p/λ where ≥ 1 (cbst_jax.pseudo_labelling)
            retrain on the round's source subset + pseudo-labelled target (cbst_jax.trainer)
            evaluate on the target evaluation split (cbst_jax.evaluate)
            record the round (cbst_jax.run_ledger, cbst_jax.run_outputs)
            judge its health from training-side signals only (cbst_jax.collapse_guard):
            warn, or stop after the recorded round (self_training.on_collapse)

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

import copy
import sys
import time

import jax

from cbst_jax import checkpointing, collapse_guard, config_lib, experiment, preflight, run_outputs
from cbst_jax import labels as labels_lib
from cbst_jax.evaluate import evaluate
from cbst_jax.methods import SOURCE, Stage, parse as parse_methods, portion_at, stages
from cbst_jax.pseudo_labelling import label_target
from cbst_jax.errors import notice
from cbst_jax.run_ledger import RunLedger
from cbst_jax.trainer import Trainer, mixed_iterator, round_lr, round_steps, variables_of
from cbst_jax.workdir import SeedDir


def run(config, seed_dir: SeedDir, on_started=None) -> tuple[list[dict], list[dict]]:
    """One seed: the source model, then every method's rounds; resumes from ``seed_dir``.
    Returns the seed's evaluation rows and pseudo-label rows. ``on_started()`` is called once
    the source model exists."""
    config = copy.deepcopy(config)
    ledger = RunLedger(seed_dir, config_lib.seed_record(config),
                       stages(parse_methods(config.methods), config.self_training.rounds))
    try:
        return _run(config, ledger, on_started)
    finally:
        ledger.close()


def _run(config, ledger: RunLedger, on_started):
    exp = experiment.build(config, ledger.seed_dir)
    preflight.check_adaptation_split(config, exp.data)  # the counts after leaving out evaluation images
    rng = jax.random.key(config.seed)
    variables = experiment.init_variables(config, exp.model, rng, tuple(config.input.crop))
    trainer = Trainer(exp, ledger, variables)
    loop = _Loop(exp, ledger, trainer, variables, rng)

    source = loop.source_model()                                     # round 0
    if on_started is not None:
        on_started()
    for method in exp.methods:
        if not method.self_trains:
            continue
        model = source                                               # each method from the source model
        for r in range(config.self_training.rounds):
            stage = Stage(method.name, r)
            portion = portion_at(config.self_training.portion, r)    # p_r
            if ledger.trained(stage):                                # finished before a restart
                model = loop.complete(stage, method)
                loop.guard(stage)
                continue
            if model is None:
                model = ledger.trained_variables(previous_stage(stage))
            store = loop.label(stage, method, model, portion)        # pseudo-labels at p_r, by the previous model
            state, progress = loop.start(stage, model)               # then its optimiser state (or a checkpoint's)
            state, steps = loop.retrain(stage, method, state, store, progress)
            model = variables_of(state)
            ledger.stage_trained(stage, model, loop.metadata, steps, trainer.last_loss, trainer.loss_windows)
            loop.health(stage)                                       # training-side signals, before evaluation
            loop.evaluate_and_record(stage, method, model, store, portion=portion, steps=steps,
                                     train_loss=trainer.last_loss)
            loop.guard(stage)                                        # on_collapse=stop: after the recorded round

    return loop.report()


def previous_stage(stage: Stage) -> Stage:
    """The stage whose model a round starts from and labels with: the source model for round 0."""
    return SOURCE if stage.round == 0 else Stage(stage.method, stage.round - 1)


class _Loop:
    """The steps of :func:`run`, sharing the run's set-up."""

    def __init__(self, exp, ledger: RunLedger, trainer: Trainer, variables, rng):
        self.exp, self.ledger, self.trainer, self.rng = exp, ledger, trainer, rng
        config = exp.config
        self.initial = trainer.fresh_state(variables, jax.random.fold_in(rng, 1), trainer.kind(SOURCE))
        self.like_source = checkpointing.abstract_like(self.initial)
        self.like_round = trainer.like(variables, rng, config.self_training.optimizer)
        self.metadata = experiment.weights_metadata(config, exp.model, seed=config.seed)
        self.guard_settings = collapse_guard.Settings.of(config)
        self.t_start = time.time()

    def report(self) -> tuple[list[dict], list[dict]]:
        """Writes the seed's report (process 0) from the recorded rows; returns its evaluation
        and pseudo-label rows."""
        ledger = self.ledger
        rows, pl_rows = ledger.rows("eval"), ledger.rows("pseudo_labels")
        if jax.process_index() == 0:
            run_outputs.write_seed_report(self.exp, rows, pl_rows, ledger.rows("health"))
        return rows, pl_rows

    def health(self, stage: Stage) -> dict:
        """The round's health row: recorded once, from the recorded pseudo-label rows and the
        stage's loss windows only (``collapse_guard.verdict``); a fired check is one warning
        line on stderr, also in the row (metrics.jsonl)."""
        ledger = self.ledger
        if not ledger.recorded(stage, "health"):
            health = collapse_guard.verdict(ledger.rows("pseudo_labels"), stage.method, stage.round,
                                            ledger.loss_windows(stage), self.guard_settings)
            names = labels_lib.class_names(self.exp.config.num_classes)
            warning = collapse_guard.warning_line(stage.key, health, names)
            if warning and jax.process_index() == 0:
                print(warning, file=sys.stderr, flush=True)
            ledger.record(stage, collapse_guard.health_row(self.exp.config.seed, health, warning), slot="health")
        return next(r for r in ledger.rows("health") if (r["method"], r["round"]) == (stage.method, stage.round))

    def guard(self, stage: Stage) -> None:
        """With ``self_training.on_collapse=stop``, a round whose checks fired ends the run once
        it is recorded: the seed's report is written, then one line (CollapseStop: exit 2)."""
        fired = self.health(stage)["fired"]
        if fired and self.exp.config.self_training.on_collapse == "stop":
            self.report()
            results = self.exp.seed_dir.results
            raise collapse_guard.CollapseStop(collapse_guard.stop_message(stage.key, previous_stage(stage).key,
                                                                          fired, results))

    def source_model(self):
        """Round 0: trained on the source here (resuming its progress), or the imported
        weights; evaluated (what it lacks); returns its variables."""
        cfg, ledger = self.exp.config, self.ledger
        if not ledger.trained(SOURCE):
            state = self.initial
            if not cfg.model.init_is_source_model and cfg.source_training.steps > 0:
                progress = ledger.progress(SOURCE, self.like_source)
                it = mixed_iterator(self.exp, None)
                if progress is not None:
                    state = progress.state
                    it.set_state(progress.iterator)
                with it:
                    state = self.trainer.train(
                        state, SOURCE, None, steps=cfg.source_training.steps, lr=cfg.source_training.lr,
                        schedule=cfg.source_training.schedule, iterator=it,
                        start_step=progress.step if progress else 0,
                        recent_losses=progress.recent_losses if progress else (),
                        loss_windows=progress.loss_windows if progress else ())
            ledger.stage_trained(SOURCE, variables_of(state), self.metadata, cfg.source_training.steps,
                                 self.trainer.last_loss, self.trainer.loss_windows)
        source = ledger.trained_variables(SOURCE)
        self.evaluate_and_record(SOURCE, None, source)
        return source

    def complete(self, stage: Stage, method):
        """A stage trained before a restart: its rows and files, made now where the stop came
        before them or where they were lost; returns its variables when read, else None (read
        later if needed)."""
        if not self.lacks(stage):
            return None
        model = self.ledger.trained_variables(stage)
        self.evaluate_and_record(stage, method, model,
                                 portion=portion_at(self.exp.config.self_training.portion, stage.round),
                                 **self.ledger.training_summary(stage))
        return model

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
            ledger.record(stage, run_outputs.pseudo_label_row(self.exp.config.seed, manifest))
        return store

    def start(self, stage: Stage, previous):
        """The state a round trains from and its training progress: the round's newest
        checkpoint trained on its current pseudo-labels, else ``previous`` (the model of the stage
        before) with a fresh optimiser."""
        progress = self.ledger.progress(stage, self.like_round)
        if progress is not None:
            return progress.state, progress
        return self.trainer.round_state(previous, stage, self.rng), None

    def retrain(self, stage: Stage, method, state, store, progress):
        """Training on the round's source subset + pseudo-labelled target, from ``progress``;
        returns the trained state and the round's step count."""
        cfg = self.exp.config
        manifest = store.manifest()
        mine = manifest.mine_classes if cfg.self_training.mine_rare else ()
        soft = store.read_soft if manifest.soft_label_stride else None
        it = mixed_iterator(self.exp, stage.round, target_labels=store.read, mine_classes=mine, target_soft_labels=soft)
        if progress is not None:
            it.set_state(progress.iterator)
        steps = round_steps(self.exp, it)
        with it:
            state = self.trainer.train(state, stage, method.model_regularizer, steps=steps,
                                       lr=round_lr(cfg, stage.round), schedule=cfg.self_training.schedule,
                                       iterator=it, start_step=progress.step if progress else 0,
                                       recent_losses=progress.recent_losses if progress else (),
                                       loss_windows=progress.loss_windows if progress else ())
        return state, steps

    def eval_slots(self, stage: Stage) -> list[str]:
        """The evaluation rows a stage gets: "eval", and "eval+mst" for ``evaluate.mst_methods``."""
        return ["eval"] + (["eval+mst"] if stage.method in self.exp.mst_methods else [])

    def owned(self, stage: Stage) -> dict:
        """The files a stage owns besides its weights, by kind: its kept predictions and, for a
        round, its pseudo-label figure."""
        files = {"predictions": self.exp.seed_dir.predictions(stage)}
        if stage.round is not None:
            files["figure"] = self.exp.seed_dir.pseudo_label_figure(stage)
        return files

    def lacks(self, stage: Stage) -> bool:
        """Whether a trained stage lacks a row, or a file it owns is missing or damaged."""
        return (not all(self.ledger.recorded(stage, slot) for slot in self.eval_slots(stage))
                or any(self.ledger.output_problem(stage, path) for path in self.owned(stage).values()))

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
            written.append(run_outputs.save_predictions(exp, stage, preds))
        if "figure" in redo:
            if store is None:
                portion = portion_at(exp.config.self_training.portion, stage.round)
                store = self.label(stage, method, None, portion)
            written.append(run_outputs.pseudo_label_figure(exp, stage, store))
        if not recorded:
            row = run_outputs.eval_row(exp, stage, cm, dict(extra, wall_s=time.time() - self.t_start))
            ledger.record(stage, row, outputs=written)
        elif written:
            ledger.record_outputs(stage, written)
        if "eval+mst" in self.eval_slots(stage) and not ledger.recorded(stage, "eval+mst"):
            cm, _ = evaluate(exp, variables, keep=0, desc=f"{stage.key} eval MST", predictor=exp.mst_predictor)
            row = run_outputs.eval_row(exp, Stage(f"{stage.method}+mst", stage.round), cm,
                                       dict(extra, wall_s=time.time() - self.t_start))
            ledger.record(stage, row, slot="eval+mst")
