"""Retraining: the source phase and each self-training round run the jitted train step over a
mixed source/target stream (``cbst_jax.data.pipeline``), checkpointing their progress through
the run ledger, and stop with a one-line error on a non-finite loss.

One optimiser per kind (``sgd`` | ``adam``) and one jitted step per (kind, model regulariser)
are built once per run; every round starts from a fresh optimiser state of the same optimiser
(both references reset SGD momentum every round), so rounds never recompile the step.
"""
from __future__ import annotations

import zlib

import jax
import numpy as np
from tqdm.auto import tqdm

from cbst_jax import checkpointing
from cbst_jax import sharding as shd
from cbst_jax import train as train_lib
from cbst_jax.data import pipeline
from cbst_jax.errors import RunError
from cbst_jax.failpoints import failpoint
from cbst_jax.methods import SOURCE, Stage


class Trainer:
    def __init__(self, exp, ledger, variables):
        from cbst_jax import models

        self.exp, self.ledger = exp, ledger
        self.labels = models.param_groups(exp.model, variables["params"], train_bn=exp.config.model.train_bn)
        self._tx, self._init, self._steps = {}, {}, {}
        self.last_loss = None
        self.loss_windows: list[float] = []

    # ------------------------------------------------------------------ optimisers and states
    def optimizer(self, kind: str):
        if kind not in self._tx:
            o = self.exp.config.optim
            self._tx[kind] = train_lib.make_optimizer(
                self.labels, momentum=o.momentum, weight_decay=o.weight_decay, head_lr_mult=o.head_lr_mult,
                bias_lr_mult=o.bias_lr_mult, bias_weight_decay=o.weight_decay * o.bias_weight_decay_mult,
                optimizer=kind)
        return self._tx[kind]

    def kind(self, stage: Stage) -> str:
        cfg = self.exp.config
        return cfg.source_training.optimizer if stage == SOURCE else cfg.self_training.optimizer

    def fresh_state(self, variables, rng, kind: str):
        """A train state with a new optimiser state. The variables are copied through the host,
        so donating the new state never frees the buffers of the state it came from (the
        source model is reused by every method)."""
        variables = jax.tree.map(lambda x: np.array(jax.device_get(x)), variables)
        if kind not in self._init:
            self._init[kind] = train_lib.state_initializer(self.optimizer(kind), self.exp.mesh)
        return self._init[kind](variables, rng)

    def round_state(self, variables, stage: Stage, run_rng):
        """The state a round starts from: the previous model, a fresh optimiser, the round's RNG."""
        rng = jax.random.fold_in(run_rng, zlib.crc32(stage.key.encode()) % (2 ** 31))
        return self.fresh_state(variables, rng, self.kind(stage))

    def like(self, variables, run_rng, kind: str):
        """Shapes, dtypes and shardings of a state of this optimiser kind (to restore into)."""
        return checkpointing.abstract_like(self.fresh_state(variables, jax.random.fold_in(run_rng, 1), kind))

    def step_for(self, kind: str, regularizer: str | None):
        key = (kind, regularizer)
        if key not in self._steps:
            cfg = self.exp.config
            self._steps[key] = train_lib.make_train_step(self.exp.model, self.optimizer(kind), train_lib.TrainConfig(
                loss_resolution=cfg.self_training.loss_resolution, stride=self.exp.model.output_stride,
                regularizer=regularizer or "none", reg_weight=cfg.self_training.reg_weight if regularizer else 0.0,
                train_bn=cfg.model.train_bn), self.exp.mesh, self.labels)
        return self._steps[key]

    # ------------------------------------------------------------------ a phase
    def train(self, state, stage: Stage, regularizer: str | None, *, steps: int, lr: float, schedule: str,
              iterator: pipeline.MixedIterator, start_step: int = 0, recent_losses=(), loss_windows=()):
        """Trains steps ``start_step .. steps-1``; returns the state. ``loss_windows``: the
        phase's logged window means before ``start_step`` (a resumed phase). Afterwards
        ``loss_windows`` holds every logged window mean of the phase (the mean loss of the last
        ``log_every`` steps at each multiple of ``log_every`` and at the last step, as logged)
        and ``last_loss`` the last of them."""
        cfg = self.exp.config
        phase = cfg.source_training if stage == SOURCE else cfg.self_training  # the schedule's shape
        step_fn = self.step_for(self.kind(stage), regularizer)
        log = self.ledger.log
        pending, losses_seen, windows = None, list(recent_losses), list(loss_windows)
        bar = tqdm(range(start_step, steps), desc=f"{stage.key} train", disable=jax.process_index() != 0,
                   leave=False, initial=start_step, total=steps)
        for k in bar:
            host = next(iterator)
            fields = {"image": host["image"], "label": host["label"], "is_target": host["domain"] == pipeline.TARGET}
            if "soft_label" in host:
                fields["soft_label"] = host["soft_label"]
            batch = shd.to_global(fields, self.exp.mesh)
            lr_k = train_lib.learning_rate(lr, schedule, k, steps, phase.power, phase.warmup_steps, phase.warmup_ratio)
            state, m = step_fn(state, batch, lr_k)
            failpoint("train.step")
            if pending is not None:
                self._check(stage, *pending, losses_seen)
            pending = (k, m)
            if (k + 1) % cfg.log_every == 0 or k + 1 == steps:
                self._check(stage, *pending, losses_seen)
                pending = None
                mean = float(np.mean(losses_seen[-cfg.log_every:]))
                windows.append(mean)
                bar.set_postfix(loss=f"{mean:.4f}")
                log.scalars(f"train/{stage.key}", k + 1, {"loss": mean, "lr": float(lr_k)})
            if (k + 1) % cfg.checkpoint_every == 0 and k + 1 < steps:
                if pending is not None:
                    self._check(stage, *pending, losses_seen)
                    pending = None
                self.ledger.save_progress(stage, state, k + 1, iterator.get_state(), losses_seen[-cfg.log_every:],
                                          windows)
        if pending is not None:
            self._check(stage, *pending, losses_seen)
        self.last_loss = float(np.mean(losses_seen[-cfg.log_every:])) if losses_seen else None
        self.loss_windows = windows
        return state

    def _check(self, stage: Stage, k, m, losses_seen):
        if not bool(m["finite"]):
            raise RunError(f"non-finite loss in stage {stage.key} at step {k}: stopped (nothing written after "
                           f"the last good step); {self.ledger.how_to_go_on()}")
        losses_seen.append(float(m["loss"]))


