"""Folder readers on tiny fixtures in each official layout: records, label tables, names, counters, errors."""
import collections
import hashlib
import os
import re
import pickle
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

from cbst_jax import labels as L
from cbst_jax.data import DatasetError, DatasetWarning, check_disjoint, open_dataset, split_overlap, without_eval_overlap
from cbst_jax.data.overlap import image_hash
from cbst_jax.data.io import read_png_any_depth, resize_nearest
from fixtures_layouts import (make_bdd100k, make_cityscapes, make_gta5, make_nthu, make_synthia, write_list_file,
                              write_png16)

PIN_IDS = np.array([[7, 8, 11, 26, 33, 0, 22, 27]], np.uint8)  # Cityscapes labelIds, one row


def _write(path, array, mode):
    """Save an id map as 'L' or as 'P' (with a palette, as GTA5 ships them; without one Pillow re-indexes)."""
    im = Image.frombytes(mode, (array.shape[1], array.shape[0]), np.ascontiguousarray(array, np.uint8).tobytes())
    if mode == "P":
        im.putpalette(list(range(256)) * 3)
    im.save(path)


def _check_record(record, name, labelled=True):
    assert record["image"].dtype == np.uint8 and record["image"].ndim == 3 and record["image"].shape[2] == 3
    assert record["name"] == name
    if labelled:
        assert record["label"].dtype == np.uint8 and record["label"].shape == record["image"].shape[:2]
    else:
        assert "label" not in record


# ---------------------------------------------------------------- 16-bit PNG decoding

@pytest.mark.parametrize("channels", [3, 4])
@pytest.mark.parametrize("ftype", [0, 1, 2, 3, 4])
def test_png16_round_trip_every_filter(tmp_path, channels, ftype):
    rng = np.random.default_rng(ftype)
    array = rng.integers(0, 65536, (5, 7, channels)).astype(np.uint16)
    write_png16(tmp_path / "a.png", array, filters=(ftype,))
    decoded = read_png_any_depth(tmp_path / "a.png")
    assert decoded.dtype == np.uint16 and np.array_equal(decoded, array)
    # Pillow alone keeps only the high byte: same unfiltering, so it must agree with ours there.
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), (array >> 8).astype(np.uint8))


def test_png16_mixed_filters_and_grey(tmp_path):
    array = np.random.default_rng(0).integers(0, 65536, (9, 6, 3)).astype(np.uint16)
    write_png16(tmp_path / "m.png", array)  # rows cycle through all five filters
    assert np.array_equal(read_png_any_depth(tmp_path / "m.png"), array)
    grey = np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000
    write_png16(tmp_path / "g.png", grey)
    assert np.array_equal(read_png_any_depth(tmp_path / "g.png"), grey)


def test_trainid19_to_16_composes_to_the_cityscapes16_table():
    from cbst_jax.data.io import TRAINID19_TO_TRAINID16

    assert np.array_equal(TRAINID19_TO_TRAINID16[L.CITYSCAPES_ID_TO_TRAINID], L.CITYSCAPES_ID_TO_TRAINID16)


def test_resize_nearest_matches_pil():
    label = np.random.default_rng(0).integers(0, 19, (7, 11)).astype(np.uint8)
    ours = resize_nearest(label, (5, 13))
    pil = np.asarray(Image.fromarray(label).resize((13, 5), Image.NEAREST))
    assert np.array_equal(ours, pil)


# ---------------------------------------------------------------- GTA5

def test_gta5_records_palette_labels_and_pins(tmp_path):
    names = make_gta5(tmp_path, n=3)
    assert Image.open(tmp_path / "labels" / "00001.png").mode == "P"
    raw = np.asarray(Image.open(tmp_path / "labels" / "00001.png"))
    src = open_dataset("gta5", tmp_path, "train")
    assert len(src) == 3 and src.names == names == ["00001", "00002", "00003"]
    assert src.num_classes == 19 and src.has_labels
    rec = src[0]
    _check_record(rec, "00001")
    assert np.array_equal(rec["label"], L.CITYSCAPES_ID_TO_TRAINID[raw])
    pinned = np.zeros((32, 64), np.uint8)
    pinned[0, :8] = PIN_IDS
    _write(tmp_path / "labels" / "00002.png", pinned, "P")
    assert src[1]["label"][0, :8].tolist() == [0, 1, 2, 13, 18, 255, 9, 14]
    assert src[-1]["name"] == "00003"
    clone = pickle.loads(pickle.dumps(src))  # worker processes receive pickled sources
    assert clone.names == names and np.array_equal(clone[0]["label"], rec["label"])
    with pytest.raises(IndexError):
        src[3]


