"""One step of online teacher-student self-training (DACS / DAFormer) as one jitted program, with
either DAFormer's fixed confidence threshold or the seed's class-balanced thresholds.

A step (lhoyer/DAFormer ``mmseg/models/uda/dacs.py`` ``forward_train``):

1. the teacher (:mod:`cbst_jax.ema_teacher`) predicts the un-augmented target batch in eval
   mode (no dropout); its logits are brought to the crop size and softmaxed;
2. pseudo-labels and pixel weights by the policy (:mod:`cbst_jax.online_thresholds`); the
   class-balanced policy first writes the batch into the window held in the state;
3. ClassMix of each source image with the target image of the same row
   (:mod:`cbst_jax.class_mix`), then colour jitter and blur of the mixed image
   (:mod:`cbst_jax.strong_augment`);
4. the student's loss: cross-entropy on the source batch, pixel-weighted cross-entropy on the
   mixed batch, each summed over valid pixels and divided by all pixels of its batch (DAFormer's
   mmseg ``weight_reduce_loss``, ``mean``), optionally plus ``fd_weight`` times the ImageNet
   feature distance on thing classes (:mod:`cbst_jax.feature_distance`). Two forwards, source
   then mixed, as in DAFormer (with trained BatchNorm the running statistics see both in that
   order);
5. the optimiser update at the step's learning rate (an argument, as in :mod:`cbst_jax.train_step`),
   then the teacher's EMA update with the new student.

Everything is in :class:`OnlineTrainState` (student, teacher, optimiser state, window, RNG,
step): a state copied to the host and put back continues bit-identically. The jitted program
takes the state replicated except the window (split over ``'data'`` along its batch axis, see
:mod:`cbst_jax.online_thresholds`), the batch sharded on its leading axis, and donates the
state. A step whose loss, gradient norm or update is not finite returns its input state
unchanged (window included) with ``finite=False``.

batch (global, sharded on axis 0): ``source_image`` uint8 (B, H, W, 3), ``source_label`` uint8
(B, H, W) (255 = ignore), ``target_image`` uint8 (B, H, W, 3), and with a spatial prior
``target_origin`` int32 (B, 2), each target crop's top-left corner in the prior's coordinates;
optionally ``target_truth`` uint8 (B, H, W), the target crops' ground truth where known, only
counted for the report (:func:`label_counts`), never part of the loss.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from cbst_jax import class_mix, ema_teacher, feature_distance as fdist, losses, online_thresholds as othr, selection
from cbst_jax.device_thresholds import portion_words
from cbst_jax.labels import IGNORE_INDEX
from cbst_jax.sharding import batch_sharded, replicated
from cbst_jax.strong_augment import COLOR_JITTER_PROBABILITY, COLOR_JITTER_STRENGTH, strong_augment
from cbst_jax.train_step import state_inputs


@struct.dataclass
class OnlineTrainState:
    """Everything an online step reads and writes (what a checkpoint holds).

    ``step``: student updates done (int32); ``params`` / ``batch_stats``: the student;
    ``teacher_params`` / ``teacher_batch_stats``: the EMA teacher; ``opt_state``: the student's
    optimiser; ``window``: the class-balanced policy's :class:`online_thresholds.Window` (None
    for ``fixed``); ``rng``: raw uint32 key data.
    """
    step: jax.Array
    params: Any
    batch_stats: Any
    teacher_params: Any
    teacher_batch_stats: Any
    opt_state: optax.OptState
    window: Any
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class OnlineConfig:
    """Options of :func:`make_online_step` (published values as defaults, sources in the
    modules named).

    policy: "fixed" (DAFormer) | "class_balanced" (the seed's thresholds over a window).
    window_batches: W, target batches in the class-balanced window.
    fd_weight: 0 disables the feature distance; DAFormer uses ``feature_distance.WEIGHT``.
    fd_layer: flax module path of the network's bottleneck features (needed when fd_weight > 0).
    loss_resolution / stride / train_bn / ignore_label: as :class:`cbst_jax.train_step.TrainConfig`.
    """
    num_classes: int
    policy: str = "fixed"
    alpha: float = ema_teacher.ALPHA
    tau: float = othr.TAU
    ignore_top: int = 0
    ignore_bottom: int = 0
    window_batches: int = 8
    color_jitter_strength: float = COLOR_JITTER_STRENGTH
    color_jitter_probability: float = COLOR_JITTER_PROBABILITY
    blur: bool = True
    fd_weight: float = 0.0
    fd_classes: tuple = fdist.THING_CLASSES
    fd_min_ratio: float = fdist.MIN_RATIO
    fd_layer: tuple = ()
    loss_resolution: str = "upsample"
    stride: int = 8
    train_bn: bool = False
    ignore_label: int = IGNORE_INDEX

    def __post_init__(self):
        if self.policy not in othr.POLICIES:
            raise ValueError(f"policy must be one of {othr.POLICIES}, got {self.policy!r}")
        if self.loss_resolution not in losses.RESOLUTIONS:
            raise ValueError(f"loss_resolution must be one of {losses.RESOLUTIONS}, got {self.loss_resolution!r}")
        if self.fd_weight > 0 and not self.fd_layer:
            raise ValueError("fd_weight > 0 needs fd_layer, the module path of the bottleneck features")


def state_shardings(mesh, config: OnlineConfig) -> OnlineTrainState:
    """The state's layout as a pytree prefix: replicated, the window split over ``'data'``."""
    rep = replicated(mesh)
    window = othr.window_shardings(mesh) if config.policy == "class_balanced" else None
    return OnlineTrainState(step=rep, params=rep, batch_stats=rep, teacher_params=rep, teacher_batch_stats=rep,
                            opt_state=rep, window=window, rng=rep)


def online_state_initializer(tx, mesh, config: OnlineConfig, target_shape):
    """``init(variables, rng) -> OnlineTrainState``: step 0, the teacher a copy of the student,
    a fresh ``tx`` state, an empty window for (B, H, W) target batches; placed per
    :func:`state_shardings`. ``rng``: a typed key, raw key data or an int seed."""

    def build(params, batch_stats, rng):
        window = None
        if config.policy == "class_balanced":
            window = othr.Window.empty(config.window_batches, target_shape, config.num_classes)
        return OnlineTrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                                teacher_params=jax.tree.map(jnp.copy, params),
                                teacher_batch_stats=jax.tree.map(jnp.copy, batch_stats),
                                opt_state=tx.init(params), window=window, rng=rng)

    jitted = jax.jit(build, out_shardings=state_shardings(mesh, config))
    repl = replicated(mesh)

    def init(variables, rng) -> OnlineTrainState:
        return jitted(*state_inputs(variables, rng, repl))

    return init


