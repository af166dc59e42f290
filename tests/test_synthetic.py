"""The embedded domain pair: determinism, split structure, drawn classes, class shares and the
target shift."""
import numpy as np
import pytest

from cbst_jax.data import synthetic as syn
from cbst_jax.labels import IGNORE_INDEX


def _shares(domain, n=60, split="val"):
    return syn.class_shares(syn.open_synthetic(domain, split, num_images=n), n)


@pytest.fixture(scope="module")
def shares():
    return {d: _shares(d) for d in syn.DOMAINS}


def test_record_format_and_determinism():
    src = syn.open_synthetic("source", "train", num_images=10)
    r = src[3]
    assert set(r) == {"image", "label", "name"}
    assert r["image"].dtype == np.uint8 and r["image"].shape == (64, 128, 3)
    assert r["label"].dtype == np.uint8 and r["label"].shape == (64, 128)
    again = syn.open_synthetic("source", "train", num_images=10)[3]
    assert r["image"].tobytes() == again["image"].tobytes() and r["label"].tobytes() == again["label"].tobytes()
    assert src[-1]["name"] == src[9]["name"] and len(src) == 10
    with pytest.raises(IndexError):
        src[10]
    assert src.num_classes == 19 and len(src.class_names) == 19 and len(src.names) == len(src) and src.has_labels


@pytest.mark.parametrize("other", [dict(split="val"), dict(seed=1), dict(domain="target", split="val"),
                                   dict(index=4)])
def test_streams_are_disjoint(other):
    base = dict(domain="source", split="train", seed=0, index=3)
    a = syn.render(**base)[0]
    b = syn.render(**{**base, **other})[0]
    assert a.tobytes() != b.tobytes()


def test_target_train_hides_its_labels():
    tt = syn.open_synthetic("target", "train", num_images=4)
    r = tt[0]
    assert not tt.has_labels and "label" not in r and r["hidden_label"].shape == (64, 128)
    assert syn.open_synthetic("target", "val", num_images=4).has_labels


def test_only_drawn_trainids_and_no_ignore():
    for d in syn.DOMAINS:
        lab = syn.open_synthetic(d, "val", num_images=8)
        ids = set()
        for i in range(8):
            ids |= set(np.unique(lab[i]["label"]).tolist())
        assert ids <= set(syn.DRAWN_CLASSES) and IGNORE_INDEX not in ids
        assert {syn.ROAD, syn.SKY, syn.BUILDING, syn.POLE} <= ids


def test_sizes_and_presets():
    r = syn.open_synthetic("target", "val", height=96, width=192, num_images=1)[0]
    assert r["image"].shape == (96, 192, 3) and r["label"].shape == (96, 192)
    big = syn.open_synthetic("source", "val", preset="gpu", num_images=1)
    assert (big.height, big.width) == syn.PRESETS["gpu"]
    assert len(syn.open_synthetic("source", "train")) == syn.DEFAULT_COUNTS[("source", "train")]


def test_class_shares_in_range(shares):
    # (low, high) in percent, generous bounds around the measured shares of docs/synthetic.md.
    bounds = {syn.ROAD: (12, 35), syn.SIDEWALK: (2, 12), syn.BUILDING: (15, 45), syn.VEGETATION: (8, 40),
              syn.SKY: (5, 35), syn.POLE: (0.3, 3), syn.LIGHT: (0.05, 1), syn.SIGN: (0.05, 1),
              syn.PERSON: (0.15, 2), syn.RIDER: (0.1, 2), syn.CAR: (0.8, 6)}
    for d, sh in shares.items():
        for c, (lo, hi) in bounds.items():
            assert lo <= 100 * sh[c] <= hi, (d, c, 100 * sh[c])
        assert abs(sh.sum() - 1) < 1e-9
        undrawn = [c for c in range(19) if c not in syn.DRAWN_CLASSES]
        assert sh[undrawn].sum() == 0


def test_content_shift(shares):
    s, t = shares["source"], shares["target"]
    assert t[syn.POLE] > s[syn.POLE] and t[syn.PERSON] > s[syn.PERSON]
    assert t[syn.CAR] < s[syn.CAR] and t[syn.VEGETATION] > s[syn.VEGETATION]


def test_rare_objects_stay_at_least_two_pixels_wide():
    src = syn.open_synthetic("target", "val", num_images=20)
    runs = []
    for i in range(20):
        m = src[i]["label"] == syn.POLE
        for row in m:
            edges = np.flatnonzero(np.diff(np.concatenate([[0], row.astype(np.int8), [0]])))
            runs += list(edges[1::2] - edges[0::2])
    runs = np.asarray(runs)
    assert len(runs) > 100 and np.mean(runs >= 2) > 0.9


def test_target_appearance_shift():
    def stats(d):
        ims = [syn.open_synthetic(d, "val", num_images=20)[i]["image"].astype(np.float32) / 255 for i in range(20)]
        contrast = np.mean([im.std() for im in ims])
        sharp = np.mean([np.abs(np.diff(im.mean(-1), axis=1)).mean() for im in ims])
        blue = np.mean([im[..., 2].mean() - im[..., 0].mean() for im in ims])
        return contrast, sharp, blue
    (cs, ss, bs), (ct, st, bt) = stats("source"), stats("target")
    assert ct < cs          # haze lowers contrast
    assert bt < bs          # warm white balance
    assert st < 1.5 * ss    # blur offsets the added sensor noise