def test_gta5_size_mismatch_is_resized_and_counted(tmp_path):
    make_gta5(tmp_path, n=3, mismatched=2)
    src = open_dataset("gta5", tmp_path, "train")
    with pytest.warns(DatasetWarning, match="00001.png.*resized"):
        first = src[0]
    assert first["label"].shape == (32, 64)
    src[1], src[2]
    assert src.stats["resized_labels"] == 2 and src.resized_label_names == ["00001", "00002"]


def test_gta5_list_file_and_16_classes(tmp_path):
    make_gta5(tmp_path, n=4)
    lst = write_list_file(tmp_path / "filtered.txt", ["# CRST-style list", "00003.png", "images/00001.png", "00004"])
    src = open_dataset("gta5", tmp_path, "train", list_file=lst, num_classes=16)
    assert src.names == ["00003", "00001", "00004"] and src.num_classes == 16
    raw = np.asarray(Image.open(tmp_path / "labels" / "00003.png"))
    assert np.array_equal(src[0]["label"], L.CITYSCAPES_ID_TO_TRAINID16[raw])


def test_unknown_label_ids_become_255_and_are_counted(tmp_path):
    make_gta5(tmp_path, n=1)
    ids = np.full((32, 64), 7, np.uint8)
    ids[0, :5] = [34, 40, 200, 255, 33]
    _write(tmp_path / "labels" / "00001.png", ids, "P")
    src = open_dataset("gta5", tmp_path)
    with pytest.warns(DatasetWarning, match="4 pixels with ids outside"):
        label = src[0]["label"]
    assert label[0, :5].tolist() == [255, 255, 255, 255, 18] and (label[1:] == 0).all()
    assert src.stats["unknown_label_pixels"] == 4 and src.stats["unknown_label_images"] == 1


# ---------------------------------------------------------------- Cityscapes

def test_cityscapes_splits_names_and_pins(tmp_path):
    written = make_cityscapes(tmp_path, n_train=4, n_val=2, n_test=1)
    val = open_dataset("cityscapes", tmp_path, "val")
    assert val.names == written["val"] == ["frankfurt_000000_000019", "lindau_000001_000038"]
    rec = val[0]
    _check_record(rec, "frankfurt_000000_000019")
    label_path = tmp_path / "gtFine/val/frankfurt/frankfurt_000000_000019_gtFine_labelIds.png"
    assert Image.open(label_path).mode == "L"
    pinned = np.asarray(Image.open(label_path)).copy()
    pinned[0, :8] = PIN_IDS
    _write(label_path, pinned, "L")
    assert val[0]["label"][0, :8].tolist() == [0, 1, 2, 13, 18, 255, 9, 14]
    v16 = open_dataset("cityscapes", tmp_path, "validation", num_classes=16)
    assert v16[0]["label"][0, :8].tolist() == [0, 1, 2, 12, 15, 255, 255, 255]  # terrain, truck ignored
    test = open_dataset("cityscapes", tmp_path, "test")
    assert not test.has_labels and "label" not in test[0]
    target = open_dataset("cityscapes", tmp_path, "train", labelled=False)
    assert not target.has_labels and len(target) == 4
    _check_record(target[0], written["train"][0], labelled=False)


