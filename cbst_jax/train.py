"""The retraining step of CBST / CRST: train state, SGD parameter groups, LR schedules and one
jitted, data-parallel ``train_step``.

Data parallelism follows big_vision: one ``('data',)`` mesh, the state replicated, the batch
sharded on its leading axis, everything inside one ``jax.jit`` with ``NamedSharding`` in/out
shardings and the state donated. On global arrays the mean losses, BatchNorm statistics and the
gradient all-reduce span the whole batch, so 1 device and N devices run the same computation.

Learning rate. The effective LR of a parameter is ``lr · schedule(count) · group multiplier ·
lr_scale``: ``lr``/``schedule`` are baked into the optimiser (:func:`make_optimizer`), the
multiplier comes from its parameter group, and ``lr_scale`` is a float32 scalar *argument* of
the step. Changing ``lr_scale`` (CBST's per-round decay ``decay**round``, or an absolute,
host-computed LR with ``lr=1``) never recompiles. Scaling the SGD update after the momentum
trace is exactly a change of learning rate, as in ``torch.optim.SGD``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from cbst_jax import losses, soft_labels
from cbst_jax.sharding import batch_sharded, replicated

GROUPS = ("backbone", "head", "frozen")
SCHEDULES = ("constant", "poly")
OPTIMIZERS = ("sgd", "adam")


@struct.dataclass
class TrainState:
    """Everything a training step reads and writes.

    ``batch_stats`` are BatchNorm running statistics (constants when BN is frozen, as in both
    references); ``rng`` is raw uint32 key data (``jax.random.key_data``) so checkpoints and the
    non-finite select treat it like any array; ``apply_fn``/``tx`` are static.
    """
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: optax.OptState
    rng: jax.Array
    apply_fn: Callable = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Options of :func:`make_train_step` (any object with these attributes works too).

    loss_resolution: "upsample" (CRST: logits bilinear, align_corners, to the crop) or "stride"
      (CBST: labels sampled at the logits' cell centres); see :mod:`cbst_jax.losses`.
    stride: the network's output stride (used by "stride").
    regularizer: "none" | "mrent" | "mrkld" | "mrl2" (CRST model regularisers, target only).
    reg_weight: effective MR weight (CRST's ``mrkld.sh`` 0.1 → 0.01, see ``losses``).
    train_bn: False: BN frozen (running statistics, ``mutable=False``); True: batch statistics
      and updated running statistics (``mutable=['batch_stats']``).
    """
    loss_resolution: str = "upsample"
    stride: int = 8
    regularizer: str = "none"
    reg_weight: float = 0.0
    train_bn: bool = False
    ignore_label: int = losses.IGNORE_LABEL


# ---------------------------------------------------------------------------- schedules
def lr_schedule(lr: float, schedule: str = "constant", total_steps: int = 0, power: float = 0.9):
    """optax schedule of the step count: constant ``lr`` or DeepLab's poly
    ``lr · (1 − t/T)^power`` (CRST ``lr_poly``; 0 from t = T on)."""
    if schedule == "constant":
        return optax.constant_schedule(lr)
    if schedule == "poly":
        if total_steps <= 0:
            raise ValueError("the poly schedule needs total_steps > 0")

        def poly(count):
            frac = jnp.minimum(count, total_steps) / total_steps
            return lr * (1.0 - frac) ** power

        return poly
    raise ValueError(f"unknown LR schedule {schedule!r}; expected one of {SCHEDULES}")


def round_lr_scale(round_index, decay: float = 1.0 / math.sqrt(2.0)):
    """Per-round LR factor ``decay**round`` (CBST ``solve_AO``: /√2 each round; CRST: 1), as a
    float32 value to pass as the step's ``lr_scale``."""
    return np.float32(decay ** round_index)


# ---------------------------------------------------------------------------- optimiser
class GroupedSGD(optax.GradientTransformationExtraArgs):
    """An optax transformation that also remembers the parameter labels it was built from
    (``param_labels``), so the step can skip frozen leaves' gradients and norms."""


_OPTIMIZERS: dict = {}


def _bias_aware_labels(param_labels, split_bias: bool):
    def label(path, group):
        if group not in GROUPS:
            raise ValueError(f"unknown parameter group {group!r} at {jax.tree_util.keystr(path)}; "
                             f"expected one of {GROUPS}")
        name = getattr(path[-1], "key", getattr(path[-1], "name", None)) if path else None
        if split_bias and group != "frozen" and name == "bias":
            return group + "_bias"
        return group

    return jax.tree_util.tree_map_with_path(label, param_labels)


