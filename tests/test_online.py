"""Online teacher-student self-training (DACS / DAFormer + the seed's class-balanced thresholds):
the building blocks against numpy / scipy / brute force, and the one jitted step (wiring,
1 vs 8 devices, determinism, resume from a host copy, the non-finite guard)."""

import jax
import jax.numpy as jnp
import numpy as np

from cbst_jax import ema_teacher

K = 5  # classes of the small tests
IGN = 255


def host(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


# ------------------------------------------------------------------------------ EMA teacher
def test_ema_decay_matches_the_float64_schedule_rounded_once():
    ts = np.concatenate([np.arange(1, 3000), np.arange(2 ** 20 - 5, 2 ** 20 + 5)]).astype(np.int32)
    alphas = (0.999, 0.99, 0.9, 0.5, 0.0)
    decays = jax.jit(lambda t: [ema_teacher.decay(t, alpha) for alpha in alphas])(ts)  # one program
    for alpha, (a, b) in zip(alphas, decays):
        ref = [min(1 - 1 / (int(t) + 1), alpha) for t in ts]  # Python floats, as the references
        np.testing.assert_array_equal(np.asarray(a), np.array(ref, np.float32))
        np.testing.assert_array_equal(np.asarray(b), np.array([1 - r for r in ref], np.float32))
    a, _ = ema_teacher.decay(jnp.int32(1), 0.999)
    assert float(a) == 0.5  # the plain average of the first two students


def test_ema_update_matches_numpy():
    rng = np.random.default_rng(0)
    teacher = {"conv": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32)}, "b": rng.normal(size=7).astype(np.float32)}
    student = jax.tree.map(lambda x: (x + rng.normal(size=x.shape)).astype(np.float32), teacher)
    stats_t = {"mean": rng.normal(size=4).astype(np.float32)}
    stats_s = {"mean": rng.normal(size=4).astype(np.float32)}
    updates = {tb: jax.jit(lambda *x, tb=tb: ema_teacher.update(x[0], x[1], x[2], 0.999, x[3], x[4], tb))
               for tb in (False, True)}
    for t in (1, 7, 998, 999, 1000, 50000):
        a = np.float32(min(1 - 1 / (t + 1), 0.999))
        b = np.float32(1 - min(1 - 1 / (t + 1), 0.999))
        for train_bn in (False, True):
            params, stats = updates[train_bn](teacher, student, np.int32(t), stats_t, stats_s)
            expect = jax.tree.map(lambda e, s: (a * e + b * s).astype(np.float32), teacher, student)
            # within one rounding of the two-rounding reference: XLA may fuse a multiply-add
            jax.tree.map(lambda x, y: np.testing.assert_array_max_ulp(x, y, 1), host(params), expect)
            expect_stats = (a * stats_t["mean"] + b * stats_s["mean"]) if train_bn else stats_s["mean"]
            np.testing.assert_array_max_ulp(np.asarray(stats["mean"]), expect_stats, 1)