def test_cityscapes_13_classes_match_nthu_13(tmp_path):
    make_cityscapes(tmp_path / "cs", n_train=1, n_val=1)
    make_nthu(tmp_path / "nthu", cities=("Tokyo",), n_train=1, n_test=1)
    ids = np.arange(40, dtype=np.uint8).reshape(1, 40).repeat(32, 0)[:, :40]
    ids = np.pad(ids, ((0, 0), (0, 24)), constant_values=7)  # 32 x 64, every labelId 0..39 once per row
    cs_label = tmp_path / "cs/gtFine/val/frankfurt/frankfurt_000000_000019_gtFine_labelIds.png"
    nthu_label = tmp_path / "nthu/Tokyo/Labels/Test/pic_000_eval.png"
    _write(cs_label, ids, "L")
    _write(nthu_label, ids, "L")
    cs13 = open_dataset("cityscapes", tmp_path / "cs", "val", num_classes=13)
    nthu13 = open_dataset("nthu", tmp_path / "nthu", "test", city="tokyo", num_classes=13)
    assert cs13.num_classes == nthu13.num_classes == 13
    with pytest.warns(DatasetWarning):  # ids 34..39 are outside the labelId table
        a, b = cs13[0]["label"], nthu13[0]["label"]
    assert np.array_equal(a, b)
    want = {7: 0, 8: 1, 11: 2, 19: 3, 20: 4, 21: 5, 23: 6, 24: 7, 25: 8, 26: 9, 28: 10, 32: 11, 33: 12}
    assert a[0, :40].tolist() == [want.get(i, 255) for i in range(40)]
    train13 = open_dataset("cityscapes", tmp_path / "cs", "train", num_classes=13)
    assert set(np.unique(train13[0]["label"])) <= set(range(13)) | {255}
    with pytest.raises(DatasetError, match="num_classes=12, expected one of 19, 16, 13"):
        open_dataset("cityscapes", tmp_path / "cs", "val", num_classes=12)


def test_opening_nthu_cities_decodes_nothing(tmp_path):
    from cbst_jax.data import nthu

    assert nthu.CITIES == ("Rome", "Rio", "Tokyo", "Taipei")
    written = make_nthu(tmp_path, cities=nthu.CITIES, n_train=2, n_test=1)
    for city in nthu.CITIES:  # corrupt every image: opening must still work, reading must not
        for path in (tmp_path / city / "Images").rglob("*.jpg"):
            path.write_bytes(b"broken")
    for city in nthu.CITIES:
        train = open_dataset("nthu", tmp_path, "train", city=city, num_classes=13)
        test = open_dataset("nthu", tmp_path, "test", city=city, num_classes=13)
        assert (train.names, test.names) == (written[city]["train"], written[city]["test"])
        assert train.city == test.city == city
        with pytest.raises(DatasetError, match=f"{city}/Images/Test/pic_000.jpg: not a readable image"):
            test[0]


def test_cityscapes_list_file_forms(tmp_path):
    make_cityscapes(tmp_path, n_train=4, n_val=0)
    lst = write_list_file(tmp_path / "train.lst", [
        "bochum/bochum_000001_000038",
        "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png\tgtFine/train/aachen/x_gtFine_labelIds.png",
        "aachen_000002_000057",
        "bochum_000003_000076_leftImg8bit.png",
    ])
    src = open_dataset("cityscapes", tmp_path, "train", list_file=lst, labelled=False)
    assert src.names == ["bochum_000001_000038", "aachen_000000_000019", "aachen_000002_000057",
                         "bochum_000003_000076"]
    bad = write_list_file(tmp_path / "bad.lst", ["frankfurt/frankfurt_000000_000294"])
    with pytest.raises(DatasetError, match="bad.lst line 1: frankfurt_000000_000294 is not in leftImg8bit/train"):
        open_dataset("cityscapes", tmp_path, "train", list_file=bad)


