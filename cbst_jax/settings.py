"""A run's settings, read from its configuration once (by ``cbst_jax.experiment.build``) into small
frozen records, one per part of the round loop: the source phase, the rounds' training phase, labelling, evaluation,
what every training phase shares, the collapse guard and the report. The loop and its leaves
(``cbst_jax.trainer``, ``cbst_jax.pseudo_labelling``, ``cbst_jax.evaluation``,
``cbst_jax.run_report``, ``cbst_jax.collapse_guard``) take these records, never the
configuration; the seed and the NTHU city a run is for are arguments, never written into it.

The online methods' rounds (``docs/online.md``) add :class:`Online`: what differs from an
offline round's training (the per-step batches, the teacher, the mixing, the threshold window).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from cbst_jax import methods as methods_lib
from cbst_jax.collapse_guard import Settings as GuardSettings
from cbst_jax.data import pipeline
from cbst_jax.predictor import SoftLabelling
from cbst_jax.train_step import learning_rate


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A phase's learning rate at each step: ``lr`` at the ``kind`` schedule (constant | poly, of
    ``power``), after a linear warm-up of ``warmup_steps`` from ``warmup_ratio`` x the rate."""
    lr: float
    kind: str
    power: float
    warmup_steps: int
    warmup_ratio: float

    def rate(self, step: int, steps: int) -> np.float32:
        """The rate of step ``step`` (0-based) of a phase of ``steps`` steps
        (``cbst_jax.train_step.learning_rate``)."""
        return learning_rate(self.lr, self.kind, step, steps, self.power, self.warmup_steps, self.warmup_ratio)


@dataclasses.dataclass(frozen=True)
class Stream:
    """How a phase's training batches are drawn and augmented (``pipeline.MixedIterator``)."""
    crop: tuple
    source_scale_range: tuple
    target_scale_range: tuple
    flip: bool
    mine_prob: float
    mine_domains: tuple     # the domains rare-class crops are mined on
    workers: int
    processes: bool | None  # grain worker processes (None: whenever grain is installed) or threads
    soft_stride: int        # LR* rounds: the soft labels' cell stride
    num_classes: int


@dataclasses.dataclass(frozen=True)
class SourcePhase:
    """Round 0's training on the source (``source_training.*``)."""
    trains: bool            # False: round 0 is model.init itself, or source_training.steps is 0
    steps: int
    optimizer: str          # sgd | adam
    schedule: Schedule
    batch_size: int         # global (source_training.batch_size, 0: input.batch_size)
    sampler_seed: int
    stream: Stream

    def sampler(self, num_source: int, num_target: int = 0, round_idx: int | None = None) -> pipeline.MixedSampler:
        """Which records make up each batch: the whole source set (the target and the round play
        no part); ValueError when it cannot fill one batch (``cbst_jax.preflight`` checks that
        before a run starts)."""
        return pipeline.MixedSampler(tuple(range(num_source)), 0, self.batch_size, "pooled", seed=self.sampler_seed)


@dataclasses.dataclass(frozen=True)
class RoundPhase:
    """Each self-training round's training (``self_training.*``, the round's batches from
    ``input.*``)."""
    rounds: int
    steps_per_round: int    # > 0: the steps of every round, else epochs_per_round epochs
    epochs_per_round: float
    optimizer: str
    schedule: Schedule      # of round 0; round r's rate is lr_round_decay^r times it
    lr_round_decay: float
    mine_rare: bool         # rare-class mining on the classes the labelling pass found rare
    batch_size: int
    sampler_mode: str       # pooled | paired
    source_per_batch: int | None  # paired: source rows of each batch
    source_portion: tuple   # (first, step, max) of the source subset
    subset_schedule: str    # cumulative | fresh
    seed: int
    stream: Stream

    def schedule_of(self, round_idx: int) -> Schedule:
        """Round ``round_idx``'s schedule: base rate ``lr · decay^r`` (CBST: decay 1/√2; CRST: 1)."""
        return dataclasses.replace(self.schedule, lr=self.schedule.lr * self.lr_round_decay ** round_idx)

    def steps(self, batches_per_epoch: int) -> int:
        """Training steps of a round: ``steps_per_round``, or ``epochs_per_round`` epochs."""
        if self.steps_per_round > 0:
            return int(self.steps_per_round)
        return max(1, int(round(self.epochs_per_round * batches_per_epoch)))

    def sampler(self, num_source: int, num_target: int, round_idx: int) -> pipeline.MixedSampler:
        """Which records make up each batch of round ``round_idx``: its source subset and the
        target train split; ValueError when they cannot fill one batch."""
        s0, ds, smax = self.source_portion
        return pipeline.round_sampler(num_source, num_target, round_idx, batch_size=self.batch_size,
                                      mode=self.sampler_mode, source_per_batch=self.source_per_batch, s0=s0, ds=ds,
                                      s_max=smax, subset_schedule=self.subset_schedule, seed=self.seed)


