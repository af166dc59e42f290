"""Prediction: multi-scale + flip averaging against a numpy re-implementation, and the on-device
threshold passes against thresholds computed from the gathered probabilities."""
import flax.linen as nn
import pytest
import jax
import numpy as np

from cbst_jax import selection, sharding
from cbst_jax.predictor import Evaluation, LabelledBatch, Predictor, SoftLabelling, local_rows


class PixelNet(nn.Module):
    """Logits = per-pixel affine map of the colour, then a horizontal shift of one pixel, so
    flipping is not a symmetry and scale changes matter."""
    num_classes: int = 4
    output_stride = 1

    @nn.compact
    def __call__(self, x, train=False):
        y = nn.Dense(self.num_classes)(x.astype(np.float32) / 255.0)
        return jax.numpy.pad(y, ((0, 0), (0, 0), (1, 0), (0, 0)))[:, :, :-1]


def np_resize_half_pixel(x, size):
    """Bilinear, half-pixel centres, edge clamp, no antialias (jax.image.resize 'linear')."""
    def axis(n_in, n_out):
        src = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
        src = np.clip(src, 0, n_in - 1)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0
    i0, i1, w = axis(x.shape[1], size[0])
    x = x[:, i0] * (1 - w)[None, :, None, None] + x[:, i1] * w[None, :, None, None]
    j0, j1, v = axis(x.shape[2], size[1])
    return x[:, :, j0] * (1 - v)[None, None, :, None] + x[:, :, j1] * v[None, None, :, None]


def np_resize_align_corners(x, size):
    def axis(n_in, n_out):
        src = np.arange(n_out) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0
    i0, i1, w = axis(x.shape[1], size[0])
    x = x[:, i0] * (1 - w)[None, :, None, None] + x[:, i1] * w[None, :, None, None]
    j0, j1, v = axis(x.shape[2], size[1])
    return x[:, :, j0] * (1 - v)[None, None, :, None] + x[:, :, j1] * v[None, None, :, None]


def np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def reference_probs(params, images, scales, flip, canvas):
    w, b = np.asarray(params["Dense_0"]["kernel"]), np.asarray(params["Dense_0"]["bias"])

    def net(x):
        y = (x / 255.0) @ w + b
        return np.pad(y, ((0, 0), (0, 0), (1, 0), (0, 0)))[:, :, :-1]

    total, n = 0.0, 0
    for s in scales:
        size = (max(8, round(canvas[0] * s)), max(8, round(canvas[1] * s)))
        xs = images.astype(np.float64) if size == canvas else np_resize_half_pixel(images.astype(np.float64), size)
        for f in ([False, True] if flip else [False]):
            xi = xs[:, :, ::-1] if f else xs
            logits = net(xi)
            if f:
                logits = logits[:, :, ::-1]
            total = total + np_softmax(np_resize_align_corners(logits, canvas))
            n += 1
    return total / n


def test_mst_flip_average_matches_numpy():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 16, 24, 3)).astype(np.uint8)
    model = PixelNet()
    variables = model.init(jax.random.key(0), images[:1], train=False)
    mesh = sharding.make_mesh()
    for scales, flip in [((1.0,), False), ((1.0,), True), ((0.5, 1.0, 1.5), True)]:
        pred = Predictor(model, 4, mesh, (16, 24), scales=scales, flip=flip)
        got = np.asarray(jax.jit(pred.probs)(variables, sharding.to_global(images, mesh)))
        want = reference_probs(variables["params"], images, scales, flip, (16, 24))
        np.testing.assert_allclose(got, want, atol=2e-5)
        np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)


