"""Pseudo-label selection against independent references: brute-force minimisation of the
self-training objective, and a numpy per-class sort of the reference's lists."""
import jax
import numpy as np
import pytest

from cbst_jax import selection as sel
from cbst_jax.sharding import batch_sharded, make_mesh

C = 5
PORTIONS = (1e-6, 0.2, 0.29, 0.5, 1.0)


# --------------------------------------------------------------------------- references


def sort_thresholds(conf_lists, portion):
    """numpy sort reference: per list, sort descending, element floor(N p) - 1, else 1.0."""
    lam = np.ones(len(conf_lists), np.float32)
    for c, values in enumerate(conf_lists):
        v = np.sort(np.asarray(values, np.float32))[::-1]
        k = int(np.floor(v.size * portion))
        if k > 0:
            lam[c] = v[k - 1]
    return lam


def reference_lists(probs, prior=None, valid=None, subsample=1):
    """The reference's per-class confidence lists: per image (leading axis of (B,H,W,C)),
    row-major pixels predicted as c, every subsample-th one."""
    scores = probs if prior is None else (prior.astype(np.float32) * probs).astype(np.float32)
    conf, pred = scores.max(-1), scores.argmax(-1)
    n_img = probs.shape[0] if probs.ndim >= 4 else 1
    conf, pred = conf.reshape(n_img, -1), pred.reshape(n_img, -1)
    valid = np.ones(conf.shape, bool) if valid is None else np.asarray(valid).reshape(n_img, -1)
    lists = [[] for _ in range(probs.shape[-1])]
    for i in range(n_img):
        for c in range(probs.shape[-1]):
            lists[c].append(conf[i][valid[i] & (pred[i] == c)][::subsample])
    return [np.concatenate(v) for v in lists]


def reference_thresholds(probs, portion, policy="cbst", **kw):
    lists = reference_lists(probs, **kw)
    if policy == "st":
        return np.repeat(sort_thresholds([np.concatenate(lists)], portion), len(lists))
    return sort_thresholds(lists, portion)


def brute_force_labels(scores, lam, ignore=255):
    """argmin over y in {0} U {one-hot_c} of -sum_c y_c log s_c - k_c y_c, k_c = -log lam_c
    (float64); also the gap to the runner-up, to set ties aside."""
    k = -np.log(lam.astype(np.float64))
    objective = np.concatenate(
        [np.zeros(scores.shape[:-1] + (1,)), -np.log(scores.astype(np.float64)) - k], -1)
    order = np.sort(objective, -1)
    best = objective.argmin(-1)
    return np.where(best == 0, ignore, best - 1), order[..., 1] - order[..., 0]


def make_probs(rng, shape, num_classes=C, levels=None, absent=()):
    """Softmax-like probabilities; quantised to ``levels`` steps to force ties; classes in
    ``absent`` never win the argmax."""
    logits = rng.normal(size=shape + (num_classes,)) * 2
    logits[..., list(absent)] = -30.0
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if levels:
        p = np.round(p * levels) / levels
    return p.astype(np.float32)


# -------------------------------------------------------------------- brute-force labelling


@pytest.mark.parametrize("variant", ["st", "cbst", "cbst-sp"])
def test_selection_minimises_self_training_objective(variant):
    rng = np.random.default_rng(0)
    probs = make_probs(rng, (4, 16, 16))
    lam = rng.uniform(0.05, 1.0, C).astype(np.float32)
    if variant == "st":
        lam[:] = lam[0]
    prior = rng.uniform(0.05, 1.0, (16, 16, C)).astype(np.float32) if variant == "cbst-sp" else None
    scores = probs if prior is None else prior * probs
    expected, gap = brute_force_labels(scores, lam)
    got = np.asarray(sel.select_pseudo_labels(probs, lam, prior=prior))
    assert got.dtype == np.uint8
    clear = gap > 1e-5
    assert clear.mean() > 0.99 and 0.05 < (expected == 255).mean() < 0.95
    np.testing.assert_array_equal(got[clear], expected[clear])


