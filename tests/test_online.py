"""Online teacher-student self-training (DACS / DAFormer + the seed's class-balanced thresholds):
the building blocks against numpy / scipy / brute force, and the one jitted step (wiring,
1 vs 8 devices, determinism, resume from a host copy, the non-finite guard)."""
from collections import Counter

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from cbst_jax import (class_mix, device_thresholds, ema_teacher, feature_distance, losses, online_step,
                      online_thresholds, rare_class_sampling as rcs, selection, strong_augment as sa, train_step)
from cbst_jax.sharding import make_mesh, to_global

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


# ------------------------------------------------------------------------------ ClassMix
def _labels(rng, b=6, hw=(9, 11)):
    lab = rng.integers(0, K, (b, *hw)).astype(np.uint8)
    lab[0, rng.random(hw) < 0.3] = IGN  # ignore counts as a class (DACS)
    lab[1] = 3  # a single class: ceil(1/2) = 1, always pasted
    lab[2] = IGN  # only ignore
    lab[3, :, :] = np.where(rng.random(hw) < 0.5, 1, 4)  # two classes: one of them
    return lab


def test_class_masks_choose_half_of_the_present_classes():
    rng = np.random.default_rng(1)
    labels = _labels(rng)
    masks_fn = jax.jit(lambda k, l: class_mix.class_masks(k, l, K))
    for seed in range(12):
        mask, chosen = host(masks_fn(jax.random.key(seed), labels))
        for i, lab in enumerate(labels):
            present = sorted(set(np.minimum(lab, K).ravel().tolist()))  # values >= C are the ignore class C
            picked = np.flatnonzero(chosen[i]).tolist()
            assert set(picked) <= set(present)
            assert len(picked) == (len(present) + len(present) % 2) // 2  # ceil(n / 2), DACS's rounding
            values = [IGN if c == K else c for c in picked]
            np.testing.assert_array_equal(mask[i], np.isin(lab, values))


def test_class_mix_subsets_are_uniform():
    label = np.repeat(np.array([0, 1, 2, 4], np.uint8), 4).reshape(1, 4, 4)  # 4 classes: C(4,2) = 6 subsets
    chosen = jax.jit(jax.vmap(lambda k: class_mix.class_masks(k, label, K)[1][0]))(
        jax.random.split(jax.random.key(0), 1200))
    counts = Counter(tuple(np.flatnonzero(c)) for c in np.asarray(chosen))
    assert len(counts) == 6 and all(130 < n < 270 for n in counts.values()), counts  # 200 expected each


def test_mixed_image_label_and_weight():
    rng = np.random.default_rng(2)
    b, hw = 4, (6, 7)
    mask = rng.random((b, *hw)) < 0.5
    src = rng.integers(0, 256, (b, *hw, 3)).astype(np.uint8)
    tgt = rng.integers(0, 256, (b, *hw, 3)).astype(np.uint8)
    src_lab = rng.integers(0, K, (b, *hw)).astype(np.uint8)
    pl = rng.integers(0, K, (b, *hw)).astype(np.int32)
    pw = rng.random((b, *hw)).astype(np.float32)
    img, lab, w = host(jax.jit(class_mix.mix_batch)(mask, src, tgt, src_lab, pl, pw))
    m = mask.astype(np.int64)
    np.testing.assert_array_equal(img, (m[..., None] * src + (1 - m[..., None]) * tgt).astype(np.uint8))
    np.testing.assert_array_equal(lab, m * src_lab + (1 - m) * pl)
    np.testing.assert_array_equal(w, np.where(mask, 1.0, pw).astype(np.float32))