def test_streamed_thresholds_equal_in_memory():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (16, 16, 24, 3)).astype(np.uint8)
    valid = np.ones((16, 16, 24), bool)
    valid[:, 12:] = False  # padded canvas rows
    model = PixelNet()
    variables = model.init(jax.random.key(1), images[:1], train=False)
    mesh = sharding.make_mesh()
    pred = Predictor(model, 4, mesh, (16, 24), scales=(1.0, 0.75), flip=True)

    def batches():
        for k in range(0, 16, 8):
            yield sharding.to_global({"image": images[k:k + 8], "valid": valid[k:k + 8]}, mesh)

    for policy in ("cbst", "st"):
        lam, counts = pred.thresholds(variables, batches, 0.3, policy)
        probs = np.asarray(jax.jit(pred.probs)(variables, sharding.to_global(images, mesh)))
        want = selection.class_thresholds(probs, 0.3, policy, valid=valid)
        np.testing.assert_array_equal(lam, want)
        assert counts.sum() == valid.sum()


def test_typed_results_labels_counts_and_evaluation_progress(capsys):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (8, 16, 24, 3)).astype(np.uint8)
    valid = np.zeros((8, 16, 24), bool)
    for b in range(8):
        valid[b, :16 - b, :24 - 2 * b] = True
    gt = rng.integers(0, 4, (8, 16, 24)).astype(np.uint8)
    gt[~valid] = 255
    model = PixelNet()
    variables = model.init(jax.random.key(2), images[:1], train=False)
    mesh = sharding.make_mesh()
    pred = Predictor(model, 4, mesh, (16, 24), scales=(1.0,), flip=True)
    host = {"image": images, "valid": valid, "label": gt, "index": np.arange(8, dtype=np.int32)}
    batch = sharding.to_global(host, mesh)
    result = pred.thresholds(variables, lambda: iter([batch]), 0.5, "cbst")
    assert isinstance(result, selection.ClassThresholds)
    probs = np.asarray(jax.jit(pred.probs)(variables, batch["image"]))
    conf_pred = probs.argmax(-1)
    np.testing.assert_array_equal(result.class_counts, np.bincount(conf_pred[valid], minlength=4))
    out = pred.pseudo_labels(variables, batch, result.thresholds)
    assert isinstance(out, LabelledBatch)
    ratio = probs / result.thresholds  # numpy float32: correctly rounded
    want = np.where(ratio.max(-1) >= 1, ratio.argmax(-1), 255)
    want[~valid] = 255
    np.testing.assert_array_equal(np.asarray(out.labels), want)
    kept = want != 255
    np.testing.assert_array_equal(np.asarray(out.selected), np.bincount(want[kept], minlength=4))
    np.testing.assert_array_equal(np.asarray(out.correct), np.bincount(want[kept & (want == gt)], minlength=4))
    assert int(out.valid) == valid.sum()

    ev = pred.evaluate(variables, [(batch, host)], keep_predictions=3, desc="eval-bar", total=1)
    assert isinstance(ev, Evaluation)
    cm = np.zeros((4, 5), np.int64)  # the last column: predictions outside [0, 4), none here
    np.add.at(cm, (gt[valid], conf_pred[valid]), 1)
    np.testing.assert_array_equal(ev.confusion, cm)
    assert [p.shape for p in ev.predictions] == [(16, 24), (15, 22), (14, 20)]
    np.testing.assert_array_equal(ev.predictions[1], conf_pred[1, :15, :22])
    assert "eval-bar" in capsys.readouterr().err


def numpy_labels(scores, lam):
    """The reference's float32 selection: argmax of s / λ (numpy divides correctly rounded,
    first class on ties), 255 where that ratio is below 1."""
    ratio = scores / lam
    return np.where(ratio.max(-1) >= 1, ratio.argmax(-1), 255)


