"""Input pipeline: crop-first joint transforms (against a rescale-then-crop brute force), decoding
and the folder read path, source-subset schedule, mixed sampler, per-host rows, resumable iterators
(threads and worker processes) and fixed-shape evaluation batches."""
import json
import math
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

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
def _bilinear(image, nh, nw):
    """Float64 bilinear resize at pixel centres, edges clamped (what cv2.resize INTER_LINEAR means)."""
    def taps(n_out, n_in):
        f = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        i0 = np.floor(f).astype(int)
        return i0, np.minimum(i0 + 1, n_in - 1), f - i0
    (r0, r1, wr), (c0, c1, wc) = taps(nh, image.shape[0]), taps(nw, image.shape[1])
    x = image.astype(np.float64)
    x = x[r0] * (1 - wr)[:, None, None] + x[r1] * wr[:, None, None]
    return x[:, c0] * (1 - wc)[None, :, None] + x[:, c1] * wc[None, :, None]


def _rescale_then_crop(rng, image, label, crop_size, scale_range, flip, mine_classes, p_mine):
    """Brute-force reference of a training crop: rescale the whole record (float bilinear for
    the image; for the label, output pixel t takes input pixel floor((t + 1/2) n_in / n_out) in
    exact fractions - Pillow's NEAREST accumulates the step in floating point and is off by one
    where that is an integer), pick the window (uniform, or centred on a random
    pixel of a random present mine class of the rescaled label, in np.nonzero order), pad (0 /
    255), flip. The same random draws as the crop-first path, in the same order."""
    lo, hi = scale_range
    scale = float(rng.uniform(lo, hi)) if hi > lo else float(lo)
    h, w = label.shape
    nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    img = _bilinear(image, nh, nw)
    src = [[math.floor(Fraction(2 * t + 1, 2) * n_in / n_out) for t in range(n_out)]
           for n_in, n_out in ((h, nh), (w, nw))]
    lab = np.array([[label[i, j] for j in src[1]] for i in src[0]], np.uint8)
    ch, cw = crop_size
    ylo, yhi, xlo, xhi = min(0, nh - ch), max(0, nh - ch), min(0, nw - cw), max(0, nw - cw)
    y0 = None
    if len(mine_classes) and rng.random() < p_mine:
        present = [c for c in mine_classes if c != 255 and (lab == c).any()]
        if present:
            c = present[rng.integers(len(present))]
            ys, xs = np.nonzero(lab == c)
            j = rng.integers(len(ys))
            y0, x0 = int(np.clip(ys[j] - ch // 2, ylo, yhi)), int(np.clip(xs[j] - cw // 2, xlo, xhi))
    if y0 is None:
        y0, x0 = int(rng.integers(ylo, yhi + 1)), int(rng.integers(xlo, xhi + 1))
    out_i, out_l = np.zeros((ch, cw, 3)), np.full((ch, cw), 255, np.uint8)
    for i in range(ch):
        for j in range(cw):
            if 0 <= y0 + i < nh and 0 <= x0 + j < nw:
                out_i[i, j], out_l[i, j] = img[y0 + i, x0 + j], lab[y0 + i, x0 + j]
    if flip and rng.random() < 0.5:
        out_i, out_l = out_i[:, ::-1], out_l[:, ::-1]
    return out_i, out_l


def test_crop_first_equals_rescale_then_crop():
    """The crop-first path gives the labels of rescaling whole records then cropping, exactly (mining,
    padding and flips included, raw ids through a table or trainIds), and the image up to uint8
    rounding (OpenCV before 5 quantises sampling positions to 1/32 pixel: a few grey levels at
    sharp edges); at scale 1 the image too is exact."""
    rng0 = np.random.default_rng(0)
    mined = 0
    for trial in range(60):
        h, w = int(rng0.integers(5, 40)), int(rng0.integers(5, 60))
        image = rng0.integers(0, 256, (h, w, 3), dtype=np.uint8)
        label = np.where(rng0.random((h, w)) < 0.85, 0, rng0.integers(0, 6, (h, w))).astype(np.uint8)
        kw = dict(crop_size=(int(rng0.integers(3, 40)), int(rng0.integers(3, 60))),
                  scale_range=[(0.5, 1.5), (1.0, 1.0), (0.3, 2.5)][trial % 3], flip=True,
                  mine_classes=[(), (3, 4), (5, 255, 1, 9)][trial % 3], p_mine=0.7)
        want_i, want_l = _rescale_then_crop(np.random.default_rng(trial), image, label, **kw)
        got_i, got_l, geom = aug.augment(np.random.default_rng(trial), image, label, return_geometry=True, **kw)
        np.testing.assert_array_equal(got_l, want_l)
        err = np.abs(got_i - want_i)
        assert err.max() <= (0 if geom.rescaled == geom.size else 4) and err.mean() < 0.5
        table = np.random.default_rng(trial).permutation(256).astype(np.uint8)  # raw id -> trainId
        raw = np.argsort(table).astype(np.uint8)[label]                          # table[raw] == label
        got_t, got_tl = aug.augment(np.random.default_rng(trial), image, raw, label_table=table, **kw)
        np.testing.assert_array_equal(got_tl, want_l)
        np.testing.assert_array_equal(got_t, got_i)
        uniform = aug.sample_geometry(np.random.default_rng(trial), label, **dict(kw, p_mine=0.0))
        mined += geom != uniform  # (the same draws, but for the mined window)
    assert mined >= 10  # the mining branch was exercised


def test_crop_pads_and_flips():
    img = np.full((4, 6, 3), 200, np.uint8)
    img[:, 0] = 7
    lab = np.full((4, 6), 3, np.uint8)
    lab[:, 0] = 1
    g = aug.Geometry((4, 6), (4, 6), (-2, -1), (8, 8), False)
    ci, cl = aug.crop_image(img, g), aug.crop_label(lab, g)
    assert ci.shape == (8, 8, 3) and cl.shape == (8, 8)
    assert (cl[2:6, 2:7] == 3).all() and (cl[2:6, 1] == 1).all() and (cl == 255).sum() == 64 - 24
    assert (ci[2:6, 1] == 7).all() and (ci[2:6, 2:7] == 200).all() and (ci[cl == 255] == 0).all()
    f = aug.Geometry((4, 6), (4, 6), (-2, -1), (8, 8), True)
    np.testing.assert_array_equal(aug.crop_image(img, f), ci[:, ::-1])
    np.testing.assert_array_equal(aug.crop_label(lab, f), cl[:, ::-1])
    outside = aug.Geometry((4, 6), (4, 6), (10, 10), (3, 3), False)
    assert not aug.crop_image(img, outside).any() and (aug.crop_label(lab, outside) == 255).all()


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
    with pytest.raises(ValueError, match="differ in size"):
        aug.augment(np.random.default_rng(0), rec["image"], rec["label"][1:], crop_size=(8, 8))


def test_mining_crop_contains_the_rare_class():
    src = syn.open_synthetic("target", "val", num_images=10)
    for i in range(10):
        rec = src[i]
        present = set(np.unique(rec["label"]).tolist())
        for c in (syn.LIGHT, syn.SIGN, syn.RIDER):
            if c not in present:
                continue
            for seed in range(5):
                g = aug.sample_geometry(np.random.default_rng(seed), rec["label"], crop_size=(24, 24),
                                        scale_range=(0.8, 1.2), mine_classes=(c,), p_mine=1.0)
                assert (aug.crop_label(rec["label"], g) == c).any()
                assert 0 <= g.offset[0] <= g.rescaled[0] - 24 and 0 <= g.offset[1] <= g.rescaled[1] - 24
    lab = np.zeros((32, 32), np.uint8)  # the class is absent: the window is the uniform one
    kw = dict(crop_size=(8, 8), mine_classes=(syn.POLE,))
    assert (aug.sample_geometry(np.random.default_rng(0), lab, p_mine=1.0, **kw)
            == aug.sample_geometry(np.random.default_rng(0), lab, p_mine=0.0, **kw))


# ------------------------------------------------------------------ decoding and the folder read path
def test_rgb_png_decoders_agree(tmp_path, monkeypatch):
    """pyspng (when installed) and Pillow decode RGB PNGs to the same pixels; other PNG kinds and
    broken files go through Pillow (DatasetError naming the file)."""
    from cbst_jax.data import io

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "pal.png")
    Image.fromarray(np.concatenate([rgb, rgb[..., :1]], -1)).save(tmp_path / "rgba.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "rgb.png").read_bytes()[:300])
    pal = np.asarray(Image.open(tmp_path / "pal.png").convert("RGB"))
    for installed in {io.pyspng, None}:
        monkeypatch.setattr(io, "pyspng", installed)
        for decoder in ("pillow", "pyspng"):
            np.testing.assert_array_equal(io.read_rgb(tmp_path / "rgb.png", decoder), rgb)
            np.testing.assert_array_equal(io.read_rgb(tmp_path / "pal.png", decoder), pal)
            np.testing.assert_array_equal(io.read_rgb(tmp_path / "rgba.png", decoder), rgb)
            with pytest.raises(io.DatasetError, match="cut.png"):
                io.read_rgb(tmp_path / "cut.png", decoder)
            with pytest.raises(io.DatasetError, match="missing.png: file not found"):
                io.read_rgb(tmp_path / "missing.png", decoder)
    with pytest.raises(ValueError, match="decoder"):
        io.read_rgb(tmp_path / "rgb.png", "cv2")


def test_raw_records_remap_to_the_records(tmp_path):
    """A reader's raw record (ids not yet remapped, and its table) gives its record's label, also
    for labels resized to their image and ids outside the table; stats count the same."""
    from cbst_jax.data import open_dataset
    from tests.fixtures_layouts import make_gta5

    make_gta5(tmp_path / "gta5", n=3, size=(20, 36), mismatched=1)
    with Image.open(tmp_path / "gta5" / "labels" / "00002.png") as im:
        ids, pal = np.asarray(im).copy(), im.getpalette()
    ids[0, :3] = 200                                                   # an id outside the table
    out = Image.frombytes("P", (ids.shape[1], ids.shape[0]), ids.tobytes())
    out.putpalette(pal)
    out.save(tmp_path / "gta5" / "labels" / "00002.png")
    a = open_dataset("gta5", tmp_path / "gta5")
    b = open_dataset("gta5", tmp_path / "gta5")
    with pytest.warns(Warning):
        for i in range(3):
            rec, raw = a[i], b.raw_record(i, decoder="pyspng")
            np.testing.assert_array_equal(raw["image"], rec["image"])
            assert raw["label_ids"].shape == rec["label"].shape and raw["label_ids"].dtype == np.uint8
            np.testing.assert_array_equal(raw["label_table"][raw["label_ids"]], rec["label"])
    assert a.stats == b.stats and a.stats["unknown_label_pixels"] == 3 and a.stats["resized_labels"] == 1
    assert set(b.raw_record(0, label=False)) == {"image", "name"}


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
def _iterator(process_index=0, process_count=1, seed=0, prefetch=2, mode="paired", workers=2, processes=False):
    src = syn.open_synthetic("source", "train", num_images=30, height=32, width=64)
    tgt = syn.open_synthetic("target", "train", num_images=20, height=32, width=64)
    pls = lambda i: np.full((32, 64), syn.CAR, np.uint8)       # stand-in pseudo-labels
    sampler = pl.MixedSampler(tuple(range(0, 30, 3)), 20, 4, mode, seed=seed)
    return pl.MixedIterator(src, tgt, sampler, crop_size=(24, 40), target_labels=pls, scale_range=(0.7, 1.3),
                            mine_classes=(syn.POLE, syn.SIGN), process_index=process_index,
                            process_count=process_count, prefetch=prefetch, workers=workers, processes=processes)


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


def test_worker_processes_make_the_same_batches():
    """grain worker processes give the thread pool's batches, in order, also after a restored state."""
    pytest.importorskip("grain")
    with _iterator(mode="pooled", prefetch=0) as ref, _iterator(mode="pooled", workers=2, processes=True) as procs:
        want = [next(ref) for _ in range(7)]
        for e in want[:4]:
            got = next(procs)
            assert set(got) == set(e) and all(np.array_equal(got[k], e[k]) for k in e)
        procs.set_state({"epoch": 0, "step": 2})                   # restarts the workers at step 2
        for e in want[2:]:
            got = next(procs)
            assert all(np.array_equal(got[k], e[k]) for k in e)


def test_folder_sources_crop_as_their_decoded_records(tmp_path):
    """A reader's crop-first path (raw ids, remapped on the crop) gives the batches of its decoded
    records (trainIds) - label resizes and mining included."""
    from cbst_jax.data import open_dataset
    from tests.fixtures_layouts import make_cityscapes, make_gta5

    make_gta5(tmp_path / "gta5", n=6, size=(40, 72), mismatched=2)
    make_cityscapes(tmp_path / "cs", n_train=4, n_val=0, size=(36, 64))
    src, tgt = open_dataset("gta5", tmp_path / "gta5"), open_dataset("cityscapes", tmp_path / "cs", labelled=False)
    with pytest.warns(Warning):
        decoded = [src[i] for i in range(len(src))]
    images = [{"image": tgt[i]["image"]} for i in range(len(tgt))]
    pls = lambda i: np.full((36, 64), 13, np.uint8)            # stand-in pseudo-labels
    sampler = pl.MixedSampler(tuple(range(6)), 4, 5, "pooled", seed=3)
    kw = dict(crop_size=(24, 40), target_labels=pls, scale_range=(0.6, 1.4), mine_classes=(5, 6, 7, 11, 13),
              p_mine=0.9, process_index=0, process_count=1, prefetch=0)
    with pl.MixedIterator(src, tgt, sampler, **kw) as it:       # (the resize warnings came above)
        a = [next(it) for _ in range(3)]
    with pl.MixedIterator(decoded, images, sampler, **kw) as it:
        b = [next(it) for _ in range(3)]
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert (np.concatenate([x["label"] for x in a]) < 19).any()


def test_worker_settings():
    assert pl.default_workers() >= 1
    with _iterator(workers=-1) as it:
        assert it.parallelism == "threads"
    with _iterator(workers=0) as it:
        assert it.parallelism == "none"
    with pytest.raises(ValueError, match="processes=True"):
        _iterator(prefetch=0, processes=True)


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


# ------------------------------------------------------------------ benchmark smoke test
def test_pipeline_benchmark_smoke():
    """benchmarks/bench_pipeline.py runs end to end on tiny fixtures (its figures are measured at
    full size, docs/performance.md): every variant, the previous pipeline from git included."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-m", "benchmarks.bench_pipeline", "--quick", "--crop", "24,40",
                          "--rounds", "2", "--images", "2", "--workers", ""], cwd=root, capture_output=True,
                         text=True, timeout=600,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    names = {r["variant"] for r in rows if "variant" in r}
    assert {"old pipeline", "current pipeline", "plain PIL/numpy loader", "decode floor, Pillow"} <= names
    assert all(r["crops_per_core_s"] > 0 for r in rows if "crops_per_core_s" in r)
    assert "load_avg" in rows[-1]
