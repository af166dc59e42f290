"""The mean teacher of online self-training: an exponential moving average (EMA) of the student.

After the student's ``t``-th update (``t >= 1``) the teacher becomes

    teacher <- a_t * teacher + b_t * student,   a_t = min(1 - 1/(t + 1), alpha),  b_t = 1 - a_t

with ``alpha = 0.999`` (DAFormer: ``configs/_base_/uda/dacs_a999_fdthings.py``; DACS itself
used 0.99, ``configs/_base_/uda/dacs.py`` and vikolss/DACS ``trainUDA.py``). The early
schedule ``1 - 1/(t + 1)`` makes the teacher the plain average of the students seen so far
until the EMA weight takes over (lhoyer/DAFormer ``mmseg/models/uda/dacs.py`` ``_update_ema``;
vikolss/DACS ``update_ema_variables``). The teacher starts as a copy of the student
(``_init_ema_weights``) and gets no gradients.

Index: DAFormer updates the teacher at the start of iteration ``i > 0`` with ``a_i`` and the
student after ``i`` updates, then labels the target with it; our step updates it at the end of
the step that made the student's ``t``-th update, with ``a_t``, which is the same teacher for
the same target batch.

Arithmetic, as the references' (a Python float64 ``alpha_teacher`` times a float32 tensor):
``a_t`` and ``b_t`` are the float64 values ``min(1 - 1/(t+1), alpha)`` and ``1 - that``, each
rounded once to float32, and the update is ``a*teacher + b*student`` in float32. On device
(no float64 there) the schedule branch is ``t/(t+1)`` and ``1/(t+1)`` correctly rounded
(:func:`cbst_jax.selection.correctly_rounded_divide`; for ``t < 2**24`` these equal the float64
expressions rounded to float32, tested), the constant branch two float32 constants computed on
the host, and the switch between them is the step ``t`` where the float64 schedule first
reaches ``alpha`` (found on the host). The weights are the references' exactly; the update
itself may differ from torch's two roundings by one ulp where XLA fuses it into a
multiply-add (measured on CPU).

BatchNorm statistics: DAFormer averages ``parameters()`` only; its teacher runs in training
mode, so its BatchNorm layers normalise with the target batch's own statistics and its running
buffers are never used. Our teacher predicts in eval mode (running statistics, no dropout):
with frozen BatchNorm (every network here by default, and both CBST references) the running
statistics are constants and the teacher uses the student's; with trained BatchNorm the
teacher's running statistics are the same EMA of the student's (:func:`update`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cbst_jax.selection import correctly_rounded_divide

ALPHA = 0.999  # DAFormer, configs/_base_/uda/dacs_a999_fdthings.py


@functools.lru_cache(maxsize=None)
def _schedule_end(alpha: float) -> int:
    """The first ``t >= 1`` with ``1 - 1/(t+1) >= alpha`` in float64 (where ``min`` picks alpha)."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must lie in [0, 1), got {alpha}")
    t = max(1, int(np.floor(1.0 / (1.0 - alpha))) - 2)
    while 1.0 - 1.0 / (t + 1) < alpha:
        t += 1
    while t > 1 and 1.0 - 1.0 / t >= alpha:
        t -= 1
    return t


def decay(t, alpha: float = ALPHA):
    """``(a_t, b_t)`` float32 for the update after the student's ``t``-th step (``t >= 1``,
    int32, traceable): ``a_t = min(1 - 1/(t+1), alpha)``, ``b_t = 1 - a_t``, as the references
    compute them in float64 and round to float32."""
    end = _schedule_end(float(alpha))
    t = jnp.asarray(t, jnp.int32)
    tf = t.astype(jnp.float32)
    a_sched = correctly_rounded_divide(tf, tf + 1)
    b_sched = correctly_rounded_divide(np.float32(1), tf + 1)
    const = t >= end
    return (jnp.where(const, np.float32(alpha), a_sched),
            jnp.where(const, np.float32(1.0 - float(alpha)), b_sched))


def average(teacher, student, a, b):
    """``a * teacher + b * student`` leaf by leaf (float32 products, then the sum)."""
    return jax.tree.map(lambda e, s: (a * e + b * s).astype(e.dtype), teacher, student)


def update(teacher_params, student_params, t, alpha: float = ALPHA, teacher_stats=None,
           student_stats=None, train_bn: bool = False):
    """The teacher after the student's ``t``-th update: ``(params, batch_stats)``.

    Parameters are averaged; BatchNorm running statistics are averaged the same way when the
    student trains them (``train_bn``) and are the student's (constants) otherwise.
    """
    a, b = decay(t, alpha)
    params = average(teacher_params, student_params, a, b)
    stats = average(teacher_stats, student_stats, a, b) if train_bn else student_stats
    return params, stats


__all__ = ["ALPHA", "decay", "average", "update"]