@pytest.mark.parametrize("devices", [1, 8])
@pytest.mark.parametrize("with_prior", [False, True])
def test_pseudo_labels_exact_at_the_boundary(devices, with_prior):
    mesh = sharding.make_mesh(jax.devices()[:devices])
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (8, 16, 24, 3)).astype(np.uint8)
    valid = np.ones((8, 16, 24), bool)
    valid[5:, 11:] = False
    model = PixelNet()
    variables = model.init(jax.random.key(3), images[:1], train=False)
    params = jax.tree.map(np.array, variables["params"])
    for name in ("kernel", "bias"):  # class 2 a copy of class 0: exactly tied probabilities
        params["Dense_0"][name][..., 2] = params["Dense_0"][name][..., 0]
    variables = {"params": params}
    prior = rng.uniform(0.2, 1.0, (16, 24, 4)).astype(np.float32) if with_prior else None
    pred = Predictor(model, 4, mesh, (16, 24), scales=(1.0, 0.75), flip=True)
    batch = sharding.to_global({"image": images, "valid": valid, "label": np.full_like(valid, 255, np.uint8)}, mesh)
    probs = np.asarray(jax.jit(pred.probs)(variables, batch["image"]))
    assert (probs[..., 0] == probs[..., 2]).all()
    scores = probs if prior is None else (prior * probs).astype(np.float32)
    conf, arg = scores.max(-1), scores.argmax(-1)
    for portion, policy in ((0.3, "cbst"), (1.0, "cbst"), (0.4, "st")):
        lam = pred.thresholds(variables, lambda: iter([batch]), portion, policy, prior).thresholds
        labels = np.asarray(pred.pseudo_labels(variables, batch, lam, prior).labels)
        want = np.where(valid, numpy_labels(scores, lam), 255)
        np.testing.assert_array_equal(labels, want)
        rank_k = valid & (conf == lam[arg]) & (lam[arg] < 1)  # the pixels the thresholds come from
        assert rank_k.any() and (labels[rank_k] != 255).all()
        if portion == 1.0:
            assert (labels[valid] != 255).all()
        if policy == "st" and prior is None:  # exact ratio ties between classes 0 and 2
            assert (labels == 0).any() and not (labels == 2).any()
        up = np.nextafter(lam, np.float32(2))  # now those pixels are one ulp below
        labels_up = np.asarray(pred.pseudo_labels(variables, batch, up, prior).labels)
        np.testing.assert_array_equal(labels_up, np.where(valid, numpy_labels(scores, up), 255))
        below = rank_k & (scores / up < 1).all(-1)
        assert below.any() and (labels_up[below] == 255).all()
    for _ in range(6):  # thresholds equal to the scores of random pixels predicted as their class
        lam = np.ones(4, np.float32)
        for c in np.unique(arg[valid]):
            lam[c] = rng.choice(conf[valid & (arg == c)])
        labels = np.asarray(pred.pseudo_labels(variables, batch, lam, prior).labels)
        np.testing.assert_array_equal(labels, np.where(valid, numpy_labels(scores, lam), 255))
        on_threshold = valid & (conf == lam[arg])
        assert on_threshold.any() and (labels[on_threshold] != 255).all()
        if prior is None:  # CRST LR* with CBST's kept pixels: the same pixels, exactly
            soft = pred.soft_pseudo_labels(variables, batch, lam, kind="lrent", alpha=0.25, stride=4, keep="cbst")
            np.testing.assert_array_equal(np.asarray(soft.labels) != 255, labels != 255)


class CountingNet(PixelNet):
    """PixelNet that counts its runs on the host (one per execution of the network)."""
    runs = [0]

    @nn.compact
    def __call__(self, x, train=False):
        jax.debug.callback(lambda: self.runs.__setitem__(0, self.runs[0] + 1))
        return PixelNet.__call__(self, x, train)


def split_batches(rng, mesh, n_batches=3, size=8, canvas=(16, 24)):
    hosts = []
    for k in range(n_batches):
        valid = np.zeros((size,) + canvas, bool)
        for b in range(size):
            valid[b, :canvas[0] - (b + k) % 5, :canvas[1] - 3 * ((b * k) % 4)] = True
        index = np.arange(k * size, (k + 1) * size, dtype=np.int32)
        if k == n_batches - 1:  # a last, partly padded batch
            index[-3:], valid[-3:] = -1, False
        label = np.where(valid, rng.integers(0, 4, valid.shape), 255).astype(np.uint8)
        hosts.append({"image": rng.integers(0, 256, valid.shape + (3,)).astype(np.uint8), "valid": valid,
                      "label": label, "index": index})
    return [sharding.to_global(h, mesh) for h in hosts], hosts


