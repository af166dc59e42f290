"""Retraining: a training phase (the source phase, each self-training round) runs a jitted step over
a mixed source/target stream (``cbst_jax.data.pipeline``), checkpoints its progress through the
run ledger, stops with a one-line error on a non-finite loss, and returns what it did.

A phase is a :class:`TrainingPhase`: its stage, step count, learning-rate schedule, optimiser kind
and step function. :meth:`Trainer.resume` runs one from its newest checkpoint, or from a fresh
state built only then; :meth:`Trainer.train` runs its steps and returns ``(state, summary)``
(:class:`TrainingSummary`: steps, final loss, logged loss windows). An online phase
(``docs/online.md``) is a phase too (:meth:`Trainer.online_phase`): its own state, batches and
step over the same loop, checkpoints and summary, plus the pseudo-label tally of its steps.

One optimiser per kind (``sgd`` | ``adam``) and one jitted step per (kind, model regulariser)
are built once per run; every round starts from a fresh optimiser state of the same optimiser
(both references reset SGD momentum every round), so rounds never recompile the step.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from cbst_jax import online_step, settings
from cbst_jax import sharding as shd
from cbst_jax import train_step as train_lib
from cbst_jax.data import pipeline
from cbst_jax.errors import RunError
from cbst_jax.failpoints import failpoint
from cbst_jax.methods import SOURCE, Method, Stage


@dataclasses.dataclass(frozen=True)
class TrainingSummary:
    """What a training phase did: its steps, the mean loss of its last logged window (None: no
    step ran) and the mean of every logged window (the mean loss of the last ``log_every``
    steps at each multiple of ``log_every`` and at the last step; the collapse guard's signal);
    for an online round, its pseudo-label ``tally`` (``online_pseudo_labels.Tally``)."""
    steps: int
    loss: float | None
    loss_windows: tuple
    tally: object = None


@dataclasses.dataclass(frozen=True)
class TrainingPhase:
    """One training phase: ``steps`` calls of ``step(state, fields(host batch), lr) -> (state,
    metrics)`` (metrics: "loss", "finite") at ``schedule``'s rate of each step, on states shaped
    like ``like()`` (what its checkpoints restore into); ``tally()``: a fresh sum of the steps'
    pseudo-label counts (online rounds; None: none)."""
    stage: Stage
    steps: int
    schedule: settings.Schedule
    like: Callable
    step: Callable
    fields: Callable
    tally: Callable | None = None


class Trainer:
    """The run's optimisers, states and jitted steps, and the loop of a training phase."""

    def __init__(self, exp, ledger):
        from cbst_jax import models

        self.exp, self.ledger = exp, ledger
        self.labels = models.param_groups(exp.network, exp.initial_variables["params"], train_bn=exp.training.train_bn)
        self._tx, self._init, self._steps = {}, {}, {}

    # ------------------------------------------------------------------ optimisers and states
    def optimizer(self, kind: str):
        if kind not in self._tx:
            t = self.exp.training
            self._tx[kind] = train_lib.make_optimizer(
                self.labels, momentum=t.momentum, weight_decay=t.weight_decay, head_lr_mult=t.head_lr_mult,
                bias_lr_mult=t.bias_lr_mult, bias_weight_decay=t.bias_weight_decay, optimizer=kind)
        return self._tx[kind]

    def _initializer(self, kind: str):
        if kind not in self._init:
            self._init[kind] = train_lib.state_initializer(self.optimizer(kind), self.exp.mesh)
        return self._init[kind]

    def fresh_state(self, variables, rng, kind: str):
        """A train state with a new optimiser state. The variables are copied through the host,
        so donating the new state never frees the buffers of the state it came from (the
        source model is reused by every method)."""
        variables = jax.tree.map(lambda x: np.array(jax.device_get(x)), variables)
        return self._initializer(kind)(variables, rng)

    def source_state(self):
        """The state the source phase starts from: the initial variables, a fresh optimiser."""
        return self.fresh_state(self.exp.initial_variables, jax.random.fold_in(self.exp.rng, 1),
                                self.exp.source_phase.optimizer)

    def round_state(self, variables, stage: Stage):
        """The state a round starts from: the previous model, a fresh optimiser, the round's RNG."""
        rng = jax.random.fold_in(self.exp.rng, zlib.crc32(stage.key.encode()) % (2 ** 31))
        return self.fresh_state(variables, rng, self.exp.round_phase.optimizer)

    def like(self, kind: str):
        """Shapes, dtypes and shardings of a state of this optimiser kind (to restore into),
        traced without building one."""
        return jax.eval_shape(self._initializer(kind), self.exp.initial_variables, jax.random.fold_in(self.exp.rng, 1))

    def step_for(self, kind: str, regularizer: str | None):
        key = (kind, regularizer)
        if key not in self._steps:
            t = self.exp.training
            self._steps[key] = train_lib.make_train_step(self.exp.network, self.optimizer(kind), train_lib.TrainConfig(
                loss_resolution=t.loss_resolution, stride=self.exp.network.output_stride,
                regularizer=regularizer or "none", reg_weight=t.reg_weight if regularizer else 0.0,
                train_bn=t.train_bn), self.exp.mesh, self.labels)
        return self._steps[key]

    # ------------------------------------------------------------------ phases
    def source_phase(self) -> TrainingPhase:
        """Round 0's training on the source."""
        p = self.exp.source_phase
        return TrainingPhase(SOURCE, p.steps, p.schedule, lambda: self.like(p.optimizer),
                             self.step_for(p.optimizer, None), self.mesh_fields)

    def round_phase(self, stage: Stage, method: Method, steps: int) -> TrainingPhase:
        """Round ``stage.round`` of ``method``: ``steps`` steps with the method's model regulariser."""
        p = self.exp.round_phase
        return TrainingPhase(stage, steps, p.schedule_of(stage.round), lambda: self.like(p.optimizer),
                             self.step_for(p.optimizer, method.model_regularizer), self.mesh_fields)

    def mesh_fields(self, host: dict):
        """An offline step's batch: the host batch's image, label, target rows (and soft labels)."""
        fields = {"image": host["image"], "label": host["label"], "is_target": host["domain"] == pipeline.TARGET}
        if "soft_label" in host:
            fields["soft_label"] = host["soft_label"]
        return shd.to_global(fields, self.exp.mesh)

    # ------------------------------------------------------------------ online rounds
    def online_config(self, method: Method):
        return self.exp.online.step_config(self.exp.num_classes, method.online, self.exp.training,
                                           self.exp.network.output_stride)

    def _online_init(self, method: Method):
        key = ("online-init", method.online)
        if key not in self._init:
            o = self.exp.online
            self._init[key] = online_step.online_state_initializer(
                self.optimizer(self.exp.round_phase.optimizer), self.exp.mesh, self.online_config(method),
                (o.batch_size,) + tuple(self.exp.round_phase.stream.crop))
        return self._init[key]

    def online_state(self, variables, method: Method, stage: Stage):
        """The state an online method's first round starts from: the source model as student and
        teacher, a fresh optimiser, an empty window, the round's RNG (host copies: see
        :meth:`fresh_state`)."""
        variables = jax.tree.map(lambda x: np.array(jax.device_get(x)), variables)
        rng = jax.random.fold_in(self.exp.rng, zlib.crc32(stage.key.encode()) % (2 ** 31))
        return self._online_init(method)(variables, rng)

    def online_like(self, method: Method):
        """Shapes, dtypes and shardings of an online state of ``method`` (to restore into)."""
        return jax.eval_shape(self._online_init(method), self.exp.initial_variables,
                              jax.random.fold_in(self.exp.rng, 1))

    def online_phase(self, stage: Stage, method: Method) -> TrainingPhase:
        """Round ``stage.round`` of online ``method``: ``steps_per_round`` online steps at the
        round's learning rate and portion p_r (the spatial prior with -SP, the initial network
        as the ImageNet model of the feature distance)."""
        from cbst_jax.online_pseudo_labels import Tally

        exp, p = self.exp, self.exp.round_phase
        key = ("online", method.online)
        if key not in self._steps:
            self._steps[key] = online_step.make_online_step(exp.network, self.optimizer(p.optimizer),
                                                            self.online_config(method), exp.mesh, self.labels)
        jitted, portion = self._steps[key], exp.labelling.portion_at(stage.round)
        prior = exp.prior if method.spatial_prior else None
        imagenet = exp.initial_variables if exp.online.fd_weight > 0 else None

        def step(state, batch, lr):
            return jitted(state, batch, lr, portion=portion, prior=prior, imagenet=imagenet)

        return TrainingPhase(stage, p.steps_per_round, p.schedule_of(stage.round), lambda: self.online_like(method),
                             step, lambda host: shd.to_global(host, exp.mesh), lambda: Tally(exp.num_classes))

    def resume(self, phase: TrainingPhase, iterator, fresh: Callable):
        """Trains ``phase`` over ``iterator`` from its newest checkpoint that verifies and was
        trained on the round's current pseudo-labels (``RunLedger.progress``), else from
        ``fresh()`` (built only then); returns ``(state, TrainingSummary)``."""
        progress = self.ledger.progress(phase.stage, phase.like())
        if progress is not None:
            iterator.set_state(progress.iterator)
        state = progress.state if progress is not None else fresh()
        with iterator:
            return self.train(phase, state, iterator, progress)

    def train(self, phase: TrainingPhase, state, iterator: pipeline.MixedIterator, progress=None):
        """Runs steps ``progress.step .. phase.steps - 1`` (from 0 without ``progress``, a
        ``run_ledger.Progress``, whose recent losses and loss windows it continues); returns
        ``(state, TrainingSummary)``."""
        log_every, checkpoint_every = self.exp.training.log_every, self.exp.training.checkpoint_every
        stage, steps = phase.stage, phase.steps
        start = progress.step if progress is not None else 0
        losses_seen = list(progress.recent_losses) if progress is not None else []
        windows = list(progress.loss_windows) if progress is not None else []
        tally = None
        if phase.tally is not None:
            tally = phase.tally()
            if progress is not None and progress.tally is not None:
                tally = type(tally).restore(tally.num_classes, progress.tally)
        log, pending = self.ledger.log, None
        bar = tqdm(range(start, steps), desc=f"{stage.key} train", disable=jax.process_index() != 0,
                   leave=False, initial=start, total=steps)
        for k in bar:
            batch = phase.fields(next(iterator))
            lr_k = phase.schedule.rate(k, steps)
            state, m = phase.step(state, batch, lr_k)
            failpoint("train.step")
            if pending is not None:
                self._check(stage, *pending, losses_seen, tally)
            pending = (k, m)
            if (k + 1) % log_every == 0 or k + 1 == steps:
                self._check(stage, *pending, losses_seen, tally)
                pending = None
                mean = float(np.mean(losses_seen[-log_every:]))
                windows.append(mean)
                bar.set_postfix(loss=f"{mean:.4f}")
                log.scalars(f"train/{stage.key}", k + 1, {"loss": mean, "lr": float(lr_k)})
            if (k + 1) % checkpoint_every == 0 and k + 1 < steps:
                if pending is not None:
                    self._check(stage, *pending, losses_seen, tally)
                    pending = None
                self.ledger.save_progress(stage, state, k + 1, iterator.get_state(), losses_seen[-log_every:], windows,
                                          tally=None if tally is None else tally.state())
        if pending is not None:
            self._check(stage, *pending, losses_seen, tally)
        loss = float(np.mean(losses_seen[-log_every:])) if losses_seen else None
        return state, TrainingSummary(steps, loss, tuple(windows), tally)

    def _check(self, stage: Stage, k, m, losses_seen, tally=None):
        if not bool(m["finite"]):
            raise RunError(f"non-finite loss in stage {stage.key} at step {k}: stopped (nothing written after "
                           f"the last good step); {self.ledger.how_to_go_on()}")
        losses_seen.append(float(m["loss"]))
        if tally is not None:
            tally.add(jax.device_get(m))


def variables_of(state) -> dict:
    return {"params": state.params, "batch_stats": state.batch_stats}


def mixed_iterator(data, phase, round_idx: int | None = None, target_labels=None, mine_classes=(),
                   target_soft_labels=None) -> pipeline.MixedIterator:
    """The training stream of ``phase`` (``settings.SourcePhase``: the whole source set;
    ``settings.RoundPhase``: round ``round_idx``'s source subset and the pseudo-labelled target)
    over ``data``'s splits, at its stream's crop, scales and workers; rare-class crops of
    ``mine_classes`` are mined on the stream's domains."""
    s = phase.stream
    sampler = phase.sampler(len(data.source), len(data.target_train), round_idx)
    return pipeline.MixedIterator(data.source, data.target_train, sampler, crop_size=s.crop,
                                  target_labels=target_labels, scale_range=s.source_scale_range,
                                  target_scale_range=s.target_scale_range, flip=s.flip, mine_classes=mine_classes,
                                  p_mine=s.mine_prob, mine_domains=s.mine_domains, workers=s.workers,
                                  processes=s.processes, target_soft_labels=target_soft_labels,
                                  soft_stride=s.soft_stride, num_classes=s.num_classes)


def online_iterator(exp, stage: Stage):
    """The batches of online round ``stage`` (``cbst_jax.data.online_batches``): a pure function of
    (seed, stage, step); source images by rare-class sampling when ``online.rcs_temperature`` > 0,
    the target crops' ground truth counted for the report where the target train records keep it."""
    from cbst_jax.data.online_batches import OnlineBatches
    from cbst_jax.rare_class_sampling import RareClassSampler

    o, s = exp.online, exp.round_phase.stream
    seed = int(np.random.SeedSequence([o.seed, zlib.crc32(stage.key.encode())]).generate_state(1)[0])
    rcs = None
    if o.rcs_temperature > 0:
        rcs = RareClassSampler(exp.source_class_counts, temperature=o.rcs_temperature, min_pixels=o.rcs_min_pixels,
                               seed=seed)
    return OnlineBatches(exp.data.source, exp.data.target_train, batch_size=o.batch_size, crop_size=s.crop,
                         source_scale_range=s.source_scale_range, target_scale_range=s.target_scale_range,
                         flip=s.flip, seed=seed, canvas=exp.canvas, rcs=rcs, min_pixels=o.rcs_min_pixels,
                         min_crop_ratio=o.rcs_min_crop_ratio, truth_key=exp.data.hidden_label_key,
                         workers=s.workers if s.workers > 0 else pipeline.default_workers())