def test_builtin_cityscapes_list_names_the_505_image_subset(tmp_path):
    from cbst_jax.data import lists

    assert "cityscapes_train_ClsConfSet" in lists.names()
    lines = open(lists.find("builtin:cityscapes_train_ClsConfSet")).read().splitlines()
    stems = [re.fullmatch(r"leftImg8bit/train/([a-z]+)/(\1_\d{6}_\d{6})_leftImg8bit\.png\t"
                          r"gtFine/train/\1/\2_gtFine_labelIds\.png", line).group(2) for line in lines]
    assert len(stems) == len(set(stems)) == 505 and stems == sorted(stems)
    cities = collections.Counter(s.rsplit("_", 2)[0] for s in stems)
    assert (len(cities), cities["hamburg"], cities["dusseldorf"]) == (18, 95, 8)  # reference-cbst.md §3
    # a Cityscapes train split holding these images plus others: the list selects exactly them
    make_cityscapes(tmp_path, n_val=0, size=(4, 8), stems={"train": stems + ["aachen_000999_000019"]})
    src = open_dataset("cityscapes", tmp_path, "train", list_file="builtin:cityscapes_train_ClsConfSet",
                       labelled=False)
    assert src.names == stems and len(src) == 505
    with pytest.raises(DatasetError, match="list_file builtin:nope: no such built-in list; available: "
                                           "builtin:cityscapes_train_ClsConfSet"):
        open_dataset("cityscapes", tmp_path, "train", list_file="builtin:nope")
    os.remove(tmp_path / "leftImg8bit/train/ulm/ulm_000084_000019_leftImg8bit.png")
    with pytest.raises(DatasetError, match="builtin:cityscapes_train_ClsConfSet line 450: ulm_000084_000019 is "
                                           "not in leftImg8bit/train"):
        open_dataset("cityscapes", tmp_path, "train", list_file="builtin:cityscapes_train_ClsConfSet")


def test_builtin_gta5_list_is_crst_filtered_19984(tmp_path):
    from cbst_jax.data import lists
    from cbst_jax.data.io import Item, select_by_list

    lines = open(lists.find("gta5_crst_19984")).read().splitlines()
    ids = [re.fullmatch(r"images/(\d{5})\.png\tlabels/\1\.png", line).group(1) for line in lines]
    assert len(ids) == len(set(ids)) == 19984 and ids == sorted(ids)
    assert (ids[0], ids[-1], 24966 - len(ids)) == ("00001", "24966", 4982)
    # the reader's list resolution on the 24,966 GTA5 names (no files needed to select)
    items = [Item(f"{i:05d}", f"images/{i:05d}.png") for i in range(1, 24967)]
    chosen = select_by_list(items, "builtin:gta5_crst_19984", "gta5")
    assert [item.name for item in chosen] == ids
    make_gta5(tmp_path, n=3)
    with pytest.raises(DatasetError, match=r"builtin:gta5_crst_19984 line 4: 'images/00004.png' is not an image"):
        open_dataset("gta5", tmp_path, "train", list_file="builtin:gta5_crst_19984")


def test_target_split_overlapping_eval_is_refused(tmp_path):
    make_cityscapes(tmp_path, n_train=2, n_val=2)
    val = open_dataset("cityscapes", tmp_path, "val")
    check_disjoint(open_dataset("cityscapes", tmp_path, "train", labelled=False), val)
    with pytest.raises(DatasetError, match="2 training images are evaluation images "
                                           r"\(frankfurt_000000_000019 = frankfurt_000000_000019, "):
        check_disjoint(open_dataset("cityscapes", tmp_path, "val", labelled=False), val)


# ---------------------------------------------------------------- evaluation overlap by content

def test_image_hash_compares_shape_and_pixels():
    a = np.arange(36, dtype=np.uint8).reshape(2, 6, 3)
    assert image_hash(a) == image_hash(a.copy()) == image_hash(np.asfortranarray(a))
    assert image_hash(a) != image_hash(a.reshape(4, 3, 3))  # same bytes, another shape
    b = a.copy()
    b[1, 5, 2] += 1
    assert image_hash(a) != image_hash(b)
    assert image_hash(a) == hashlib.sha1(b"(2, 6, 3)|" + a.dtype.str.encode() + b"|" + a.tobytes()).hexdigest()


