"""Spatial prior: counts against a loop, normalisation, floor, smoothing, resize, save/load."""
import numpy as np
import pytest

from cbst_jax import priors


def test_counts_match_loop():
    rng = np.random.default_rng(0)
    maps = [rng.integers(0, 4, (8, 12)).astype(np.uint8) for _ in range(3)]
    maps[0][0, 0] = 255
    counts = priors.count_classes(maps, 4, (8, 12))
    ref = np.zeros((8, 12, 4), np.int64)
    for m in maps:
        for i in range(8):
            for j in range(12):
                if m[i, j] < 4:
                    ref[i, j, m[i, j]] += 1
    np.testing.assert_array_equal(counts, ref)


def test_pixel_normalisation_floor_and_geometry():
    # Sky (class 1) always in the top half, road (class 0) always in the bottom half.
    lab = np.zeros((16, 16), np.uint8)
    lab[:8] = 1
    q = priors.build_spatial_prior([lab] * 5, num_classes=3, size=(16, 16), sigma=1.0, floor=1e-3,
                                   normalize="pixel")
    np.testing.assert_allclose(q.sum(-1), 1.0, rtol=1e-6)
    assert q.min() >= 1e-3 - 1e-9  # no class impossible, class 2 never seen included
    assert q[0, 5, 1] > 0.99 and q[15, 5, 0] > 0.99
    assert 0.2 < q[7, 5, 1] < 0.8  # smoothing blurs the boundary


def test_class_normalisation_is_the_default_and_ignores_frequency():
    # A rare class (1 column) and a common one (the rest), each confined to its own columns: per
    # class, both get the same peak value; the frequency of a class does not scale its prior.
    lab = np.zeros((8, 16), np.uint8)
    lab[:, 15] = 1
    q = priors.build_spatial_prior([lab], 2, size=(8, 16), sigma=0, floor=1e-3)
    np.testing.assert_allclose(q.mean(axis=(0, 1)), 1.0, rtol=1e-2)
    assert q[0, 15, 1] == pytest.approx(16.0) and q[0, 0, 0] == pytest.approx(16 / 15)
    assert q[0, 0, 1] == pytest.approx(1e-3)  # floored, never impossible


def test_class_normalisation_and_errors():
    lab = np.zeros((4, 4), np.uint8)
    lab[0, 0] = 1
    q = priors.build_spatial_prior([lab], 2, size=(4, 4), sigma=0, floor=1e-4, normalize="class")
    np.testing.assert_allclose(q.mean(axis=(0, 1)), 1.0, rtol=1e-3)
    with pytest.raises(ValueError, match="normalize"):
        priors.build_spatial_prior([lab], 2, size=(4, 4), normalize="bogus")


def test_resize_save_load(tmp_path):
    rng = np.random.default_rng(0)
    q = rng.random((6, 10, 3)).astype(np.float32)
    q /= q.sum(-1, keepdims=True)
    big = priors.resize_prior(q, (12, 20))
    assert big.shape == (12, 20, 3)
    np.testing.assert_allclose(big.sum(-1), 1.0, rtol=1e-5)
    path = tmp_path / "prior.npz"
    priors.save_prior(path, q, sigma=4)
    np.testing.assert_array_equal(priors.load_prior(path, 3), q)
    with pytest.raises(ValueError, match="expected"):
        priors.load_prior(path, 19)
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(ValueError, match="bad.npz"):
        priors.load_prior(tmp_path / "bad.npz")
