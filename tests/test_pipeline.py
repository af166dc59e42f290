"""Input pipeline: joint transforms, source-subset schedule, mixed sampler, per-host rows,
resumable iterators and fixed-shape evaluation batches."""
import json

import numpy as np
import pytest

from cbst_jax.data import augment as aug
from cbst_jax.data import pipeline as pl
from cbst_jax.data import synthetic as syn


class _Fake:
    """A tiny random-access source: record i is (h_i, w_i) with image value i and label i % 19."""
    has_labels = True

    def __init__(self, sizes):
        self.sizes = sizes

    def __len__(self):
        return len(self.sizes)

    def __getitem__(self, i):
        h, w = self.sizes[i]
        img = np.full((h, w, 3), i, np.uint8)
        return {"image": img, "label": np.full((h, w), i % 19, np.uint8), "name": str(i)}


# ------------------------------------------------------------------ augment
def test_crop_pads_image_and_label():
    img = np.full((4, 6, 3), 200, np.uint8)
    lab = np.full((4, 6), 3, np.uint8)
    ci, cl = aug.crop(img, lab, -2, -1, 8, 8, image_fill="mean")
    assert ci.shape == (8, 8, 3) and cl.shape == (8, 8)
    assert (cl[2:6, 1:7] == 3).all() and (cl == 255).sum() == 64 - 24
    assert (ci[0, 0] == aug.MEAN_RGB).all() and (ci[2:6, 1:7] == 200).all()
    ci, _ = aug.crop(img, lab, 0, 0, 8, 8)
    assert (ci[5:] == 0).all()


def test_rescale_and_flip():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    lab = rng.integers(0, 5, (20, 30)).astype(np.uint8)
    i2, l2 = aug.rescale(img, lab, 1.5)
    assert i2.shape == (30, 45, 3) and l2.shape == (30, 45) and set(np.unique(l2)) <= set(np.unique(lab))
    i3, l3 = aug.rescale(img, lab, 2.0)
    assert (l3[::2, ::2] == lab).all()
    fi, fl = aug.hflip(img, lab)
    assert (fi[:, 0] == img[:, -1]).all() and (fl[:, ::-1] == lab).all()


def test_augment_shapes_and_flip_is_joint():
    rec = syn.open_synthetic("source", "val", num_images=1)[0]
    for seed in range(6):
        im, lb = aug.augment(np.random.default_rng(seed), rec["image"], rec["label"], crop_size=(48, 80),
                             scale_range=(0.5, 1.5))
        assert im.shape == (48, 80, 3) and lb.shape == (48, 80) and im.dtype == lb.dtype == np.uint8
    # Without rescale, the crop is a window (possibly mirrored) of the original: labels match the image.
    im, lb = aug.augment(np.random.default_rng(1), rec["image"], rec["label"], crop_size=(64, 128),
                         scale_range=(1.0, 1.0))
    same = (im == rec["image"]).all() and (lb == rec["label"]).all()
    flipped = (im == rec["image"][:, ::-1]).all() and (lb == rec["label"][:, ::-1]).all()
    assert same or flipped


def test_mining_crop_contains_the_rare_class():
    src = syn.open_synthetic("target", "val", num_images=10)
    for i in range(10):
        rec = src[i]
        present = set(np.unique(rec["label"]).tolist())
        for c in (syn.LIGHT, syn.SIGN, syn.RIDER):
            if c not in present:
                continue
            for seed in range(5):
                rng = np.random.default_rng(seed)
                y0, x0, mined = aug.crop_offsets(rng, rec["label"], (24, 24), mine_classes=(c,), p_mine=1.0)
                assert mined == c
                _, lb = aug.crop(rec["image"], rec["label"], y0, x0, 24, 24)
                assert (lb == c).any()
                assert 0 <= y0 <= 64 - 24 and 0 <= x0 <= 128 - 24   # clamped on the image
    lab = np.zeros((32, 32), np.uint8)
    assert aug.crop_offsets(np.random.default_rng(0), lab, (8, 8), (syn.POLE,), 1.0)[2] == -1  # absent: uniform


# ------------------------------------------------------------------ schedule and sampler
def test_source_portion_schedule():
    assert pl.source_portion(0) == pytest.approx(0.03)
    assert pl.source_portion(4) == pytest.approx(0.04)
    assert pl.source_portion(100) == pytest.approx(0.06)


