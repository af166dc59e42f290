"""Loss terms against direct numpy formulas (and PyTorch's align_corners resize when available)."""
import numpy as np
import pytest

import jax.numpy as jnp

from cbst_jax import losses

RNG = np.random.default_rng(0)


def np_log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def random_labels(shape, num_classes, ignore_frac=0.3):
    y = RNG.integers(0, num_classes, shape).astype(np.uint8)
    y[RNG.random(shape) < ignore_frac] = 255
    return y


def test_cross_entropy_with_ignore():
    logits = RNG.normal(size=(2, 5, 6, 4)).astype(np.float32) * 3
    y = random_labels((2, 5, 6), 4)
    s, n = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(y))
    lp = np_log_softmax(logits)
    m = y != 255
    ref = -np.take_along_axis(lp, np.where(m, y, 0)[..., None].astype(int), -1)[..., 0][m].sum()
    assert int(n) == m.sum()
    np.testing.assert_allclose(float(s), ref, rtol=1e-5)


def test_cross_entropy_bf16_logits_computed_in_float32():
    logits = RNG.normal(size=(1, 3, 3, 5)).astype(np.float32)
    y = random_labels((1, 3, 3), 5, 0.0)
    s32, _ = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(y))
    s16, _ = losses.cross_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(y))
    assert s16.dtype == jnp.float32
    np.testing.assert_allclose(float(s16), float(s32), rtol=2e-2)


def test_soft_cross_entropy_and_ignore_rows():
    logits = RNG.normal(size=(2, 4, 4, 3)).astype(np.float32)
    soft = RNG.dirichlet(np.ones(3), size=(2, 4, 4)).astype(np.float32)
    soft[0, 0, :] = 0.0  # ignored row of pixels (ŷ = 0)
    soft[1, 2, 1] = [0.0, 1.0, 0.0]
    s, n = losses.soft_cross_entropy(jnp.asarray(logits), jnp.asarray(soft))
    lp = np_log_softmax(logits)
    ref = -(soft * lp).sum()
    assert int(n) == 2 * 16 - 4
    np.testing.assert_allclose(float(s), ref, rtol=1e-5)


def test_soft_cross_entropy_of_one_hot_equals_hard_cross_entropy():
    logits = RNG.normal(size=(1, 4, 4, 5)).astype(np.float32)
    y = random_labels((1, 4, 4), 5)
    one_hot = np.where((y != 255)[..., None], np.eye(5, dtype=np.float32)[np.where(y == 255, 0, y)], 0)
    a = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(y))
    b = losses.soft_cross_entropy(jnp.asarray(logits), jnp.asarray(one_hot))
    np.testing.assert_allclose(float(a[0]), float(b[0]), rtol=1e-6)
    assert int(a[1]) == int(b[1])