def variables_of(state) -> dict:
    return {"params": state.params, "batch_stats": state.batch_stats}


def mixed_iterator(exp, round_idx: int | None, target_labels=None, mine_classes=(), target_soft_labels=None):
    """The training stream of the source phase (``round_idx`` None: the whole source set, at
    ``source_training``'s batch size, crop and scale range where set) or of a round (its
    source subset and the pseudo-labelled target, at ``input``'s). Rare-class crops are mined
    on the domains of ``input.mine_domains``."""
    cfg = exp.config
    data = exp.data
    crop, scale_range = tuple(cfg.input.crop), tuple(cfg.input.scale_range)
    source_range = tuple(cfg.input.source_scale_range) or scale_range
    target_range = tuple(cfg.input.target_scale_range) or scale_range
    if round_idx is None:
        crop = tuple(cfg.source_training.crop) or crop
        source_range = tuple(cfg.source_training.scale_range) or source_range
    sampler = phase_sampler(cfg, len(data.source), len(data.target_train), round_idx)
    mine_domains = (pipeline.TARGET,) if cfg.input.mine_domains == "target" else (pipeline.SOURCE, pipeline.TARGET)
    return pipeline.MixedIterator(data.source, data.target_train, sampler, crop_size=crop,
                                  target_labels=target_labels, scale_range=source_range,
                                  target_scale_range=target_range,
                                  flip=cfg.input.flip, mine_classes=mine_classes, p_mine=cfg.input.mine_prob,
                                  mine_domains=mine_domains, workers=cfg.input.workers,
                                  processes=worker_processes(cfg),
                                  target_soft_labels=target_soft_labels,
                                  soft_stride=cfg.self_training.soft_label_stride, num_classes=cfg.num_classes)


def phase_sampler(config, num_source: int, num_target: int, round_idx: int | None) -> pipeline.MixedSampler:
    """Which records make up each batch of the source phase (``round_idx`` None: the whole
    source set at ``source_training``'s batch size, else ``input``'s) or of a round (its source
    subset and the target train split); ValueError when the split cannot fill one batch
    (``cbst_jax.preflight`` checks every phase with it before a run starts)."""
    if round_idx is None:
        return pipeline.MixedSampler(tuple(range(num_source)), 0, source_batch_size(config), "pooled",
                                     seed=int(np.random.SeedSequence([config.seed, 999]).generate_state(1)[0]))
    inp = config.input
    s0, ds, smax = inp.source_portion
    return pipeline.round_sampler(
        num_source, num_target, round_idx, batch_size=inp.batch_size, mode=inp.sampler,
        source_per_batch=source_rows_per_batch(config), s0=s0, ds=ds, s_max=smax,
        subset_schedule="cumulative" if inp.source_subset == "nested" else "fresh", seed=config.seed)


def source_batch_size(config) -> int:
    """The source phase's global batch (``source_training.batch_size``, 0: ``input.batch_size``)."""
    return config.source_training.batch_size or config.input.batch_size


def source_rows_per_batch(config) -> int | None:
    """Source rows of a round's batch with the paired sampler (None: pooled, no fixed share)."""
    inp = config.input
    return int(round(inp.source_share * inp.batch_size)) if inp.sampler == "paired" else None


def worker_processes(config) -> bool | None:
    """``input.worker_kind`` as the pipeline's ``processes`` argument (None: its default)."""
    return {"auto": None, "processes": True, "threads": False}[config.input.worker_kind]


def round_steps(exp, iterator) -> int:
    """Training steps of a round: ``steps_per_round``, or ``epochs_per_round`` epochs."""
    st = exp.config.self_training
    if st.steps_per_round > 0:
        return int(st.steps_per_round)
    return max(1, int(round(st.epochs_per_round * iterator.sampler.batches_per_epoch())))


def round_lr(config, round_idx: int) -> float:
    """The round's base learning rate ``lr · decay^r`` (CBST: decay 1/√2; CRST: 1)."""
    return config.self_training.lr * config.self_training.lr_round_decay ** round_idx

