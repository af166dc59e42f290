"""CRST LR* soft pseudo-labels between labelling and retraining: the encoding (numpy brute
force), the crop warp (an oracle from scipy's map_coordinates and independently computed source
pixels), the rebuild, the store, the mixed iterator and the predictor on 8 devices."""
import numpy as np
import pytest
from scipy import ndimage

from cbst_jax import soft_labels
from cbst_jax.data import augment as aug
from cbst_jax.labels import IGNORE_INDEX


def random_soft(rng, shape, k, keep=0.6):
    x = rng.gamma(0.3, size=(*shape, k)).astype(np.float32) + 1e-6
    x /= x.sum(-1, keepdims=True)
    x[rng.random(shape) > keep] = 0.0
    return x


@pytest.mark.parametrize("hw,stride", [((16, 24), 4), ((13, 21), 4), ((9, 9), 8), ((6, 10), 1)])
def test_pool_cells_matches_block_loop(hw, stride):
    rng = np.random.default_rng(0)
    soft = random_soft(rng, (2, *hw), 5)
    got = np.asarray(soft_labels.pool_cells(soft, stride))
    hc, wc = -(-hw[0] // stride), -(-hw[1] // stride)
    assert got.shape == (2, hc, wc, 5)
    for b in range(2):
        for i in range(hc):
            for j in range(wc):
                block = soft[b, i * stride:(i + 1) * stride, j * stride:(j + 1) * stride].reshape(-1, 5)
                np.testing.assert_allclose(got[b, i, j], block.sum(0), rtol=1e-5, atol=1e-6)


def test_encode_matches_numpy():
    rng = np.random.default_rng(5)
    soft = random_soft(rng, (2, 13, 22), 7)
    hard, top, cells = (np.asarray(x) for x in soft_labels.encode(soft, 4))
    kept = soft.sum(-1) > 0
    np.testing.assert_array_equal(hard, np.where(kept, soft.argmax(-1), 255))
    np.testing.assert_array_equal(top, np.where(kept, np.round(soft.max(-1) * 255), 0))
    for b in range(2):
        for i in range(4):
            for j in range(6):
                blk = soft[b, 4 * i:4 * i + 4, 4 * j:4 * j + 4].reshape(-1, 7).astype(np.float64)
                res = blk.copy()
                res[np.arange(len(blk)), blk.argmax(-1)] = 0  # the hard class's own mass is in `top`
                res = res.sum(0)
                want = np.zeros(7) if res.sum() == 0 else np.round(res / res.sum() * 255)
                assert np.abs(cells[b, i, j].astype(int) - want).max() <= 1


def test_quantize_round_trip():
    rng = np.random.default_rng(1)
    soft = random_soft(rng, (64, 64), 19)
    q = soft_labels.quantize(soft)
    assert q.dtype == np.uint8
    kept = soft.sum(-1) > 0
    assert (q.sum(-1) > 0).tolist() == kept.tolist()  # no kept row quantises to nothing
    back = soft_labels.dequantize(q)
    np.testing.assert_allclose(back[kept].sum(-1), 1.0, rtol=1e-6)
    assert np.abs(back - soft).max() < 19 * 0.5 / 255 + 1e-6
    assert not back[~kept].any()


def oracle_crop(cells_u8, stride, label_full, geometry, top_full=None):
    """The crop's soft labels computed another way: the full-resolution soft map is the
    kept-cell-normalised bilinear interpolation between cell centres (scipy), sampled at the
    record pixels found by re-deriving the nearest-neighbour rescale / crop / flip."""
    h, w = label_full.shape
    (nh, nw), (y0, x0), (ch, cw) = geometry.rescaled, geometry.offset, geometry.crop
    rows = np.full(ch, -1)
    cols = np.full(cw, -1)
    for i in range(ch):
        t = y0 + i
        if 0 <= t < nh:
            rows[i] = min(int(np.floor((t + 0.5) * h / nh)), h - 1)
    for j in range(cw):
        t = x0 + j
        if 0 <= t < nw:
            cols[j] = min(int(np.floor((t + 0.5) * w / nw)), w - 1)
    if geometry.flipped:
        cols = cols[::-1]
    dist = soft_labels.dequantize(cells_u8)
    kept = (dist.sum(-1) > 0).astype(np.float64)
    yy, xx = np.meshgrid((np.arange(h) + 0.5) / stride - 0.5, (np.arange(w) + 0.5) / stride - 0.5, indexing="ij")
    coords = np.stack([yy, xx])
    weight = ndimage.map_coordinates(kept, coords, order=1, mode="nearest")
    full = np.stack([ndimage.map_coordinates(dist[..., k].astype(np.float64), coords, order=1, mode="nearest")
                     for k in range(dist.shape[-1])], -1)
    full = np.where(weight[..., None] > 0, full / np.where(weight > 0, weight, 1)[..., None], 0.0)
    out = np.zeros((ch, cw, dist.shape[-1]))
    lab = np.full((ch, cw), IGNORE_INDEX, np.uint8)
    top = np.zeros((ch, cw), np.uint8)
    for i in range(ch):
        for j in range(cw):
            if rows[i] >= 0 and cols[j] >= 0:
                out[i, j] = full[rows[i], cols[j]]
                lab[i, j] = label_full[rows[i], cols[j]]
                top[i, j] = 0 if top_full is None else top_full[rows[i], cols[j]]
    return out, lab, top


@pytest.mark.parametrize("seed", range(6))
def test_warp_matches_oracle(seed):
    rng = np.random.default_rng(seed)
    h, w, k, stride = 37, 53, 6, 4
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    label = rng.integers(0, k, (h, w)).astype(np.uint8)
    cells = soft_labels.quantize(random_soft(rng, (-(-h // stride), -(-w // stride)), k, keep=0.7))
    im, lab, geom = aug.augment(np.random.default_rng(seed), image, label, crop_size=(40, 48),
                                scale_range=(0.6, 1.6), flip=True, return_geometry=True)
    im2, lab2 = aug.augment(np.random.default_rng(seed), image, label, crop_size=(40, 48),
                            scale_range=(0.6, 1.6), flip=True)
    np.testing.assert_array_equal(im, im2)  # asking for the geometry changes nothing
    np.testing.assert_array_equal(lab, lab2)
    top_full = rng.integers(1, 256, (h, w)).astype(np.uint8)
    want, want_lab, want_top = oracle_crop(cells, stride, label, geom, top_full)
    np.testing.assert_array_equal(lab, want_lab)  # the geometry is where the hard crop came from
    np.testing.assert_array_equal(aug.warp_pixels(top_full, geom), want_top)
    got = aug.warp_cells(cells, stride, geom)
    np.testing.assert_allclose(got, want, atol=2e-6)
    inside = want_lab != IGNORE_INDEX
    np.testing.assert_allclose(got[inside].sum(-1)[got[inside].sum(-1) > 0], 1.0, rtol=1e-5)


def test_compose_and_round_trip():
    """Encode then rebuild at the identity transform: the hard class keeps exactly its quantised
    mass everywhere; with one residual distribution for the whole image (so cells lose nothing)
    the rebuilt labels equal the originals up to uint8 quantisation."""
    rng = np.random.default_rng(6)
    h, w, k, stride = 24, 40, 6, 8
    rho = rng.dirichlet(np.ones(k - 1))
    m = rng.uniform(0.4, 1.0, (h, w))
    soft = np.zeros((h, w, k))
    soft[..., 2] = m
    soft[..., [0, 1, 3, 4, 5]] = (1 - m)[..., None] * rho
    soft[rng.random((h, w)) < 0.3] = 0
    lab, top, cells = (np.asarray(x) for x in soft_labels.encode(soft[None].astype(np.float32), stride))
    geom = aug.Geometry((h, w), (h, w), (0, 0), (h, w), False)
    rebuilt = soft_labels.compose(lab[0], aug.warp_pixels(top[0], geom), aug.warp_cells(cells[0], stride, geom))
    np.testing.assert_allclose(rebuilt, soft, atol=1.5 / 255)
    np.testing.assert_array_equal(lab[0] == 255, soft.sum(-1) == 0)

    general = random_soft(rng, (1, h, w), k, keep=0.8)  # any soft map: the hard class keeps its mass
    lab, top, cells = (np.asarray(x)[0] for x in soft_labels.encode(general, stride))
    rebuilt = soft_labels.compose(lab, top, aug.warp_cells(cells, stride, geom))
    kept = lab != 255
    np.testing.assert_allclose(np.take_along_axis(rebuilt, np.where(kept, lab, 0)[..., None].astype(int), -1)[..., 0][kept],
                               top[kept] / 255, atol=1e-6)
    np.testing.assert_allclose(rebuilt[kept].sum(-1), 1.0, atol=1e-5)
    assert not rebuilt[~kept].any()
    # the pipeline's fast path (no per-pixel renormalisation before compose) gives the same labels
    for seed in range(3):
        _, crop_lab, g = aug.augment(np.random.default_rng(seed), np.zeros((h, w, 3), np.uint8), lab,
                                     crop_size=(20, 30), scale_range=(0.7, 1.4), return_geometry=True)
        slow = soft_labels.compose(crop_lab, aug.warp_pixels(top, g), aug.warp_cells(cells, stride, g))
        fast = soft_labels.compose(crop_lab, aug.warp_pixels(top, g), aug.warp_cells(cells, stride, g, normalize=False))
        np.testing.assert_allclose(fast, slow, atol=1e-6)


def test_store_soft_round_trip(tmp_path):
    from cbst_jax.pseudo_label_store import Manifest, PseudoLabelError, PseudoLabelStore

    store = PseudoLabelStore(str(tmp_path / "r0"))
    store.begin()
    rng = np.random.default_rng(2)
    # a full-resolution image's encoding from smooth LRENT-like labels: peaked, slowly varying
    yy, xx = np.mgrid[0:1024, 0:2048] / 300.0
    top = np.round(255 * (0.9 + 0.1 * np.sin(yy) * np.cos(xx))).astype(np.uint8)
    cells = soft_labels.quantize(random_soft(rng, (128, 256), 19))
    store.write_soft(3, top, cells)
    store.finish(Manifest(method="lrent", round=0, portion=0.2, policy="cbst", thresholds=[], class_counts=[],
                          selected=[], correct=[], valid_pixels=0, mine_classes=[], num_records=4,
                          has_ground_truth=False, soft_label_stride=8))
    got_top, got_cells = store.read_soft(3)
    np.testing.assert_array_equal(got_top, top)
    np.testing.assert_array_equal(got_cells, cells)
    assert (tmp_path / "r0" / "0000003.soft.npz").stat().st_size < 2 * 2**20
    with pytest.raises(PseudoLabelError, match="soft pseudo-label of target record 4 is missing"):
        store.read_soft(4)
    np.savez_compressed(tmp_path / "r0" / "0000003.soft.npz", top=top, cells=cells[::-1])  # replaced
    with pytest.raises(PseudoLabelError, match="does not match its manifest"):
        PseudoLabelStore(str(tmp_path / "r0")).read_soft(3)


def test_mixed_iterator_carries_soft_labels():
    from cbst_jax.data import pipeline

    rng = np.random.default_rng(3)
    k, stride, n = 5, 4, 6
    recs = [{"image": rng.integers(0, 255, (20, 28, 3), dtype=np.uint8),
             "label": rng.integers(0, k, (20, 28)).astype(np.uint8)} for _ in range(n)]
    hard = [np.where(rng.random((20, 28)) < 0.3, IGNORE_INDEX, r["label"]).astype(np.uint8) for r in recs]
    cells = [soft_labels.quantize(random_soft(rng, (5, 7), k, keep=0.9)) for _ in range(n)]
    tops = [rng.integers(60, 256, (20, 28)).astype(np.uint8) for _ in range(n)]
    sampler = pipeline.MixedSampler(tuple(range(n)), n, 4, "paired", 2, seed=5)
    it = pipeline.MixedIterator(recs, recs, sampler, crop_size=(16, 24), target_labels=lambda i: hard[i],
                                target_soft_labels=lambda i: (tops[i], cells[i]), soft_stride=stride,
                                num_classes=k, scale_range=(0.8, 1.2), prefetch=0, process_index=0, process_count=1)
    batch = next(it)
    assert batch["soft_label"].shape == (4, 16, 24, k) and batch["soft_label"].dtype == np.uint8
    for j in range(4):
        soft, lab = batch["soft_label"][j], batch["label"][j]
        if batch["domain"][j] == pipeline.SOURCE:
            assert not soft.any()
            continue
        assert not soft[lab == IGNORE_INDEX].any()
        rng_j = np.random.default_rng([sampler.seed, 0, 1, int(batch["index"][j]), 0])
        _, lab_j, geom = aug.augment(rng_j, recs[batch["index"][j]]["image"], hard[batch["index"][j]],
                                     crop_size=(16, 24), scale_range=(0.8, 1.2), return_geometry=True)
        np.testing.assert_array_equal(lab, lab_j)
        i = batch["index"][j]
        want = soft_labels.compose(lab_j, aug.warp_pixels(tops[i], geom), aug.warp_cells(cells[i], stride, geom))
        np.testing.assert_array_equal(soft, soft_labels.quantize(want))
        kept = lab != IGNORE_INDEX
        assert kept.any() and (soft[kept].sum(-1) > 0).all()
    second = next(it)  # resuming at step 1 (a restored checkpoint) rebuilds the same soft labels
    again = pipeline.MixedIterator(recs, recs, sampler, crop_size=(16, 24), target_labels=lambda i: hard[i],
                                   target_soft_labels=lambda i: (tops[i], cells[i]), soft_stride=stride,
                                   num_classes=k, scale_range=(0.8, 1.2), prefetch=2, workers=2,
                                   process_index=0, process_count=1)
    again.set_state({"epoch": 0, "step": 1})
    with again:
        resumed = next(again)
    for key in second:
        np.testing.assert_array_equal(resumed[key], second[key])
    with pytest.raises(ValueError, match=r"soft pseudo-label of target \d+ has shapes"):
        next(pipeline.MixedIterator(recs, recs, sampler, crop_size=(16, 24), target_labels=lambda i: hard[i],
                                    target_soft_labels=lambda i: (tops[i], cells[i]), soft_stride=8, num_classes=k,
                                    prefetch=0, process_index=0, process_count=1))


def test_predictor_soft_pseudo_labels_on_8_devices():
    import jax

    from cbst_jax import crst, sharding as shd
    from cbst_jax.models import get_model
    from cbst_jax.predictor import Predictor, local_rows

    mesh = shd.make_mesh()
    assert mesh.devices.size == 8
    model = get_model("demo_segnet", 19)
    rng = np.random.default_rng(4)
    images = rng.integers(0, 255, (8, 24, 40, 3), dtype=np.uint8)
    valid = np.zeros((8, 24, 40), bool)
    sizes = [(24, 40), (20, 33), (24, 17), (9, 40), (24, 40), (1, 1), (17, 23), (24, 40)]
    for b, (h, w) in enumerate(sizes):
        valid[b, :h, :w] = True
    variables = jax.jit(lambda key: model.init(key, images[:1], train=False))(jax.random.key(0))
    pred = Predictor(model, 19, mesh, (24, 40), scales=(1.0,), flip=False)
    lam = np.clip(rng.uniform(0.05, 0.6, 19), 0, 1).astype(np.float32)
    host = {"image": images, "valid": valid, "label": np.full((8, 24, 40), IGNORE_INDEX, np.uint8),
            "index": np.arange(8, dtype=np.int32)}
    batch = shd.to_global(host, mesh)
    lab, top, cells, picked, _, nvalid = pred.soft_pseudo_labels(variables, batch, lam, kind="lrent", alpha=0.25,
                                                                 stride=4)
    probs = np.asarray(jax.jit(pred.probs)(variables, images))
    soft = np.array(crst.soft_pseudo_labels(probs, lam, kind="lrent", alpha=0.25))
    soft[~valid] = 0
    want_lab = np.where(soft.sum(-1) > 0, soft.argmax(-1), IGNORE_INDEX)
    np.testing.assert_array_equal(np.asarray(lab), want_lab)
    assert 0 < (want_lab != IGNORE_INDEX).sum() < valid.sum()  # a real selection, not all or nothing
    np.testing.assert_array_equal(np.asarray(picked), np.bincount(want_lab[want_lab != IGNORE_INDEX], minlength=19))
    assert int(nvalid) == valid.sum()
    np.testing.assert_array_equal(np.asarray(top), np.where(want_lab != 255, np.round(soft.max(-1) * 255), 0))
    _, _, want_cells = (np.asarray(x) for x in soft_labels.encode(soft, 4))
    assert np.abs(np.asarray(cells).astype(int) - want_cells).max() <= 1  # float summation order
    assert np.asarray(cells).any()
    for (row, t), (row2, cell) in zip(local_rows(top, host), local_rows(cells, host, 4)):
        h, w = sizes[row]
        assert row == row2 and t.shape == (h, w) and cell.shape == (-(-h // 4), -(-w // 4), 19)