def test_colliding_names_with_other_pixels_are_no_overlap(tmp_path):
    written = make_nthu(tmp_path, cities=("Rome",), n_train=3, n_test=2)
    assert set(written["Rome"]["test"]) <= set(written["Rome"]["train"])  # pic_000, pic_001 in both
    train = open_dataset("nthu", tmp_path, "train", city="Rome")
    test = open_dataset("nthu", tmp_path, "test", city="Rome")
    assert split_overlap(train, test, progress=False) == []
    check_disjoint(train, test, progress=False)
    adapt, report = without_eval_overlap(train, test, progress=False)
    assert adapt is train
    assert report == {"train_images": 3, "eval_images": 2, "shared_names": 2, "overlap_pairs": 0,
                      "train_images_in_eval": 0, "eval_images_in_train": 0, "allow_eval_overlap": False,
                      "excluded_train_images": 0, "adaptation_images": 3, "overlapping": [], "city": "Rome"}


def test_renamed_and_reencoded_copies_of_eval_images_are_found_and_left_out(tmp_path):
    make_nthu(tmp_path, cities=("Taipei",), n_train=3, n_test=3)
    images = tmp_path / "Taipei/Images"
    shutil.copy(images / "Test/pic_001.jpg", images / "Train/zz_renamed.jpg")  # same bytes, new name
    decoded = np.asarray(Image.open(images / "Test/pic_002.jpg").convert("RGB"))
    Image.fromarray(decoded).save(images / "Train/aa_as_png.png")  # other bytes, same decoded pixels
    train = open_dataset("nthu", tmp_path, "train", city="Taipei")
    test = open_dataset("nthu", tmp_path, "test", city="Taipei")
    assert train.names == ["aa_as_png", "pic_000", "pic_001", "pic_002", "zz_renamed"]
    assert split_overlap(train, test, progress=False) == [(0, 2), (4, 1)]
    with pytest.raises(DatasetError, match=r"2 training images are evaluation images \(aa_as_png = pic_002, "
                                           r"zz_renamed = pic_001\)"):
        check_disjoint(train, test, progress=False)

    adapt, report = without_eval_overlap(train, test, progress=False)
    assert adapt.names == ["pic_000", "pic_001", "pic_002"] and len(adapt) == 3
    assert np.array_equal(adapt[1]["image"], train[2]["image"]) and adapt[-1]["name"] == "pic_002"
    assert (adapt.num_classes, adapt.has_labels, adapt.city, adapt.dataset) == (19, False, "Taipei", "nthu")
    assert report["overlap_pairs"] == 2 and report["excluded_train_images"] == 2
    assert report["adaptation_images"] == 3 and report["shared_names"] == 3
    assert report["overlapping"] == [["aa_as_png", "pic_002"], ["zz_renamed", "pic_001"]]
    assert split_overlap(adapt, test, progress=False) == []
    clone = pickle.loads(pickle.dumps(adapt))  # worker processes receive pickled sources
    assert clone.names == adapt.names and np.array_equal(clone[0]["image"], adapt[0]["image"])

    published, report = without_eval_overlap(train, test, allow_overlap=True, progress=False)
    assert published is train
    assert report["allow_eval_overlap"] and report["eval_images_in_train"] == 2
    assert report["excluded_train_images"] == 0 and report["adaptation_images"] == 5


def test_hashes_are_computed_once_per_source():
    from cbst_jax.data import overlap

    class Counting:
        names = ["a", "b", "c"]

        def __init__(self, images):
            self.images, self.reads = images, 0

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):
            self.reads += 1
            return {"image": self.images[i], "name": self.names[i]}

    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (4, 5, 3), dtype=np.uint8) for _ in range(3)]
    train, evals = Counting(imgs), Counting([imgs[2], imgs[0]])
    assert split_overlap(train, evals, progress=False) == [(0, 1), (2, 0)]
    assert split_overlap(train, evals, progress=False) == [(0, 1), (2, 0)]
    assert overlap.exclude(train, [0, 2]).names == ["b"]
    assert overlap.content_hashes(overlap.exclude(train, [1]), progress=False) == [image_hash(imgs[0]),
                                                                                   image_hash(imgs[2])]
    assert (train.reads, evals.reads) == (3, 2)
    with pytest.raises(IndexError):
        overlap.SubsetSource(train, [3])


# ---------------------------------------------------------------- SYNTHIA