def test_cumulative_subsets_are_nested_and_fresh_ones_are_not():
    subs = [pl.source_subset(1000, r, s0=0.1, ds=0.05, s_max=0.3, seed=3) for r in range(6)]
    assert [len(s) for s in subs] == [100, 150, 200, 250, 300, 300]
    for a, b in zip(subs, subs[1:]):
        assert set(a) <= set(b)
    fresh = [pl.source_subset(1000, r, s0=0.1, ds=0.05, s_max=0.3, seed=3, schedule="fresh") for r in range(2)]
    assert len(fresh[1]) == 150 and not set(fresh[0]) <= set(fresh[1])
    assert (fresh[0] == subs[0]).all()


def test_pooled_sampler_covers_the_union_once_per_epoch():
    s = pl.MixedSampler(tuple(range(0, 40, 2)), 30, 8, "pooled", seed=1)
    assert s.batches_per_epoch() == 50 // 8
    rows = [s.batch(0, k) for k in range(s.batches_per_epoch())]
    pairs = [(int(d), int(i)) for dom, idx, _ in rows for d, i in zip(dom, idx)]
    assert len(set(pairs)) == len(pairs) == 48
    assert {i for d, i in pairs if d == pl.SOURCE} <= set(range(0, 40, 2))
    assert {i for d, i in pairs if d == pl.TARGET} <= set(range(30))
    assert not (s.batch(1, 0)[1] == rows[0][1]).all()


def test_paired_sampler_composition():
    s = pl.MixedSampler(tuple(range(5)), 24, 8, "paired", source_per_batch=4, seed=0)
    assert s.batches_per_epoch() == 6
    tgt = []
    for k in range(6):
        dom, idx, rep = s.batch(0, k)
        assert (dom == pl.SOURCE).sum() == 4 and list(dom) == [0, 1] * 4      # interleaved
        assert (dom[:4] == 0).sum() == 2                                      # each host half gets 2 + 2
        tgt += list(idx[dom == pl.TARGET])
        assert set(idx[dom == pl.SOURCE]) <= set(range(5))
    assert sorted(tgt) == list(range(24))


def test_round_sampler_uses_the_round_subset():
    s0 = pl.round_sampler(400, 50, 0, batch_size=8, s0=0.1, ds=0.05, s_max=0.5, seed=0)
    s2 = pl.round_sampler(400, 50, 2, batch_size=8, s0=0.1, ds=0.05, s_max=0.5, seed=0)
    assert s0.num_source == 40 and s2.num_source == 80 and set(s0.source_indices) <= set(s2.source_indices)
    assert s0.seed != s2.seed


# ------------------------------------------------------------------ training iterator
def _iterator(process_index=0, process_count=1, seed=0, prefetch=2, mode="paired"):
    src = syn.open_synthetic("source", "train", num_images=30, height=32, width=64)
    tgt = syn.open_synthetic("target", "train", num_images=20, height=32, width=64)
    pls = lambda i: np.full((32, 64), syn.CAR, np.uint8)       # stand-in pseudo-labels
    sampler = pl.MixedSampler(tuple(range(0, 30, 3)), 20, 4, mode, seed=seed)
    return pl.MixedIterator(src, tgt, sampler, crop_size=(24, 40), target_labels=pls, scale_range=(0.7, 1.3),
                            mine_classes=(syn.POLE, syn.SIGN), process_index=process_index,
                            process_count=process_count, prefetch=prefetch)


def test_training_batches_are_deterministic_and_labelled_by_domain():
    with _iterator() as a, _iterator(prefetch=0) as b, _iterator(seed=1) as c:
        ba, bb, bc = next(a), next(b), next(c)
    assert set(ba) == {"image", "label", "domain", "index"}
    assert ba["image"].shape == (4, 24, 40, 3) and ba["image"].dtype == np.uint8
    assert ba["label"].shape == (4, 24, 40) and ba["index"].dtype == np.int32
    for k in ba:
        assert ba[k].tobytes() == bb[k].tobytes()
    assert ba["image"].tobytes() != bc["image"].tobytes()
    tl = ba["label"][ba["domain"] == pl.TARGET]
    assert set(np.unique(tl)) <= {syn.CAR, 255}                  # target labels come from the lookup
    sl = ba["label"][ba["domain"] == pl.SOURCE]
    assert len(set(np.unique(sl)) - {syn.CAR, 255}) > 0