# ------------------------------------------------------------------------ sort reference


@pytest.mark.parametrize("policy", ["cbst", "st"])
def test_thresholds_match_sort_with_ties_empty_and_single_pixel_classes(policy):
    rng = np.random.default_rng(2)
    probs = make_probs(rng, (3, 9, 11), levels=32, absent=(3, 4))
    probs[1, 4, 5] = [0.0, 0.0, 0.0, 0.0, 1.0]  # class 4: one pixel; class 3: none
    lists = reference_lists(probs)
    assert len(lists[3]) == 0 and len(lists[4]) == 1
    for p in PORTIONS:
        got = sel.class_thresholds(probs, p, policy)
        want = reference_thresholds(probs, p, policy)
        assert got.dtype == np.float32 and np.array_equal(got, want), (p, got, want)
    if policy == "cbst":
        assert sel.class_thresholds(probs, 1.0)[4] == 1.0 and sel.class_thresholds(probs, 1.0)[3] == 1.0


def test_spatial_prior_with_negative_entries_valid_mask_and_subsample():
    rng = np.random.default_rng(3)
    probs = make_probs(rng, (4, 10, 12), levels=64)
    prior = rng.normal(0.5, 0.5, (10, 12, C)).astype(np.float32)  # some negative, some zero
    prior[0, 0] = 0.0
    valid = rng.random((4, 10, 12)) < 0.8
    for kw in (dict(prior=prior), dict(valid=valid), dict(prior=prior, valid=valid, subsample=4),
               dict(subsample=3)):
        for policy in ("cbst", "st"):
            for p in (0.2, 1.0):
                got = sel.class_thresholds(probs, p, policy, **kw)
                want = reference_thresholds(probs, p, policy, **kw)
                assert np.array_equal(got, want), (kw.keys(), policy, p, got, want)


def test_rank_uses_float64_product_like_the_reference():
    # 100 * 0.29 is 28.999999999999996 in float64 (rank 28) but 29.0 in float32 (rank 29).
    assert sel.selection_rank(100, 0.29) == 28
    assert int(np.floor(np.float32(100) * np.float32(0.29))) == 29
    conf = np.arange(100, dtype=np.float32) / 128
    lam = sel.thresholds_from_confidence(conf, np.zeros(100, np.int32), 1, 0.29)
    assert lam[0] == np.sort(conf)[::-1][27]


