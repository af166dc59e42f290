"""The self-training round loop of CBST (Zou et al., ECCV 2018), as the paper's algorithm:

    round 0: a source-only model (trained here on the source, or imported weights)
    for each method (ST, ST-SP, CBST, CBST-SP, CRST variants: cbst_jax.methods), from that model:
        for round r = 0 .. R-1:
            p_r = min(p0 + r·Δp, p_max)                          self-paced portion
            label the target: λ at p_r, ŷ = argmax q·p/λ where ≥ 1 (cbst_jax.pseudo_labelling)
            retrain on the round's source subset + pseudo-labelled target (cbst_jax.trainer)
            evaluate on the target evaluation split (cbst_jax.evaluate)
            record the round (cbst_jax.run_ledger, cbst_jax.run_outputs)

Resume: the run ledger knows which stages are trained, labelled and evaluated (each trained
stage's network is a verified weights file), and holds the training progress inside a stage.
Killed anywhere, the same command skips what is done and resumes the rest; since every batch,
augmentation and pseudo-label is a pure function of (seed, stage, step), it reaches the same
final metrics bit for bit (on CPU). Evaluation never feeds back
into training: every round is reported, and no round is picked by looking at the evaluation
split unless ``config.select_by_eval`` asks for it (the report then says so).
"""
from __future__ import annotations

import copy
import time

import jax

from cbst_jax import checkpointing, experiment, run_outputs
from cbst_jax.evaluate import evaluate
from cbst_jax.methods import SOURCE, Stage, parse as parse_methods, portion_at, stages
from cbst_jax.pseudo_labelling import label_target
from cbst_jax.run_ledger import RunLedger
from cbst_jax.trainer import Trainer, mixed_iterator, round_lr, round_steps, variables_of


def run(config, workdir: str, on_started=None) -> tuple[list[dict], list[dict]]:
    """One seed: the source model, then every method's rounds; resumes from ``workdir``.
    Returns the seed's evaluation rows and pseudo-label rows. ``on_started()`` is called once
    the source model exists."""
    config = copy.deepcopy(config)
    ledger = RunLedger(workdir, config, stages(parse_methods(config.methods), config.self_training.rounds))
    exp = experiment.build(config, workdir)
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
            if ledger.trained(stage):                                # finished before a restart
                model = loop.evaluate_if_needed(stage)
                continue
            state, progress = loop.start(stage, model)               # previous model, fresh optimiser
            portion = portion_at(config.self_training.portion, r)    # p_r
            store = loop.label(stage, method, state, portion)        # pseudo-labels at p_r
            state, steps = loop.retrain(stage, method, state, store, progress)
            model = variables_of(state)
            ledger.stage_trained(stage, model, loop.metadata, steps, trainer.last_loss)
            loop.evaluate_and_record(stage, model, portion=portion, steps=steps, train_loss=trainer.last_loss)

    rows, pl_rows = ledger.rows("eval"), ledger.rows("pseudo_labels")
    if jax.process_index() == 0:
        run_outputs.write_seed_report(exp, rows, pl_rows)
    ledger.log.close()
    return rows, pl_rows


class _Loop:
    """The steps of :func:`run`, sharing the run's set-up."""

    def __init__(self, exp, ledger: RunLedger, trainer: Trainer, variables, rng):
        self.exp, self.ledger, self.trainer, self.rng = exp, ledger, trainer, rng
        config = exp.config
        self.initial = trainer.fresh_state(variables, jax.random.fold_in(rng, 1), trainer.kind(SOURCE))
        self.like_source = checkpointing.abstract_like(self.initial)
        self.like_round = trainer.like(variables, rng, config.self_training.optimizer)
        self.metadata = experiment.weights_metadata(config, exp.model, seed=config.seed)
        self.t_start = time.time()

    def source_model(self):
        """Round 0: trained on the source here (resuming its progress), or the imported
        weights; returns its variables."""
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
                        recent_losses=progress.recent_losses if progress else ())
            ledger.stage_trained(SOURCE, variables_of(state), self.metadata, cfg.source_training.steps,
                                 self.trainer.last_loss)
        source = ledger.trained_variables(SOURCE)
        if not ledger.recorded(SOURCE, "eval"):
            self.evaluate_and_record(SOURCE, source)
        return source

    def evaluate_if_needed(self, stage: Stage):
        """A stage trained before a restart, evaluated now if the stop came before its rows;
        returns its variables when read, else None (read later if needed)."""
        if all(self.ledger.recorded(stage, slot) for slot in self.eval_slots(stage)):
            return None
        model = self.ledger.trained_variables(stage)
        self.evaluate_and_record(stage, model, portion=portion_at(self.exp.config.self_training.portion, stage.round),
                                 **self.ledger.training_summary(stage))
        return model

    def start(self, stage: Stage, previous):
        """The state a round starts from and its training progress (if resumed inside it):
        the previous round's model (read from its weights file if not at hand) with a fresh
        optimiser."""
        progress = self.ledger.progress(stage, self.like_round)
        if progress is not None:
            return progress.state, progress
        if previous is None:
            previous = self.ledger.trained_variables(Stage(stage.method, stage.round - 1))
        return self.trainer.round_state(previous, stage, self.rng), None
    def label(self, stage: Stage, method, state, portion: float):
        """The round's pseudo-labels (made now, or complete from before a restart), recorded."""
        ledger = self.ledger
        store = ledger.pseudo_labels(stage)
        if ledger.labelled(stage):
            manifest = store.manifest()
        else:
            manifest = label_target(self.exp, variables_of(state), method, stage, portion, store)
        if not ledger.recorded(stage, "pseudo_labels"):
            ledger.record(stage, run_outputs.pseudo_label_row(self.exp.config.seed, manifest))
        return store

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
                                       recent_losses=progress.recent_losses if progress else ())
        return state, steps

    def eval_slots(self, stage: Stage) -> list[str]:
        """The evaluation rows a stage gets: "eval", and "eval+mst" for ``evaluate.mst_methods``."""
        return ["eval"] + (["eval+mst"] if stage.method in self.exp.mst_methods else [])

    def evaluate_and_record(self, stage: Stage, variables, **extra):
        """The evaluation rows a stage still lacks, kept predictions and (rounds) the
        pseudo-label figure."""
        if not self.ledger.recorded(stage, "eval"):
            cm, preds = evaluate(self.exp, variables, desc=f"{stage.key} eval")
            self.ledger.record(stage, run_outputs.eval_row(self.exp, stage, cm,
                                                           dict(extra, wall_s=time.time() - self.t_start)))
            run_outputs.save_predictions(self.exp, stage, preds)
            if stage.round is not None:
                run_outputs.pseudo_label_figure(self.exp, stage, self.ledger.pseudo_labels(stage))
        if "eval+mst" in self.eval_slots(stage) and not self.ledger.recorded(stage, "eval+mst"):
            cm, _ = evaluate(self.exp, variables, keep=0, desc=f"{stage.key} eval MST",
                             predictor=self.exp.mst_predictor)
            row = run_outputs.eval_row(self.exp, Stage(f"{stage.method}+mst", stage.round), cm,
                                       dict(extra, wall_s=time.time() - self.t_start))
            self.ledger.record(stage, row, slot="eval+mst")