@pytest.mark.parametrize("devices", [1, 8])
@pytest.mark.parametrize("scales", [(1.0,), (0.9, 1.0, 1.2)])
def test_one_network_pass_bit_identical_to_three_passes(devices, scales):
    mesh = sharding.make_mesh(jax.devices()[:devices])
    rng = np.random.default_rng(5)
    globals_, hosts = split_batches(rng, mesh)
    model = CountingNet()
    variables = model.init(jax.random.key(5), hosts[0]["image"][:1], train=False)
    pred = Predictor(model, 4, mesh, (16, 24), scales=scales, flip=True)
    prior = rng.uniform(0.2, 1.0, (16, 24, 4)).astype(np.float32)
    batches_fn = lambda: iter(zip(globals_, hosts))
    n, views = len(hosts), 2 * len(scales)
    cases = [(None, None, 1, "cbst"), (prior, None, 2, "cbst"), (None, None, 1, "st"),
             (None, SoftLabelling("lrent", 0.25, 4), 1, "cbst")]
    for prior_, soft, subsample, policy in cases:
        # the three-pass path: thresholds (network in both passes), then each batch labelled
        lam, counts = pred.thresholds(variables, lambda: iter(globals_), 0.3, policy, prior_, subsample)
        if soft is None:
            want = [pred.pseudo_labels(variables, g, lam, prior_) for g in globals_]
        else:
            want = [pred.soft_pseudo_labels(variables, g, lam, kind=soft.kind, alpha=soft.alpha,
                                            stride=soft.stride, keep=soft.keep) for g in globals_]
        want = [jax.tree.map(np.asarray, w) for w in want]
        reports = {}
        for path, budgets in [("device", (1 << 40, 1 << 40)), ("host", (0, 1 << 40)), ("recompute", (0, 0))]:
            got, model.runs[0] = [], 0
            res = pred.label_split(variables, batches_fn, 0.3, policy, prior_, subsample,
                                   lambda host, out: got.append((host, local_rows(out.labels, host),
                                                                 jax.tree.map(np.asarray, out))),
                                   soft=soft, device_bytes=budgets[0], host_bytes=budgets[1])
            np.testing.assert_array_equal(res.thresholds, lam)
            np.testing.assert_array_equal(res.class_counts, counts)
            assert len(got) == n
            for (host, rows, out), w, h in zip(got, want, hosts):
                assert type(out) is type(w)
                for field, a, b in zip(w._fields, out, w):
                    np.testing.assert_array_equal(a, b, err_msg=f"{path} {field}")
                np.testing.assert_array_equal(host["index"], h["index"])
                assert [r for r, _ in rows] == [r for r in range(8) if h["index"][r] >= 0]
                for r, lab in rows:
                    box = h["valid"][r]
                    np.testing.assert_array_equal(lab, w.labels[r][:box.any(1).sum(), :box.any(0).sum()])
            assert res.selected.tolist() == np.sum([w.selected for w in want], 0).tolist()
            assert res.valid_pixels == sum(h["valid"].sum() for h in hosts)
            expected_runs = n if path != "recompute" else 3 * n
            assert res.cache.forward_calls == expected_runs
            if devices == 1:  # counted by the network itself: once per batch, scale and flip
                assert model.runs[0] == expected_runs * views
            assert getattr(res.cache, f"{path}_batches" if path != "recompute" else "recomputed_batches") == n
            reports[path] = res.cache
        # a budget holding one batch on the devices and one in host RAM: the third is recomputed
        per_dev = reports["device"].device_bytes // n
        meta = reports["device"].host_bytes // n
        logits_host = reports["host"].host_bytes // n - meta
        res = pred.label_split(variables, batches_fn, 0.3, policy, prior_, subsample, soft=soft,
                               device_bytes=per_dev, host_bytes=2 * meta + logits_host)
        assert (res.cache.device_batches, res.cache.host_batches, res.cache.recomputed_batches) == (1, 1, 1)
        assert res.cache.forward_calls == n + 2 and res.cache.path == "device + host RAM + recompute"
        np.testing.assert_array_equal(res.thresholds, lam)
        assert res.selected.tolist() == np.sum([w.selected for w in want], 0).tolist()