@pytest.mark.parametrize("kind", ["mrent", "mrkld", "mrl2"])
def test_model_regularizers(kind):
    logits = RNG.normal(size=(2, 3, 3, 6)).astype(np.float32) * 2
    lp = np_log_softmax(logits)
    p = np.exp(lp)
    ref = {"mrent": (p * lp).sum(-1), "mrkld": -(lp / 6).sum(-1), "mrl2": (p ** 2).sum(-1)}[kind]
    np.testing.assert_allclose(np.asarray(losses.model_regularizer(jnp.asarray(logits), kind)), ref,
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        losses.model_regularizer(jnp.asarray(logits), "mrfoo")


def test_subsample_labels_cbst_grid_and_ceil_mode_padding():
    y = np.arange(2 * 504 * 504).reshape(2, 504, 504) % 251
    sub = np.asarray(losses.subsample_labels(jnp.asarray(y), 8, (63, 63)))
    np.testing.assert_array_equal(sub, y[:, 4::8, 4::8])
    # DeepLab ceil mode: 512 -> 65 logits, the 64 label centres are padded with ignore.
    y = random_labels((1, 512, 512), 19)
    sub = np.asarray(losses.subsample_labels(jnp.asarray(y), 8, (65, 65)))
    np.testing.assert_array_equal(sub[:, :64, :64], y[:, 4::8, 4::8])
    assert (sub[:, 64, :] == 255).all() and (sub[:, :, 64] == 255).all()
    # Smaller logits than label centres: crop. Soft labels pad with zeros.
    assert losses.subsample_labels(jnp.asarray(y), 8, (60, 61)).shape == (1, 60, 61)
    soft = jnp.ones((1, 16, 16, 3))
    s = np.asarray(losses.subsample_labels(soft, 8, (3, 3), fill=0))
    assert s[:, :2, :2].min() == 1 and s[:, 2].max() == 0 and s[:, :, 2].max() == 0


def test_stride_loss_equals_loss_on_cropped_logits():
    """Padding the label grid with ignore == cropping the extra (ceil-mode) logits."""
    logits = RNG.normal(size=(2, 5, 5, 4)).astype(np.float32)
    y = random_labels((2, 32, 32), 4, 0.1)
    loss, aux = losses.segmentation_loss(jnp.asarray(logits), jnp.asarray(y), jnp.array([False, True]),
                                         resolution="stride", stride=8)
    ref_s, ref_n = losses.cross_entropy(jnp.asarray(logits[:, :4, :4]), jnp.asarray(y[:, 4::8, 4::8]))
    assert int(aux["n_valid"]) == int(ref_n)
    np.testing.assert_allclose(float(loss), float(ref_s) / int(ref_n), rtol=1e-6)


def np_resize_align_corners(x, out_hw):
    """Direct per-pixel bilinear interpolation, align_corners=True (float64)."""
    b, h, w, c = x.shape
    H, W = out_hw
    out = np.zeros((b, H, W, c))
    for i in range(H):
        sy = i * (h - 1) / (H - 1) if H > 1 else 0.0
        y0 = int(np.floor(sy)); y1 = min(y0 + 1, h - 1); wy = sy - y0
        for j in range(W):
            sx = j * (w - 1) / (W - 1) if W > 1 else 0.0
            x0 = int(np.floor(sx)); x1 = min(x0 + 1, w - 1); wx = sx - x0
            out[:, i, j] = ((1 - wy) * ((1 - wx) * x[:, y0, x0] + wx * x[:, y0, x1])
                            + wy * ((1 - wx) * x[:, y1, x0] + wx * x[:, y1, x1]))
    return out


@pytest.mark.parametrize("in_hw,out_hw", [((5, 7), (33, 49)), ((9, 9), (65, 64)), ((4, 6), (4, 6)), ((6, 6), (3, 4))])
def test_resize_align_corners_against_numpy(in_hw, out_hw):
    x = RNG.normal(size=(2, *in_hw, 3)).astype(np.float32)
    got = np.asarray(losses.resize_bilinear_align_corners(jnp.asarray(x), out_hw))
    np.testing.assert_allclose(got, np_resize_align_corners(x, out_hw), atol=1e-5)


def test_resize_align_corners_against_torch():
    torch = pytest.importorskip("torch")
    x = RNG.normal(size=(2, 9, 17, 5)).astype(np.float32)
    got = np.asarray(losses.resize_bilinear_align_corners(jnp.asarray(x), (65, 129)))
    ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(65, 129),
                                          mode="bilinear", align_corners=True).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_upsample_loss_matches_torch_crst_formula():
    """CRST ``reg_loss_calc``: upsample (align_corners) then CE summed / #valid, plus MRKLD."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    K = 4
    logits = RNG.normal(size=(2, 5, 5, K)).astype(np.float32)
    y = random_labels((2, 33, 33), K)
    is_target = np.array([False, True])
    w = 0.1  # --mr-weight-kld
    loss, aux = losses.segmentation_loss(jnp.asarray(logits), jnp.asarray(y), jnp.asarray(is_target),
                                         resolution="upsample", regularizer="mrkld", reg_weight=w * w)
    pred = F.interpolate(torch.from_numpy(logits).permute(0, 3, 1, 2), size=(33, 33), mode="bilinear",
                         align_corners=True).double()
    lab = torch.from_numpy(y.astype(np.int64))
    valid = lab != 255
    ce = F.cross_entropy(pred, lab, ignore_index=255, reduction="sum")
    reg_weights = torch.from_numpy(np.where(is_target, w, 0.0))[:, None, None]
    logsm = F.log_softmax(pred, dim=1)
    kld = torch.sum(-logsm * (valid.double() * reg_weights)[:, None] / K)
    valid_target = (valid & torch.from_numpy(is_target)[:, None, None]).sum()
    ref = ce / valid.sum() + w * kld / valid_target
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-5)
    assert int(aux["n_valid"]) == int(valid.sum()) and int(aux["n_valid_target"]) == int(valid_target)


@pytest.mark.parametrize("kind", ["none", "mrent", "mrkld", "mrl2"])
def test_pooled_mixed_loss_normalisation(kind):
    """One mean over all valid pixels of the batch; the MR term over valid target pixels only."""
    K = 5
    logits = RNG.normal(size=(3, 6, 6, K)).astype(np.float32)
    y = random_labels((3, 6, 6), K)
    is_target = np.array([True, False, True])
    loss, aux = losses.segmentation_loss(jnp.asarray(logits), jnp.asarray(y), jnp.asarray(is_target),
                                         resolution="stride", stride=1, regularizer=kind, reg_weight=0.3)
    lp = np_log_softmax(logits)
    p = np.exp(lp)
    valid = y != 255
    nll = -np.take_along_axis(lp, np.where(valid, y, 0)[..., None].astype(int), -1)[..., 0]
    ce = nll[valid].sum() / valid.sum()
    vt = valid & is_target[:, None, None]
    r = {"none": np.zeros_like(nll), "mrent": (p * lp).sum(-1), "mrkld": -lp.mean(-1), "mrl2": (p ** 2).sum(-1)}[kind]
    ref = ce + (0.3 * r[vt].sum() / vt.sum() if kind != "none" else 0.0)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    np.testing.assert_allclose(float(aux["ce"]), ce, rtol=1e-5)
    assert int(aux["n_valid"]) == valid.sum() and int(aux["n_valid_target"]) == vt.sum()
    # Source-only batch: the MR term vanishes instead of dividing by zero.
    l0, a0 = losses.segmentation_loss(jnp.asarray(logits), jnp.asarray(y), jnp.zeros(3, bool),
                                      resolution="stride", stride=1, regularizer=kind, reg_weight=0.3)
    np.testing.assert_allclose(float(l0), ce, rtol=1e-5)
    assert int(a0["n_valid_target"]) == 0


def test_mixed_loss_with_soft_target_labels():
    K = 4
    logits = RNG.normal(size=(2, 4, 4, K)).astype(np.float32)
    y = random_labels((2, 4, 4), K)
    soft = RNG.dirichlet(np.ones(K), size=(2, 4, 4)).astype(np.float32)
    soft[1, 0] = 0  # ignored target pixels
    soft[0] = 7.0  # source rows of soft_label are not read
    is_target = np.array([False, True])
    loss, aux = losses.segmentation_loss(jnp.asarray(logits), jnp.asarray(y), jnp.asarray(is_target),
                                         jnp.asarray(soft), resolution="stride", stride=1,
                                         regularizer="mrent", reg_weight=0.5)
    lp = np_log_softmax(logits)
    vs = y[0] != 255
    src = -np.take_along_axis(lp[0], np.where(vs, y[0], 0)[..., None].astype(int), -1)[..., 0][vs].sum()
    vt = soft[1].sum(-1) > 0
    tgt = -(soft[1] * lp[1]).sum(-1)[vt].sum()
    ent = (np.exp(lp[1]) * lp[1]).sum(-1)[vt].sum() / vt.sum()
    ref = (src + tgt) / (vs.sum() + vt.sum()) + 0.5 * ent
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    assert int(aux["n_valid"]) == vs.sum() + vt.sum() and int(aux["n_valid_target"]) == vt.sum()
