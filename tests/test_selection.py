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


# ------------------------------------------------------------- exactness at the boundary


def numpy_labels(scores, lam, ignore=255):
    """The reference's float32 selection (numpy division is correctly rounded): argmax of
    s / λ, first class on ties, ignored where that ratio is below 1."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.asarray(scores, np.float32) / np.asarray(lam, np.float32)
    return np.where(ratio.max(-1) >= 1, ratio.argmax(-1), ignore).astype(np.uint8)


def random_bits(rng, n, mask=0xFFFFFFFF):
    return (rng.integers(0, 2 ** 32, n, dtype=np.uint64).astype(np.uint32) & np.uint32(mask)).view(np.float32)


def same_floats(a, b):
    return (a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))


def test_correctly_rounded_divide_matches_numpy_bit_for_bit():
    rng = np.random.default_rng(7)
    divide = jax.jit(sel.correctly_rounded_divide)
    n = 400_000
    cases = [(random_bits(rng, n), random_bits(rng, n)),  # every sign, exponent, NaN and infinity
             (random_bits(rng, n), random_bits(rng, n, 0x807FFFFF)),  # subnormal divisors
             (random_bits(rng, n, 0x807FFFFF), random_bits(rng, n)),  # subnormal dividends
             (random_bits(rng, n, 0x3FFFFFFF), random_bits(rng, n, 0x3FFFFFFF))]  # |x| < 2: mid range
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, -3.0, 1e-45, 3e38], np.float32)
    a, b = np.meshgrid(special, special)
    cases.append((a.ravel(), b.ravel()))
    for a, b in cases:
        with np.errstate(all="ignore"):
            want = a / b
        got = np.asarray(divide(a, b))
        assert same_floats(got, want).all(), (a[~same_floats(got, want)][:4], b[~same_floats(got, want)][:4])
    # a divisor broadcast over the pixels (what XLA turns into a reciprocal product)
    a, b = rng.random((1000, 19), dtype=np.float32), rng.random(19, dtype=np.float32)
    assert same_floats(np.asarray(divide(a, b)), a / b).all()
    with np.errstate(all="ignore"):
        assert (a * (np.float32(1) / b) != a / b).mean() > 0.05  # the two-rounding product is not it


def near_tie_scores(rng, shape, lam, spread_ulps=3):
    """Scores whose ratios s_c / λ_c all lie within a few ulps of one value t >= 1 per pixel, so
    the argmax and the ties are decided by the last bit of correctly rounded quotients."""
    t = rng.uniform(1.0, 1.5, shape[:-1] + (1,)).astype(np.float32)
    s = (t * lam).astype(np.float32)
    steps = rng.integers(-spread_ulps, spread_ulps + 1, shape)
    for _ in range(spread_ulps):
        s = np.where(steps > 0, np.nextafter(s, np.float32(np.inf)), s)
        s = np.where(steps < 0, np.nextafter(s, np.float32(0)), s)
        steps = steps - np.sign(steps)
    return s


@pytest.mark.parametrize("with_prior", [False, True])
def test_selection_exact_rank_k_pixel_one_ulp_below_and_ties(with_prior):
    rng = np.random.default_rng(8)
    probs = make_probs(rng, (4, 12, 16))
    prior = rng.uniform(0.05, 1.0, (12, 16, C)).astype(np.float32) if with_prior else None
    scores = probs if prior is None else (prior * probs).astype(np.float32)
    conf, pred = scores.max(-1), scores.argmax(-1)
    for portion in (0.05, 0.3, 0.77, 1.0):
        lam = sel.class_thresholds(probs, portion, prior=prior)
        got = np.asarray(sel.select_pseudo_labels(probs, lam, prior=prior))
        np.testing.assert_array_equal(got, numpy_labels(scores, lam))
        for c in range(C):  # the rank-k pixel scores exactly λ_c and is selected
            rank_k = (pred == c) & (conf == lam[c])
            if lam[c] < 1:
                assert rank_k.any() and (got[rank_k] != 255).all()
        if portion == 1.0:  # every pixel is some class's most confident: all are selected
            assert (got != 255).all()
        # λ one ulp above: a pixel scoring one ulp below its threshold is not selected by it
        up = np.nextafter(lam, np.float32(2))
        got_up = np.asarray(sel.select_pseudo_labels(probs, up, prior=prior))
        np.testing.assert_array_equal(got_up, numpy_labels(scores, up))
        below = (conf == lam[pred]) & (lam[pred] < 1) & (scores / up < 1).all(-1)
        assert below.any() and (got_up[below] == 255).all()
    # exact ratio ties: equal λ and equal scores in two classes -> the lower class
    tied = probs.copy()
    tied[..., 3] = tied[..., 1]
    lam = np.full(C, 0.05, np.float32)
    got = np.asarray(sel.select_pseudo_labels(tied, lam, prior=prior))
    tied_scores = tied if prior is None else (prior * tied).astype(np.float32)
    np.testing.assert_array_equal(got, numpy_labels(tied_scores, lam))
    assert (got == 1).any()
    if prior is None:
        assert not (got == 3).any()


@pytest.mark.parametrize("with_prior", [False, True])
@pytest.mark.parametrize("tied_classes", [2, C])
def test_selection_adversarial_ratios_near_rounding_boundaries(with_prior, tied_classes):
    """Ratios within a few ulps of each other in two classes (the fast path decides them) or in
    all classes (three-way near-ties: the exact path labels the batch)."""
    rng = np.random.default_rng(9 + tied_classes)
    shape = (64, 64, C)
    for trial in range(4):
        # λ from random bit patterns in (2**-20, 1): exponents and mantissas of every kind
        lam = np.abs(random_bits(rng, C, 0x3FFFFFFF))
        lam = np.where((lam > 2 ** -20) & (lam < 1), lam, rng.uniform(0.01, 1, C)).astype(np.float32)
        target = near_tie_scores(rng, shape, lam)
        if tied_classes == 2:  # classes 1 and 3 near the tie, the others well below
            far = np.ones(C, np.float32)
            far[[0, 2, 4]] = 0.7
            target = (target * far).astype(np.float32)
        if with_prior:
            prior = rng.uniform(0.25, 1.0, shape).astype(np.float32)
            probs = (target / prior).astype(np.float32)  # prior * probs lands within an ulp of target
        else:
            prior, probs = None, target
        below = rng.random(shape[:-1]) < 0.3  # some pixels pushed under every threshold
        probs = np.where(below[..., None], probs * np.float32(0.5), probs).astype(np.float32)
        scores = probs if prior is None else (prior * probs).astype(np.float32)
        got = np.asarray(sel.select_pseudo_labels(probs, lam, prior=prior))
        want = numpy_labels(scores, lam)
        np.testing.assert_array_equal(got, want)
        ratio = scores / lam
        top = ratio.max(-1, keepdims=True)
        assert ((ratio == top).sum(-1) > 1).sum() > 100  # many exact ties of rounded ratios
        recip = scores * (np.float32(1) / lam)
        assert (recip.argmax(-1) != ratio.argmax(-1)).sum() > 20  # two roundings would differ
        # the fast path: right wherever it claims certainty; certain for two-class ties only
        label, keep, certain = (np.asarray(x) for x in jax.jit(sel._top_two_labels)(
            np.moveaxis(scores, -1, 0), lam))
        np.testing.assert_array_equal(np.where(keep, label, 255)[certain], want[certain])
        assert certain.all() if tied_classes == 2 else not certain.all()


def test_selection_thresholds_outside_the_fast_range():
    rng = np.random.default_rng(10)
    probs = make_probs(rng, (2, 16, 16))
    for lam in (np.array([1e-39, 0.3, 0.2, 0.5, 1.0], np.float32),  # subnormal threshold
                np.array([2.0 ** 127, 0.3, 0.2, 0.5, 1.0], np.float32)):
        with np.errstate(divide="ignore", over="ignore"):
            want = numpy_labels(probs, lam)
        np.testing.assert_array_equal(np.asarray(sel.select_pseudo_labels(probs, lam)), want)