def label_counts(probs, pred, pseudo_label, pseudo_weight, truth, num_classes: int) -> dict:
    """What a step's pseudo-labels were, for the run's report and collapse guard (never fed back):
    per class the pixels ``predicted`` (the argmax the thresholds rank), ``selected`` (weight >
    0) and, with ground truth ``truth`` (evaluation only), ``correct`` selected pixels; the
    teacher's summed per-pixel entropy ``entropy_sum`` (nats) and the step's ``pixels``."""
    def per_class(values, keep):
        return jnp.bincount(jnp.where(keep, values, num_classes).reshape(-1).astype(jnp.int32),
                            length=num_classes + 1)[:num_classes]

    selected = pseudo_weight > 0
    p = jnp.asarray(probs, jnp.float32)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
    out = dict(predicted=per_class(pred, True), selected=per_class(pseudo_label, selected),
               entropy_sum=jnp.sum(entropy, dtype=jnp.float32), pixels=jnp.asarray(pred.size, jnp.int32))
    if truth is not None:
        out["correct"] = per_class(pseudo_label, selected & (pseudo_label == truth.astype(jnp.int32)))
    return out


def _select(pred, new, old):
    return jax.tree.map(lambda n, o: jnp.where(pred, n, o), new, old)


def make_online_step(model, tx, config: OnlineConfig, mesh, param_labels=None):
    """The jitted ``step(state, batch, lr, portion=1.0, prior=None, imagenet=None) ->
    (state, metrics)``.

    ``lr``: the step's learning rate (float32 argument; :func:`cbst_jax.train_step.learning_rate`);
    ``portion``: the class-balanced policy's p for this step (a host float, passed as its
    float64 words so that the rank is the offline one; :func:`online_thresholds.portion_at_step`);
    ``prior``: the spatial prior (Hp, Wp, C) of CBST-SP or None; ``imagenet``: the frozen
    ImageNet model's variables for the feature distance or None. ``param_labels`` marks the
    "frozen" leaves, whose gradients are not taken.

    metrics (replicated): ``loss, ce_source, ce_mix, feature_distance, grad_norm, lr, finite``,
    ``pseudo_share`` (share of target pixels with a non-zero weight), ``pseudo_weight`` (mean
    target pixel weight), ``alpha`` (the EMA weight just used), ``jitter``/``blur`` (applied),
    the step's pseudo-label counts (:func:`label_counts`: ``predicted``, ``selected``, ``correct``
    with a ``target_truth`` batch field, ``entropy_sum``, ``pixels``) and for the class-balanced
    policy ``thresholds`` (C,) and ``window_class_counts`` (C,).
    """
    num_classes, ignore = int(config.num_classes), int(config.ignore_label)
    use_fd = config.fd_weight > 0
    layer = tuple(config.fd_layer)
    capture = fdist.capture_filter(layer) if use_fd else None

    def forward(params, stats, images, key, train, capture_features):
        variables = {"params": params}
        if jax.tree.leaves(stats):
            variables["batch_stats"] = stats
        mutable = (["batch_stats"] if train and config.train_bn else []) + (["intermediates"] if capture_features else [])
        kwargs = dict(train=train)
        if train:
            kwargs["rngs"] = {"dropout": key}
        if capture_features:
            kwargs["capture_intermediates"] = capture
        if not mutable:
            return model.apply(variables, images, mutable=False, **kwargs).astype(jnp.float32), None, stats
        logits, mutated = model.apply(variables, images, mutable=mutable, **kwargs)
        features = fdist.captured(mutated["intermediates"], layer) if capture_features else None
        return logits.astype(jnp.float32), features, mutated.get("batch_stats", stats)

    def pixel_loss(logits, labels, weights):
        logits, labels, _ = losses.align_logits_and_labels(
            logits, labels, resolution=config.loss_resolution, stride=config.stride, ignore_label=ignore)
        if config.loss_resolution == "stride":
            weights = losses.subsample_labels(weights, config.stride, logits.shape[1:3], fill=0)
        total = losses.weighted_cross_entropy(logits, labels, weights, ignore_label=ignore)
        return total / np.float32(labels.size)

    def online_step(state: OnlineTrainState, batch, lr, words, consts):
        rng, k_mix, k_aug, k_src, k_mix_drop = jax.random.split(jax.random.wrap_key_data(state.rng), 5)
        source_image, source_label = batch["source_image"], batch["source_label"]
        target_image = batch["target_image"]
        size = source_label.shape[1:3]

        # 1. the teacher on the clean target batch
        teacher_logits, _, _ = forward(state.teacher_params, state.teacher_batch_stats, target_image, None,
                                       False, False)
        if teacher_logits.shape[1:3] != size:
            teacher_logits = losses.resize_bilinear_align_corners(teacher_logits, size)
        probs = jax.lax.stop_gradient(jax.nn.softmax(teacher_logits, axis=-1))

        # 2. pseudo-labels and weights
        window, extra = state.window, {}
        if config.policy == "fixed":
            pseudo_label, pseudo_weight, _ = othr.fixed_pseudo_labels(probs, config.tau, config.ignore_top,
                                                                      config.ignore_bottom)
            pred = pseudo_label
        else:
            prior = consts["prior"]
            if prior is not None:
                origins = batch.get("target_origin", jnp.zeros((probs.shape[0], 2), jnp.int32))
                prior = othr.prior_windows(prior, origins, size)
            conf, pred = selection.confidence(probs, prior)
            window = othr.insert(window, conf, pred)
            thresholds, counts = othr.window_thresholds(window, num_classes, words, mesh)
            pseudo_label, pseudo_weight = othr.class_balanced_pseudo_labels(probs, thresholds, prior, ignore)
            extra = dict(thresholds=thresholds, window_class_counts=counts)
        extra.update(label_counts(probs, pred, pseudo_label, pseudo_weight, batch.get("target_truth"), num_classes))

        # 3. ClassMix, then colour jitter and blur
        mask, _ = class_mix.class_masks(k_mix, source_label, num_classes)
        mixed_image, mixed_label, mixed_weight = class_mix.mix_batch(
            mask, source_image, target_image, source_label, pseudo_label, pseudo_weight)
        mixed_image, (jittered, blurred) = strong_augment(
            k_aug, mixed_image, strength=config.color_jitter_strength,
            jitter_probability=config.color_jitter_probability, blur=config.blur)

        imagenet_features = None
        if use_fd:
            _, imagenet_features, _ = forward(consts["imagenet"]["params"], consts["imagenet"].get("batch_stats", {}),
                                              source_image, None, False, True)

        trainable = (jax.tree.map(lambda _: True, state.params) if param_labels is None
                     else jax.tree.map(lambda g: g != "frozen", param_labels))

        # 4. the student's loss
        def loss_fn(params):
            params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)
            logits, features, stats = forward(params, state.batch_stats, source_image, k_src, True, use_fd)
            ce_source = pixel_loss(logits, source_label, jnp.ones(source_label.shape, jnp.float32))
            logits, _, stats = forward(params, stats, mixed_image, k_mix_drop, True, False)
            ce_mix = pixel_loss(logits, mixed_label, mixed_weight)
            fd = jnp.zeros((), jnp.float32)
            if use_fd:
                fd, _ = fdist.feature_distance(features, imagenet_features, source_label, num_classes,
                                               config.fd_classes, config.fd_min_ratio, ignore)
            loss = ce_source + ce_mix + np.float32(config.fd_weight) * fd
            return loss, (dict(ce_source=ce_source, ce_mix=ce_mix, feature_distance=fd), stats)

        (loss, (aux, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_norm = optax.tree.norm([g for g, t in zip(jax.tree.leaves(grads), jax.tree.leaves(trainable)) if t])

        # 5. student update, then the teacher's EMA with the new student
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        updates = jax.tree.map(lambda u: u * lr.astype(u.dtype), updates)
        params = optax.apply_updates(state.params, updates)
        step = state.step + 1
        teacher_params, teacher_stats = ema_teacher.update(
            state.teacher_params, params, step, config.alpha, state.teacher_batch_stats, new_stats, config.train_bn)
        new_state = state.replace(step=step, params=params, batch_stats=new_stats, teacher_params=teacher_params,
                                  teacher_batch_stats=teacher_stats, opt_state=opt_state, window=window,
                                  rng=jax.random.key_data(rng))
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
        metrics = dict(loss=loss, **aux, grad_norm=grad_norm, lr=lr, finite=finite,
                       pseudo_share=jnp.mean(pseudo_weight > 0), pseudo_weight=jnp.mean(pseudo_weight),
                       alpha=ema_teacher.decay(step, config.alpha)[0], jitter=jittered, blur=blurred, **extra)
        return _select(finite, new_state, state), metrics

    repl = replicated(mesh)
    jitted = jax.jit(online_step, in_shardings=(state_shardings(mesh, config), batch_sharded(mesh), repl, repl, repl),
                     out_shardings=(state_shardings(mesh, config), repl), donate_argnums=0)

    def step(state: OnlineTrainState, batch, lr=1.0, portion: float = 1.0, prior=None, imagenet=None):
        if not isinstance(lr, jax.Array):
            lr = np.float32(lr)
        if use_fd and imagenet is None:
            raise ValueError("the feature distance needs the frozen ImageNet model's variables (imagenet=)")
        consts = dict(prior=None if prior is None else jnp.asarray(prior, jnp.float32),
                      imagenet=imagenet if use_fd else None)
        return jitted(state, batch, lr, portion_words(portion), consts)

    step.jitted = jitted
    return step


__all__ = ["OnlineTrainState", "OnlineConfig", "state_shardings", "online_state_initializer", "make_online_step",
           "label_counts"]