def test_synthia_16bit_labels_channel0_and_pins(tmp_path):
    make_synthia(tmp_path, n=2)
    raw = read_png_any_depth(tmp_path / "GT/LABELS/0000000.png")
    assert raw.dtype == np.uint16 and raw.shape == (32, 64, 3) and raw[..., 1].max() > 255
    pinned = raw.copy()
    pinned[0, :8, 0] = [3, 4, 2, 21, 1, 22, 16, 0]
    write_png16(tmp_path / "GT/LABELS/0000000.png", pinned)
    src = open_dataset("synthia", tmp_path)
    assert src.num_classes == 16 and src.names == ["0000000", "0000001"]
    rec = src[0]
    _check_record(rec, "0000000")
    assert rec["label"][0, :8].tolist() == [0, 1, 2, 3, 9, 255, 255, 255]
    assert np.array_equal(rec["label"], L.SYNTHIA_ID_TO_TRAINID16[pinned[..., 0]])
    crst = open_dataset("synthia", tmp_path, "train", lanemarking_as_road=True)
    assert crst[0]["label"][0, 5] == 0  # lanemarking -> road
    assert src.stats["unknown_label_pixels"] == 0


def test_synthia_rgba_labels_converted_labels_and_archive_root(tmp_path):
    make_synthia(tmp_path / "RAND_CITYSCAPES", n=1, channels=4)
    src = open_dataset("synthia", tmp_path, "all")  # the archive's top folder is found
    raw = read_png_any_depth(tmp_path / "RAND_CITYSCAPES/GT/LABELS/0000000.png")
    assert raw.shape[2] == 4
    assert np.array_equal(src[0]["label"], L.SYNTHIA_ID_TO_TRAINID16[raw[..., 0]])
    _write(tmp_path / "RAND_CITYSCAPES/GT/LABELS/0000000.png", raw[..., 0].astype(np.uint8), "L")
    assert np.array_equal(src[0]["label"], L.SYNTHIA_ID_TO_TRAINID16[raw[..., 0]])


# ---------------------------------------------------------------- BDD100K

@pytest.mark.parametrize("layout", ["10k", "seg"])
def test_bdd100k_both_layouts(tmp_path, layout):
    written = make_bdd100k(tmp_path, layout=layout)
    for root in (tmp_path, tmp_path / "bdd100k"):
        val = open_dataset("bdd100k", root, "val")
        assert val.names == written["val"] and val.has_labels
    rec = val[0]
    _check_record(rec, written["val"][0])
    mask = next(p for p in (tmp_path / "bdd100k").rglob(written["val"][0] + "*.png"))
    assert np.array_equal(rec["label"], np.asarray(Image.open(mask)))  # already trainIds
    test = open_dataset("bdd100k", tmp_path, "test")
    assert not test.has_labels and test[0]["image"].shape == (32, 64, 3)
    nthu13 = open_dataset("bdd100k", tmp_path, "val", num_classes=13)
    assert np.array_equal(nthu13[0]["label"], L.TRAINID_TO_NTHU13[rec["label"]])


# ---------------------------------------------------------------- NTHU

def test_nthu_city_splits_and_encodings(tmp_path):
    written = make_nthu(tmp_path, cities=("Rome", "Taipei"))
    train = open_dataset("nthu", tmp_path, "train", city="rome")
    assert not train.has_labels and train.names == written["Rome"]["train"]
    test = open_dataset("nthu", tmp_path, "test", city="Rome")
    label_path = tmp_path / "Rome/Labels/Test/pic_000_eval.png"
    raw = np.asarray(Image.open(label_path)).copy()
    raw[0, :6] = [7, 8, 11, 19, 33, 0]
    _write(label_path, raw, "L")
    assert test[0]["label"][0, :6].tolist() == [0, 1, 2, 6, 18, 255]
    assert open_dataset("nthu", tmp_path, "validation", city="Rome", num_classes=13)[0]["label"][0, :6].tolist() == \
        [0, 1, 2, 3, 12, 255]
    raw[0, :3] = [10, 18, 255]
    _write(label_path, raw, "L")
    as_trainid = open_dataset("nthu", tmp_path, "test", city="Rome", label_encoding="trainid")
    with pytest.warns(DatasetWarning):  # the fixture's other pixels hold labelIds above 18
        assert as_trainid[0]["label"][0, :3].tolist() == [10, 18, 255]
    as13 = open_dataset("nthu", tmp_path, "test", city="Rome", label_encoding="nthu13")
    with pytest.warns(DatasetWarning):
        assert as13[0]["label"][0, :3].tolist() == [15, 255, 255]  # 13-class index 10 = bus; 18 is not an index
    assert as13.stats["unknown_label_pixels"] >= 1
    with pytest.raises(DatasetError, match="city=None, expected one of Rome, Rio, Tokyo, Taipei"):
        open_dataset("nthu", tmp_path, "test")