def test_ten_million_pixels_bit_identical_to_sort():
    rng = np.random.default_rng(4)
    n, num_classes = 10_000_000, 19
    share = rng.dirichlet(np.ones(num_classes) * 0.3)
    share[-1] = 0.0  # an empty class
    share[-2] = 3e-7  # a handful of pixels
    pred = rng.choice(num_classes, n, p=share / share.sum()).astype(np.uint8)
    conf = rng.random(n, dtype=np.float32)
    conf[: n // 2] = np.round(conf[: n // 2] * 1000) / 1000  # heavy ties
    order = np.argsort(pred, kind="stable")
    bounds = np.searchsorted(pred[order], np.arange(num_classes + 1))
    lists = [conf[order[a:b]] for a, b in zip(bounds[:-1], bounds[1:])]
    for p in (1e-6, 0.2, 0.5, 1.0):
        got = sel.thresholds_from_confidence(conf, pred, num_classes, p)
        assert np.array_equal(got, sort_thresholds(lists, p)), p
    got = sel.thresholds_from_confidence(conf, pred, num_classes, 0.2, policy="st")
    assert np.array_equal(got, np.repeat(sort_thresholds([conf], 0.2), num_classes))


# ------------------------------------------------------------------- streaming and devices


def test_streaming_equals_in_memory_and_reference_with_padding():
    rng = np.random.default_rng(5)
    probs = make_probs(rng, (6, 8, 8), levels=32)
    prior = rng.uniform(0.1, 1.0, (8, 8, C)).astype(np.float32)

    def batches():  # batches of 4 images; the last one padded with garbage and masked out
        for i in (0, 4):
            chunk = probs[i:i + 4]
            valid = np.ones(chunk.shape[:-1], bool)
            if len(chunk) < 4:
                pad = make_probs(rng, (4 - len(chunk), 8, 8))
                valid = np.concatenate([valid, np.zeros(pad.shape[:-1], bool)])
                chunk = np.concatenate([chunk, pad])
            yield chunk, valid

    for policy in ("cbst", "st"):
        lam, counts = sel.streaming_class_thresholds(batches, C, 0.3, policy, prior=prior,
                                                     subsample=2, return_counts=True)
        assert np.array_equal(lam, sel.class_thresholds(probs, 0.3, policy, prior=prior, subsample=2))
        assert np.array_equal(lam, reference_thresholds(probs, 0.3, policy, prior=prior, subsample=2))
    lists = reference_lists(probs, prior=prior, subsample=2)
    np.testing.assert_array_equal(counts, [len(v) for v in lists])
    # one compile per pass for equal-shape batches
    assert sel._batch_pass(None, False, 2)._cache_size() == 1
    assert sel._batch_pass(None, True, 2)._cache_size() == 1


def test_one_device_and_eight_devices_agree():
    assert jax.device_count() == 8
    mesh = make_mesh()
    rng = np.random.default_rng(6)
    probs = make_probs(rng, (16, 8, 12), levels=64)
    prior = rng.uniform(0.1, 1.0, (8, 12, C)).astype(np.float32)
    valid = rng.random((16, 8, 12)) < 0.9
    sharded = jax.device_put(probs, batch_sharded(mesh))
    sharded_valid = jax.device_put(valid, batch_sharded(mesh))
    for policy in ("cbst", "st"):
        want = reference_thresholds(probs, 0.4, policy, prior=prior, valid=valid)
        single = sel.class_thresholds(probs, 0.4, policy, prior=prior, valid=valid)
        multi = sel.class_thresholds(sharded, 0.4, policy, prior=prior, valid=sharded_valid)
        assert np.array_equal(single, want) and np.array_equal(multi, want)

        def batches():  # 8-image batches, as host numpy and as sharded jax arrays
            yield probs[:8], valid[:8]
            yield sharded[8:], sharded_valid[8:]

        streamed = sel.streaming_class_thresholds(batches, C, 0.4, policy, prior=prior, mesh=mesh)
        assert np.array_equal(streamed, want)
    labels_single = np.asarray(sel.select_pseudo_labels(probs, want, prior=prior))
    labels_multi = sel.select_pseudo_labels(sharded, want, prior=prior)
    assert labels_multi.sharding.is_equivalent_to(batch_sharded(mesh), labels_multi.ndim)
    np.testing.assert_array_equal(np.asarray(labels_multi), labels_single)


def test_accumulator_memory_is_independent_of_pixels_and_counts_stay_exact():
    # 2 * 19 * 65536 * 4 bytes = 9,961,472 B (9.5 MiB) for 19 classes, any pixel count.
    sizes = set()
    for num_pixels in (1_000, 1_000_000):
        acc = sel.HistogramAccumulator.zeros(19)
        conf = np.linspace(0, 1, num_pixels, dtype=np.float32)
        pred = np.arange(num_pixels) % 19
        counts = sel.coarse_histogram_from_confidence(conf, pred, 19)
        acc = sel.accumulate(acc, counts)
        sizes.add(acc.nbytes)
        assert acc.counts().sum() == num_pixels
    assert sizes == {2 * 19 * sel.NUM_BINS * 4}
    # beyond 2**31 (and 2**32) pixels per bin: six batches of 2**30 - 1 counts
    acc = sel.HistogramAccumulator.zeros(2)
    big = np.full((2, sel.NUM_BINS), (1 << 30) - 1, np.int32)
    add = jax.jit(sel.accumulate)
    for _ in range(6):
        acc = add(acc, big)
    assert np.all(acc.counts() == 6 * ((1 << 30) - 1))
    assert add._cache_size() == 1