@dataclasses.dataclass(frozen=True)
class Online:
    """An online method's round (``online.*``): ``RoundPhase.steps_per_round`` online steps, each a
    source batch and a target batch of ``batch_size`` crops (``cbst_jax.data.online_batches``) and
    one jitted step (``cbst_jax.online_step``) at the round's learning rate and portion p_r."""
    batch_size: int         # global rows of the source batch and of the target batch of a step
    alpha: float            # EMA weight of the teacher
    tau: float              # the fixed policy's confidence threshold
    ignore_top: int         # rows of the crop whose pseudo-weight is 0 (fixed policy)
    ignore_bottom: int
    window_batches: int     # class-balanced: target batches in the threshold window
    color_jitter_strength: float
    color_jitter_probability: float
    blur: bool
    rcs_temperature: float  # rare-class sampling of source images (0: uniform)
    rcs_min_pixels: int
    rcs_min_crop_ratio: float
    fd_weight: float        # ImageNet feature distance on thing classes (0: off)
    fd_layer: tuple         # the network's module path of the features FD compares
    seed: int

    def step_config(self, num_classes: int, policy: str, training: "Training", stride: int):
        """The jitted step's options (``online_step.OnlineConfig``) for threshold policy ``policy``."""
        from cbst_jax.online_step import OnlineConfig

        return OnlineConfig(num_classes=num_classes, policy=policy, alpha=self.alpha, tau=self.tau,
                            ignore_top=self.ignore_top, ignore_bottom=self.ignore_bottom,
                            window_batches=self.window_batches, color_jitter_strength=self.color_jitter_strength,
                            color_jitter_probability=self.color_jitter_probability, blur=self.blur,
                            fd_weight=self.fd_weight, fd_layer=self.fd_layer,
                            loss_resolution=training.loss_resolution, stride=stride, train_bn=training.train_bn)


@dataclasses.dataclass(frozen=True)
class Training:
    """What every training phase shares: the optimiser's parameter groups (``optim.*``), the step
    (``self_training.loss_resolution``, ``reg_weight``, ``model.train_bn``) and how often it logs
    and checkpoints."""
    momentum: float
    weight_decay: float
    head_lr_mult: float
    bias_lr_mult: float
    bias_weight_decay: float
    loss_resolution: str
    reg_weight: float       # the MR* regulariser's weight
    train_bn: bool
    log_every: int
    checkpoint_every: int


@dataclasses.dataclass(frozen=True)
class Labelling:
    """Labelling the target each round: the self-paced portion, the threshold histograms'
    subsampling and, for CRST's LR* methods, the soft labels."""
    portion: tuple          # (p0, Δp, p_max)
    select_subsample: int
    soft_label_stride: int
    soft: tuple             # SoftLabelling per LR* kind

    def portion_at(self, round_idx: int) -> float:
        """p_r = min(p0 + r·Δp, p_max)."""
        return methods_lib.portion_at(self.portion, round_idx)

    def soft_labelling(self, kind: str | None) -> SoftLabelling | None:
        """The soft labels of label regulariser ``kind`` (None: hard labels)."""
        return next(s for s in self.soft if s.kind == kind) if kind else None


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Which methods' stages are also evaluated with multi-scale + flip testing (rows
    "<method>+mst"); the predictors themselves are built with the network (``experiment.build``)."""
    mst_methods: tuple


@dataclasses.dataclass(frozen=True)
class Guard:
    """The collapse guard's thresholds and what a fired check does (warn | stop)."""
    settings: GuardSettings
    on_collapse: str


@dataclasses.dataclass(frozen=True)
class Reporting:
    """What the tables and reports need beyond the rows."""
    num_classes: int
    table_classes: tuple    # the classes the tables show and mIoU averages
    subset_classes: tuple | None  # SYNTHIA's 13 of 16 (mIoU*), else None
    adapted: tuple          # the self-training methods, in order
    rounds: int
    select_by_eval: bool
    source_origin: str      # where round 0 comes from (config_lib.source_model_origin)


def stream(config, *, crop=None, source_scale_range=None) -> Stream:
    """The training stream of ``input.*`` (the source phase passes its own crop and scale range)."""
    inp = config.input
    scale_range = tuple(inp.scale_range)
    return Stream(crop=tuple(crop or inp.crop),
                  source_scale_range=tuple(source_scale_range or inp.source_scale_range) or scale_range,
                  target_scale_range=tuple(inp.target_scale_range) or scale_range,
                  flip=inp.flip, mine_prob=inp.mine_prob,
                  mine_domains=(pipeline.TARGET,) if inp.mine_domains == "target" else (pipeline.SOURCE,
                                                                                        pipeline.TARGET),
                  workers=inp.workers,
                  processes={"auto": None, "processes": True, "threads": False}[inp.worker_kind],
                  soft_stride=config.self_training.soft_label_stride, num_classes=config.num_classes)


