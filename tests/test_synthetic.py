"""The embedded domain pair: determinism, split structure, drawn classes, class shares, the shared
camera of the default pair, the camera-shift variant and the target's appearance shift."""
import numpy as np
import pytest
from scipy import stats

from cbst_jax.data import DatasetError, open_dataset
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


def test_sizes():
    r = syn.open_synthetic("target", "val", height=96, width=192, num_images=1)[0]
    assert r["image"].shape == (96, 192, 3) and r["label"].shape == (96, 192)
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



def _horizon_rows(domain, n=200, **kw):
    """Per image, the first row holding a road pixel, as a fraction of H: the apex of the road
    trapezoid, one row below the horizon (measured on the label maps, not read from the generator)."""
    src = syn.open_synthetic(domain, "val", num_images=n, **kw)
    rows = []
    for i in range(n):
        hit = np.flatnonzero((src[i]["label"] == syn.ROAD).any(axis=1))
        rows.append(hit[0] / src.height)
    return np.asarray(rows)


@pytest.fixture(scope="module")
def horizons():
    return {"source": _horizon_rows("source"), "target": _horizon_rows("target"),
            "shifted": _horizon_rows("target", camera_shift=True)}


def test_default_pair_shares_the_camera(horizons):
    # Both domains are dashboard cameras: the horizon rows follow one distribution (two-sample KS).
    s, t = horizons["source"], horizons["target"]
    assert stats.ks_2samp(s, t).pvalue > 0.05
    assert abs(s.mean() - t.mean()) < 0.02
    assert 0.35 <= min(s.min(), t.min()) and max(s.max(), t.max()) <= 0.53


def test_camera_shift_raises_the_target_horizon(horizons):
    s, sh = horizons["source"], horizons["shifted"]
    assert stats.ks_2samp(s, sh).pvalue < 1e-6
    assert sh.mean() < s.mean() - 0.05
    assert sh.max() <= 0.45


def test_camera_shift_moves_only_the_target_camera():
    kw = dict(num_images=3)
    for split in ("train", "val"):
        a = syn.open_synthetic("source", split, **kw)[1]
        b = syn.open_synthetic("source", split, camera_shift=True, **kw)[1]
        assert a["image"].tobytes() == b["image"].tobytes()
    plain = open_dataset("synthetic/target", None, "val", **kw)
    shifted = open_dataset("synthetic/target", None, "val", camera_shift=True, **kw)
    assert shifted.camera_shift and not plain.camera_shift
    assert plain[0]["label"].tobytes() != shifted[0]["label"].tobytes()
    assert shifted[0]["label"].tobytes() == open_dataset("synthetic/target", None, "val", camera_shift=True,
                                                         **kw)[0]["label"].tobytes()


def test_bad_names_raise_dataset_error():
    with pytest.raises(DatasetError, match="domain"):
        syn.open_synthetic("game", "train")
    with pytest.raises(DatasetError, match="split"):
        syn.open_synthetic("source", "validation")


def _class_colours(domain, n=40):
    """Mean RGB (in [0, 1]) of each drawn class over the first ``n`` val images."""
    src = syn.open_synthetic(domain, "val", num_images=n)
    sums, counts = np.zeros((19, 3)), np.zeros(19)
    for i in range(n):
        r = src[i]
        im, lab = r["image"].reshape(-1, 3) / 255.0, r["label"].ravel()
        np.add.at(sums, lab, im)
        counts += np.bincount(lab, minlength=19)
    return sums / np.maximum(counts, 1)[:, None]


def test_target_surfaces_look_like_their_confusers():
    # The calibrated gap (docs/results.md): on target the overcast sky is grey like the façades,
    # and the sidewalk's colour is close to the road's; in the source both pairs are far apart.
    src, tgt = _class_colours("source"), _class_colours("target")
    dist = lambda c, a, b: float(np.linalg.norm(c[a] - c[b]))
    chroma = lambda rgb: float(rgb.max() - rgb.min())
    assert chroma(tgt[syn.SKY]) < 0.5 * chroma(src[syn.SKY])
    assert dist(tgt, syn.SKY, syn.BUILDING) < 0.7 * dist(src, syn.SKY, syn.BUILDING)
    assert dist(tgt, syn.SIDEWALK, syn.ROAD) < 0.5 * dist(src, syn.SIDEWALK, syn.ROAD)
    # Foliage is duller on target (less green over red/blue), but still the greenest class.
    green = lambda rgb: float(rgb[1] - 0.5 * (rgb[0] + rgb[2]))
    assert green(tgt[syn.VEGETATION]) < green(src[syn.VEGETATION])
    assert all(green(tgt[syn.VEGETATION]) > green(tgt[c]) for c in syn.DRAWN_CLASSES if c != syn.VEGETATION)


def test_rendered_source_holds_the_same_records():
    """Rendered once (in this process, and by 2 spawned workers): the records the generator
    renders on the fly, the same arrays, read-only."""
    src = syn.open_synthetic("target", "train", height=32, width=64, num_images=7, seed=3)
    for rendered in (syn.RenderedSource(src, 1), syn.RenderedSource(src, 2, min_pixels=0)):
        assert len(rendered) == 7 and rendered.names == src.names and not rendered.has_labels
        for i in range(7):
            want, got = src[i], rendered[i]
            assert set(got) == {"image", "hidden_label", "name"} and got["name"] == want["name"]
            np.testing.assert_array_equal(got["image"], want["image"])
            np.testing.assert_array_equal(got["hidden_label"], want["hidden_label"])
        np.testing.assert_array_equal(rendered[-1]["image"], src[6]["image"])
        with pytest.raises(ValueError, match="read-only"):
            rendered[0]["image"][0, 0, 0] = 1
        with pytest.raises(IndexError):
            rendered[7]


def test_a_run_renders_the_embedded_pair_once():
    from cbst_jax.data.splits import open_splits
    from experiments.configs import synthetic as recipe

    config = recipe.get_config("quick")
    data = open_splits(config)
    for split, n in ((data.source, 96), (data.target_train, 48), (data.target_eval, 32)):
        assert isinstance(split, syn.RenderedSource) and len(split) == n
    np.testing.assert_array_equal(data.target_eval[5]["label"],
                                  syn.render("target", "val", 5, height=64, width=128, seed=0)[1])