def make_optimizer(param_labels, *, lr: float = 1.0, momentum: float = 0.9, weight_decay: float = 5e-4,
                   head_lr_mult: float = 10.0, bias_lr_mult: float = 1.0, bias_weight_decay=None,
                   schedule: str = "constant", total_steps: int = 0, poly_power: float = 0.9,
                   optimizer: str = "sgd"):
    """SGD with momentum and coupled weight decay, in parameter groups (``torch.optim.SGD``);
    ``optimizer="adam"`` swaps in AdamW per group (for small networks trained from scratch, such
    as the embedded benchmark's, where no ImageNet initialisation exists).

    ``param_labels``: pytree of "backbone" | "head" | "frozen" over the params (e.g.
    ``cbst_jax.models.param_groups``). Per group: ``d = g + wd·w``, ``buf = momentum·buf + d``,
    ``w −= lr_t·mult·buf`` with mult 1 (backbone) or ``head_lr_mult`` (head, DeepLab's 10×);
    "frozen" leaves get no update at all (``set_to_zero``: no decay, no momentum).
    CBST's MXNet ``lr_type='alex'`` ("biases lr×2, wd 0") is ``bias_lr_mult=2,
    bias_weight_decay=0``; biases are non-frozen leaves named ``bias``.

    The result is memoised on its arguments: rebuilding it for a new round returns the same
    object, so a state made with it keeps the jitted step's cache (``tx`` is a static field).
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    bias_wd = weight_decay if bias_weight_decay is None else bias_weight_decay
    split_bias = bias_lr_mult != 1.0 or bias_wd != weight_decay
    labels = _bias_aware_labels(param_labels, split_bias)
    leaves, treedef = jax.tree.flatten(labels)
    key = (treedef, tuple(leaves), lr, momentum, weight_decay, head_lr_mult, bias_lr_mult, bias_wd,
           schedule, total_steps, poly_power, optimizer)
    if key in _OPTIMIZERS:
        return _OPTIMIZERS[key]
    base = lr_schedule(lr, schedule, total_steps, poly_power)

    def sgd(mult, wd):
        scaled = lambda count: base(count) * mult
        if optimizer == "adam":  # decoupled decay (AdamW): L2 through Adam's normaliser does little
            return optax.adamw(scaled, weight_decay=wd)
        parts = ([optax.add_decayed_weights(wd)] if wd else []) + [optax.sgd(scaled, momentum=momentum)]
        return optax.chain(*parts)

    groups = {
        "backbone": lambda: sgd(1.0, weight_decay),
        "head": lambda: sgd(head_lr_mult, weight_decay),
        "backbone_bias": lambda: sgd(bias_lr_mult, bias_wd),
        "head_bias": lambda: sgd(head_lr_mult * bias_lr_mult, bias_wd),
        "frozen": optax.set_to_zero,
    }
    tx = optax.partition({g: groups[g]() for g in sorted(set(leaves))}, labels)
    tx = GroupedSGD(tx.init, tx.update)
    tx.param_labels = param_labels
    _OPTIMIZERS[key] = tx
    return tx


def _trainable_mask(tx, params):
    labels = getattr(tx, "param_labels", None)
    if labels is None:
        return jax.tree.map(lambda _: True, params)
    return jax.tree.map(lambda g: g != "frozen", labels)


# ---------------------------------------------------------------------------- state
def create_train_state(model, variables, tx, rng, mesh) -> TrainState:
    """A fresh state (step 0, ``tx.init`` optimiser state) placed replicated on ``mesh``.
    ``variables``: {'params', optional 'batch_stats'}; ``rng``: a typed key, raw key data or
    an int seed."""
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    repl = replicated(mesh)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    params, batch_stats, rng = jax.device_put((params, batch_stats, rng), repl)

    def init(params, batch_stats, rng):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                          opt_state=tx.init(params), rng=rng, apply_fn=model.apply, tx=tx)

    return jax.jit(init, out_shardings=repl)(params, batch_stats, rng)


def reset_optimizer(state: TrainState, mesh) -> TrainState:
    """Fresh SGD momentum (both references start a new optimiser every round), same shardings."""
    opt_state = jax.jit(state.tx.init, out_shardings=replicated(mesh))(state.params)
    return state.replace(opt_state=opt_state)


def _select(pred, new, old):
    return jax.tree.map(lambda n, o: jnp.where(pred, n, o), new, old)


def _cfg(config, name):
    return getattr(config, name, getattr(TrainConfig, name))


# ---------------------------------------------------------------------------- step
def make_train_step(model, config, mesh):
    """The jitted ``train_step(state, batch, lr_scale=1.0) -> (state, metrics)``.

    batch (global, sharded on axis 0): ``image`` uint8 (B,H,W,3) as the model expects them
    (models normalise internally), ``label`` uint8 (B,H,W) with 255 = ignore, ``is_target``
    bool (B,), optional ``soft_label`` (B,H,W,C) for CRST's LR* modes (target rows used, all-zero
    rows ignored): float distributions, or uint8 quantised rows that are renormalised here. The model is called as ``model.apply(variables, image, train=True,
    rngs={'dropout': key})``; with ``train_bn=False`` it must use its running statistics
    (``mutable=False`` fails loudly otherwise), with ``train_bn=True`` the running statistics
    are collected via ``mutable=['batch_stats']``. Logits are cast to float32 for the loss, so
    a bfloat16 model (``dtype``) still has a float32 loss.

    metrics (replicated scalars): ``loss, ce, reg, n_valid, n_valid_target, grad_norm`` (global
    norm of the trainable parameters' gradients), ``lr_scale`` and ``finite``. When the loss,
    the gradient norm or the update is NaN/inf, the step returns the input state unchanged (a per-leaf
    ``jnp.where`` select, no host sync) and ``finite=False``: the caller stops the run naming
    round and step, and its last good checkpoint and state stay intact.

    The returned function wraps the ``jax.jit`` (available as ``.jitted``) only to pass
    ``lr_scale`` as a float32 array, so Python floats never add a compilation.
    """
    resolution = _cfg(config, "loss_resolution")
    stride = int(_cfg(config, "stride"))
    regularizer = _cfg(config, "regularizer") or "none"
    reg_weight = float(_cfg(config, "reg_weight"))
    train_bn = bool(_cfg(config, "train_bn"))
    ignore_label = int(_cfg(config, "ignore_label"))
    if resolution not in losses.RESOLUTIONS:
        raise ValueError(f"loss_resolution must be one of {losses.RESOLUTIONS}, got {resolution!r}")
    if regularizer not in losses.REGULARIZERS:
        raise ValueError(f"regularizer must be one of {losses.REGULARIZERS}, got {regularizer!r}")

    def train_step(state: TrainState, batch, lr_scale):
        rng, dropout_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
        trainable = _trainable_mask(state.tx, state.params)
        soft = batch.get("soft_label")
        if soft is not None and soft.dtype == jnp.uint8:  # quantised rows (cbst_jax.soft_labels)
            soft = soft_labels.normalize_rows(soft)

        def loss_fn(params):
            params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)
            variables = {"params": params}
            if jax.tree.leaves(state.batch_stats):
                variables["batch_stats"] = state.batch_stats
            kwargs = dict(train=True, rngs={"dropout": dropout_rng})
            if train_bn:
                logits, mutated = model.apply(variables, batch["image"], mutable=["batch_stats"], **kwargs)
                new_stats = mutated["batch_stats"]
            else:
                logits = model.apply(variables, batch["image"], mutable=False, **kwargs)
                new_stats = state.batch_stats
            loss, aux = losses.segmentation_loss(
                logits.astype(jnp.float32), batch["label"], batch["is_target"], soft,
                resolution=resolution, stride=stride, regularizer=regularizer, reg_weight=reg_weight,
                ignore_label=ignore_label)
            return loss, (aux, new_stats)

        (loss, (aux, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_norm = optax.tree.norm([g for g, t in zip(jax.tree.leaves(grads), jax.tree.leaves(trainable)) if t])
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        updates = jax.tree.map(lambda u: u * lr_scale.astype(u.dtype), updates)
        new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                  batch_stats=new_stats, opt_state=opt_state,
                                  rng=jax.random.key_data(rng))
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
        metrics = dict(loss=loss, ce=aux["ce"], reg=aux["reg"], n_valid=aux["n_valid"],
                       n_valid_target=aux["n_valid_target"], grad_norm=grad_norm, lr_scale=lr_scale,
                       finite=finite)
        return _select(finite, new_state, state), metrics

    repl = replicated(mesh)
    jitted = jax.jit(train_step, in_shardings=(repl, batch_sharded(mesh), repl),
                     out_shardings=(repl, repl), donate_argnums=0)

    def step(state: TrainState, batch, lr_scale=1.0):
        if not isinstance(lr_scale, jax.Array):
            lr_scale = np.float32(lr_scale)
        return jitted(state, batch, lr_scale)

    step.jitted = jitted
    return step


__all__ = ["TrainState", "TrainConfig", "GroupedSGD", "lr_schedule", "round_lr_scale", "make_optimizer",
           "create_train_state", "reset_optimizer", "make_train_step"]