def test_two_processes_make_the_two_halves_of_the_global_batch():
    with _iterator() as one, _iterator(0, 2) as h0, _iterator(1, 2) as h1:
        for _ in range(3):
            full, a, b = next(one), next(h0), next(h1)
            for k in full:
                assert (np.concatenate([a[k], b[k]]) == full[k]).all()
            assert (a["domain"] == 0).sum() == (b["domain"] == 0).sum() == 1


def test_resumed_iterator_gives_the_same_next_batches():
    with _iterator(mode="pooled") as it:
        bpe = it.sampler.batches_per_epoch()
        for _ in range(bpe - 1):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        expected = [next(it) for _ in range(3)]                   # crosses an epoch boundary
        assert it.get_state() == {"epoch": 1, "step": 2}
    with _iterator(mode="pooled") as fresh:
        fresh.set_state(state)
        for e in expected:
            got = next(fresh)
            for k in e:
                assert (got[k] == e[k]).all()


def test_global_batch_assembles_on_the_mesh():
    import jax

    from cbst_jax.sharding import make_mesh, to_global

    with _iterator() as it:
        batch = next(it)
    mesh = make_mesh(jax.devices()[:4])
    g = to_global(batch, mesh)
    assert g["image"].shape == (4, 24, 40, 3) and len(g["image"].sharding.device_set) == 4
    assert (np.asarray(g["label"]) == batch["label"]).all()


# ------------------------------------------------------------------ evaluation iterator
def test_eval_iterator_covers_each_record_once_with_masks():
    sizes = [(10, 12), (16, 20), (8, 8), (16, 20), (12, 5), (3, 4), (16, 16)]
    src = _Fake(sizes)
    seen = []
    with pl.EvalIterator(src, batch_size=4, canvas=(16, 20)) as it:
        assert len(it) == 2
        for b in it:
            assert b["image"].shape == (4, 16, 20, 3) and b["valid"].dtype == bool
            for j, i in enumerate(b["index"]):
                if i < 0:
                    assert not b["valid"][j].any() and (b["label"][j] == 255).all()
                    continue
                seen.append(int(i))
                h, w = sizes[i]
                assert b["valid"][j].sum() == h * w and b["valid"][j, :h, :w].all()
                assert (b["label"][j][b["valid"][j]] == i % 19).all() and (b["label"][j][~b["valid"][j]] == 255).all()
                assert (b["image"][j, :h, :w] == i).all() and (b["image"][j][~b["valid"][j]] == 0).all()
    assert sorted(seen) == list(range(7))
    with pytest.raises(ValueError):
        next(pl.EvalIterator(src, batch_size=4, canvas=(8, 8)))


def test_eval_iterator_hosts_and_resume():
    src = _Fake([(6, 6)] * 9)
    one = list(pl.EvalIterator(src, batch_size=4))
    h0 = list(pl.EvalIterator(src, batch_size=4, process_index=0, process_count=2))
    h1 = list(pl.EvalIterator(src, batch_size=4, process_index=1, process_count=2))
    assert len(one) == len(h0) == len(h1) == 3
    for f, a, b in zip(one, h0, h1):
        for k in f:
            assert (np.concatenate([a[k], b[k]]) == f[k]).all()
    it = pl.EvalIterator(src, batch_size=4)
    next(it)
    st = it.get_state()
    rest = list(it)
    it2 = pl.EvalIterator(src, batch_size=4)
    it2.set_state(st)
    assert [b["index"].tolist() for b in it2] == [b["index"].tolist() for b in rest]


def test_eval_iterator_unlabelled_target_and_hidden_labels():
    tt = syn.open_synthetic("target", "train", num_images=3)
    b = next(pl.EvalIterator(tt, batch_size=4))
    assert (b["label"] == 255).all() and b["valid"][:3].all()
    b = next(pl.EvalIterator(tt, batch_size=4, label_key="hidden_label"))
    assert (b["label"][0] == tt[0]["hidden_label"]).all()