# ------------------------------------------------------------------------- strong augment
def _hsv_np(x):
    """kornia 0.5.8's rgb_to_hsv in numpy float64 (written from its formula)."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = x.max(-1)
    delta = v - x.min(-1)
    s = delta / (v + 1e-6)
    d = np.where(delta == 0, 1.0, delta)
    h = np.select([r == v, g == v], [(v - b) - (v - g), 2 * d + (v - r) - (v - b)], 4 * d + (v - g) - (v - r)) / d
    return np.stack([2 * np.pi * ((h / 6) % 1.0), s, v], -1)


def _rgb_np(hsv):
    h, s, v = hsv[..., 0] / (2 * np.pi), hsv[..., 1], hsv[..., 2]
    hi = np.floor(h * 6) % 6
    f = (h * 6) % 6 - hi
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = {0: (v, t, p), 1: (q, v, p), 2: (p, v, t), 3: (p, q, v), 4: (t, p, v), 5: (v, p, q)}
    out = np.zeros(hsv.shape)
    for k, (rr, gg, bb) in table.items():
        sel = hi == k
        out[sel] = np.stack([rr, gg, bb], -1)[sel]
    return out


def _jitter_np(x, p):
    for op in p["order"]:
        if op == 0:
            x = np.clip(x + (p["brightness"] - 1), 0, 1)
        elif op == 1:
            x = np.clip(x * p["contrast"], 0, 1)
        else:
            hsv = _hsv_np(x)
            if op == 2:
                hsv[..., 1] = np.clip(hsv[..., 1] * p["saturation"], 0, 1)
            else:
                hsv[..., 0] = np.fmod(hsv[..., 0] + p["hue"] * 2 * np.pi, 2 * np.pi)
            x = _rgb_np(hsv)
    return x


def test_color_jitter_matches_a_numpy_reference():
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (6, 10, 12, 3)).astype(np.uint8)
    images[0, :3] = images[0, :3, :, :1]  # grey pixels (delta = 0) and channel ties
    params = host(jax.jit(lambda k: sa.jitter_params(k, 6, 0.2))(jax.random.key(5)))
    assert np.all((params["brightness"] >= 0.8) & (params["brightness"] <= 1.2))
    assert np.all((params["hue"] >= -0.2) & (params["hue"] <= 0.2))
    assert all(sorted(o) == [0, 1, 2, 3] for o in params["order"])
    out = np.asarray(jax.jit(sa.color_jitter)(images / np.float32(255), params))
    for i in range(6):
        p = {k: (v[i] if k == "order" else float(v[i])) for k, v in params.items()}
        np.testing.assert_allclose(out[i], _jitter_np(images[i] / 255.0, p), atol=2e-5)
    hsv = np.asarray(jax.jit(sa.rgb_to_hsv)(images / np.float32(255)))
    np.testing.assert_allclose(hsv, _hsv_np(images / 255.0), atol=2e-5)


def test_gaussian_blur_matches_scipy():
    assert [sa.blur_kernel_size(n) for n in (10, 64, 512, 1024, 720)] == [1, 7, 51, 103, 71]
    rng = np.random.default_rng(4)
    images = rng.uniform(0, 255, (3, 64, 40, 3)).astype(np.float32)
    sigmas = np.array([0.15, 0.6, 1.15], np.float32)
    out = np.asarray(jax.jit(sa.gaussian_blur)(images, sigmas))
    for i, s in enumerate(sigmas):
        ref = images[i].astype(np.float64)
        for axis, k in ((0, 7), (1, 3)):  # ceil(6.4) = 7; ceil(4.0) = 4, even: 3
            x = np.arange(k) - k // 2
            taps = np.exp(-x ** 2 / (2 * float(s) ** 2))
            ref = ndimage.correlate1d(ref, taps / taps.sum(), axis=axis, mode="mirror")  # torch "reflect"
        np.testing.assert_allclose(out[i], ref, rtol=1e-5, atol=2e-4)


def test_strong_augment_probabilities_and_output():
    images = np.random.default_rng(5).integers(0, 256, (2, 12, 12, 3)).astype(np.uint8)
    run = jax.jit(jax.vmap(lambda k: sa.strong_augment(k, images)))
    out, (jit, blur) = run(jax.random.split(jax.random.key(1), 1000))
    assert 0.75 < float(jnp.mean(jit)) < 0.85 and 0.44 < float(jnp.mean(blur)) < 0.56  # P = 0.8, 0.5
    untouched = ~np.asarray(jit) & ~np.asarray(blur)
    np.testing.assert_array_equal(np.asarray(out)[untouched], np.broadcast_to(images, out.shape)[untouched])
    assert np.asarray(out).dtype == np.float32 and np.all((np.asarray(out) >= 0) & (np.asarray(out) <= 255))


# ------------------------------------------------------------------------ rare-class sampling
def test_rcs_probabilities_follow_the_published_formula():
    rng = np.random.default_rng(6)
    counts = rng.integers(0, 20000, (40, 6))
    counts[:, 4] = rng.integers(0, 3001, 40)  # class 4: never more than 3000 pixels in an image
    counts[:, 5] = 0  # class 5: absent from the source
    labels = [rng.choice(7, size=(20, 20), p=[0.3, 0.2, 0.2, 0.1, 0.1, 0.05, 0.05]).astype(np.uint8) for _ in range(3)]
    for lab in labels:
        lab[lab == 6] = IGN
    np.testing.assert_array_equal(rcs.image_class_counts(labels, 6),
                                  [[np.sum(lab == c) for c in range(6)] for lab in labels])
    sampler = rcs.RareClassSampler(counts, temperature=0.01, min_pixels=3000, seed=3)
    f = counts.sum(0) / counts.sum()
    w = np.exp((1 - f[:4]) / 0.01)  # P(c) ∝ exp((1 - f_c) / T) over the classes that can be drawn
    np.testing.assert_allclose(sampler.probabilities[:4], w / w.sum(), rtol=1e-12)
    assert sampler.probabilities[4] == sampler.probabilities[5] == 0 and sampler.excluded == (4, 5)
    for c in range(4):
        np.testing.assert_array_equal(sampler.images_of[c], np.flatnonzero(counts[:, c] > 3000))


def test_rcs_draws_are_a_pure_function_of_seed_and_step():
    rng = np.random.default_rng(7)
    counts = rng.integers(0, 20000, (30, 5))
    a = rcs.RareClassSampler(counts, temperature=0.1, seed=11)
    b = rcs.RareClassSampler(counts.copy(), temperature=0.1, seed=11)
    draws = [a.draw(s, 4) for s in range(3000)]
    for s in (0, 17, 2999):
        np.testing.assert_array_equal(b.draw(s, 4)[0], draws[s][0])
        np.testing.assert_array_equal(b.draw(s, 4)[1], draws[s][1])
    assert not all(np.array_equal(draws[0][0], d[0]) for d in draws[1:10])
    classes = np.concatenate([d[0] for d in draws])
    images = np.concatenate([d[1] for d in draws])
    assert np.all(counts[images, classes] > 3000)
    freq = np.bincount(classes, minlength=5) / classes.size
    assert np.all(np.abs(freq - a.probabilities) < 4 * np.sqrt(a.probabilities / classes.size) + 1e-9)
    with pytest.raises(ValueError):
        rcs.RareClassSampler(np.full((3, 2), 10), min_pixels=3000)


def test_rcs_crop_redraw():
    crops = [np.full((10, 10), 0)] * 4 + [np.full((10, 10), 2)] + [np.full((10, 10), 0)] * 7
    assert rcs.choose_crop(lambda a: crops[a], 2, min_pixels=100, min_crop_ratio=0.5)[0] == 4  # 100 > 50
    assert rcs.choose_crop(lambda a: crops[a], 1, min_pixels=100, min_crop_ratio=0.5)[0] == 10  # kept unchecked
    assert rcs.choose_crop(lambda a: crops[a], 1, min_pixels=100, min_crop_ratio=0.0)[0] == 0


# ------------------------------------------------------------------------------ thresholds
def test_device_rank_equals_the_float64_reference():
    rng = np.random.default_rng(8)
    ns = np.concatenate([np.arange(0, 2000), rng.integers(0, 2 ** 31 - 1, 20000),
                         10 * rng.integers(0, 2 ** 27, 3000), 1000 * rng.integers(0, 2 ** 21, 3000),
                         [2 ** 31 - 1, 2 ** 30, 2 ** 24 + 1]]).astype(np.int64)
    portions = [0.1, 0.2, 0.25, 0.3, 0.35, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1e-7, 0.0025, 0.05, 1 - 2 ** -53,
                *rng.random(40).tolist()]
    rank = jax.jit(device_thresholds.selection_rank)
    for p in portions:
        got = np.asarray(rank(ns.astype(np.int32), device_thresholds.portion_words(p)))
        ref = np.array([selection.selection_rank(n, p) for n in ns])  # int(np.floor(n * p)) in float64
        np.testing.assert_array_equal(got, ref, err_msg=f"p={p!r}")
        if p in (0.3, 0.7):  # where the float64 product and the exact one disagree, the test can tell
            num, den = p.as_integer_ratio()
            assert np.any(ref != np.array([int(n) * num // den for n in ns]))
    with pytest.raises(ValueError):
        device_thresholds.portion_words(0.0)


def _brute_thresholds(conf, pred, p):
    lam = np.ones(K, np.float32)
    for c in range(K):
        vals = np.sort(conf[pred == c])[::-1]
        r = int(np.floor(len(vals) * p))
        if r > 0:
            lam[c] = vals[r - 1]
    return lam


def _teacher_probs(rng, b, hw, quantize=True):
    logits = rng.normal(size=(b, *hw, K)) * 2
    logits[..., 2] -= 3  # a rare class
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    if quantize:  # many exact ties in the confidences
        probs = np.round(probs * 64) / 64
    return probs.astype(np.float32)


@pytest.mark.parametrize("with_prior,mesh_devices", [(False, None), (True, 8)])
def test_online_thresholds_equal_offline_bit_for_bit(with_prior, mesh_devices):
    rng = np.random.default_rng(9)
    b, hw, slots = 8, (12, 10), 3
    mesh = None if mesh_devices is None else make_mesh(jax.devices()[:mesh_devices])
    prior = rng.uniform(0.2, 2.0, (*hw, K)).astype(np.float32) if with_prior else None
    window = online_thresholds.Window.empty(slots, (b, *hw), K)
    if mesh is not None:
        window = jax.device_put(window, online_thresholds.window_shardings(mesh))

    @jax.jit
    def step(window, probs, words):
        conf, pred = selection.confidence(probs, prior)
        window = online_thresholds.insert(window, conf, pred)
        return window, online_thresholds.window_thresholds(window, K, words, mesh)

    batches = []
    for t, p in enumerate((0.2, 0.3, 0.5, 0.35, 0.7)):
        batches.append(_teacher_probs(rng, b, hw, quantize=t % 2 == 0))
        window, (lam, counts) = step(window, batches[-1], device_thresholds.portion_words(p))
        seen = np.concatenate(batches[-slots:])  # the last W batches (fewer before the window fills)
        offline = selection.class_thresholds(seen, p, prior=prior)
        np.testing.assert_array_equal(np.asarray(lam), offline)
        conf, pred = (np.asarray(x) for x in selection.confidence(seen, prior))
        np.testing.assert_array_equal(np.asarray(lam), selection.thresholds_from_confidence(conf, pred, K, p))
        np.testing.assert_array_equal(np.asarray(lam), _brute_thresholds(conf, pred, p))
        np.testing.assert_array_equal(np.asarray(counts), np.bincount(pred.ravel(), minlength=K))
    assert int(window.cursor) == 5 % slots and bool(np.all(window.filled))


def test_class_balanced_labels_match_brute_force():
    rng = np.random.default_rng(10)
    probs = _teacher_probs(rng, 2, (9, 13), quantize=False)
    prior = rng.uniform(0.5, 1.5, (9, 13, K)).astype(np.float32)
    lam = np.array([0.5, 0.3, 0.2, 0.9, 0.45], np.float32)
    label, weight = host(jax.jit(online_thresholds.class_balanced_pseudo_labels)(probs, lam, prior))
    scores = prior * probs
    ratio = scores / lam  # numpy float32 division: correctly rounded
    best = np.argmax(ratio, -1)
    keep = np.take_along_axis(scores, best[..., None], -1)[..., 0] >= lam[best]
    np.testing.assert_array_equal(label, np.where(keep, best, IGN))
    np.testing.assert_array_equal(weight, keep.astype(np.float32))
    assert 0 < keep.mean() < 1


def test_fixed_policy_matches_brute_force():
    rng = np.random.default_rng(11)
    probs = _teacher_probs(rng, 3, (20, 8), quantize=False)
    probs[0, :2] = np.eye(K, dtype=np.float32)[1]  # confidence 1
    tau = 0.6
    label, weight, share = host(jax.jit(lambda p: online_thresholds.fixed_pseudo_labels(p, tau, 2, 5))(probs))
    conf = probs.max(-1)
    expect_share = np.float32(int(np.sum(conf >= np.float32(tau))) / conf.size)  # over the whole batch
    assert share == expect_share and 0 < share < 1
    np.testing.assert_array_equal(label, probs.argmax(-1))
    rows = np.arange(20)
    expect = np.where(((rows >= 2) & (rows < 15))[None, :, None], expect_share, 0).astype(np.float32)
    np.testing.assert_array_equal(weight, np.broadcast_to(expect, weight.shape))


def test_portion_at_step_follows_the_self_paced_schedule():
    steps = [0, 99, 100, 250, 10 ** 6]
    got = [online_thresholds.portion_at_step((0.2, 0.05, 0.5), s, 100) for s in steps]
    assert got == [min(0.2 + (s // 100) * 0.05, 0.5) for s in steps]


def test_prior_windows_cut_each_crop():
    prior = np.arange(10 * 12 * 2, dtype=np.float32).reshape(10, 12, 2)
    origins = np.array([[0, 0], [3, 5], [6, 8]], np.int32)
    out = np.asarray(jax.jit(lambda p, o: online_thresholds.prior_windows(p, o, (4, 4)))(prior, origins))
    for i, (y, x) in enumerate(origins):
        np.testing.assert_array_equal(out[i], prior[y:y + 4, x:x + 4])


# ------------------------------------------------------------------ losses and feature distance
def test_weighted_cross_entropy_matches_numpy():
    rng = np.random.default_rng(12)
    logits = rng.normal(size=(2, 5, 6, K)).astype(np.float32)
    labels = rng.integers(0, K, (2, 5, 6)).astype(np.uint8)
    labels[0, 0] = IGN
    w = rng.random((2, 5, 6)).astype(np.float32)
    got = float(jax.jit(losses.weighted_cross_entropy)(logits, labels, w))
    lg = logits.astype(np.float64)
    logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    valid = labels != IGN
    nll = -np.take_along_axis(logp, np.where(valid, labels, 0)[..., None].astype(np.int64), -1)[..., 0]
    np.testing.assert_allclose(got, np.sum(nll * w * valid), rtol=1e-6)


def test_feature_distance_matches_brute_force():
    rng = np.random.default_rng(13)
    labels = rng.integers(0, K, (2, 16, 12)).astype(np.uint8)
    labels[0, :4, :4] = 3  # a pure cell of a "thing" class
    labels[1, :4, 4:8] = IGN  # an ignore cell
    labels[1, 4:8, :4] = np.array([[1, 1, 1, 1]] * 3 + [[1, 1, 1, 0]])  # 15/16 of class 1 -> kept
    cells = np.asarray(jax.jit(lambda l: feature_distance.downscale_labels(l, 4, K, 0.75))(labels))
    for i in range(2):
        for y in range(4):
            for x in range(3):
                block = labels[i, 4 * y:4 * y + 4, 4 * x:4 * x + 4].ravel()
                values, counts = np.unique(np.minimum(block, K), return_counts=True)
                top = values[np.argmax(counts)]  # np.unique sorts: argmax takes the lowest value on ties
                expect = IGN if (top == K or counts.max() / 16 < 0.75) else top
                assert cells[i, y, x] == expect
    assert cells[0, 0, 0] == 3 and cells[1, 0, 1] == IGN and cells[1, 1, 0] == 1
    fs = rng.normal(size=(2, 4, 3, 8)).astype(np.float32)
    fi = rng.normal(size=(2, 4, 3, 8)).astype(np.float32)
    fd, n = jax.jit(lambda a, b, l: feature_distance.feature_distance(a, b, l, K, (1, 3), 0.75))(fs, fi, labels)
    mask = np.isin(cells, [1, 3])
    dist = np.sqrt(((fs.astype(np.float64) - fi) ** 2).sum(-1))
    assert int(n) == mask.sum() > 0
    np.testing.assert_allclose(float(fd), dist[mask].mean(), rtol=1e-6)
    grad = jax.grad(lambda a: feature_distance.feature_distance(a, a, labels, K, (1, 3))[0])(fs)
    assert np.all(np.isfinite(np.asarray(grad)))  # zero distance: gradient 0, not NaN


# ----------------------------------------------------------------------------------- the step
class TinyBNNet(nn.Module):
    """conv (stride 2) -> trained BatchNorm -> ReLU -> 1x1 head; logits at stride 2."""
    num_classes: int = K

    @nn.compact
    def __call__(self, images, train: bool = False):
        x = images.astype(jnp.float32) / 255.0
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.5, name="bn")(
            nn.Conv(8, (3, 3), strides=2, name="stem")(x)))
        return nn.Conv(self.num_classes, (1, 1), name="head")(x)


B, HW = 8, (32, 32)


def _batch(seed):
    rng = np.random.default_rng(seed)
    label = np.repeat(np.repeat(rng.integers(0, K, (B, 8, 8)), 4, 1), 4, 2).astype(np.uint8)
    label[:, :2] = IGN
    return dict(source_image=rng.integers(0, 256, (B, *HW, 3)).astype(np.uint8), source_label=label,
                target_image=rng.integers(0, 256, (B, *HW, 3)).astype(np.uint8),
                target_origin=rng.integers(0, 9, (B, 2)).astype(np.int32))


class Run:
    """A compiled step on a mesh of ``devices`` with its initial state."""

    def __init__(self, devices, policy="class_balanced", fd_weight=0.5):
        self.model = TinyBNNet()
        v = self.model.init(jax.random.key(0), jnp.zeros((1, *HW, 3), jnp.uint8))
        self.variables = host(v)
        self.imagenet = host(self.model.init(jax.random.key(1), jnp.zeros((1, *HW, 3), jnp.uint8)))
        self.labels = {"stem": {"kernel": "backbone", "bias": "backbone"}, "bn": {"scale": "backbone", "bias": "backbone"},
                       "head": {"kernel": "head", "bias": "head"}}
        self.tx = train_step.make_optimizer(self.labels, optimizer="adam", weight_decay=0.01)
        self.config = online_step.OnlineConfig(
            num_classes=K, policy=policy, window_batches=2, train_bn=True, fd_weight=fd_weight, fd_layer=("stem",),
            fd_classes=(1, 3), ignore_top=3, ignore_bottom=4, tau=0.3)
        self.mesh = make_mesh(jax.devices()[:devices])
        self.init = online_step.online_state_initializer(self.tx, self.mesh, self.config, (B, *HW))
        self.step_fn = online_step.make_online_step(self.model, self.tx, self.config, self.mesh, self.labels)
        self.prior = np.random.default_rng(3).uniform(0.5, 1.5, (40, 40, K)).astype(np.float32)

    def state(self):
        return self.init(self.variables, 0)

    def step(self, state, k, lr=1e-2, portion=0.4):
        return self.step_fn(state, to_global(_batch(k), self.mesh), lr, portion, prior=self.prior,
                            imagenet=self.imagenet)


@pytest.fixture(scope="module")
def run8():
    return Run(8)


@pytest.fixture(scope="module")
def after_one(run8):
    state = run8.state()
    before = host(state)
    state, metrics = run8.step(state, 0)
    return before, state, host(metrics)


def test_step_wiring(run8, after_one):
    """Teacher prediction -> window -> thresholds -> the EMA, and the source CE / FD terms."""
    before, state, m = after_one
    assert m["finite"] and int(state.step) == 1
    assert state.window.conf.sharding.spec == jax.sharding.PartitionSpec(None, "data")  # split like the batch
    assert len(state.window.conf.sharding.device_set) == 8 and state.params["head"]["kernel"].sharding.is_fully_replicated
    batch = _batch(0)
    model, v = run8.model, run8.variables
    # the window holds the initial teacher's confidences (CBST-SP: prior-weighted) of the target batch
    logits = model.apply(v, batch["target_image"], train=False)
    probs = jax.nn.softmax(losses.resize_bilinear_align_corners(logits, HW), -1)
    prior = np.stack([run8.prior[y:y + HW[0], x:x + HW[1]] for y, x in batch["target_origin"]])
    conf, pred = (np.asarray(x) for x in selection.confidence(probs, prior))
    w_conf, w_pred = host(state.window.conf)[0], host(state.window.pred)[0]
    np.testing.assert_allclose(w_conf, conf, rtol=1e-5)
    assert np.mean(w_pred == pred) > 0.99
    assert not np.any(host(state.window.filled)[1:])
    # the thresholds are the offline ones of the window's contents, bit for bit
    np.testing.assert_array_equal(m["thresholds"], selection.thresholds_from_confidence(w_conf, w_pred, K, 0.4))
    # teacher = 0.5 * teacher_0 + 0.5 * student_1 (t = 1), BN statistics likewise (trained BN)
    half = lambda t, t0, s: np.testing.assert_array_max_ulp(t, (0.5 * t0 + 0.5 * s).astype(np.float32), 1)
    jax.tree.map(half, host(state.teacher_params), before.teacher_params, host(state.params))
    jax.tree.map(half, host(state.teacher_batch_stats), before.teacher_batch_stats, host(state.batch_stats))
    assert float(m["alpha"]) == 0.5
    # source CE over all pixels of the batch, and the feature distance, of the initial student
    (logits, mutated) = model.apply(v, batch["source_image"], train=True, mutable=["batch_stats", "intermediates"],
                                    capture_intermediates=feature_distance.capture_filter(("stem",)))
    aligned = losses.resize_bilinear_align_corners(logits, HW)
    total = losses.weighted_cross_entropy(aligned, batch["source_label"], np.ones((B, *HW), np.float32))
    np.testing.assert_allclose(m["ce_source"], float(total) / (B * HW[0] * HW[1]), rtol=1e-5)
    imnet = run8.model.apply(run8.imagenet, batch["source_image"], train=False, mutable=["intermediates"],
                             capture_intermediates=feature_distance.capture_filter(("stem",)))[1]
    fd, _ = feature_distance.feature_distance(mutated["intermediates"]["stem"]["__call__"][0],
                                              imnet["intermediates"]["stem"]["__call__"][0], batch["source_label"],
                                              K, (1, 3), 0.75)
    np.testing.assert_allclose(m["feature_distance"], float(fd), rtol=1e-5)
    assert 0 < m["pseudo_share"] < 1 and m["pseudo_share"] == m["pseudo_weight"]


def test_step_is_deterministic_and_resumes_from_a_host_copy(run8):
    state = run8.state()
    state, _ = run8.step(state, 0)
    copy = host(state)
    shardings = online_step.state_shardings(run8.mesh, run8.config)
    straight, seen = state, []
    for k in (1, 2):
        straight, m = run8.step(straight, k)
        seen.append(host(m))
    straight = host(straight)
    for _ in range(2):  # twice from the same host copy: bit-identical each time
        resumed = jax.device_put(copy, shardings)
        for k in (1, 2):
            resumed, m = run8.step(resumed, k)
            jax.tree.map(np.testing.assert_array_equal, host(m), seen[k - 1])
        jax.tree.map(np.testing.assert_array_equal, host(resumed), straight)
    assert bool(np.all(straight.window.filled)) and int(straight.window.cursor) == 1


def test_one_device_equals_eight_devices(run8):
    run1 = Run(1)
    results = []
    for run in (run1, run8):
        state, seen = run.state(), []
        for k in range(3):
            state, m = run.step(state, k, portion=(0.3, 0.4, 0.5)[k])
            seen.append(host(m))
        results.append((host(state), seen))
    (s1, m1), (s8, m8) = results
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    for key in ("loss", "ce_source", "ce_mix", "feature_distance", "pseudo_share", "thresholds"):
        close([m[key] for m in m1], [m[key] for m in m8])
    for name in ("params", "batch_stats", "teacher_params", "teacher_batch_stats"):
        jax.tree.map(close, getattr(s1, name), getattr(s8, name))
    close(s1.window.conf, s8.window.conf)
    assert np.mean(s1.window.pred == s8.window.pred) > 0.999


def test_non_finite_step_returns_the_old_state(run8, after_one):
    _, state, _ = after_one
    state = jax.device_put(host(state), online_step.state_shardings(run8.mesh, run8.config))
    before = host(state)
    state, m = run8.step(state, 1, lr=np.float32(np.inf))  # the update overflows
    assert not bool(m["finite"]) and np.isfinite(float(m["loss"]))
    jax.tree.map(np.testing.assert_array_equal, host(state), before)  # window and teacher included
    state, m = run8.step(state, 1)
    assert bool(m["finite"]) and int(state.step) == 2


def test_fixed_policy_step():
    run = Run(8, policy="fixed", fd_weight=0.0)
    state = run.state()
    assert state.window is None
    state, m = run.step(state, 0)
    batch = _batch(0)
    logits = run.model.apply(run.variables, batch["target_image"], train=False)
    probs = np.asarray(jax.nn.softmax(losses.resize_bilinear_align_corners(logits, HW), -1))
    share = np.float32(np.sum(probs.max(-1) >= np.float32(0.3)) / probs[..., 0].size)
    rows = HW[0] - 3 - 4  # rows 3 .. 27 keep the weight
    np.testing.assert_allclose(float(m["pseudo_weight"]), share * rows / HW[0], rtol=1e-5)
    assert bool(m["finite"]) and "thresholds" not in m and float(m["feature_distance"]) == 0


def test_online_config_is_validated():
    with pytest.raises(ValueError, match="policy"):
        online_step.OnlineConfig(num_classes=K, policy="cbst")
    with pytest.raises(ValueError, match="fd_layer"):
        online_step.OnlineConfig(num_classes=K, fd_weight=0.005)
    with pytest.raises(ValueError, match="2\\*\\*31"):
        online_thresholds.Window.empty(2 ** 12, (8, 512, 512), 19)
