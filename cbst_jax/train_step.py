"""The retraining step of CBST / CRST: train state, SGD / AdamW parameter groups, the learning-rate
schedule and one jitted, data-parallel ``train_step``.

Data parallelism follows big_vision: one ``('data',)`` mesh, the state replicated, the batch
sharded on its leading axis, everything inside one ``jax.jit`` with ``NamedSharding`` in/out
shardings and the state donated. On global arrays the mean losses, BatchNorm statistics and the
gradient all-reduce span the whole batch, so 1 device and N devices run the same computation.

Learning rate. The optimiser (:func:`make_optimizer`) runs at unit rate with its parameter
groups' multipliers; the step closes over it and takes the step's learning rate as a float32
scalar *argument* (:func:`learning_rate`), so a schedule, a new round's rate or a new round's
fresh optimiser state never recompiles it. Scaling the SGD update after the momentum trace is
exactly a change of learning rate, as in ``torch.optim.SGD``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from cbst_jax import losses, soft_labels
from cbst_jax.labels import IGNORE_INDEX
from cbst_jax.sharding import batch_sharded, replicated

# "*_no_decay": trained without weight decay (transformer recipes: the encoder's norms)
GROUPS = ("backbone", "head", "frozen", "backbone_no_decay", "head_no_decay")
SCHEDULES = ("constant", "poly")
OPTIMIZERS = ("sgd", "adam")


@struct.dataclass
class TrainState:
    """Everything a training step reads and writes, all arrays (what a checkpoint holds); the
    optimiser is not part of it, the step closes over it.

    ``batch_stats`` are BatchNorm running statistics (constants when BN is frozen, as in both
    references); ``rng`` is raw uint32 key data (``jax.random.key_data``) so checkpoints and the
    non-finite select treat it like any array.
    """
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: optax.OptState
    rng: jax.Array


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
    ignore_label: int = IGNORE_INDEX


# ---------------------------------------------------------------------------- schedules
def learning_rate(base: float, schedule: str, step: int, total_steps: int, power: float = 0.9,
                  warmup_steps: int = 0, warmup_ratio: float = 1e-6) -> np.float32:
    """The learning rate of step ``step`` (0-based) of a phase of ``total_steps`` steps: constant
    ``base`` or DeepLab's poly ``base · (1 − step/total)^power`` (CRST's ``lr_poly``), passed to the
    jitted step as an argument so that no schedule or round ever recompiles it.

    ``warmup_steps`` > 0 adds mmcv's linear warm-up (SegFormer / DAFormer: 1500 steps, ratio 1e-6):
    for step < warmup_steps the rate is multiplied by ``r + (1 − r) · step / warmup_steps``
    (``r`` = ``warmup_ratio``), i.e. ``optax.linear_schedule(r, 1, warmup_steps)`` times
    ``optax.polynomial_schedule(base, 0, power, total)`` (the test checks both forms).

    Evaluated on the host in float64 and rounded once to float32, as the references compute it in
    Python floats. Not optax's schedules themselves: they evaluate in float32, and 712 of the 1000
    per-step rates of the embedded benchmark's source phase then differ from the float64 value by
    an ulp (measured), which would make runs differ from the references' arithmetic; and on an
    accelerator each call would be a device computation read back every step."""
    if schedule == "constant":
        rate = base
    elif schedule == "poly":
        if total_steps <= 0:
            raise ValueError("the poly schedule needs total_steps > 0")
        rate = base * (1.0 - min(step, total_steps) / total_steps) ** power
    else:
        raise ValueError(f"unknown LR schedule {schedule!r}; expected one of {SCHEDULES}")
    if step < warmup_steps:
        rate *= warmup_ratio + (1.0 - warmup_ratio) * step / warmup_steps
    return np.float32(rate)


# ---------------------------------------------------------------------------- optimiser
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


def make_optimizer(param_labels, *, momentum: float = 0.9, weight_decay: float = 5e-4,
                   head_lr_mult: float = 10.0, bias_lr_mult: float = 1.0, bias_weight_decay=None,
                   optimizer: str = "sgd") -> optax.GradientTransformation:
    """SGD with momentum and coupled weight decay, in parameter groups (``torch.optim.SGD``), at
    unit learning rate: the step multiplies the update by the step's learning rate (scaling
    the SGD update after the momentum trace is exactly a change of learning rate, as in
    ``torch.optim.SGD``). ``optimizer="adam"`` swaps in AdamW per group (``torch.optim.AdamW``:
    betas 0.9/0.999, eps 1e-8, decoupled decay ``w −= lr·mult·wd·w``; the transformer recipes',
    and the embedded benchmark's small networks trained from scratch).

    ``param_labels``: pytree of "backbone" | "head" | "frozen" | "backbone_no_decay" |
    "head_no_decay" over the params (e.g. ``cbst_jax.models.param_groups``). Per group: ``d = g +
    wd·w``, ``buf = momentum·buf + d``, ``w −= lr·mult·buf`` with mult 1 (backbone) or
    ``head_lr_mult`` (head, DeepLab's and SegFormer's 10×); "*_no_decay" groups have weight decay 0
    (SegFormer / DAFormer: the encoder's norms); "frozen" leaves get no update at all
    (``set_to_zero``: no decay, no momentum). CBST's MXNet ``lr_type='alex'`` ("biases lr×2, wd 0")
    is ``bias_lr_mult=2, bias_weight_decay=0``; biases are non-frozen leaves named ``bias``.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    bias_wd = weight_decay if bias_weight_decay is None else bias_weight_decay
    split_bias = bias_lr_mult != 1.0 or bias_wd != weight_decay
    labels = _bias_aware_labels(param_labels, split_bias)

    def group(mult, wd):
        if optimizer == "adam":  # decoupled decay (AdamW): L2 through Adam's normaliser does little
            return optax.adamw(mult, weight_decay=wd)
        parts = ([optax.add_decayed_weights(wd)] if wd else []) + [optax.sgd(mult, momentum=momentum)]
        return optax.chain(*parts)

    def settings(name):  # "<backbone|head>[_no_decay][_bias]" -> (LR multiplier, weight decay)
        mult = (head_lr_mult if name.startswith("head") else 1.0) * (bias_lr_mult if name.endswith("_bias") else 1.0)
        wd = 0.0 if "_no_decay" in name else bias_wd if name.endswith("_bias") else weight_decay
        return mult, wd

    return optax.partition({g: optax.set_to_zero() if g == "frozen" else group(*settings(g))
                            for g in sorted(set(jax.tree.leaves(labels)))}, labels)


# ---------------------------------------------------------------------------- state
def state_initializer(tx, mesh):
    """``init(variables, rng) -> TrainState``: a fresh state (step 0, ``tx.init`` optimiser
    state: both references start a new optimiser every round) placed replicated on ``mesh``.
    One jitted program per optimiser, however many rounds start from it. ``variables``:
    {'params', optional 'batch_stats'}; ``rng``: a typed key, raw key data or an int seed."""
    repl = replicated(mesh)

    def build(params, batch_stats, rng):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                          opt_state=tx.init(params), rng=rng)

    jitted = jax.jit(build, out_shardings=repl)

    def init(variables, rng) -> TrainState:
        return jitted(*state_inputs(variables, rng, repl))

    return init


def state_inputs(variables, rng, sharding):
    """``(params, batch_stats, raw key data)`` of a fresh state, placed with ``sharding``:
    ``variables`` {'params', optional 'batch_stats'}; ``rng`` a typed key, raw key data or an
    int seed (a state keeps the raw key data)."""
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    return jax.device_put((variables["params"], variables.get("batch_stats", {}), rng), sharding)


def create_train_state(variables, tx, rng, mesh) -> TrainState:
    """A fresh state of optimiser ``tx`` (:func:`state_initializer`, once)."""
    return state_initializer(tx, mesh)(variables, rng)


def _select(pred, new, old):
    return jax.tree.map(lambda n, o: jnp.where(pred, n, o), new, old)


def _cfg(config, name):
    return getattr(config, name, getattr(TrainConfig, name))


# ---------------------------------------------------------------------------- step
def make_train_step(model, tx, config, mesh, param_labels=None):
    """The jitted ``train_step(state, batch, lr) -> (state, metrics)`` of optimiser ``tx``
    (:func:`make_optimizer`; states from :func:`create_train_state` with the same ``tx``) at
    learning rate ``lr`` (:func:`learning_rate`). ``param_labels``, the groups ``tx`` was built
    from, marks the "frozen" leaves, whose gradients are not taken.

    batch (global, sharded on axis 0): ``image`` uint8 (B,H,W,3) as the model expects them
    (models normalise internally), ``label`` uint8 (B,H,W) with 255 = ignore, ``is_target``
    bool (B,), optional ``soft_label`` (B,H,W,C) for CRST's LR* modes (target rows used, all-zero
    rows ignored): float distributions, or uint8 quantised rows that are renormalised here. The model is called as ``model.apply(variables, image, train=True,
    rngs={'dropout': key})``; with ``train_bn=False`` it must use its running statistics
    (``mutable=False`` fails loudly otherwise), with ``train_bn=True`` the running statistics
    are collected via ``mutable=['batch_stats']``. Logits are cast to float32 for the loss, so
    a bfloat16 model (``dtype``) still has a float32 loss.

    metrics (replicated scalars): ``loss, ce, reg, n_valid, n_valid_target, grad_norm`` (global
    norm of the trainable parameters' gradients), ``lr`` and ``finite``. When the loss,
    the gradient norm or the update is NaN/inf, the step returns the input state unchanged (a per-leaf
    ``jnp.where`` select, no host sync) and ``finite=False``: the caller stops the run naming
    round and step, and its last good checkpoint and state stay intact.

    The returned function wraps the ``jax.jit`` (available as ``.jitted``) only to pass ``lr``
    as a float32 array, so Python floats never add a compilation.
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

    def train_step(state: TrainState, batch, lr):
        rng, dropout_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
        trainable = (jax.tree.map(lambda _: True, state.params) if param_labels is None
                     else jax.tree.map(lambda g: g != "frozen", param_labels))
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
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        updates = jax.tree.map(lambda u: u * lr.astype(u.dtype), updates)
        new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                  batch_stats=new_stats, opt_state=opt_state,
                                  rng=jax.random.key_data(rng))
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
        metrics = dict(loss=loss, ce=aux["ce"], reg=aux["reg"], n_valid=aux["n_valid"],
                       n_valid_target=aux["n_valid_target"], grad_norm=grad_norm, lr=lr,
                       finite=finite)
        return _select(finite, new_state, state), metrics

    repl = replicated(mesh)
    jitted = jax.jit(train_step, in_shardings=(repl, batch_sharded(mesh), repl),
                     out_shardings=(repl, repl), donate_argnums=0)

    def step(state: TrainState, batch, lr=1.0):
        if not isinstance(lr, jax.Array):
            lr = np.float32(lr)
        return jitted(state, batch, lr)

    step.jitted = jitted
    return step


__all__ = ["TrainState", "TrainConfig", "learning_rate", "make_optimizer", "state_initializer", "create_train_state",
           "make_train_step"]