def test_label_split_logs_its_path(caplog):
    mesh = sharding.make_mesh()
    rng = np.random.default_rng(6)
    globals_, hosts = split_batches(rng, mesh, n_batches=2)
    model = PixelNet()
    variables = model.init(jax.random.key(6), hosts[0]["image"][:1], train=False)
    pred = Predictor(model, 4, mesh, (16, 24), scales=(1.0,), flip=False)
    with caplog.at_level("INFO", logger="cbst_jax.predictor"):
        res = pred.label_split(variables, lambda: iter(zip(globals_, hosts)), 0.5, "cbst")
    lines = [r.getMessage() for r in caplog.records if "pseudo-labelling cache" in r.getMessage()]
    assert len(lines) == 1
    # on CPU no device memory statistics exist: the default device budget is 0, so host RAM
    assert res.cache.device_budget == 0 and res.cache.host_batches == 2 and res.cache.host_budget > 0
    assert f"{res.cache.host_bytes} bytes on this host" in lines[0] and "2 in host RAM" in lines[0]


def test_default_device_budget_reads_memory_stats():
    from cbst_jax.predictor import _free_device_bytes

    class Device:
        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            return self.stats

    gpus = [Device({"bytes_limit": 100, "bytes_in_use": 30}), Device({"bytes_limit": 100, "bytes_in_use": 55})]
    assert _free_device_bytes(gpus) == 45  # the fullest device bounds the batch-sharded cache
    assert _free_device_bytes(gpus + [Device(None)]) == 0  # no statistics (CPU): no device budget
    assert _free_device_bytes(jax.devices()) == 0


@pytest.mark.parametrize("soft", [None, SoftLabelling("lrent", 0.25, 4)])
def test_labelling_pass_mean_entropy_against_scipy(soft):
    """The labelling pass's mean prediction entropy (collapse guard): the labels program's
    float32 sum over a batch's valid pixels, and the split's mean per valid pixel, against
    scipy.stats.entropy of the numpy probabilities (multi-scale + flip, padded rows and a partly
    padded batch left out)."""
    from scipy.stats import entropy

    mesh = sharding.make_mesh()
    rng = np.random.default_rng(7)
    globals_, hosts = split_batches(rng, mesh)
    model = PixelNet()
    variables = model.init(jax.random.key(7), hosts[0]["image"][:1], train=False)
    scales = (1.0, 0.75)
    pred = Predictor(model, 4, mesh, (16, 24), scales=scales, flip=True)
    res = pred.label_split(variables, lambda: iter(zip(globals_, hosts)), 0.3, "cbst", soft=soft)
    want = [entropy(reference_probs(variables["params"], h["image"], scales, True, (16, 24))[h["valid"]], axis=-1)
            for h in hosts]
    progs = pred.programs(soft)
    lam = jax.device_put(res.thresholds, sharding.replicated(mesh))
    for g, w in zip(globals_, want):
        _, total = progs.labels(progs.forward(variables, g["image"]), g["valid"], g["label"], lam, None)
        assert total.dtype == np.float32
        np.testing.assert_allclose(float(total), w.sum(), rtol=1e-5)
    np.testing.assert_allclose(res.mean_entropy, np.concatenate(want).mean(), rtol=1e-5)
    assert res.valid_pixels == sum(len(w) for w in want)