# ---------------------------------------------------------------- errors

def test_missing_or_mislaid_root_names_layout(tmp_path):
    with pytest.raises(DatasetError, match=r"gta5: .*missing is not a directory; expected layout: <root>/images"):
        open_dataset("gta5", tmp_path / "missing")
    make_cityscapes(tmp_path / "cs", n_train=1, n_val=0)
    with pytest.raises(DatasetError, match=r"leftImg8bit/train is not a directory; expected layout"):
        open_dataset("cityscapes", tmp_path / "cs" / "leftImg8bit", "train")
    with pytest.raises(DatasetError, match=r"bdd100k: no train images under .*bdd100k/seg/images"):
        open_dataset("bdd100k", tmp_path / "cs", "train")
    (tmp_path / "syn" / "RGB").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"GT/LABELS is not a directory"):
        open_dataset("synthia", tmp_path / "syn")


def test_corrupt_and_truncated_images_name_the_file(tmp_path):
    make_gta5(tmp_path, n=2)
    data = (tmp_path / "images/00001.png").read_bytes()
    (tmp_path / "images/00001.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "images/00002.png").write_bytes(b"not a png at all")
    src = open_dataset("gta5", tmp_path)
    with pytest.raises(DatasetError, match=r"images/00001.png: corrupt or truncated image"):
        src[0]
    with pytest.raises(DatasetError, match=r"images/00002.png: not a readable image"):
        src[1]
    os.remove(tmp_path / "labels/00002.png")
    with pytest.raises(DatasetError, match=r"label .*labels/00002.png missing for image"):
        open_dataset("gta5", tmp_path)


def test_bad_names_options_and_splits(tmp_path):
    make_gta5(tmp_path, n=1)
    with pytest.raises(DatasetError, match="unknown dataset 'kitti'"):
        open_dataset("kitti", tmp_path)
    with pytest.raises(DatasetError, match="unknown option.*city.*accepted: list_file, num_classes"):
        open_dataset("gta5", tmp_path, "train", city="Rome")
    with pytest.raises(DatasetError, match="split 'val', expected 'train' or 'all'"):
        open_dataset("gta5", tmp_path, "val")
    with pytest.raises(DatasetError, match="test split has no public labels"):
        make_cityscapes(tmp_path / "cs", 1, 0, 1)
        open_dataset("cityscapes", tmp_path / "cs", "test", labelled=True)
    lst = write_list_file(tmp_path / "l.txt", ["00009.png"])
    with pytest.raises(DatasetError, match=r"l.txt line 1: '00009.png' is not an image"):
        open_dataset("gta5", tmp_path, list_file=lst)


def test_synthetic_names_delegate_lazily(monkeypatch):
    calls = []
    fake = types.ModuleType("cbst_jax.data.synthetic")
    fake.open_synthetic = lambda domain, split, **kw: calls.append((domain, split, kw)) or "source"
    monkeypatch.setitem(sys.modules, "cbst_jax.data.synthetic", fake)
    assert open_dataset("synthetic/target", None, "validation", size=8) == "source"
    assert calls == [("target", "validation", {"size": 8})]


def test_import_does_not_load_tensorflow_datasets():
    code = "import sys, cbst_jax.data; assert 'tensorflow_datasets' not in sys.modules and 'PIL' not in sys.modules"
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
