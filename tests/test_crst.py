"""CRST LR* closed forms against numerical minimisers on the simplex, and the α → 0 limit (CBST)."""
import numpy as np
import pytest
from scipy import optimize

import jax
import jax.numpy as jnp

from cbst_jax import crst

K = 5
RNG = np.random.default_rng(0)


def random_pixels(n, k=K):
    probs = RNG.dirichlet(np.full(k, 0.5), size=n).astype(np.float32)
    thresholds = RNG.uniform(0.03, 1.0, size=k).astype(np.float32)
    thresholds[-1] = 1.0  # a never-selected class keeps λ = 1
    return probs, thresholds


def f_np(y, a, alpha, kind):
    """Objective −Σ ŷ a + α r(ŷ) in float64."""
    if kind == "lrent":
        r = np.sum(np.where(y > 0, y * np.log(np.where(y > 0, y, 1.0)), 0.0))
    elif kind == "lrl2":
        r = np.sum(y ** 2)
    else:
        r = -np.mean(np.log(y))
    return -np.dot(y, a) + alpha * r


def numeric_minimum(a, alpha, kind):
    """Best simplex point by scipy (the problems are convex; two starts guard against early
    stops): softmax-parametrised BFGS for the interior (entropy, log-barrier) regularisers,
    SLSQP with bounds for the sparse L2 one."""
    best = None
    for s in range(2):
        z0 = np.random.default_rng(s).normal(size=a.size)
        if kind == "lrl2":
            y0 = np.exp(z0) / np.exp(z0).sum()
            res = optimize.minimize(lambda y: f_np(y, a, alpha, kind), y0, method="SLSQP",
                                    bounds=[(0, 1)] * a.size, options=dict(ftol=1e-12, maxiter=500),
                                    constraints=[dict(type="eq", fun=lambda y: y.sum() - 1)])
            y = np.clip(res.x, 0, None)
            y /= y.sum()
        else:
            sm = lambda z: np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            res = optimize.minimize(lambda z: f_np(sm(z), a, alpha, kind), z0, method="BFGS",
                                    options=dict(gtol=1e-10))
            y = sm(res.x)
        val = f_np(y, a, alpha, kind)
        if best is None or val < best[1]:
            best = (y, val)
    return best


@pytest.mark.parametrize("kind,alpha", [("lrent", 0.25), ("lrent", 1.0), ("lrl2", 0.3), ("lrl2", 1.0),
                                        ("lrkld", 0.05), ("lrkld", 0.3)])
def test_closed_form_matches_numerical_minimiser(kind, alpha):
    probs = RNG.dirichlet(np.full(K, 0.2), size=12).astype(np.float32)  # a mix of kept and ignored
    lam = np.array([0.05, 0.1, 0.2, 0.4, 1.0], np.float32)
    soft = np.asarray(crst.soft_pseudo_labels(jnp.asarray(probs), jnp.asarray(lam), kind=kind, alpha=alpha))
    a = np.log(probs.astype(np.float64)) - np.log(lam.astype(np.float64))
    kept = 0
    for i in range(len(probs)):
        y_num, v_num = numeric_minimum(a[i], alpha, kind)
        if abs(v_num) < 1e-3:
            continue  # at the keep/ignore boundary: either answer is optimal
        if v_num < 0:
            kept += 1
            np.testing.assert_allclose(soft[i].sum(), 1.0, atol=1e-5)
            v_ours = f_np(soft[i].astype(np.float64), a[i], alpha, kind)
            assert v_ours <= v_num + 1e-5 * max(1.0, abs(v_num))
            np.testing.assert_allclose(soft[i], y_num, atol=2e-3)
        else:
            np.testing.assert_array_equal(soft[i], 0.0)  # the ŷ = 0 option wins: ignored
    assert kept > 0


@pytest.mark.parametrize("kind", ["lrent", "lrl2", "lrkld"])
def test_closed_form_beats_dense_random_search(kind):
    probs, lam = random_pixels(8)
    alpha = 0.5
    soft = np.asarray(crst.soft_pseudo_labels(jnp.asarray(probs), jnp.asarray(lam), kind=kind, alpha=alpha))
    ours = np.asarray(crst.objective(jnp.asarray(soft), jnp.asarray(probs), jnp.asarray(lam), alpha, kind))
    cand = np.concatenate([RNG.dirichlet(np.full(K, c), size=4000) for c in (0.2, 1.0, 5.0)])
    cand = np.clip(cand, 1e-12, None)
    a = np.log(probs.astype(np.float64)) - np.log(lam.astype(np.float64))
    for i in range(len(probs)):
        r = {"lrent": (cand * np.log(cand)).sum(1), "lrl2": (cand ** 2).sum(1),
             "lrkld": -np.log(cand).mean(1)}[kind]
        best_random = min(0.0, np.min(-cand @ a[i] + alpha * r))
        assert ours[i] <= best_random + 1e-5