def _schedule(phase) -> Schedule:
    return Schedule(phase.lr, phase.schedule, phase.power, phase.warmup_steps, phase.warmup_ratio)


def source_phase(config, seed: int) -> SourcePhase:
    st = config.source_training
    return SourcePhase(trains=st.steps > 0 and not config.model.init_is_source_model, steps=st.steps,
                       optimizer=st.optimizer, schedule=_schedule(st),
                       batch_size=st.batch_size or config.input.batch_size,
                       sampler_seed=int(np.random.SeedSequence([seed, 999]).generate_state(1)[0]),
                       stream=stream(config, crop=tuple(st.crop), source_scale_range=tuple(st.scale_range)))


def round_phase(config, seed: int) -> RoundPhase:
    st, inp = config.self_training, config.input
    return RoundPhase(rounds=st.rounds, steps_per_round=st.steps_per_round, epochs_per_round=st.epochs_per_round,
                      optimizer=st.optimizer, schedule=_schedule(st), lr_round_decay=st.lr_round_decay,
                      mine_rare=st.mine_rare, batch_size=inp.batch_size, sampler_mode=inp.sampler,
                      source_per_batch=(int(round(inp.source_share * inp.batch_size)) if inp.sampler == "paired"
                                        else None),
                      source_portion=tuple(inp.source_portion),
                      subset_schedule="cumulative" if inp.source_subset == "nested" else "fresh", seed=seed,
                      stream=stream(config))


def reporting(config, methods) -> Reporting:
    """The reports of ``config``'s runs of ``methods`` (:func:`methods`)."""
    from cbst_jax.config_lib import source_model_origin
    from cbst_jax.data.splits import class_lists

    table, subset = class_lists(config)
    return Reporting(num_classes=config.num_classes, table_classes=tuple(table),
                     subset_classes=None if subset is None else tuple(subset),
                     adapted=tuple(m.name for m in methods if m.self_trains),
                     rounds=config.self_training.rounds, select_by_eval=bool(config.select_by_eval),
                     source_origin=source_model_origin(config))


def methods(config) -> tuple:
    """The methods of ``config.methods``, in the order they run: the method list parsed once per run."""
    return tuple(methods_lib.parse(config.methods))


def online(config, seed: int) -> Online:
    o = config.online
    return Online(batch_size=o.batch_size or config.input.batch_size, alpha=float(o.alpha), tau=float(o.tau),
                  ignore_top=int(o.ignore_top), ignore_bottom=int(o.ignore_bottom),
                  window_batches=int(o.window_batches), color_jitter_strength=float(o.color_jitter_strength),
                  color_jitter_probability=float(o.color_jitter_probability), blur=bool(o.blur),
                  rcs_temperature=float(o.rcs_temperature), rcs_min_pixels=int(o.rcs_min_pixels),
                  rcs_min_crop_ratio=float(o.rcs_min_crop_ratio), fd_weight=float(o.fd_weight),
                  fd_layer=tuple(str(p) for p in o.fd_layer), seed=seed)


def training(config) -> Training:
    st, o = config.self_training, config.optim
    return Training(momentum=o.momentum, weight_decay=o.weight_decay, head_lr_mult=o.head_lr_mult,
                    bias_lr_mult=o.bias_lr_mult, bias_weight_decay=o.weight_decay * o.bias_weight_decay_mult,
                    loss_resolution=st.loss_resolution, reg_weight=st.reg_weight, train_bn=config.model.train_bn,
                    log_every=config.log_every, checkpoint_every=config.checkpoint_every)


def labelling(config) -> Labelling:
    st = config.self_training
    return Labelling(portion=tuple(st.portion), select_subsample=st.select_subsample,
                     soft_label_stride=st.soft_label_stride,
                     soft=tuple(SoftLabelling(kind, st.label_reg_weight[kind], st.soft_label_stride,
                                              st.label_reg_keep[kind]) for kind in st.label_reg_weight))


def evaluation(config) -> Evaluation:
    return Evaluation(tuple(m.name for m in methods_lib.parse(config.evaluate.mst_methods)))


def guard(config) -> Guard:
    g = config.self_training.collapse_guard
    return Guard(GuardSettings(float(g.min_share), float(g.share_fraction), float(g.loss_rise), int(g.loss_windows),
                               float(g.entropy_fraction)), config.self_training.on_collapse)