def test_lrent_is_the_code_formula():
    probs, lam = random_pixels(50)
    alpha = 0.25
    soft = np.asarray(crst.lrent_soft_labels(jnp.asarray(probs), jnp.asarray(lam), alpha))
    # CRST label_selection, in float64.
    p, l = probs.astype(np.float64), lam.astype(np.float64)
    ref = (p / l) ** (1.0 / alpha)
    ref /= ref.sum(-1, keepdims=True)
    reg_score = np.sum(-ref * np.log(p) + alpha * ref * np.log(ref), -1)
    sel_score = np.sum(-ref * np.log(l), -1)
    ref[reg_score >= sel_score] = 0
    np.testing.assert_allclose(soft, ref, atol=1e-5)


def test_simplex_projection():
    v = RNG.normal(size=(200, 7)).astype(np.float32) * 3
    y = np.asarray(crst.project_to_simplex(jnp.asarray(v)))
    assert (y >= 0).all()
    np.testing.assert_allclose(y.sum(-1), 1.0, atol=1e-5)
    for i in range(0, 200, 40):  # projection: closer than any other simplex point sampled
        cand = RNG.dirichlet(np.full(7, 0.3), size=2000)
        assert ((y[i] - v[i]) ** 2).sum() <= ((cand - v[i]) ** 2).sum(1).min() + 1e-5
    np.testing.assert_allclose(np.asarray(crst.project_to_simplex(jnp.asarray([[0.2, 0.3, 0.5]]))),
                               [[0.2, 0.3, 0.5]], atol=1e-6)


@pytest.mark.parametrize("kind,alpha", [("lrent", 1e-3), ("lrl2", 1e-4), ("lrkld", 1e-4)])
def test_alpha_to_zero_recovers_cbst_hard_labels(kind, alpha):
    probs, lam = random_pixels(400, k=7)
    ratio = probs / lam
    margin = np.abs(np.log(ratio.max(-1))) > 0.05  # away from the keep/ignore boundary
    top2 = np.sort(np.log(ratio), -1)[:, -2:]
    margin &= (top2[:, 1] - top2[:, 0]) > 0.05  # and from argmax ties
    soft = crst.soft_pseudo_labels(jnp.asarray(probs), jnp.asarray(lam), kind=kind, alpha=alpha)
    got = np.asarray(crst.hard_labels(soft))
    cbst = np.where(ratio.max(-1) >= 1, ratio.argmax(-1), 255).astype(np.uint8)
    np.testing.assert_array_equal(got[margin], cbst[margin])
    assert (cbst[margin] != 255).any() and (cbst[margin] == 255).any()


def test_jit_leading_shape_and_zero_probabilities():
    probs = RNG.dirichlet(np.ones(4), size=(2, 3, 5)).astype(np.float32)
    probs[0, 0, 0] = [1.0, 0.0, 0.0, 0.0]
    lam = np.array([0.5, 0.9, 1.0, 0.7], np.float32)
    for kind in crst.KINDS:
        fn = jax.jit(lambda p, l: crst.soft_pseudo_labels(p, l, kind=kind, alpha=0.3))
        soft = np.asarray(fn(jnp.asarray(probs), jnp.asarray(lam)))
        assert soft.shape == probs.shape and np.isfinite(soft).all()
        sums = soft.sum(-1)
        assert np.all((np.abs(sums - 1) < 1e-5) | (sums == 0))
        if kind != "lrkld":  # LRKLD's log barrier makes near-one-hot labels costly: ignored here
            assert soft[0, 0, 0].argmax() == 0 and sums[0, 0, 0] > 0
    assert np.asarray(crst.hard_labels(jnp.zeros((2, 4)))).tolist() == [255, 255]


@pytest.mark.parametrize("kind", crst.KINDS)
def test_keep_cbst_labels_exactly_cbst_pixels(kind):
    """keep="cbst": the kept pixels and the argmax are CBST's (select_pseudo_labels, an
    independent code path), the labels are the unrestricted simplex minimisers there."""
    from cbst_jax import selection

    probs, lam = random_pixels(2000, k=7)
    soft = np.asarray(crst.soft_pseudo_labels(jnp.asarray(probs), jnp.asarray(lam), kind=kind, alpha=0.25,
                                              keep="cbst"))
    cbst = np.asarray(selection.select_pseudo_labels(jnp.asarray(probs), jnp.asarray(lam)))
    kept = cbst != 255
    assert 0 < kept.sum() < len(kept)
    np.testing.assert_array_equal(soft.sum(-1) > 0, kept)
    np.testing.assert_array_equal(np.asarray(crst.hard_labels(soft)), cbst)
    a = np.log(np.maximum(probs, np.finfo(np.float32).tiny).astype(np.float64)) - np.log(lam.astype(np.float64))
    for i in np.flatnonzero(kept)[:15]:
        _, best = numeric_minimum(a[i], 0.25, kind)
        assert f_np(soft[i].astype(np.float64), a[i], 0.25, kind) <= best + 1e-4
    with pytest.raises(ValueError, match="keep rule"):
        crst.soft_pseudo_labels(jnp.asarray(probs), jnp.asarray(lam), kind=kind, alpha=0.25, keep="nope")
